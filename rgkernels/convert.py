"""Model conversion and pruning statistics for masked layers (DESIGN.md §1, §3).

`sparsify` converts IN PLACE by swapping the class of each exact nn.Linear / nn.Conv2d /
nn.ConvTranspose2d to its masked subclass: parameters stay the same objects (an optimiser built
before still holds them), and hooks, buffers and parametrisations (spectral norm in both forms,
applied before or after conversion) stay attached. Subclasses of those nn layers are left alone,
since they may override `forward`.

Statistics describe the masks of each layer's last sparse forward (a sparse layer that has not run
a forward since its mode was set counts as fully active; a dense-mode layer is fully active, M = 1).
They gather all layers' numbers into one tensor per device and sync the host once.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._backend import RGKernelsWarning
from .layers import MASKED_CLASSES, MaskedLayer, check_mode_flag, unsupported_reparametrisation


def _check_module(module, where: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module (a model or a layer), got {type(module).__name__}")


def _masked_class_for(m: nn.Module):
    cls = type(m)
    if parametrize.is_parametrized(m):
        # torch.nn.utils.parametrize swapped in a per-instance class `Parametrized<Base>(Base)` holding
        # the parametrised properties; rebuild it on top of the masked class so that
        # remove_parametrizations (which restores __bases__[0]) still gives back a masked layer.
        masked = MASKED_CLASSES.get(cls.__bases__[0])
        if masked is None:
            return None
        # (Not its injected __deepcopy__, which copies __dict__ as it is: the masked layer's own leaves the
        # per-process state out.)
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__", "__deepcopy__")}
        return type(f"Parametrized{masked.__name__}", (masked,), body)
    return MASKED_CLASSES.get(cls)


# Layers with weights that sparsify leaves alone, reported so that a model does not "train sparse"
# with nothing pruned without a word.
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def sparsify(module: nn.Module) -> nn.Module:
    """Converts every nn.Linear / nn.Conv2d / nn.ConvTranspose2d inside `module` (itself included) to
    its masked layer, in place, in sparse mode with zero thresholds. Returns `module`.

    Raises NotImplementedError, before converting anything, for a layer whose weight is under weight
    norm (its stored tensors are not shaped like the weight, so pruned entries could not be frozen).
    Warns once per call, naming them, about layers it leaves alone: subclasses of those nn layers
    (they may override forward: convert their inner layers or write a masked version), other conv
    dimensions, and lazy layers not yet initialised (run one forward first)."""
    _check_module(module, "sparsify")
    todo, skipped = [], []
    for name, m in module.named_modules():
        if isinstance(m, MaskedLayer):
            continue
        new_cls = _masked_class_for(m)
        if new_cls is None:
            if isinstance(m, _WEIGHTED) or isinstance(m, nn.modules.lazy.LazyModuleMixin):
                skipped.append(f"{name or '(root)'} ({type(m).__name__})")
            continue
        why = unsupported_reparametrisation(m)
        if why is not None:
            raise NotImplementedError(f"sparsify: layer {name or '(root)'} ({type(m).__name__}) has its weight under "
                                      f"{why}, which masked layers cannot prune (DESIGN.md section 2 needs one stored "
                                      "tensor shaped like the weight): use spectral norm, or remove it")
        todo.append((m, new_cls))
    for m, new_cls in todo:
        m.__class__ = new_cls
        m._init_masked_state()
    if skipped:
        shown = ", ".join(skipped[:8]) + (f" and {len(skipped) - 8} more" if len(skipped) > 8 else "")
        warnings.warn(f"rgkernels.sparsify: left {len(skipped)} layer(s) with weights as they are: {shown} "
                      "(only exact nn.Linear / nn.Conv2d / nn.ConvTranspose2d are converted; lazy layers "
                      "after their first forward)", RGKernelsWarning, stacklevel=2)
    return module


def masked_layers(module: nn.Module) -> List[Tuple[str, MaskedLayer]]:
    """(qualified name, layer) of every masked layer inside `module`, in module order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MaskedLayer)]


def set_sparse(module: nn.Module, flag: bool) -> nn.Module:
    """Puts every masked layer inside `module` in sparse (True) or dense (False) mode."""
    _check_module(module, "set_sparse")
    check_mode_flag(flag)
    for _, m in masked_layers(module):
        m.sparse = flag
    return module


# ---- statistics ----------------------------------------------------------------------------------

def _to_host(values: Sequence[Union[int, Tensor]]) -> List[int]:
    """Python ints for a mix of ints and 0-dim device tensors: one stack and one sync per device."""
    out: List = list(values)
    by_device: Dict[torch.device, List[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, Tensor):
            by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        host = torch.stack([values[i].to(torch.int64) for i in idx]).tolist()
        for i, h in zip(idx, host):
            out[i] = h
    return out


def _active(layer: MaskedLayer) -> Union[int, Tensor]:
    """Active weights of the layer's last sparse forward (all of them when its mask is M = 1)."""
    if not layer.sparse or layer.last_counts is None:
        return layer._stored_weight().numel()
    return layer.last_counts.sum()


def keep_ratio(module: nn.Module) -> float:
    """Active weights / maskable weights over all masked layers (1.0 when there are none)."""
    _check_module(module, "keep_ratio")
    layers = [m for _, m in masked_layers(module)]
    total = sum(m._stored_weight().numel() for m in layers)
    if total == 0:
        return 1.0
    return sum(_to_host([_active(m) for m in layers])) / total


def layer_stats(module: nn.Module) -> Dict[str, Dict[str, float]]:
    """name -> {keep_ratio, rows_pruned, regenerations} for every masked layer.

    regenerations: weights pruned at the previous call of layer_stats on this layer and active now
    (0 at the first call). It compares two snapshots, so a weight pruned and regrown between calls
    is not counted; switching a layer to dense mode counts every pruned weight as regenerated.
    """
    _check_module(module, "layer_stats")
    layers = masked_layers(module)
    values: List[Union[int, Tensor]] = []
    for _, m in layers:
        cur = m._mask_rows()
        if cur is None:  # fully active
            w = m._stored_weight()
            cur = torch.ones(m.mask_rows, w.numel() // m.mask_rows, dtype=torch.bool, device=w.device)
            rows_pruned: Union[int, Tensor] = 0
        else:
            rows_pruned = (m.last_counts == 0).sum()
        prev = m._stats_mask
        regen = 0 if prev is None else (cur & ~prev).sum()
        m._stats_mask = cur
        values += [_active(m), rows_pruned, regen]
    host = _to_host(values)
    out = {}
    for i, (name, m) in enumerate(layers):
        active, rows_pruned, regen = host[3 * i: 3 * i + 3]
        numel = m._stored_weight().numel()
        out[name] = {"keep_ratio": active / numel if numel else 1.0, "rows_pruned": rows_pruned,
                     "regenerations": regen}
    return out


def stats_state(module: nn.Module) -> Dict[str, Tensor]:
    """The masks layer_stats compares against at its next call (name -> bool mask), so that a
    checkpoint can carry them and regeneration counts continue across a resume."""
    _check_module(module, "stats_state")
    return {name: m._stats_mask for name, m in masked_layers(module) if m._stats_mask is not None}


def load_stats_state(module: nn.Module, state: Dict[str, Tensor]) -> None:
    """Restore what stats_state returned (layers missing from `state` start afresh)."""
    _check_module(module, "load_stats_state")
    for name, m in masked_layers(module):
        mask = state.get(name)
        if mask is not None:
            numel = m._stored_weight().numel()
            shape = (m.mask_rows, numel // m.mask_rows if m.mask_rows else 0)
            if tuple(mask.shape) != shape:  # a mask of another model would broadcast into wrong counts
                raise ValueError(f"load_stats_state: the mask of layer {name!r} has shape {tuple(mask.shape)}, "
                                 f"the layer's is {shape}")
            mask = mask.to(device=m._stored_weight().device, dtype=torch.bool)
        m._stats_mask = mask


def threshold_regularizer(module: nn.Module, lam: float) -> Tensor:
    """lam * sum_i exp(-t_i) over the thresholds of the masked layers in sparse mode (§1); a zero
    tensor when none is sparse. Its gradient on t_i is -lam * exp(-t_i)."""
    _check_module(module, "threshold_regularizer")
    ts = [m.threshold for _, m in masked_layers(module) if m.sparse]
    if not ts:
        layers = masked_layers(module)
        device = layers[0][1].threshold.device if layers else None
        return torch.zeros((), device=device)
    device = ts[0].device
    flat = torch.cat([t.reshape(-1).to(device) for t in ts])  # one exp and one sum for the whole model
    return lam * torch.exp(-flat).sum()
