"""FLOP accounting for linear and conv layers: dense, active and executed (DESIGN.md §4).

`count_flops(module, *example_inputs)` runs one forward pass (eval mode, no grad; the training
flags are restored afterwards) with hooks on every nn.Linear and conv layer (masked or not, any
subclass, Conv1d/2d/3d and transposed) and counts, per layer and in total:

  * uses: how many times each weight entry is multiplied in the forward
      linear:          number of input rows (the product of all leading dims)
      conv:            batch * output positions (padded positions included)
      transposed conv: batch * input positions (each input element is scattered by the whole kernel)
  * forward     = 2 * uses * weights                 (one multiply-accumulate = 2 FLOPs)
  * input_grad  = the same GEMM with W^T             (counted for every layer, the first one too:
                  in a GAN, D's input gradient is what trains G, and R1 needs it; for a standalone
                  classifier this overcounts by the first layer's forward)
  * weight_grad = 2 * uses * weights, always dense   (the threshold gradient needs dL/dW_hat at
                  every entry, so the weight-gradient GEMM stays dense, §4)
  * step        = forward + input_grad + weight_grad
Bias adds, activations, normalisation and the masked-weight op itself are not counted.

The three figures, never mixed:
  * dense:    as if unpruned (all weights).
  * active:   only weights with M = 1 in this forward (the paper's convention) for the forward and
              input-gradient GEMMs; the weight gradient stays dense. Plain nn layers and masked
              layers in dense mode have M = 1.
  * executed: what the kernels ran. Plain nn layers, and masked layers on the masked-weight path
              (the default) where ATen runs the GEMM on W * M, run it dense: executed == dense. Masked
              layers whose forward ran the fused kernels (rgkernels/sparse_exec.py), or the CPU's
              one-node masked linear (rgkernels/ops/cpu_masked_linear.py, which leaves entirely pruned
              rows out of its GEMMs once they are numerous enough), count their live output channels
              and the input channels they reduced over, as recorded by that forward on the device
              (the CPU node: every input channel): forward = 2 * uses * live rows
              * reduced input channels * kh * kw; input_grad the same, except that the input channels
              are all of them unless the chain lets the kernel skip them; weight_grad = 2 * uses *
              all rows * reduced input channels (the weight-gradient GEMM stays dense over rows).
A layer called several times in the forward is summed over its calls. Masked layers in sparse mode
run their op as in any forward (their last keep counts are updated; the collapse guard can fire).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Set, Union

import torch
from torch import Tensor, nn

from .convert import _check_module, _to_host
from .layers import MaskedLayer


@dataclass(frozen=True)
class FlopCounts:
    dense: int = 0
    active: int = 0
    executed: int = 0

    def __add__(self, other: "FlopCounts") -> "FlopCounts":
        return FlopCounts(self.dense + other.dense, self.active + other.active, self.executed + other.executed)


@dataclass
class LayerFlops:
    name: str
    kind: str              # "linear", "conv" or "conv_transpose"
    calls: int
    weights: int           # weight entries (maskable weights) of the layer
    active_weights: int    # weights with M = 1, summed over calls (= weights * calls when unpruned)
    uses: int              # summed over calls
    forward: FlopCounts
    input_grad: FlopCounts
    weight_grad: FlopCounts

    @property
    def step(self) -> FlopCounts:
        return self.forward + self.input_grad + self.weight_grad


@dataclass
class FlopReport:
    layers: Dict[str, LayerFlops] = field(default_factory=dict)  # in order of first call

    def _total(self, attr: str) -> FlopCounts:
        out = FlopCounts()
        for lf in self.layers.values():
            out = out + getattr(lf, attr)
        return out

    @property
    def forward(self) -> FlopCounts:
        return self._total("forward")

    @property
    def input_grad(self) -> FlopCounts:
        return self._total("input_grad")

    @property
    def weight_grad(self) -> FlopCounts:
        return self._total("weight_grad")

    @property
    def step(self) -> FlopCounts:
        return self._total("step")

    def summary(self) -> str:
        rows = [f"{'layer':<32} {'kind':<15} {'fwd dense':>12} {'fwd active':>12} {'step dense':>12} "
                f"{'step active':>12} {'step exec':>12}"]
        for name, lf in list(self.layers.items()) + [("TOTAL", None)]:
            fwd, step = (lf.forward, lf.step) if lf else (self.forward, self.step)
            kind = lf.kind if lf else ""
            rows.append(f"{name:<32} {kind:<15} {fwd.dense:>12.4g} {fwd.active:>12.4g} {step.dense:>12.4g} "
                        f"{step.active:>12.4g} {step.executed:>12.4g}")
        return "\n".join(rows)


def _kind(m: nn.Module):
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv_transpose" if m.transposed else "conv"
    return None


def _weight_entries(m: nn.Module, kind: str) -> int:
    """Entries of the weight the layer computes with, from its geometry: whatever reparametrisation
    stores it (spectral norm, weight norm's direction and magnitude, ...), nothing is read or computed."""
    if kind == "linear":
        return m.in_features * m.out_features
    k = 1
    for s in m.kernel_size:
        k *= s
    return m.in_channels * m.out_channels // m.groups * k


def _uses(m: nn.Module, kind: str, inp: Tensor, out: Tensor) -> int:
    if kind == "linear":
        return out.numel() // m.out_features
    if kind == "conv":
        return out.numel() // m.out_channels
    return inp.numel() // m.in_channels


def _executed(m: nn.Module, uses: int):
    """(forward, input_grad, weight_grad) executed by a fused forward of a masked layer, else None."""
    if isinstance(m, MaskedLayer) and m.sparse and m._exec_record is not None:
        from .sparse_exec import record_executed

        return record_executed(m, uses)
    return None


def _active_weights(m: nn.Module, weights: int) -> Union[int, Tensor]:
    if isinstance(m, MaskedLayer) and m.sparse and m.last_counts is not None:
        return m.last_counts.sum()  # a device tensor, synced once for the whole model
    return weights


def _each_layer_call(module: nn.Module, example_inputs: tuple, on_call) -> None:
    """Runs module(*example_inputs) once in eval mode (no power iteration, no batch-norm statistics
    updates), calling on_call(name, layer, kind, input, output) for every call of a linear / conv layer
    (name as count_flops reports it); the modules' training flags are restored."""
    names = {id(m): n or type(m).__name__ for n, m in module.named_modules()}

    def hook(m, args, kwargs, out):
        on_call(names[id(m)], m, _kind(m), args[0] if args else kwargs.get("input"), out)  # layer(x) / (input=x)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in module.modules() if _kind(m) is not None]
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        module(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training


def layers_with_input_grad(module: nn.Module, *example_inputs) -> Set[str]:
    """Names (as count_flops reports them) of the linear / conv layers whose input requires a gradient
    when the example inputs do not: the layers whose input gradient a training step on those inputs
    computes (not those reading an input that needs no gradient, e.g. a discriminator's first convolutions
    on real images). One forward with gradients enabled."""
    found: Set[str] = set()

    def on_call(name, m, kind, x, out):
        if isinstance(x, Tensor) and x.requires_grad:
            found.add(name)

    with torch.enable_grad():
        _each_layer_call(module, example_inputs, on_call)
    return found


@torch.no_grad()
def count_flops(module: nn.Module, *example_inputs) -> FlopReport:
    """FLOPs of `module(*example_inputs)` and of a training step on it; see the module docstring."""
    _check_module(module, "count_flops")
    if not example_inputs:
        raise TypeError("count_flops(module, *example_inputs): give the inputs of one forward, "
                        "e.g. count_flops(G, z)")
    calls: List[tuple] = []  # (name, module, kind, uses, active weights)

    def on_call(name, m, kind, x, out):
        weights = _weight_entries(m, kind)
        uses = _uses(m, kind, x, out)
        calls.append((name, m, kind, uses, _active_weights(m, weights), _executed(m, uses)))

    _each_layer_call(module, example_inputs, on_call)
    n = len(calls)
    flat = [c[4] for c in calls] + [v for c in calls if c[5] is not None for v in c[5]]
    host = _to_host(flat)  # one sync per device for the whole model
    actives, execs, j = host[:n], [], n
    for c in calls:
        execs.append(None if c[5] is None else tuple(host[j:j + 3]))
        j += 0 if c[5] is None else 3
    report = FlopReport()
    for (name, m, kind, uses, _, _), active, ex in zip(calls, actives, execs):
        weights = _weight_entries(m, kind)
        dense, act = 2 * uses * weights, 2 * uses * active
        # ATen's dense GEMM on W * M: executed == dense; the fused kernels and the CPU node record theirs.
        ex = ex or (dense, dense, dense)
        prev = report.layers.get(name)
        lf = LayerFlops(name, kind, 1, weights, active, uses, FlopCounts(dense, act, ex[0]),
                        FlopCounts(dense, act, ex[1]), FlopCounts(dense, dense, ex[2]))
        if prev is not None:
            lf = LayerFlops(name, kind, prev.calls + 1, weights, prev.active_weights + active, prev.uses + uses,
                            prev.forward + lf.forward, prev.input_grad + lf.input_grad,
                            prev.weight_grad + lf.weight_grad)
        report.layers[name] = lf
    return report
