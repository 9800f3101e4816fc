"""Pure-PyTorch reference of the masked-weight op (DESIGN.md §2).

This is the definition every fast backend is tested against, and the path used wherever no
compiled or Triton kernel is available. It is registered as custom ops
(`rgkernels::ref_masked_weight_*`) so that it has the same calling convention as the other
backends and traces under torch.compile; the math below works on any device and dtype.

Conventions shared by all backends:
  * `weight` is a 2-D view [C, K] of a layer's weight (any strides), `threshold` is [C].
  * x = |W| - t is computed in float32 (float64 when the weight is float64), so the mask is exact.
  * The grouped forward takes layers of one dtype and returns ONE flat buffer with every masked
    weight (layer after layer, each contiguous) and one flat int32 buffer of keep counts: a
    mutating custom op may not return lists (torch.compile cannot functionalize it), and one
    arena is also one allocation.
  * The collapse guard (guard_ratio >= 0) resets `threshold` to 0 in place, without a host sync,
    when sum(M) / numel <= guard_ratio.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

GRAD_MODES = {"dst": 0, "masked": 1}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def surrogate_grad(x: Tensor) -> Tensor:
    """H'(x): 2 - 4|x| on |x| <= 0.4, 0.4 on 0.4 < |x| <= 1, 0 beyond."""
    ax = x.abs()
    # scalars as tensors of x's dtype: torch.where(c, 0.4, 0.0) would round 0.4 to float32
    tail = torch.where(ax <= 1.0, torch.full_like(ax, 0.4), torch.zeros_like(ax))
    return torch.where(ax <= 0.4, 2.0 - 4.0 * ax, tail)


def _x(weight: Tensor, threshold: Tensor) -> Tensor:
    cdt = compute_dtype(weight.dtype)
    return weight.to(cdt).abs() - threshold.to(cdt)[:, None]


def masked_weight_fwd(weight: Tensor, threshold: Tensor, guard_ratio: float) -> Tuple[Tensor, Tensor]:
    x = _x(weight, threshold)
    mask = x > 0
    counts = mask.sum(dim=1, dtype=torch.int32)
    if guard_ratio >= 0 and weight.numel() > 0:
        kept = counts.sum(dtype=torch.float64)
        collapse = kept / weight.numel() <= guard_ratio  # a 0-dim tensor: no host sync
        with torch.no_grad():
            threshold.copy_(torch.where(collapse, torch.zeros_like(threshold), threshold))
        mask = torch.where(collapse, weight.abs() > 0, mask)
        counts = mask.sum(dim=1, dtype=torch.int32)
    out = (weight * mask.to(weight.dtype)).contiguous()
    return out, counts


def masked_weight_bwd(grad: Tensor, weight: Tensor, threshold: Tensor, grad_mode: int) -> Tuple[Tensor, Tensor]:
    x = _x(weight, threshold)
    cdt = x.dtype
    h = surrogate_grad(x)
    g = grad.to(cdt)
    w = weight.to(cdt)
    grad_threshold = -(g * w * h).sum(dim=1).to(threshold.dtype)
    m = (x > 0).to(cdt)
    if grad_mode == GRAD_MODES["dst"]:
        gw = m * g * (1.0 + w.abs() * h)
    elif grad_mode == GRAD_MODES["masked"]:
        gw = m * g
    else:
        raise ValueError(f"grad_mode must be 0 (dst) or 1 (masked), got {grad_mode}")
    return gw.to(weight.dtype).contiguous(), grad_threshold


# ---- torch.library registration -------------------------------------------------------------

@torch.library.custom_op("rgkernels::ref_masked_weight_fwd", mutates_args=("threshold",))
def ref_masked_weight_fwd(weight: Tensor, threshold: Tensor, guard_ratio: float) -> Tuple[Tensor, Tensor]:
    return masked_weight_fwd(weight, threshold, guard_ratio)


@torch.library.custom_op("rgkernels::ref_masked_weight_bwd", mutates_args=())
def ref_masked_weight_bwd(grad: Tensor, weight: Tensor, threshold: Tensor, grad_mode: int) -> Tuple[Tensor, Tensor]:
    return masked_weight_bwd(grad, weight, threshold, grad_mode)


@torch.library.custom_op("rgkernels::ref_masked_weight_grouped_fwd", mutates_args=("thresholds",))
def ref_masked_weight_grouped_fwd(
    weights: List[Tensor], thresholds: List[Tensor], guard_ratio: float
) -> Tuple[Tensor, Tensor]:
    outs, counts = [], []
    for w, t in zip(weights, thresholds):
        o, c = masked_weight_fwd(w, t, guard_ratio)
        outs.append(o.reshape(-1))
        counts.append(c)
    return torch.cat(outs), torch.cat(counts)


@torch.library.custom_op("rgkernels::ref_masked_weight_grouped_bwd", mutates_args=())
def ref_masked_weight_grouped_bwd(
    grads: List[Tensor], weights: List[Tensor], thresholds: List[Tensor], grad_mode: int
) -> Tuple[List[Tensor], List[Tensor]]:
    gws, gts = [], []
    for g, w, t in zip(grads, weights, thresholds):
        gw, gt = masked_weight_bwd(g, w, t, grad_mode)
        gws.append(gw)
        gts.append(gt)
    return gws, gts


# ---- fake (meta) implementations, shared by every backend's ops ------------------------------

def fake_fwd(weight: Tensor, threshold: Tensor, guard_ratio: float) -> Tuple[Tensor, Tensor]:
    c, k = weight.shape
    return weight.new_empty((c, k)), weight.new_empty((c,), dtype=torch.int32)


def fake_bwd(grad: Tensor, weight: Tensor, threshold: Tensor, grad_mode: int) -> Tuple[Tensor, Tensor]:
    c, k = weight.shape
    return weight.new_empty((c, k)), threshold.new_empty((c,))


def fake_grouped_fwd(weights: Sequence[Tensor], thresholds: Sequence[Tensor], guard_ratio: float):
    numel = sum(w.numel() for w in weights)
    rows = sum(w.shape[0] for w in weights)
    return weights[0].new_empty((numel,)), weights[0].new_empty((rows,), dtype=torch.int32)


def fake_grouped_bwd(grads: Sequence[Tensor], weights: Sequence[Tensor], thresholds: Sequence[Tensor], grad_mode: int):
    outs = [fake_bwd(g, w, t, grad_mode) for g, w, t in zip(grads, weights, thresholds)]
    return [o for o, _ in outs], [c for _, c in outs]


def fake_linear_bwd(grad_out: Tensor, input: Tensor, weight: Tensor, w_hat: Tensor, threshold: Tensor,
                    grad_mode: int, input_grad: bool, bias_grad: bool):
    """Shapes of the compiled CPU masked_linear_bwd (rgkernels/ops/cpu_masked_linear.py)."""
    return (input.new_empty(input.shape if input_grad else (0,)), weight.new_empty(weight.shape),
            threshold.new_empty(threshold.shape), grad_out.new_empty((grad_out.shape[1],) if bias_grad else (0,)))


ref_masked_weight_fwd.register_fake(fake_fwd)
ref_masked_weight_bwd.register_fake(fake_bwd)
ref_masked_weight_grouped_fwd.register_fake(fake_grouped_fwd)
ref_masked_weight_grouped_bwd.register_fake(fake_grouped_bwd)
