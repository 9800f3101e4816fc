"""Convolutions on the CPU that skip their entirely pruned output channels (issue #4, 3c).

`compact_conv(x, w_hat, bias, counts, conv)` = the convolution of `x` with the masked weight `w_hat`
(conv2d or conv_transpose2d, groups 1), where the rows (output channels) with keep count 0 are left
out of the GEMMs that they add nothing to:
- forward: only the live output channels are convolved (W_hat's live rows gathered); a pruned
  channel's output is its bias (or 0), written without a GEMM;
- input gradient: only the live channels of dy, against the live rows (a pruned row of W_hat is 0);
- weight gradient: every row, since dL/dW_hat of a pruned row is not 0 and its threshold gradient
  needs it (DESIGN.md §2: the sum runs over all j, pruned or not); the bias gradient as usual. Only the
  gradients the backward pass uses are computed (ops/_autograd.py): RG-GAN's G step, backward(inputs=G's
  parameters), runs no weight-gradient convolution for D's layers, as the plain convolution runs none.
The layer's `masked_weight` node turns dL/dW_hat into the weight and threshold gradients as on every
other path. The backward is written with differentiable ops, so create_graph (R1) works through it;
there the input gradient runs over every row, since its own derivative reaches the pruned rows of W_hat
(count_flops's executed step, which counts an ordinary step, then undercounts that input gradient).
Not taken under CPU autocast or forward-mode AD (the plain convolution handles both).

One difference from the plain convolution beyond rounding: a NaN or inf in the input does not reach the
output channels of pruned rows (which hold the bias, not 0 * NaN), nor, through dy of those channels,
the input gradient. The live channels propagate it as before.

On the GPU the fused Triton kernels do this (rgkernels/sparse_exec.py); on the CPU the convolutions
otherwise run masked_weight + oneDNN over all rows, and linear layers have their own node
(cpu_masked_linear.py). Reference: F.conv2d / F.conv_transpose2d on the same W_hat, which the tests
compare with in float64 for the output and every gradient.

When it pays: the gather of W_hat's live rows and the scatter of the output channels cost passes over
W and y, and the Python node ~50 us; on the 2-core Intel Xeon VM of BENCHMARKS.md (session 10, forward
+ backward, paired against the dense conv over all rows), with half the rows pruned: 0.66x for 3x3
256->256 on 8x8 at batch 64 (2.4 G multiply-adds), 0.79x for 128->128 (0.6 G), 0.86x for 64->64 on
16x16 at batch 16 (0.15 G), 0.93x at batch 4 (38 M), 1.36x for 16->16 on 8x8 at batch 2; with a
quarter pruned 0.87x / 0.95x for the first two, 0.99x at 0.15 G, 1.28x at 9 M; an eighth: 1.00x.
So a call is considered from a quarter of the rows dead and 10 M multiply-adds per thread (`TRY_FROM`;
below that it never paid), and then measured (`_choose`): at the first call of each layer shape,
convolution geometry, dtype, layout, gradients needed, share of dead rows in eighths, thread count and
which way the rule below takes, one
forward (+ backward where one follows) of each way on copies, in rotated rounds (sparse_exec's
`_cpu_times`), and the faster one is kept in sparse_exec's decisions ("compact" / "plain": in memory,
in the disk cache when one is set, and with each training run). The rule measured above
(`worth_compacting`: half the rows from 30 M multiply-adds per thread, a quarter from 300 M) is the
default that the other way must beat by 10% (`MARGIN`), and decides alone where a timing could make two
runs of one seed differ, cannot run or would be distorted (deterministic algorithms, a dispatch mode,
inference mode, anomaly detection, the profiler). The
margin is this VM's noise: in two paired benchmark runs on both cores with a smaller margin (none, then
3%), the timing chose the plain convolution once for StyleGAN2's D.conv4 and once for FastGAN's G.up8,
each with a quarter of the rows dead, where compaction was 5-14% faster in every one of 13 and 6 timings
of their own (BENCHMARKS.md, session 11).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .. import _backend, sparse_exec
from ._autograd import grads_needed, own_saved_tensors_hooks

# (share of entirely pruned rows, multiply-adds per thread of the dense forward from which it pays):
# the rule where nothing is measured
COMPACT_FROM = ((0.5, 3e7), (0.25, 3e8))
# from which share and multiply-adds per thread compaction is measured (below: the plain convolution)
TRY_FROM = (0.25, 1e7)
# the other way replaces the rule's where its measured time is at most this share of the rule's way's
MARGIN = 0.9
_FORCED: Optional[bool] = None  # tests: True / False take / skip the path whenever it applies
_MEMO: dict = {}  # the decision per call signature (sparse_exec.current_memo)


def worth_compacting(n_dead: int, cout: int, macs: float, threads: Optional[int] = None) -> bool:
    """Whether skipping `n_dead` of `cout` output channels saves time (module docstring)."""
    if n_dead <= 0 or cout <= 0:
        return False
    per_thread = macs / max(threads or torch.get_num_threads(), 1)
    return any(n_dead >= share * cout and per_thread >= work for share, work in COMPACT_FROM)


def worth_trying(n_dead: int, cout: int, macs: float, threads: Optional[int] = None) -> bool:
    """Whether compaction could pay at all (`TRY_FROM`), so that it is worth measuring."""
    share, work = TRY_FROM
    return n_dead > 0 and n_dead >= share * cout and macs / max(threads or torch.get_num_threads(), 1) >= work


def _choose(x: Tensor, w_hat: Tensor, bias: Optional[Tensor], live: Tensor, conv: tuple, n_dead: int,
            cout: int, macs: float) -> bool:
    """Whether this call skips its dead rows: forced (tests), else measured per call signature (module
    docstring), else the measured rule."""
    if _FORCED is not None:
        return _FORCED
    threads = torch.get_num_threads()
    if not worth_trying(n_dead, cout, macs, threads):
        return False
    rule = worth_compacting(n_dead, cout, macs, threads)
    if (torch.are_deterministic_algorithms_enabled() or torch.is_inference_mode_enabled()
            or torch.is_anomaly_enabled() or torch.autograd._profiler_enabled()
            or torch._C._len_torch_dispatch_stack() > 0):
        return rule
    on = torch.is_grad_enabled()
    grads = (on and x.requires_grad, on and w_hat.requires_grad, on and bias is not None and bias.requires_grad)
    bucket = round(8 * n_dead / cout)
    layout = _channels_last(x)
    # The rule's side is part of the signature: a bucket of eighths can straddle the rule's shares, and a
    # decision made against one default must not be reused where the other is the default.
    mkey = (tuple(x.shape), tuple(w_hat.shape), conv, x.dtype, bias is not None, grads, bucket, threads, layout,
            rule)
    memo = sparse_exec.current_memo(_MEMO)
    hit = memo.get(mkey)
    if hit is None:
        stride, padding, dilation, transposed, out_pad = conv
        key = (f"cpu_compact_conv|{'transposed' if transposed else 'conv'}|w{tuple(w_hat.shape)}|x{tuple(x.shape)}"
               f"|s{tuple(stride)}p{tuple(padding)}d{tuple(dilation)}op{tuple(out_pad)}"
               f"|{str(x.dtype).replace('torch.', '')}|bias{int(bias is not None)}"
               f"|grad{''.join(str(int(g)) for g in grads)}|dead{bucket}/8|threads{threads}"
               f"|{'channels_last' if layout else 'contiguous'}|rule_{'compact' if rule else 'plain'}")
        hit = sparse_exec.cached_decision(key)
        if hit is None:
            try:  # the rule's choice stays unless the other way is clearly faster (MARGIN)
                hit = sparse_exec.decide(key, _candidates(x, w_hat, bias, live, conv, grads),
                                         timer_all=sparse_exec._cpu_times, incumbent="compact" if rule else "plain",
                                         hysteresis=MARGIN)
            except RuntimeError as exc:  # e.g. inputs autograd cannot take: the rule, without retrying
                _backend.warn_once(f"cpu-compact-measure:{key}", f"rgkernels: cannot time the compacted CPU "
                                   f"convolution for {key} ({str(exc).splitlines()[0]}); using the rule")
                hit = "compact" if rule else "plain"
        memo[mkey] = hit
    return hit == "compact"


def _candidates(x, w_hat, bias, live, conv, grads):
    """One forward (+ backward when this call needs one) of each way, on copies: the layer, its tensors
    and their gradients are untouched, and the global random generator is not used."""
    with torch.no_grad():
        xx, w = x.detach().clone(), w_hat.detach().clone()
        b = None if bias is None else bias.detach().clone()
    for t, g in ((xx, grads[0]), (w, grads[1]), (b, grads[2])):
        if t is not None:
            t.requires_grad_(g)
    backward = any(grads)
    dy = []
    gen = torch.Generator(device="cpu").manual_seed(0)

    def run(compact: bool):
        with torch.set_grad_enabled(backward), own_saved_tensors_hooks():
            y = _CompactConv.apply(xx, w, b, live, conv) if compact else _conv(xx, w, b, conv)
            if backward:
                if not dy:
                    dy.append(torch.randn(y.shape, generator=gen, dtype=y.dtype, device=y.device))
                y.backward(dy[0])
        for t in (xx, w, b):
            if t is not None:
                t.grad = None

    return {"plain": lambda: run(False), "compact": lambda: run(True)}


def _conv(x: Tensor, w: Tensor, b: Optional[Tensor], conv: tuple) -> Tensor:
    return sparse_exec._layer_fn("conv_transpose" if conv[3] else "conv", conv)(x, w, b)


class _CompactConv(torch.autograd.Function):
    """y = conv(x, w_hat, bias) computed over the `live` output channels only (module docstring)."""

    @staticmethod
    def forward(ctx, x, w_hat, bias, live, conv):
        ch = 1 if conv[3] else 0  # output channels: dim 0 of a conv weight, dim 1 of a transposed conv's
        w_live = w_hat.index_select(ch, live)
        y_live = _conv(x, w_live, None if bias is None else bias.index_select(0, live), conv)
        shape = list(y_live.shape)
        shape[1] = w_hat.shape[ch]
        # the plain convolution's output layout: channels_last when its input or weight is (decided from
        # them, since y_live with one channel is contiguous in both layouts)
        fmt = torch.channels_last if _channels_last(x) or _channels_last(w_hat) else torch.contiguous_format
        y = y_live.new_zeros(shape).contiguous(memory_format=fmt)
        if bias is not None:  # a pruned channel's output is its bias
            y.copy_(bias.view(1, -1, 1, 1).expand_as(y))
        y.index_copy_(1, live, y_live)
        ctx.save_for_backward(x, w_hat, w_live, live)  # w_live: not gathered twice (a pass over W)
        ctx.conv, ctx.has_bias = conv, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_hat, w_live, live = ctx.saved_tensors
        stride, padding, dilation, transposed, out_pad = ctx.conv
        conv_bwd = torch.ops.aten.convolution_backward
        need_x, need_w, need_b = grads_needed(ctx, (True, True, ctx.has_bias))
        dx = g = db = None
        if need_x and torch.is_grad_enabled():
            # create_graph (R1): dx's own derivative with respect to a pruned row of W_hat is not 0 (dx is
            # linear in every row, zero or not), and the threshold gradient needs it: every row then
            dx = conv_bwd(dy, x, w_hat, None, stride, padding, dilation, transposed, out_pad, 1,
                          [True, False, False])[0]
        elif need_x:
            dx = conv_bwd(dy.index_select(1, live), x, w_live, None, stride, padding, dilation, transposed,
                          out_pad, 1, [True, False, False])[0]
        if need_w or need_b:
            bias_sizes = [w_hat.shape[1 if transposed else 0]] if ctx.has_bias else None
            _, g, db = conv_bwd(dy, x, w_hat, bias_sizes, stride, padding, dilation, transposed, out_pad, 1,
                                [False, need_w, ctx.has_bias and need_b])
        return dx, g, db, None, None


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def conv_args(layer, x: Tensor, output_size=None) -> Optional[tuple]:
    """(stride, padding, dilation, transposed, output_padding) of a Conv2d / ConvTranspose2d layer as
    the fused path takes them (sparse_exec._conv_args), or None where this path does not take the layer
    (groups, padding modes, asymmetric "same" padding, inputs that are not 4-d batches)."""
    if layer.groups != 1 or layer.padding_mode != "zeros" or x.dim() != 4 or sparse_exec._conv_padding(layer) is None:
        return None
    return sparse_exec._conv_args(layer, x, output_size)


def compact_conv(x: Tensor, w_hat: Tensor, bias: Optional[Tensor], counts: Tensor,
                 conv: Sequence) -> Optional[Tuple[Tensor, Tensor]]:
    """(y, [number of live channels]) with the pruned output channels skipped, or None where that
    would not pay or does not apply (then the caller runs the plain convolution on `w_hat`).

    `counts`: the keep counts of `w_hat`'s rows (CPU). Reading them here is no device sync: this path
    takes CPU tensors only."""
    if torch.compiler.is_compiling():
        return None  # a data-dependent shape would break a compiled graph
    # The size first, from shapes alone: most calls of small layers stop here (this runs in every CPU conv
    # forward, so the cheap checks come first).
    transposed = conv[3]
    ws = w_hat.shape
    cout, cin = (ws[1], ws[0]) if transposed else (ws[0], ws[1])
    macs = float(x.shape[0]) * _out_positions(x, w_hat, conv) * cout * cin * ws[2] * ws[3]
    if x.shape[0] == 0 or (_FORCED is None and not worth_trying(cout, cout, macs)):
        return None  # an empty batch, or too small to pay even with every row dead
    if x.device.type != "cpu" or w_hat.device.type != "cpu" or counts.device.type != "cpu":
        return None
    if counts.shape != (cout,):
        return None
    if torch.is_autocast_enabled("cpu") or x.dtype != w_hat.dtype or (bias is not None and bias.dtype != w_hat.dtype):
        # autocast's casts inside the node's forward would not be in the graph (its backward would get
        # dy in another dtype than x and W_hat); mismatched dtypes get the plain convolution's own error
        return None
    if forward_ad._current_level >= 0:
        return None  # forward-mode AD (dual tensors): the node has no jvp, the plain convolution has
    live = torch.nonzero(counts > 0).flatten()
    n_live = live.numel()
    if n_live == 0 or n_live == cout:
        # nothing to convolve (the plain convolution of a zero weight is cheap enough), or nothing to skip
        return None
    conv = tuple(tuple(c) if isinstance(c, (list, tuple)) else c for c in conv)
    if not _choose(x, w_hat, bias, live, conv, cout - n_live, cout, macs):
        return None
    y = _CompactConv.apply(x, w_hat, bias, live, conv)
    return y, torch.tensor([n_live], dtype=torch.int64)


def _out_positions(x: Tensor, w_hat: Tensor, conv: Sequence) -> int:
    """Output positions per image (for a transposed conv: input positions, each scattering a kernel)."""
    stride, padding, dilation, transposed, _ = conv
    if transposed:
        return x.shape[2] * x.shape[3]
    n = 1
    for i in range(2):
        n *= max((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w_hat.shape[2 + i] - 1) - 1) // stride[i] + 1, 0)
    return n
