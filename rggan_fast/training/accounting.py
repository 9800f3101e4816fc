"""Training FLOPs of G and D, cumulative, in the three figures of DESIGN.md §4.

One training iteration of SNGAN-style training with batch B and n_critic n is

    n x [ G forward on B (fakes, no grad)  +  D training step on 2B (reals and fakes) ]
      +   G training step on B             +  D forward and input gradient on B

`rgkernels.count_flops` gives per-sample FLOPs of a forward pass, its input gradient and its
weight gradient (dense / active / executed) for the networks as they are now; they are refreshed
every `flops_every` iterations and at every mode switch, and accumulated per iteration.

A training step counts the input gradient only of the layers that get one: not of those that read
the step's input directly (D's first convolutions on images that need no gradient, G's first layer
on z), which autograd never computes. In the G step D's input is G's output, so every layer of D
gets its input gradient there.
"""
from __future__ import annotations

from typing import Dict, Set

import torch

FIGURES = ("dense", "active", "executed")


def _fig(counts, fig: str) -> int:
    return int(getattr(counts, fig))


def _input_grad(report, names: Set[str], fig: str) -> int:
    return sum(_fig(lf.input_grad, fig) for name, lf in report.layers.items() if name in names)


def per_iteration_flops(G, D, z_dim: int, res: int, batch: int, n_critic: int, device) -> Dict[str, int]:
    import rgkernels
    from rgkernels.flops import layers_with_input_grad

    z = torch.zeros(1, z_dim, device=device)
    x = torch.zeros(1, 3, res, res, device=device)
    g = rgkernels.count_flops(G, z)
    d = rgkernels.count_flops(D, x)
    g_in, d_in_reals = layers_with_input_grad(G, z), layers_with_input_grad(D, x)
    out = {}
    for f in FIGURES:
        g_fwd, g_wgrad = _fig(g.forward, f), _fig(g.weight_grad, f)
        d_fwd, d_in, d_wgrad = _fig(d.forward, f), _fig(d.input_grad, f), _fig(d.weight_grad, f)
        d_step = d_fwd + _input_grad(d, d_in_reals, f) + d_wgrad  # on reals and detached fakes
        g_step = g_fwd + _input_grad(g, g_in, f) + g_wgrad  # on z
        d_phase = n_critic * (batch * g_fwd + 2 * batch * d_step)
        g_phase = batch * g_step + batch * (d_fwd + d_in)  # D on G's output: every input gradient
        out[f] = d_phase + g_phase
    return out


class FlopAccountant:
    def __init__(self):
        self.total = {f: 0 for f in FIGURES}
        self.rate = {f: 0 for f in FIGURES}  # FLOPs per iteration, as last counted

    def refresh(self, G, D, z_dim, res, batch, n_critic, device) -> None:
        self.rate = per_iteration_flops(G, D, z_dim, res, batch, n_critic, device)

    def add_iteration(self) -> None:
        for f in FIGURES:
            self.total[f] += self.rate[f]

    def state_dict(self):
        return {"total": dict(self.total), "rate": dict(self.rate)}

    def load_state_dict(self, s):
        self.total, self.rate = dict(s["total"]), dict(s["rate"])
