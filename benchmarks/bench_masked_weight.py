"""masked_weight forward + backward: fused kernel vs eager composition vs plain dense.

  fused    rgkernels.masked_weight on the device's fast backend (compiled CPU / CUDA, Triton)
  eager    the same math as a chain of PyTorch ops (the reference backend)
  dense    no mask at all: an elementwise pass-through of the weight (the floor for any op
           that must read W and write W_hat, and read g and write the weight gradient)
  copy     (GPU) a device copy moving the same bytes as fused forward + backward

Targets (BENCHMARKS.md, not asserted): CPU fused >= 4x faster than eager at >= 1M elements;
GPU fused within 1.25x of the copy at >= 4M elements.
"""
import pytest
import torch

import rgkernels
from rgkernels import _backend

from benchutil import devices, sync

SIZES = {"4K": (64, 64), "64K": (256, 256), "1M": (1024, 1024), "4M": (2048, 2048), "16M": (4096, 4096)}


def _inputs(size, device):
    c, k = SIZES[size]
    w = torch.randn(c, k, device=device).requires_grad_()
    t = (torch.rand(c, device=device) * 0.8).requires_grad_()  # ~40% pruned
    g = torch.randn(c, k, device=device)
    return w, t, g


def _step(fn, w, t, g):
    out = fn(w, t)
    out.backward(g)
    w.grad = None
    t.grad = None


def _rounds(size, device):
    return 3 if (device == "cpu" and size in ("4M", "16M")) else 20


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", ["fused", "eager", "dense", "triton"])
def test_masked_weight_fwd_bwd(benchmark, device, size, impl):
    w, t, g = _inputs(size, device)
    if impl == "dense":
        fn = lambda w, t: w * 1.0  # noqa: E731
    else:
        backend = {"fused": None, "eager": "reference", "triton": "triton"}[impl]
        if impl == "triton" and device != "cuda":
            pytest.skip("Triton is benchmarked on a GPU only (the CPU interpreter is not a kernel)")
        if impl == "fused":
            backend = _backend.choose(device)
            if backend == "reference":
                pytest.skip("no fused backend built for this device")
        fn = lambda w, t: rgkernels.masked_weight(w, t, backend=backend)  # noqa: E731
    benchmark.extra_info.update(device=device, numel=w.numel(), impl=impl)

    def run():
        _step(fn, w, t, g)
        sync(device)

    benchmark.pedantic(run, rounds=_rounds(size, device), warmup_rounds=1)


@pytest.mark.parametrize("size", ["4M", "16M"])
def test_device_copy_same_bytes(benchmark, size):
    if not torch.cuda.is_available():
        pytest.skip("the copy baseline is a GPU figure")
    c, k = SIZES[size]
    # fused fwd + bwd moves 5 floats per element (fwd: W in, W_hat out; bwd: W, g in, grad out)
    src = torch.randn(5 * c * k // 2, device="cuda")
    dst = torch.empty_like(src)
    benchmark.extra_info.update(device="cuda", numel=c * k, impl="copy")

    def run():
        dst.copy_(src)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=50, warmup_rounds=2)


@pytest.mark.parametrize("phase", ["fwd", "bwd"])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_cpu_kernel_per_isa(benchmark, isa, phase):
    """The compiled CPU kernels alone (no autograd, no allocation of the inputs) at 1M float32 elements,
    once per instruction-set variant (csrc/cpu/masked_weight_rows.h); variants this CPU lacks are skipped."""
    ext = _backend.extension()
    if ext is None:
        pytest.skip("compiled extension unavailable")
    if isa not in ext.cpu_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    w, t, g = _inputs("1M", "cpu")
    w, t = w.detach(), t.detach()
    ops = torch.ops.rgkernels
    old = ext.cpu_isa()
    ext.set_cpu_isa(isa)
    try:
        benchmark.extra_info.update(device="cpu", numel=w.numel(), impl=f"compiled-{isa}", phase=phase,
                                    threads=torch.get_num_threads())
        if phase == "fwd":
            benchmark.pedantic(lambda: ops.masked_weight_fwd(w, t, 0.01), rounds=30, warmup_rounds=2)
        else:
            benchmark.pedantic(lambda: ops.masked_weight_bwd(g, w, t, 0), rounds=30, warmup_rounds=2)
    finally:
        ext.set_cpu_isa(old)


@pytest.mark.parametrize("device", devices())
def test_autograd_node_host_time(benchmark, device):
    """The masked-weight op's autograd node in C++ against the Python autograd.Function, on a 4K weight
    whose kernels take microseconds: what is left is the host's time per call (on a GPU, a small layer's
    step is bound by it). The two alternate in rounds of 200 forward + backward calls; extra_info holds
    each one's median per call and the ratio (C++ / Python)."""
    import statistics
    import time

    from rgkernels.ops import masked_weight as MW

    if _backend.choose(device) not in ("cpu", "cuda") or MW._cpp_node() is None:
        pytest.skip("no compiled backend with the C++ node here")
    w, t, g = _inputs("4K", device)
    times = {True: [], False: []}

    def calls(cpp, n=200):
        MW.CPP_NODE = cpp
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            _step(rgkernels.masked_weight, w, t, g)
        sync(device)
        times[cpp].append((time.perf_counter() - t0) / n)

    def pair():
        first = len(times[True]) % 2 == 0
        for cpp in ((True, False) if first else (False, True)):
            calls(cpp)

    try:
        calls(True), calls(False)  # warm-up
        times[True].clear(), times[False].clear()
        benchmark.pedantic(pair, rounds=15, warmup_rounds=0)
    finally:
        MW.CPP_NODE = True
    cpp, py = statistics.median(times[True]), statistics.median(times[False])
    benchmark.extra_info.update(device=device, numel=w.numel(), cpp_median_s=cpp, python_median_s=py, ratio=cpp / py)
