"""Masked linear on the CPU in one autograd node: `masked_linear_cpu(x, W, t, b)` = F.linear(x, W * M, b).

Two GEMM paths (csrc/cpu/masked_linear_cpu.cpp):
- ATen's GEMMs (MKL / oneDNN; any dtype): the compiled masked-weight forward writes W_hat (mask, keep
  counts, collapse guard) and the GEMMs run on it, exactly as `F.linear(x, masked_weight(W, t), b)`;
  the backward runs the weight-gradient GEMM in blocks of output rows with the masked-weight backward
  (threshold gradient, masked weight gradient, DESIGN.md §2) applied to each block while in cache.
- oneDNN's micro-kernel (float32; csrc/cpu/ukernel_masked_linear.cpp): the mask of a block of 64
  weight rows goes into a buffer in cache and the micro-kernel reads it from there, so W_hat is never
  written to memory; the backward computes the blocks' mask again from W and t.
Against the composition of two autograd nodes this saves the weight-sized round trips through memory
and one node's Python overhead, which on layers with little work per weight (linear layers at GAN
batch sizes) is most of the cost of sparse mode. Both hand the layer the mask bit-packed.

Reference: the composition itself (`masked_weight`, then F.linear), which the masked layers run
wherever this path does not apply (`applies` says when it does), on the backend `masked_weight`
picks (the compiled CPU kernels when built, else the PyTorch reference); the tests compare the
node with it on the reference backend.

GEMMs: float32 layers can run them on oneDNN's micro-kernel blocks or on ATen's (MKL / oneDNN)
GEMMs, and which is faster depends on the CPU and the shape (BENCHMARKS.md). `gemm_choice` times
both once per layer shape and thread count (forward + backward on copies) and keeps the faster, in
the execution decisions of rgkernels.sparse_exec (memory, and RGKERNELS_EXEC_CACHE's file when set).
A choice pinned with RGKERNELS_CPU_GEMM=aten|ukernel (or `rgkernels._C.set_cpu_gemm`) applies to
every layer instead.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from .. import _backend
from . import masked_weight
from ._autograd import grads_needed, own_saved_tensors_hooks

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def applies(x: Tensor, weight: Tensor, threshold: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether `masked_linear_cpu` can run this call: inputs of the weight's width, CPU tensors of one
    supported dtype, a float32 threshold, the compiled CPU backend chosen (not overridden), no CPU
    autocast, no forward-mode AD."""
    dt = weight.dtype
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return False  # the layer's generic path raises F.linear's / the conv's own message
    if x.dtype != dt or dt not in _DTYPES or threshold.dtype != torch.float32 or weight.device.type != "cpu":
        return False
    if bias is not None and bias.dtype != dt:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if forward_ad._current_level >= 0:
        return False  # forward-mode AD (dual tensors): the C++ node has no jvp, the composition has
    return _backend.cpu_kernels_chosen()


class _MaskedLinearCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, threshold, bias, grad_mode_id, guard_ratio):
        w_hat, counts = torch.ops.rgkernels.masked_weight_fwd.default(weight, threshold, guard_ratio)  # guard: may reset t
        flat = x.dim() != 2  # F.linear's leading dims, flattened for the GEMMs
        x2 = x.reshape(-1, x.shape[-1]) if flat else x
        y = torch.addmm(bias, x2, w_hat.t()) if bias is not None else torch.mm(x2, w_hat.t())
        ctx.save_for_backward(x, weight, w_hat)  # x, not x2: an input stays differentiable (create_graph)
        ctx.threshold = threshold  # not saved_tensors: see masked_weight._MaskedWeightFn.forward
        ctx.grad_mode_id = grad_mode_id
        ctx.x_shape = x.shape if flat else None
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(w_hat, counts)
        # No zero-filled gradients for W_hat and the counts (never differentiated): materialising them
        # cost a weight-sized allocation and fill per backward, more than the masked-weight backward.
        ctx.set_materialize_grads(False)
        if flat:
            y = y.view(*x.shape[:-1], weight.shape[0])
        return y, w_hat, counts

    @staticmethod
    def backward(ctx, dy, _dw_hat, _dcounts):
        x, weight, w_hat = ctx.saved_tensors
        need_x, need_w, need_t, need_b = grads_needed(ctx, (True, True, True, ctx.has_bias))
        if dy is None:  # y did not reach the loss
            return None, None, None, None, None, None
        flat = ctx.x_shape is not None
        x2 = x.reshape(-1, x.shape[-1]) if flat else x
        dy2 = dy.reshape(-1, dy.shape[-1]) if flat else dy
        if torch.is_grad_enabled():  # create_graph=True (R1 & co. differentiate the input gradient)
            gx, gw, gt = differentiable_grads(x, weight, ctx.threshold, dy, ctx.grad_mode_id, (need_x, need_w, need_t))
            gb = dy2.sum(0) if need_b and ctx.has_bias else None
            return gx, gw, gt, gb, None, None
        elif need_w or need_t:
            gx, gw, gt, gb = torch.ops.rgkernels.masked_linear_bwd.default(
                dy2, x2, weight, w_hat, ctx.threshold, ctx.grad_mode_id, need_x, need_b and ctx.has_bias)
        else:  # only the input (and bias) gradient: no weight-gradient GEMM at all
            gx = dy2.mm(w_hat) if need_x else None
            gb = dy2.sum(0) if need_b and ctx.has_bias else None
            gw = gt = None
        if not need_x:
            gx = None
        elif ctx.x_shape is not None:
            gx = gx.view(ctx.x_shape)
        return (gx, gw if need_w else None, gt if need_t else None, gb if need_b and ctx.has_bias else None,
                None, None)


def differentiable_grads(x, weight, threshold, dy, grad_mode_id, needs):
    """(dx, dW, dt) as a graph for create_graph=True backward passes (also called by the C++ node)."""
    return masked_weight.differentiable_grads(F.linear, x, weight, threshold, dy, grad_mode_id, needs)


_cpp_ready = False


def _cpp_node():
    """The C++ autograd node of `rgkernels._C` (None without it), its double backward registered."""
    global _cpp_ready
    if _cpp_ready:
        return _backend.extension().masked_linear_cpu
    ext = _backend.extension()
    if ext is None or not hasattr(ext, "masked_linear_cpu"):
        return None
    ext._set_double_backward(differentiable_grads)
    _cpp_ready = True
    return ext.masked_linear_cpu


def masked_linear_cpu(x: Tensor, weight: Tensor, threshold: Tensor, bias: Optional[Tensor],
                      grad_mode_id: int, guard_ratio: float, impl: Optional[str] = None,
                      gemm: int = -1) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(y, mask record, keep counts, live rows) of F.linear(x, W * M, b), with the gradients of DESIGN.md §2.

    Mask record: with the C++ node, the mask bit-packed (uint8 [out, ceil(in / 8)], entry j in bit j % 8
    of byte j / 8, as rgkernels.ops.triton_mask_stats.unpack_bits reads it); with the Python node, W_hat.

    `weight` is [out, in] (any strides), `threshold` float32 [out] (reset in place by the collapse
    guard, `guard_ratio` < 0 disables it), `grad_mode_id` 0 = "dst", 1 = "masked". Check `applies`
    first; the mask record and the counts are for the layer's statistics (not differentiable). Live
    rows: with the C++ node, entirely pruned output channels (keep count 0) are left out of the forward
    and input-gradient GEMMs where they are >= 1/2 of the layer (ATen's GEMMs) or of a block of 64 rows
    (the micro-kernel); it is then an int64 [1] tensor holding the channels the GEMMs ran (for
    executed-FLOP accounting), else None.

    `impl`: "cpp" (the node in C++: no Python in the forward and backward calls, which on small
    layers is a visible share of the step; the default), or "python" (the same node as an
    autograd.Function; always used under torch.compile, which traces it through the ops' fake
    implementations).

    `gemm` (C++ node only): 0 ATen's GEMMs, 1 the micro-kernel, -1 the process-wide choice (see
    `gemm_choice`; a pinned choice always wins)."""
    if impl != "python" and not torch.compiler.is_compiling():
        node = _cpp_node()
        if node is not None:
            return node(x, weight, threshold, bias, grad_mode_id, guard_ratio, gemm)
        if impl == "cpp":
            raise RuntimeError("masked_linear_cpu: the C++ node needs the compiled extension")
    return (*_MaskedLinearCPU.apply(x, weight, threshold, bias, grad_mode_id, guard_ratio), None)


# ---- the GEMM path per layer shape, by measurement -----------------------------------------------

GEMMS = ("aten", "ukernel")  # the C++ node's `gemm` argument is the index
_UNMEASURABLE = set()  # keys whose timing run failed: the process-wide path, without retrying
# (rows, out, in, bias, threads) -> the decided path, through sparse_exec.current_memo: the forward of
# every CPU masked linear asks, and building the decision key costs more than the lookup.
_MEMO: dict = {}
_sparse_exec = None  # rgkernels.sparse_exec, imported at the first call (it imports this package)


def gemm_choice(x2: Tensor, weight: Tensor, threshold: Tensor, bias: Optional[Tensor], grad_mode_id: int,
                guard_ratio: float) -> int:
    """The node's `gemm` argument for this call: the faster GEMM path for its shapes (measured at the
    first call of each shape, see the module docstring), or -1 where there is nothing to choose (a
    pinned choice, no micro-kernel here, not float32, inside torch.compile, deterministic algorithms
    (checked first), inference mode (no backward to time) or a dispatch mode (it would see, and count,
    the timing runs). A shape already
    decided returns its path without those checks: where they apply, the node ignores the argument (a
    pinned choice wins, a dispatch mode or another dtype runs ATen's GEMMs, torch.compile runs the
    Python node)."""
    global _sparse_exec
    if torch.compiler.is_compiling():
        return -1
    if torch.are_deterministic_algorithms_enabled():
        # The two paths differ in the last bits, and a choice by timing could differ between two runs
        # of the same seed: the process-wide path instead, also for shapes decided before the setting.
        return -1
    if _sparse_exec is None:
        from .. import sparse_exec as _se

        _sparse_exec = _se
    sparse_exec = _sparse_exec
    o, k = weight.shape
    mkey = (x2.numel() // max(k, 1), o, k, bias is not None, torch.get_num_threads())
    memo = sparse_exec.current_memo(_MEMO)
    hit = memo.get(mkey)
    if hit is not None:
        return hit
    ext = _backend.extension()
    if (ext is None or weight.dtype != torch.float32 or not hasattr(ext, "cpu_gemm_pinned")
            or torch.is_inference_mode_enabled() or ext.cpu_gemm_pinned()
            or not ext.cpu_ukernel_available() or torch._C._len_torch_dispatch_stack() > 0):
        return -1
    if x2.shape[-1] != k:  # a wrong input: the node raises F.linear's error; nothing to time (or to
        return -1          # mark unmeasurable for the valid inputs of the same key)
    rows, _, _, has_bias, threads = mkey
    key = f"cpu_gemm|rows{rows}|w{(o, k)}|bias{int(has_bias)}|threads{threads}"
    hit = sparse_exec.cached_decision(key)
    if hit is None:
        if key in _UNMEASURABLE:
            return -1
        try:
            hit = sparse_exec.decide(key, _gemm_candidates(x2, weight, threshold, bias, grad_mode_id, guard_ratio),
                                     timer_all=sparse_exec._cpu_times)
        except RuntimeError as exc:  # e.g. inputs autograd cannot take: run the process-wide path
            _UNMEASURABLE.add(key)
            _backend.warn_once(f"cpu-gemm-measure:{key}", f"rgkernels: cannot time the CPU GEMM paths for {key} "
                                                          f"({str(exc).splitlines()[0]}); using the default")
            return -1
    memo[mkey] = GEMMS.index(hit)
    return memo[mkey]


def _gemm_candidates(x2, weight, threshold, bias, grad_mode_id, guard_ratio):
    """One forward + backward of the node per GEMM path, on copies (the layer is untouched)."""
    with torch.no_grad():
        x, w, t = x2.detach().clone(), weight.detach().clone(), threshold.detach().clone()
        b = None if bias is None else bias.detach().clone().requires_grad_()
        gen = torch.Generator().manual_seed(0)  # not the global generator: training stays reproducible
        dy = torch.randn(x.numel() // max(w.shape[1], 1), w.shape[0], generator=gen).reshape(*x.shape[:-1], w.shape[0])
    for a in (x, w, t):
        a.requires_grad_()
    node = _cpp_node()

    def run(gemm):
        with torch.enable_grad(), own_saved_tensors_hooks():
            node(x, w, t, b, grad_mode_id, guard_ratio, gemm)[0].backward(dy)
        x.grad = w.grad = t.grad = None
        if b is not None:
            b.grad = None

    return {name: (lambda g=i: run(g)) for i, name in enumerate(GEMMS)}
