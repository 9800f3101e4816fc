"""Run-time machinery of the compiled CPU kernels: the buffer pool of weight-sized outputs
(csrc/cpu/buffer_pool.cpp) and the choice of GEMM for the CPU masked linear (csrc/cpu/ukernel_gemm.cpp).
Settings read from the environment are tested in subprocesses, so that this process keeps its own."""
import os
import subprocess
import sys

import pytest
import torch

import rgkernels
from rgkernels import _backend

from conftest import cpu_gemm, cpu_gemms



@pytest.fixture(autouse=True)
def _needs_extension():
    """The compiled kernels must be built wherever the tests run: their absence fails, never skips."""
    if _backend.extension() is None:
        pytest.fail("the compiled extension rgkernels._C is not built or does not load (pip install -e .; "
                    "python -m rgkernels.info says why)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **env})


def _step(layer, x):
    layer(x).square().sum().backward()


def _stats():
    return dict(_backend.extension().cpu_pool_stats())


# ---- buffer pool ----------------------------------------------------------------------------------

@pytest.mark.parametrize("gemm", cpu_gemms())
def test_pool_reuses_weight_sized_blocks_across_steps(gemm):
    with cpu_gemm(gemm):
        layer = rgkernels.MaskedLinear(512, 256)  # 512 KB weight: pooled (>= 256 KB)
        x = torch.randn(8, 512)
        _step(layer, x)
        layer.weight.grad = layer.threshold.grad = layer.bias.grad = None
        before = _stats()
        _step(layer, x)
        after = _stats()
    # The weight gradient of the second step comes from the block the first step freed; on ATen's path
    # also W_hat (and the weight-gradient GEMM's block buffer). The micro-kernel path writes no W_hat.
    assert after["hits"] - before["hits"] >= (2 if gemm == "aten" else 1), (before, after)
    assert after["cached_bytes"] <= after["limit_bytes"]


@pytest.mark.parametrize("gemm", cpu_gemms())
def test_pool_never_hands_out_a_block_in_use(gemm):
    with cpu_gemm(gemm):
        layer, other = rgkernels.MaskedLinear(512, 256), rgkernels.MaskedLinear(512, 256)
        layer.threshold.data.fill_(0.02)
        other.threshold.data.fill_(0.03)
        x1, x2 = torch.randn(8, 512), torch.randn(8, 512)
        _step(layer, x1)
        held = layer.weight.grad  # kept by the user: its block must not be reused
        expect = held.clone()
        layer.weight.grad = None
        pending = layer(x1).square().sum()  # its saved tensors (W_hat on ATen's path) stay in use...
        _step(other, x2)  # ...while another layer's step allocates and frees same-sized blocks
        pending.backward()
    assert torch.equal(held, expect)
    assert torch.equal(layer.weight.grad, expect)  # same inputs, same path: the same gradient


def test_empty_cpu_cache_releases_the_cached_blocks():
    layer = rgkernels.MaskedLinear(512, 256)
    _step(layer, torch.randn(4, 512))
    del layer
    assert _stats()["cached_bytes"] > 0
    rgkernels.empty_cpu_cache()
    s = _stats()
    assert s["cached_bytes"] == 0 and s["cached_blocks"] == 0


def test_pool_can_be_turned_off_and_rejects_a_bad_size():
    code = ("import torch, rgkernels; l = rgkernels.MaskedLinear(512, 256); x = torch.randn(4, 512)\n"
            "for _ in range(3):\n    l(x).sum().backward(); l.weight.grad = None\n"
            "s = rgkernels._C.cpu_pool_stats(); print(s['limit_bytes'], s['hits'], s['cached_bytes'])")
    r = _run(code, RGKERNELS_CPU_POOL_MB="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0", "0"]
    r = _run(code, RGKERNELS_CPU_POOL_MB="lots")
    assert r.returncode != 0 and "RGKERNELS_CPU_POOL_MB" in r.stderr and "'lots'" in r.stderr


# ---- GEMM choice --------------------------------------------------------------------------------

def test_gemm_choice_from_the_environment():
    ext = _backend.extension()
    code = "import rgkernels; print(rgkernels._C.cpu_gemm(), '|', rgkernels._C.cpu_gemm_reason())"
    r = _run(code, RGKERNELS_CPU_GEMM="aten")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("|")[0].strip() == "aten" and "RGKERNELS_CPU_GEMM=aten" in r.stdout
    r = _run(code, RGKERNELS_CPU_GEMM="")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("|")[0].strip() == cpu_gemms()[0]
    r = _run("import torch, rgkernels; l = rgkernels.MaskedLinear(4, 3); l(torch.randn(2, 4))",
             RGKERNELS_CPU_GEMM="mkl")
    assert r.returncode != 0 and "RGKERNELS_CPU_GEMM" in r.stderr and "'mkl'" in r.stderr
    with pytest.raises(RuntimeError, match="'aten', 'ukernel' or 'auto'"):
        ext.set_cpu_gemm("mkl")


def _ran_aten_gemms(fn):
    """Whether `fn` ran ATen GEMMs (aten::mm / aten::addmm in the profiler; the micro-kernel path has none)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name in ("aten::mm", "aten::addmm", "aten::mm.out") for e in prof.events())


@pytest.mark.skipif("ukernel" not in cpu_gemms(), reason="no oneDNN micro-kernel on this CPU / build")
def test_gemm_argument_of_the_node_and_the_pin():
    from rgkernels.ops import cpu_masked_linear as CML

    ext = _backend.extension()
    x, w, t = torch.randn(6, 20, requires_grad=True), torch.randn(12, 20, requires_grad=True), torch.zeros(12)
    t.requires_grad_()

    def step(gemm):
        return lambda: CML.masked_linear_cpu(x, w, t, None, 0, -1.0, gemm=gemm)[0].sum().backward()

    with cpu_gemm("auto"):  # unpinned: the node runs what the call says, -1 the build's default
        assert not ext.cpu_gemm_pinned()
        assert _ran_aten_gemms(step(0)) and not _ran_aten_gemms(step(1)) and not _ran_aten_gemms(step(-1))
    for pinned in ("aten", "ukernel"):  # pinned: every call runs the pinned path
        with cpu_gemm(pinned):
            assert ext.cpu_gemm_pinned()
            assert _ran_aten_gemms(step(0)) == _ran_aten_gemms(step(1)) == (pinned == "aten")


@pytest.mark.skipif("ukernel" not in cpu_gemms(), reason="no oneDNN micro-kernel on this CPU / build")
def test_gemm_measured_once_per_layer_shape(monkeypatch):
    """Unpinned, a layer's first call times both GEMM paths (on copies) and every call of that shape
    then runs the faster; the decision is cached with the execution decisions."""
    from rgkernels import sparse_exec as SE
    from rgkernels.ops import cpu_masked_linear as CML

    with cpu_gemm("auto"):
        for want, times in (("aten", [1.0, 2.0]), ("ukernel", [2.0, 1.0])):
            SE.clear_decisions()
            def fake_times(cands, times=times):
                assert list(cands) == list(CML.GEMMS)
                for fn in cands.values():
                    fn()  # the candidates must run
                return dict(zip(CML.GEMMS, times))

            monkeypatch.setattr(SE, "_cpu_times", fake_times)
            layer = rgkernels.MaskedLinear(24, 16)
            x = torch.randn(5, 24, requires_grad=True)
            before = [p.detach().clone() for p in layer.parameters()]
            _step(layer, x)  # measures
            (key, got), = SE.decisions().items()
            assert key.startswith("cpu_gemm|rows5|w(16, 24)|bias1") and got == want
            monkeypatch.setattr(SE, "_cpu_times", lambda cands: pytest.fail("measured twice"))
            layer.zero_grad(set_to_none=True)
            assert _ran_aten_gemms(lambda: _step(layer, x)) == (want == "aten")
            assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))  # timing runs used copies
    SE.clear_decisions()
    with cpu_gemm("auto"), torch.inference_mode():  # no backward to time: the default path, nothing cached
        layer = rgkernels.MaskedLinear(9, 7)
        torch.testing.assert_close(layer(torch.ones(2, 9)), torch.nn.functional.linear(
            torch.ones(2, 9), layer.weight * (layer.weight.abs() > 0), layer.bias))
    assert SE.decisions() == {}
    with cpu_gemm("aten"):  # pinned: nothing to choose
        layer = rgkernels.MaskedLinear(8, 4)
        assert CML.gemm_choice(torch.randn(2, 8), layer.weight, layer.threshold, layer.bias, 0, 0.01) == -1
    assert SE.decisions() == {}


@pytest.mark.skipif("ukernel" not in cpu_gemms(), reason="no oneDNN micro-kernel on this CPU / build")
def test_gemm_measurement_inside_checkpoint_determinism_and_bad_inputs(monkeypatch):
    """The timing runs inside the user's forward: non-reentrant activation checkpointing must not see
    their saved tensors; with deterministic algorithms nothing is timed (the two paths differ in the
    last bits); a call with a wrong input size neither times nor spoils the shape's later measurement."""
    from torch.utils.checkpoint import checkpoint

    from rgkernels import sparse_exec as SE
    from rgkernels.ops import cpu_masked_linear as CML

    with cpu_gemm("auto"):
        SE.clear_decisions()
        model = rgkernels.sparsify(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                                       torch.nn.Linear(16, 4)))
        x = torch.randn(5, 16, requires_grad=True)
        checkpoint(model, x, use_reentrant=False).sum().backward()  # measures both shapes inside
        assert len(SE.decisions()) == 2
        g = x.grad.clone()
        x.grad = None
        model(x).sum().backward()
        torch.testing.assert_close(x.grad, g)

        SE.clear_decisions()
        monkeypatch.setattr(SE, "_cpu_times", lambda cands: pytest.fail("timed under deterministic algorithms"))
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        layer = rgkernels.MaskedLinear(24, 16)
        _step(layer, torch.randn(5, 24, requires_grad=True))
        assert SE.decisions() == {}
        monkeypatch.undo()

        SE.clear_decisions()
        layer = rgkernels.MaskedLinear(64, 32)
        with pytest.raises(RuntimeError, match="cannot be multiplied"):  # nn.Linear's own message
            layer(torch.randn(16, 65))
        assert SE.decisions() == {}
        _step(layer, torch.randn(16, 64, requires_grad=True))
        assert list(SE.decisions().values()) in (["aten"], ["ukernel"])  # measured: not marked unmeasurable
    SE.clear_decisions()


def test_gemm_timing_interleaves_the_candidates():
    """Each round runs every candidate once, the order rotated between rounds; medians per candidate."""
    from rgkernels import sparse_exec as SE

    order = []
    cands = {name: (lambda n=name: order.append(n)) for name in ("aten", "ukernel")}
    times = SE._cpu_times(cands, warmup=1, rounds=4)
    assert order == ["aten", "ukernel"] + ["aten", "ukernel", "ukernel", "aten"] * 2
    assert set(times) == {"aten", "ukernel"} and all(t >= 0 for t in times.values())


@pytest.mark.skipif("ukernel" not in cpu_gemms(), reason="no oneDNN micro-kernel on this CPU / build")
@pytest.mark.parametrize("b,k,o", [(1, 1, 1), (3, 5, 7), (64, 300, 129), (130, 65, 70), (2, 1000, 3)])
def test_micro_kernel_and_aten_gemms_agree(b, k, o):
    """Same layer, same masked weight, the two GEMM paths: equal up to float32 GEMM rounding (float64 is
    the reference in test_cpu_masked_linear; here the block edges of the micro-kernel path)."""
    torch.manual_seed(0)
    layer = rgkernels.MaskedLinear(k, o)
    layer.threshold.data.uniform_(-0.01, 0.3 / k ** 0.5)
    x = torch.randn(b, k)
    out = {}
    for gemm in ("ukernel", "aten"):
        xg = x.clone().requires_grad_()
        with cpu_gemm(gemm):
            y = layer(xg)
            y.backward(torch.ones_like(y))
        out[gemm] = [y.detach(), xg.grad, layer.weight.grad.clone(), layer.threshold.grad.clone()]
        layer.weight.grad = layer.threshold.grad = layer.bias.grad = None
    for got, want in zip(out["ukernel"], out["aten"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


def test_dispatch_modes_see_aten_gemms():
    """Under a Python dispatch mode (FlopCounterMode) the node runs ATen's GEMMs, so the mode sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = rgkernels.MaskedLinear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        layer(x).sum().backward()
    assert fc.get_total_flops() == 3 * 2 * 4 * 16 * 8  # forward, input gradient, weight gradient
