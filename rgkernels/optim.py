"""`protect_pruned`: pruned weights get no optimiser update at all (DESIGN.md §2).

Zeroing a pruned weight's gradient is not enough: Adam's m / sqrt(v), momentum buffers and
decoupled weight decay still move it. A step pre-hook copies the stored weight parameter of every
masked layer in sparse mode, and a step post-hook writes the copies back where M == 0 (the mask of
the layer's last sparse forward), so pruned entries stay bit-identical and come back with that value
in dense mode. Works for any optimiser; spectral-norm layers protect their stored parameter
(weight_orig / parametrizations.weight.original). Dense-mode layers are not protected.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

from .convert import _check_module, masked_layers


class ProtectHandle:
    """Removes both optimiser hooks installed by `protect_pruned`."""

    def __init__(self, handles):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def protect_pruned(module: nn.Module, optimizer: torch.optim.Optimizer) -> ProtectHandle:
    """Freezes, across every `optimizer.step()`, the pruned entries of the masked layers of `module`
    whose stored weight `optimizer` updates. Returns a handle with `.remove()`."""
    _check_module(module, "protect_pruned")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"protect_pruned: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    saved: List[Tuple[Tensor, Tensor, Tensor]] = []  # (param, mask, copy before the step)

    def before(opt, args, kwargs):
        saved.clear()
        owned = {id(p) for group in opt.param_groups for p in group["params"]}
        for _, layer in masked_layers(module):
            mask = layer.mask()  # None in dense mode or before the first sparse forward
            p = layer._stored_weight()
            if mask is not None and id(p) in owned:
                saved.append((p, mask, p.detach().clone()))

    def after(opt, args, kwargs):
        with torch.no_grad():
            for p, mask, old in saved:
                p.copy_(torch.where(mask, p, old))
        saved.clear()

    return ProtectHandle([optimizer.register_step_pre_hook(before),
                          optimizer.register_step_post_hook(after)])
