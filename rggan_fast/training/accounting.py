"""Training FLOPs of G and D, cumulative, in the three figures of DESIGN.md §4.

One training iteration of SNGAN-style training with batch B and n_critic n is

    n x [ G forward on B (fakes, no grad)  +  D training step on 2B (reals and fakes) ]
      +   G training step on B             +  D forward and input gradient on B

`rgkernels.count_flops` gives per-sample FLOPs of a forward pass, its input gradient and its
weight gradient (dense / active / executed) for the networks as they are now; they are refreshed
every `flops_every` iterations and at every mode switch, and accumulated per iteration.
"""
from __future__ import annotations

from typing import Dict

import torch

FIGURES = ("dense", "active", "executed")


def _fig(counts, fig: str) -> int:
    return int(getattr(counts, fig))


def per_iteration_flops(G, D, z_dim: int, res: int, batch: int, n_critic: int, device) -> Dict[str, int]:
    import rgkernels

    z = torch.zeros(1, z_dim, device=device)
    x = torch.zeros(1, 3, res, res, device=device)
    g = rgkernels.count_flops(G, z)
    d = rgkernels.count_flops(D, x)
    out = {}
    for f in FIGURES:
        g_fwd, g_step = _fig(g.forward, f), _fig(g.step, f)
        d_fwd, d_in, d_step = _fig(d.forward, f), _fig(d.input_grad, f), _fig(d.step, f)
        d_phase = n_critic * (batch * g_fwd + 2 * batch * d_step)
        g_phase = batch * g_step + batch * (d_fwd + d_in)
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
