"""One grouped launch for every masked layer of SNGAN 32x32 (G and D) vs one launch per layer.

Target (BENCHMARKS.md, not asserted): on GPU the grouped forward + backward is >= 3x faster than
per-layer launches for these layers (they are small, so per-layer launches are launch-bound).
"""
import pytest
import torch

import rgkernels
from rgkernels import _backend

from benchutil import devices, sync
from shapes import SNGAN32


def _layers(device):
    ws = [torch.randn(s, device=device).mul_(0.05).requires_grad_() for s in SNGAN32]
    ts = [torch.full((s[0],), 0.03, device=device).requires_grad_() for s in SNGAN32]
    gs = [torch.randn(s, device=device) for s in SNGAN32]
    return ws, ts, gs


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["grouped", "per_layer", "per_layer_eager"])
@pytest.mark.parametrize("backend", ["default", "triton"])
def test_sngan_layers_fwd_bwd(benchmark, device, impl, backend):
    if backend == "triton" and device != "cuda":
        pytest.skip("Triton is benchmarked on a GPU only")
    be = _backend.choose(device) if backend == "default" else "triton"
    if impl == "per_layer_eager":
        if backend == "triton":
            pytest.skip("eager has no Triton variant")
        be = "reference"
    ws, ts, gs = _layers(device)
    benchmark.extra_info.update(device=device, layers=len(ws), impl=impl, backend=be,
                                numel=sum(w.numel() for w in ws))

    def run():
        if impl == "grouped":
            outs, _ = rgkernels.masked_weight_grouped(ws, ts, backend=be)
        else:
            outs = [rgkernels.masked_weight(w, t, backend=be) for w, t in zip(ws, ts)]
        torch.autograd.backward(outs, gs)
        for p in ws + ts:
            p.grad = None
        sync(device)

    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
