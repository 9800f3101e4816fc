"""`masked_weight`: W_hat = W * S(|W| - t) with the threshold and weight gradients of DESIGN.md §2.

One kernel launch for the forward (mask, masked weight, per-row keep counts, collapse guard) and
one for the backward (threshold gradient and masked weight gradient in one pass over W, t, g).
`masked_weight_grouped` does the same for every masked layer of a network in one launch each way.

The backends (compiled CUDA / CPU, Triton, PyTorch reference) are custom ops; this module checks
the inputs, picks the backend (rgkernels._backend) and wraps them in autograd Functions.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from . import reference

GRAD_MODES = reference.GRAD_MODES
DEFAULT_GUARD_RATIO = 0.01  # DESIGN.md §1: keep ratio <= 1% resets the layer's threshold


def _ops(backend: str):
    """(fwd, bwd, grouped_fwd, grouped_bwd) of a backend, as torch.ops callables."""
    ns = torch.ops.rgkernels
    if backend in ("cpu", "cuda"):  # one compiled op, dispatched on the tensors' device
        return ns.masked_weight_fwd, ns.masked_weight_bwd, ns.masked_weight_grouped_fwd, ns.masked_weight_grouped_bwd
    if backend == "triton":
        from . import triton_masked_weight  # noqa: F401  (registers the ops)

        return (ns.triton_masked_weight_fwd, ns.triton_masked_weight_bwd,
                ns.triton_masked_weight_grouped_fwd, ns.triton_masked_weight_grouped_bwd)
    return (ns.ref_masked_weight_fwd, ns.ref_masked_weight_bwd,
            ns.ref_masked_weight_grouped_fwd, ns.ref_masked_weight_grouped_bwd)


def guard_value(guard_ratio: Optional[float]) -> float:
    """The ops' encoding of the collapse guard: -1 for None (off), else the keep ratio, in [0, 1).

    Checked because a value out of range fails silently: 1 (meant as 1%) or more resets every
    threshold on every call, so nothing is ever pruned; a negative one or NaN turns the guard off."""
    if guard_ratio is None:
        return -1.0
    g = float(guard_ratio)
    if not 0.0 <= g < 1.0:  # NaN fails this too
        raise ValueError(f"guard_ratio must be None (no guard) or a keep ratio in [0, 1), such as 0.01; "
                         f"got {guard_ratio!r}")
    return g


def _grad_mode_id(grad_mode: str) -> int:
    try:
        return GRAD_MODES[grad_mode]
    except KeyError:
        raise ValueError(f"grad_mode must be one of {sorted(GRAD_MODES)}, got {grad_mode!r}") from None


def _check(weight: Tensor, threshold: Tensor, where: str = "masked_weight") -> None:
    if not isinstance(weight, Tensor) or not isinstance(threshold, Tensor):
        raise TypeError(f"{where}: weight and threshold must be tensors")
    if not weight.is_floating_point():
        raise TypeError(f"{where}: weight must be a floating-point tensor, got {weight.dtype}")
    if not threshold.is_floating_point():
        raise TypeError(f"{where}: threshold must be a floating-point tensor, got {threshold.dtype}")
    if weight.dim() < 1:
        raise ValueError(f"{where}: weight must have at least 1 dimension (output channels first)")
    if threshold.dim() != 1 or threshold.shape[0] != weight.shape[0]:
        raise ValueError(f"{where}: threshold must have shape [{weight.shape[0]}] (one entry per output "
                         f"channel of a weight of shape {tuple(weight.shape)}), got {tuple(threshold.shape)}")
    if weight.device != threshold.device:
        raise ValueError(f"{where}: weight is on {weight.device} but threshold is on {threshold.device}")


def _as_rows(weight: Tensor) -> Tensor:
    """[C, ...] -> a [C, K] view (a copy only when the trailing dims cannot be merged)."""
    c = weight.shape[0]
    k = 1
    for s in weight.shape[1:]:
        k *= s
    return weight.reshape(c, k)


def _resolve(weight: Tensor, threshold: Tensor, backend: Optional[str]) -> str:
    name = _backend.choose(weight.device.type, backend)
    # The compiled and Triton kernels take float32 thresholds and fp32/fp16/bf16(/fp64 on CPU)
    # weights; anything else (a float64 threshold in a float64 reference check, say) runs the
    # reference, with a warning.
    if name != "reference" and threshold.dtype != torch.float32:
        if backend is not None:
            raise TypeError(f"masked_weight: the {name} backend needs a float32 threshold, got {threshold.dtype}")
        _backend.warn_once(f"threshold-dtype:{threshold.dtype}",
                           f"rgkernels: threshold dtype {threshold.dtype} is not float32; "
                           f"using the reference backend for it")
        return "reference"
    return name


class _MaskedWeightFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, threshold, grad_mode_id, guard_ratio, backend):
        w2 = _as_rows(weight)
        fwd, bwd, _, _ = _ops(backend)
        out, counts = fwd(w2, threshold, guard_ratio)  # may reset `threshold` in place (guard)
        ctx.save_for_backward(weight)
        # Not saved with save_for_backward: the reference and Triton ops (torch.library custom ops that
        # declare the mutation) bump the threshold's version in every call, and a layer used twice
        # before one backward (D(real), D(fake)) would fail autograd's check; the compiled ops never
        # bump it. The only real write is the collapse guard, which fires in the first call of a step
        # and leaves t = 0 for the next ones: the value the
        # backward reads is the one the forward used, unless the caller changes the threshold between
        # a forward and its backward (which autograd cannot report here; README, "converting your own
        # model").
        ctx.threshold = threshold
        ctx.bwd = bwd
        ctx.grad_mode_id = grad_mode_id
        ctx.mark_non_differentiable(counts)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the counts in every backward
        return (out if weight.dim() == 2 else out.view(weight.shape)), counts  # (a view costs ~1 us)

    @staticmethod
    def backward(ctx, grad_out, _grad_counts):
        (weight,) = ctx.saved_tensors
        threshold = ctx.threshold
        if grad_out is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None
        gw, gt = ctx.bwd(_as_rows(grad_out), _as_rows(weight), threshold, ctx.grad_mode_id)
        gw = gw.view(weight.shape) if ctx.needs_input_grad[0] else None
        gt = gt if ctx.needs_input_grad[1] else None
        return gw, gt, None, None, None


def masked_weight(
    weight: Tensor,
    threshold: Tensor,
    grad_mode: str = "dst",
    *,
    guard_ratio: Optional[float] = DEFAULT_GUARD_RATIO,
    backend: Optional[str] = None,
    return_counts: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """W * S(|W| - t) with RG-GAN's gradients (DESIGN.md §2).

    Args:
        weight: [C_out, ...] weight (any float dtype, any strides).
        threshold: [C_out] threshold, float32 for the fast backends. Reset to 0 in place when
            the collapse guard fires.
        grad_mode: "dst" (default; what the published results used) or "masked".
        guard_ratio: keep ratio at or under which the threshold is reset (None disables the guard).
        backend: force "cuda", "triton", "cpu" or "reference" (default: chosen per device).
        return_counts: also return the int32 keep counts per output channel.
    """
    _check(weight, threshold)
    gm = _grad_mode_id(grad_mode)
    g = guard_value(guard_ratio)
    name = _resolve(weight, threshold, backend)
    node = _cpp_node() if name in ("cpu", "cuda") and not torch.compiler.is_compiling() else None
    if node is not None:  # the same node in C++: no Python in the forward's apply nor in the backward
        out, counts = node(weight, threshold, gm, g)
    else:
        out, counts = _MaskedWeightFn.apply(weight, threshold, gm, g, name)
    return (out, counts) if return_counts else out


CPP_NODE = True  # False: the compiled backends' calls go through _MaskedWeightFn (tests compare the two)


def _cpp_node():
    """`rgkernels._C.masked_weight_autograd` (csrc/masked_weight_node.cpp): _MaskedWeightFn in C++, for
    the compiled backends. On small layers a step is bound by the host's time per call, and a Python
    autograd.Function's backward, called by the engine under the GIL, is a visible share of it. None
    without the extension (or one built before it), when CPP_NODE is False, and under torch.compile,
    which traces the Python Function."""
    ext = _backend.extension()
    return getattr(ext, "masked_weight_autograd", None) if CPP_NODE else None


class _GroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n, grad_mode_id, guard_ratio, backend, *tensors):
        weights, thresholds = list(tensors[:n]), list(tensors[n:])
        _, _, gfwd, gbwd = _ops(backend)
        flat_out, flat_counts = gfwd([_as_rows(w) for w in weights], thresholds, guard_ratio)
        outs = [o.view(w.shape) for o, w in zip(flat_out.split([w.numel() for w in weights]), weights)]
        counts = list(flat_counts.split([w.shape[0] for w in weights]))
        ctx.save_for_backward(*weights)
        ctx.thresholds = thresholds  # not saved_tensors: see _MaskedWeightFn.forward
        ctx.n, ctx.gbwd, ctx.grad_mode_id = n, gbwd, grad_mode_id
        ctx.mark_non_differentiable(*counts)
        return (*outs, *counts)

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n
        weights, thresholds = ctx.saved_tensors, ctx.thresholds
        gws, gts = ctx.gbwd([_as_rows(g) for g in grads[:n]], [_as_rows(w) for w in weights],
                            list(thresholds), ctx.grad_mode_id)
        gws = [g.view(w.shape) for g, w in zip(gws, weights)]
        return (None, None, None, None, *gws, *gts)


def masked_weight_grouped(
    weights: Sequence[Tensor],
    thresholds: Sequence[Tensor],
    grad_mode: str = "dst",
    *,
    guard_ratio: Optional[float] = DEFAULT_GUARD_RATIO,
    backend: Optional[str] = None,
) -> Tuple[List[Tensor], List[Tensor]]:
    """`masked_weight` for many layers at once: one launch forward, one launch backward.

    Returns (masked weights, keep counts), in the order of `weights`. All tensors must be on one
    device; layers of different dtypes are allowed (one launch per dtype). The masked weights are
    views into one flat buffer per dtype.
    """
    weights, thresholds = list(weights), list(thresholds)
    if len(weights) != len(thresholds):
        raise ValueError(f"masked_weight_grouped: {len(weights)} weights but {len(thresholds)} thresholds")
    if not weights:
        return [], []
    for i, (w, t) in enumerate(zip(weights, thresholds)):
        _check(w, t, where=f"masked_weight_grouped (layer {i})")
        if w.device != weights[0].device:
            raise ValueError(f"masked_weight_grouped: layer {i} is on {w.device}, layer 0 on {weights[0].device}")
    gm = _grad_mode_id(grad_mode)
    g = guard_value(guard_ratio)
    # One launch per dtype (the kernels write one flat buffer per call); usually a single group.
    groups = {}
    for i, w in enumerate(weights):
        groups.setdefault(w.dtype, []).append(i)
    outs: List[Optional[Tensor]] = [None] * len(weights)
    counts: List[Optional[Tensor]] = [None] * len(weights)
    for idx in groups.values():
        ws, ts = [weights[i] for i in idx], [thresholds[i] for i in idx]
        names = {_resolve(w, t, backend) for w, t in zip(ws, ts)}
        name = "reference" if "reference" in names else names.pop()
        res = _GroupedFn.apply(len(idx), gm, g, name, *ws, *ts)
        for j, i in enumerate(idx):
            outs[i], counts[i] = res[j], res[len(idx) + j]
    return outs, counts


def differentiable_grads(layer_fn, x: Tensor, weight: Tensor, threshold: Tensor, dy: Tensor, grad_mode_id: int,
                         needs: Sequence[bool]) -> List[Optional[Tensor]]:
    """(dx, dW, dt) of `layer_fn(x, W * M)` as a graph, for the backward passes with create_graph=True
    (a gradient penalty differentiates the input gradient again) of the fused masked-layer nodes, whose
    own backward kernels are not differentiable: the masked_weight composition recomputed with the
    threshold the forward used (its collapse guard already ran, so it is off here) and differentiated
    by autograd. Costs one extra forward; only such passes take it. `needs`: which of the three."""
    grad_mode = {v: k for k, v in GRAD_MODES.items()}[grad_mode_id]
    with torch.enable_grad():
        y = layer_fn(x, masked_weight(weight, threshold, grad_mode, guard_ratio=None))
    inputs = (x, weight, threshold)
    wanted = [i for i in range(3) if needs[i]]
    out: List[Optional[Tensor]] = [None, None, None]
    if wanted:
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], dy, create_graph=True, allow_unused=True)
        for i, g in zip(wanted, grads):
            out[i] = g if g is not None else torch.zeros_like(inputs[i])
    return out
