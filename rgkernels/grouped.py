"""`grouped_masks`: the masked weights of a whole model in one `masked_weight_grouped` launch (DESIGN.md §4).

On small GAN layers the per-layer masked-weight launches dominate; inside the context every masked
layer in sparse mode uses a masked weight precomputed by one grouped call (per device, grad mode and
guard ratio), with the same outputs and gradients as the per-layer path.

    with rgkernels.grouped_masks(D):
        loss = d_loss(D(real), D(fake))
    loss.backward()

The masked weights are computed once on entering: the context must not span an optimiser step, and
a parametrised effective weight is computed once per context (spectral norm: one power iteration
per context instead of one per call). Layers with forward pre-hooks (hook-form spectral norm, which
computes the effective weight in such a hook) keep the per-layer path, since their weight is only
known inside their forward.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

from torch import Tensor, nn

from . import _backend
from .convert import masked_layers
from .layers import MaskedLayer
from .ops.masked_weight import masked_weight_grouped


@contextlib.contextmanager
def grouped_masks(module: nn.Module) -> Iterator[nn.Module]:
    layers = [m for _, m in masked_layers(module) if m.sparse and not m._forward_pre_hooks]
    try:
        groups: Dict[tuple, List[Tuple[MaskedLayer, Tensor]]] = {}
        for m in layers:
            if m.execution == "fused":  # the precomputed W * M takes the masked_weight path (documented)
                _backend.warn_once(f"exec-fused:{type(m).__name__}:grouped_masks",
                                   f"rgkernels: execution='fused' unavailable for {type(m).__name__} inside "
                                   f"grouped_masks (its masked weight is computed by the grouped launch); "
                                   f"running masked_weight + the ATen GEMM")
            m._hook_stored_weight()
            rows, thresholds = m._mask_operands(m.weight)
            groups.setdefault((rows.device, m.grad_mode, m.guard_ratio), []).append((m, rows, thresholds))
        for (_, grad_mode, guard_ratio), items in groups.items():
            outs, counts = masked_weight_grouped([r for _, r, _ in items], [t for _, _, t in items],
                                                 grad_mode, guard_ratio=guard_ratio)
            for (m, _, thresholds), w_hat, c in zip(items, outs, counts):
                m._pre_masked = m._mask_result(w_hat, c, thresholds)  # in the weight's layout
        yield module
    finally:
        for m in layers:
            m._pre_masked = None
