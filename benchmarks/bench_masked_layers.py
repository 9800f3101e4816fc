"""Masked layers, forward + backward, against the dense nn layer and an eager reference layer.

  dense      the nn layer (nn.Linear / nn.Conv2d / nn.ConvTranspose2d) with the same weights: the floor
  masked     the masked layer in sparse mode with execution="auto": on CPU the masked-weight path
             (compiled CPU masked_weight kernel when built, then the CPU GEMM; linear layers as one node,
             convolutions without their entirely pruned output channels where that pays); on a GPU the
             path "auto" measured for this shape (rgkernels/sparse_exec.py)
  eager      the masked layer on the reference backend (masked_weight as a chain of PyTorch ops)
  fused      (GPU) execution="fused": Triton, mask in the GEMM prologue, row compaction
  mw         (GPU) execution="masked_weight": fused masked-weight op + cuBLAS / cuDNN

Sparsity of the masked variants: unstructured keep ratios 1.0, 0.7, 0.5, 0.3 (per-row thresholds at the
row's |W| quantile) and 25% / 50% of the rows entirely pruned (the other rows dense). Phases: "step"
(forward + input gradient + weight / threshold gradient) everywhere; "fwd_dgrad" (forward + input
gradient, the GEMMs sparsity can shorten, §4) on a GPU. Shapes: benchmarks/shapes.py LAYER_CASES (SNGAN
32x32, StyleGAN2 256x256, FastGAN 256x256 with their batch sizes); on CPU only the cases marked for it,
with the threads set by RGKERNELS_BENCH_THREADS (default: torch's). float32, or RGKERNELS_BENCH_DTYPE
(bfloat16 / float16 on a GPU: tensor-core GEMMs; float32 F.linear runs full-precision FMA on both paths
unless TF32 is enabled, see rgkernels/ops/_triton_util.dot_precision).

On a shared CPU, wall-clock times swing with the other load; for stable ratios run one thread and time
the thread's CPU time:
    RGKERNELS_BENCH_THREADS=1 pytest benchmarks/bench_masked_layers.py --benchmark-only \
        --benchmark-timer=time.thread_time
(thread_time counts only the calling thread: use it with one thread only). Big CPU tensors are
page-faulted in at every allocation (glibc maps blocks over 32 MB afresh); THP_MEM_ALLOC_ENABLE=1 (a
PyTorch setting: transparent huge pages for CPU tensors) cuts that cost about 4x for dense and masked.

On a GPU each case also records extra_info["host_median_s"], the host's time to issue a step (forward and
backward, before the sync that ends it): where it is close to the step's time, the step is bound by the host
(Python, kernel launches), not by the GPU (benchmarks/report.py tabulates it for the target cases).

Paired CPU ratio (`test_masked_layer_cpu_ratio`): on a shared machine two cases timed minutes apart
differ by more than the 5% the CPU target allows, so each round there runs the dense layer and the
masked layer back to back (alternating which goes first) and the ratio of their median times is
recorded in extra_info["ratio"] (one thread unless RGKERNELS_BENCH_THREADS says otherwise; the clock,
extra_info["clock"], is the thread's CPU time with one thread and wall time with more).

Targets (BENCHMARKS.md, not asserted): GPU keep 1.0 <= 1.05x dense and 50% rows pruned <= 0.65x dense
for fwd_dgrad; CPU masked <= 1.05x dense for a step.
"""
import os
import statistics
import time

import pytest
import torch
from torch import nn

import rgkernels
from rgkernels import sparse_exec

from benchutil import paired_clock, sync
from shapes import LAYER_CASES

SPARSITY = {"keep1.0": (1.0, 0.0), "keep0.7": (0.7, 0.0), "keep0.5": (0.5, 0.0), "keep0.3": (0.3, 0.0),
            "rows25": (1.0, 0.25), "rows50": (1.0, 0.5)}

if os.environ.get("RGKERNELS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["RGKERNELS_BENCH_THREADS"]))
DTYPE = getattr(torch, os.environ.get("RGKERNELS_BENCH_DTYPE", "float32"))  # e.g. bfloat16 on a GPU


def _cases():
    out = []
    for model, name, kind, wshape, xshape, stride, padding, on_cpu in LAYER_CASES:
        case = (model, name, kind, wshape, xshape, stride, padding)
        cid = f"{model}-{name}"
        if on_cpu:
            out.append(pytest.param(case, "cpu", id=f"{cid}-cpu"))
        out.append(pytest.param(case, "cuda", id=f"{cid}-cuda", marks=pytest.mark.gpu))
    return out


def _make(kind, wshape, stride, padding, masked):
    if kind == "linear":
        cls = rgkernels.MaskedLinear if masked else nn.Linear
        return cls(wshape[1], wshape[0])
    if kind == "conv_transpose":
        cls = rgkernels.MaskedConvTranspose2d if masked else nn.ConvTranspose2d
    else:
        cls = rgkernels.MaskedConv2d if masked else nn.Conv2d
    return cls(wshape[1], wshape[0], tuple(wshape[2:]), stride=stride, padding=padding)


def _set_sparsity(layer, keep, rows_dead, gen):
    with torch.no_grad():
        rows = layer._to_rows(layer.weight.detach())  # one row per output channel (transposed convs too)
        a = rows.abs().reshape(rows.shape[0], -1).float()
        if keep >= 1.0:
            t = torch.zeros(a.shape[0], device=a.device)
        else:
            t = torch.quantile(a.cpu(), 1.0 - keep, dim=1).to(a.device)
        n_dead = int(round(rows_dead * a.shape[0]))
        if n_dead:
            dead = torch.randperm(a.shape[0], generator=gen)[:n_dead].to(a.device)
            t[dead] = a.max(1).values[dead] + 1.0
        layer.threshold.copy_(t)


def _layer(case, device, impl, sparsity, dtype):
    model, name, kind, wshape, xshape, stride, padding = case
    gen = torch.Generator().manual_seed(0)
    dense = _make(kind, wshape, stride, padding, masked=False)
    if impl == "dense":
        return dense.to(device, dtype)
    layer = _make(kind, wshape, stride, padding, masked=True)
    layer.load_state_dict(dense.state_dict(), strict=False)
    layer = layer.to(device, dtype)
    _set_sparsity(layer, *SPARSITY[sparsity], gen)
    layer.execution = {"masked": "auto", "eager": "masked_weight", "fused": "fused", "mw": "masked_weight"}[impl]
    return layer


def _rounds(case, device):
    return 20 if device == "cuda" else 3


IMPLS_CPU = ["dense", "masked", "eager"]
IMPLS_GPU = ["dense", "masked", "eager", "fused", "mw"]


def _params():
    out = []
    for p in _cases():
        case, device = p.values
        impls = IMPLS_CPU if device == "cpu" else IMPLS_GPU
        phases = ["step"] if device == "cpu" else ["step", "fwd_dgrad"]
        for phase in phases:
            for impl in impls:
                for sp in (["-"] if impl == "dense" else list(SPARSITY)):
                    out.append(pytest.param(case, device, phase, impl, sp, id=f"{p.id}-{phase}-{impl}-{sp}",
                                            marks=p.marks))
    return out


@pytest.mark.parametrize("case,device,phase,impl,sparsity", _params())
def test_masked_layer(benchmark, case, device, phase, impl, sparsity):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dtype = DTYPE
    layer = _layer(case, device, impl, sparsity, dtype)
    x = torch.randn(case[4], device=device, dtype=dtype, requires_grad=True)
    if phase == "fwd_dgrad":
        for p in layer.parameters():
            p.requires_grad_(False)
    params = [p for p in layer.parameters() if p.requires_grad]
    with torch.no_grad():
        g = torch.ones_like(layer(x)).normal_()
    benchmark.extra_info.update(model=case[0], layer=case[1], device=device, phase=phase, impl=impl,
                                sparsity=sparsity, weight=list(case[3]), input=list(case[4]),
                                threads=torch.get_num_threads(), dtype=str(dtype))
    backend = "reference" if impl == "eager" else None
    host = []  # per step, the host's time to issue it (on a GPU: before the sync that ends the step)

    def run():
        t0 = time.perf_counter()
        with rgkernels.use_backend(backend):
            y = layer(x)
        y.backward(g)
        x.grad = None
        for p in params:
            p.grad = None
        host.append(time.perf_counter() - t0)
        sync(device)

    run()  # JIT / "auto" decision outside the timing
    if impl == "masked" and isinstance(layer, rgkernels.MaskedLayer):
        benchmark.extra_info["path"] = sparse_exec.resolve(layer, x, layer.weight)
    rounds = _rounds(case, device)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    if device == "cuda":  # a step whose issue takes about as long as the step is bound by the host, not the GPU
        benchmark.extra_info["host_median_s"] = statistics.median(host[-rounds:])


PAIRED_ROUNDS = int(os.environ.get("RGKERNELS_BENCH_PAIRED_ROUNDS", "25"))


def _paired_params():
    out = []
    for p in _cases():
        case, device = p.values
        if device != "cpu":
            continue
        for sp in SPARSITY:
            out.append(pytest.param(case, sp, id=f"{p.id}-{sp}"))
    return out


def _paired_setup(case, sparsity):
    """(dense layer, masked layer in sparse mode, step(layer)) for the paired CPU benchmarks; step runs a
    forward and backward on one fixed input and output gradient and clears the gradients."""
    torch.set_num_threads(int(os.environ.get("RGKERNELS_BENCH_THREADS", "1")))
    dense = _layer(case, "cpu", "dense", "-", DTYPE)
    masked = _layer(case, "cpu", "masked", sparsity, DTYPE)
    masked.execution = "masked_weight"
    x = torch.randn(case[4], dtype=DTYPE, requires_grad=True)
    with torch.no_grad():
        g = torch.ones_like(dense(x)).normal_()

    def step(layer):
        y = layer(x)
        y.backward(g)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    return dense, masked, step


@pytest.mark.parametrize("case,sparsity", _paired_params())
def test_masked_layer_cpu_ratio(benchmark, case, sparsity):
    """Dense and masked (sparse mode, default execution) step times measured in the same rounds."""
    dense, masked, step = _paired_setup(case, sparsity)
    clock_name, clock = paired_clock()

    times = {"dense": [], "masked": []}

    def pair():
        order = ("dense", "masked") if len(times["dense"]) % 2 == 0 else ("masked", "dense")
        for name in order:
            t0 = clock()
            step(dense if name == "dense" else masked)
            times[name].append(clock() - t0)

    step(dense), step(masked)  # warm-up outside the timing
    benchmark.pedantic(pair, rounds=PAIRED_ROUNDS, warmup_rounds=1)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    benchmark.extra_info.update(model=case[0], layer=case[1], device="cpu", sparsity=sparsity, weight=list(case[3]),
                                input=list(case[4]), threads=torch.get_num_threads(), dtype=str(DTYPE),
                                dense_median_s=med["dense"], masked_median_s=med["masked"],
                                ratio=med["masked"] / med["dense"], rounds=len(times["dense"]), clock=clock_name,
                                # whether the masked layer's GEMMs left its entirely pruned rows out (the CPU
                                # linear node, the compacted convolution: both decide per shape and share)
                                rows_skipped=masked._exec_record is not None)


def _gemm_path_params():
    out = []
    for p in _paired_params():
        case, sparsity = p.values
        one_position = case[2] == "conv" and tuple(case[3][2:]) == tuple(case[4][2:]) and case[6] == 0
        if (case[2] == "linear" or one_position) and sparsity in ("keep1.0", "keep0.5", "rows25", "rows50"):
            out.append(p)
    return out


@pytest.mark.parametrize("case,sparsity", _gemm_path_params())
def test_cpu_masked_linear_gemm_paths(benchmark, case, sparsity):
    """Where the CPU masked linear's saving comes from: dense nn layer, masked layer on the oneDNN
    micro-kernel GEMMs (the default) and masked layer on ATen's GEMMs (RGKERNELS_CPU_GEMM=aten), timed in
    the same rounds. extra_info: ratio_ukernel, ratio_aten (masked / dense medians)."""
    ext = rgkernels._backend.extension()
    if ext is None or ext.cpu_gemm_reason() not in ("", "RGKERNELS_CPU_GEMM=aten"):
        pytest.skip("no oneDNN micro-kernel here")
    dense, masked, run = _paired_setup(case, sparsity)
    clock_name, clock = paired_clock()
    before = ext.cpu_gemm()

    def step(layer, gemm=None):
        if gemm is not None:
            ext.set_cpu_gemm(gemm)
        t0 = clock()
        run(layer)
        return clock() - t0

    times = {"dense": [], "ukernel": [], "aten": []}
    order = [("dense", dense, None), ("ukernel", masked, "ukernel"), ("aten", masked, "aten")]

    def rounds():
        k = len(times["dense"]) % 3
        for name, layer, gemm in order[k:] + order[:k]:  # rotate which goes first
            times[name].append(step(layer, gemm))

    try:
        for name, layer, gemm in order:
            step(layer, gemm)  # warm-up
        benchmark.pedantic(rounds, rounds=PAIRED_ROUNDS, warmup_rounds=1)
    finally:
        ext.set_cpu_gemm(before)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    benchmark.extra_info.update(model=case[0], layer=case[1], device="cpu", sparsity=sparsity,
                                weight=list(case[3]), input=list(case[4]), threads=torch.get_num_threads(),
                                dtype=str(DTYPE), dense_median_s=med["dense"], ukernel_median_s=med["ukernel"],
                                aten_median_s=med["aten"], ratio_ukernel=med["ukernel"] / med["dense"],
                                ratio_aten=med["aten"] / med["dense"], rounds=len(times["dense"]), clock=clock_name)
