"""The fused CPU masked linear (rgkernels/ops/cpu_masked_linear.py, csrc/cpu/masked_linear_cpu.cpp) and
the instruction-set variants of the CPU row kernels (csrc/cpu/masked_weight_rows.cpp).

References: DESIGN.md §2 evaluated in float64 (test_masked_weight.ref64) with the GEMMs in float64,
and the reference composition F.linear(x, masked_weight(W, t, backend="reference"), b)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rgkernels
from rgkernels import _backend
from rgkernels.ops import cpu_masked_linear
from rgkernels.ops.triton_mask_stats import unpack_bits

from conftest import backward, cpu_gemm, cpu_gemms, cpu_isa as isa
from test_masked_weight import ref64, rel_err



@pytest.fixture(autouse=True)
def _needs_extension():
    """The compiled kernels must be built wherever the tests run: their absence fails, never skips."""
    if _backend.extension() is None:
        pytest.fail("the compiled extension rgkernels._C is not built or does not load (pip install -e .; "
                    "python -m rgkernels.info says why)")


def rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def thresholds(w, keep=0.5):
    return w.detach().float().abs().reshape(w.shape[0], -1).quantile(1 - keep, dim=1).contiguous()


def linear_ref64(x, w, t, b, dy, mode="dst", guard=0.01):
    """y, dx, dW, dt, db of F.linear(x, W * M, b) in float64 (§2 for the masked weight)."""
    k = w.shape[1]
    x2, dy2 = x.reshape(-1, k).double(), dy.reshape(-1, w.shape[0]).double()
    g = dy2.t() @ x2  # dL/dW_hat
    w_hat, counts, t_after, gw, gt = ref64(w, t, g, mode, guard)
    y = x2 @ w_hat.t() + (b.double() if b is not None else 0)
    dx = dy2 @ w_hat
    db = dy2.sum(0) if b is not None else None
    return y.reshape(*x.shape[:-1], w.shape[0]), dx.reshape(x.shape), gw, gt, db, counts, t_after


@pytest.fixture(params=["cpp"] + [f"cpp-{g}" for g in cpu_gemms()[1:]] + ["python"], autouse=True)
def impl(request, monkeypatch):
    """Every test runs with the C++ autograd node (its GEMMs on the oneDNN micro-kernel where this CPU has
    it, and on ATen: "cpp-aten") and with the Python autograd.Function."""
    real = cpu_masked_linear.masked_linear_cpu
    node = "python" if request.param == "python" else "cpp"
    monkeypatch.setattr(cpu_masked_linear, "masked_linear_cpu", lambda *a, **k: real(*a, **{"impl": node, **k}))
    with cpu_gemm("aten" if request.param == "cpp-aten" else cpu_gemms()[0]):
        yield request.param


def mask_of(record, counts, k):
    """Bool [O, K] mask from a node's mask record: the C++ node's bits, or W_hat (read as the layers read
    it: zero entries are pruned unless the whole row is kept)."""
    if record.dtype == torch.uint8:
        assert record.shape == (counts.numel(), (k + 7) // 8)
        return unpack_bits(record, k)
    return (record != 0) | (counts == k)[:, None]


def run_fused(x, w, t, b, dy, mode="dst", guard=0.01):
    x, w, t = x.clone().requires_grad_(), w.clone().requires_grad_(), t.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    mode_id = {"dst": 0, "masked": 1}[mode]
    y, record, counts, _ = cpu_masked_linear.masked_linear_cpu(x, w, t, b, mode_id, -1.0 if guard is None else guard)
    y.backward(dy)
    mask = mask_of(record, counts, w.shape[1])
    return y.detach(), x.grad, w.grad, t.grad, None if b is None else b.grad, counts, t.detach(), mask


def run_composition(x, w, t, b, dy, mode="dst", guard=0.01, backend="reference"):
    x, w, t = x.clone().requires_grad_(), w.clone().requires_grad_(), t.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    w_hat, counts = rgkernels.masked_weight(w, t, mode, guard_ratio=guard, backend=backend, return_counts=True)
    y = F.linear(x, w_hat, b)
    y.backward(dy)
    mask = mask_of(w_hat.detach(), counts, w.shape[1])
    return y.detach(), x.grad, w.grad, t.grad, None if b is None else b.grad, counts, t.detach(), mask


TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 4e-3}

SHAPES = [  # (leading dims of x, in K, out O)
    ((64,), 128, 512),  # several row blocks
    ((3,), 1, 1),
    ((5,), 7, 33),
    ((2, 3), 37, 53),  # linear on leading dims
    ((4,), 70000, 3),  # K above the block size: one row per block
    ((1,), 300, 700),  # a partial last block
    ((300,), 20, 70),  # more batch rows than one forward / weight-gradient tile (256)
    ((0,), 16, 70),  # an empty batch: zero gradients
]


@pytest.mark.parametrize("lead,k,o", SHAPES)
@pytest.mark.parametrize("mode", ["dst", "masked"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64(lead, k, o, mode, bias):
    x, w = rand(*lead, k, seed=1), rand(o, k, seed=2, scale=0.5)
    t = thresholds(w, 0.6)
    t[0] = -0.1  # a row that keeps everything, zeros included
    b = rand(o, seed=3) if bias else None
    dy = rand(*lead, o, seed=4)
    y, dx, dw, dt, db, counts, t_after, mask = run_fused(x, w, t, b, dy, mode)
    r_y, r_dx, r_dw, r_dt, r_db, r_counts, r_t = linear_ref64(x, w, t, b, dy, mode)
    assert y.shape == r_y.shape and dx.shape == x.shape and dw.shape == w.shape and dt.shape == t.shape
    assert torch.equal(counts, r_counts) and torch.equal(t_after, r_t.float())
    assert torch.equal(mask, w.abs() - t_after[:, None] > 0)
    for got, want in ((y, r_y), (dx, r_dx), (dw, r_dw), (dt, r_dt)) + (((db, r_db),) if bias else ()):
        assert rel_err(got, want) <= TOL[torch.float32], rel_err(got, want)
    pruned = (w.abs() - t[:, None] <= 0) & (t[:, None] >= 0)
    assert (dw[pruned] == 0).all(), "pruned weights get exactly zero gradient"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    x, w = rand(9, 40, dtype=dtype, seed=1), rand(70, 40, dtype=dtype, seed=2, scale=0.5)
    t, b, dy = thresholds(w), rand(70, dtype=dtype, seed=3), rand(9, 70, dtype=dtype, seed=4)
    y, dx, dw, dt, db, *_ = run_fused(x, w, t, b, dy)
    r_y, r_dx, r_dw, r_dt, r_db, *_ = linear_ref64(x, w, t, b, dy)
    assert y.dtype == dw.dtype == dx.dtype == dtype and dt.dtype == torch.float32
    for got, want in ((y, r_y), (dx, r_dx), (dw, r_dw), (db, r_db)):
        assert rel_err(got, want) <= TOL[dtype], rel_err(got, want)
    assert rel_err(dt, r_dt) <= max(TOL[dtype], 1e-6)  # grad_threshold is float32


def test_forward_and_input_gradient_equal_the_composition_exactly(impl):
    """Same mask: counts, threshold, the mask and the bias gradient are bit-identical to F.linear on
    the compiled masked_weight; so are the forward and the input gradient where the node runs ATen's GEMMs
    (with the micro-kernel they differ by float32 GEMM rounding, and the bias gradient is dy's column
    sums in batch order, exactly); the weight gradients differ by the blocked GEMM's rounding."""
    x, w = rand(32, 96, seed=1), rand(300, 96, seed=2, scale=0.5)
    t, b, dy = thresholds(w), rand(300, seed=3), rand(32, 300, seed=4)
    fused = run_fused(x, w, t, b, dy)
    comp = run_composition(x, w, t, b, dy, backend="cpu")
    exact_gemms = impl in ("python", "cpp-aten") or _backend.extension().cpu_gemm() == "aten"
    for i in (0, 1, 4, 5, 6, 7):  # y, dx, db, counts, t, mask
        if i in (0, 1) and not exact_gemms:
            assert rel_err(fused[i], comp[i]) <= 1e-6, i
        elif i == 4 and not exact_gemms:
            in_order = dy[0].clone()
            for r in range(1, dy.shape[0]):
                in_order += dy[r]
            assert torch.equal(fused[i], in_order)
        else:
            assert torch.equal(fused[i], comp[i]), i
    assert rel_err(fused[2], comp[2]) <= 1e-6 and rel_err(fused[3], comp[3]) <= 1e-5


def test_non_contiguous_inputs():
    w_store = rand(48, 80, seed=2, scale=0.5)
    w = w_store.t().contiguous().t()  # same values, column-major strides
    x = rand(80, 16, seed=1).t()  # transposed view
    dy = rand(1, 48, seed=4).expand(16, 48)  # stride-0 rows, as y.sum()'s gradient
    t, b = thresholds(w_store), rand(48, seed=3)
    assert not w.is_contiguous() and not x.is_contiguous()
    got = run_fused(x, w, t, b, dy)
    want = linear_ref64(x, w, t, b, dy)
    for g_, r_ in zip(got[:5], want[:5]):
        assert rel_err(g_, r_) <= TOL[torch.float32]


@pytest.mark.parametrize("batch", [4, 60])  # the micro-kernel's recomputed forward in either orientation
def test_collapse_guard_resets_threshold(batch):
    x, w = rand(batch, 100, seed=1), rand(10, 100, seed=2)
    t = torch.full((10,), 10.0)  # prunes everything: keep ratio 0 <= 1%
    dy = rand(batch, 10, seed=4)
    y, dx, dw, dt, _, counts, t_after, mask = run_fused(x, w, t, None, dy)
    assert torch.equal(t_after, torch.zeros(10)) and mask.all() and (counts == 100).all()
    r = linear_ref64(x, w, t, None, dy)
    assert rel_err(y, r[0]) <= 1e-6 and rel_err(dw, r[2]) <= 1e-5 and rel_err(dx, r[1]) <= 1e-5
    # guard off: stays pruned, output is the bias-free zero
    y2, *_ = run_fused(x, w, t, None, dy, guard=None)
    assert torch.equal(y2, torch.zeros(batch, 10))


def test_only_input_gradient():
    """Frozen weight and threshold (a G forward inside D's step, say): no weight-gradient GEMM, same dx."""
    x, w = rand(8, 30, seed=1).requires_grad_(), rand(20, 30, seed=2)
    t = thresholds(w)
    y, _, _, _ = cpu_masked_linear.masked_linear_cpu(x, w, t, None, 0, 0.01)
    y.backward(torch.ones_like(y))
    r = linear_ref64(x.detach(), w, t, None, torch.ones(8, 20))
    assert rel_err(x.grad, r[1]) <= 1e-6


def test_op_checks_and_opcheck():
    ops = torch.ops.rgkernels
    x, w, dy = rand(4, 6), rand(5, 6), rand(4, 5)
    t = torch.zeros(5)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        ops.masked_linear_bwd(dy, rand(4, 7), w, w, t, 0, True, True)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.masked_linear_bwd(dy.double(), x, w, w, t, 0, True, True)
    with pytest.raises(RuntimeError, match="grad_mode"):
        ops.masked_linear_bwd(dy, x, w, w, t, 5, True, True)
    with pytest.raises(RuntimeError, match="threshold"):
        ops.masked_linear_bwd(dy, x, w, w, t.double(), 0, True, True)
    gx, gw, gt, gb = ops.masked_linear_bwd(dy, x, w, w, t, 0, False, False)
    assert gx.numel() == 0 and gb.numel() == 0 and gw.shape == w.shape and gt.shape == t.shape
    torch.library.opcheck(ops.masked_linear_bwd, (dy, x, w, w * (w.abs() > 0.3), t + 0.3, 0, True, True))
    torch.library.opcheck(ops.masked_linear_bwd, (dy, x, w, w, t, 1, False, True))


# ---- the layers take the fused path ------------------------------------------------------------

@contextlib.contextmanager
def count_fused_calls():
    """Counts the layers' calls of the fused path (rgkernels.layers calls it through the module)."""
    calls = []
    real = cpu_masked_linear.masked_linear_cpu

    def spy(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    cpu_masked_linear.masked_linear_cpu = spy
    try:
        yield calls
    finally:
        cpu_masked_linear.masked_linear_cpu = real


def _layer_grads(layer, x, backend=None):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with rgkernels.use_backend(backend):
        y = layer(x)
    y.backward(torch.ones_like(y).normal_(generator=torch.Generator().manual_seed(7)))
    bias_grad = None if layer.bias is None else layer.bias.grad
    return [y.detach(), x.grad, layer.weight.grad, layer.threshold.grad, bias_grad, layer.mask().clone()]


@pytest.mark.parametrize("kind", ["linear", "conv_full_kernel"])
def test_layer_uses_fused_path_and_matches_reference(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = rgkernels.MaskedLinear(40, 90), torch.randn(6, 40)
    else:  # FastGAN-style: a 4x4 conv on a 4x4 map (one output position) is a linear layer
        layer, x = rgkernels.MaskedConv2d(12, 20, 4, stride=2), torch.randn(3, 12, 4, 4)
    with torch.no_grad():
        layer.threshold.copy_(thresholds(layer.weight))
    assert layer._linear_input(x) is not None
    with count_fused_calls() as calls:
        fused = _layer_grads(layer, x)
    assert len(calls) == 1
    ref = _layer_grads(layer, x, "reference")
    assert torch.equal(fused[5], ref[5]), "same mask"
    for a, b in zip(fused[:5], ref[:5]):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-5


def test_conv_lowering_only_when_exact():
    x = torch.randn(2, 3, 4, 4)
    assert rgkernels.MaskedConv2d(3, 5, 4)._linear_input(x) is not None
    assert rgkernels.MaskedConv2d(3, 5, 4, padding=1)._linear_input(x) is None
    assert rgkernels.MaskedConv2d(3, 5, 3)._linear_input(x) is None
    assert rgkernels.MaskedConv2d(4, 4, 4, groups=2)._linear_input(torch.randn(2, 4, 4, 4)) is None
    assert rgkernels.MaskedConv2d(3, 5, 4, dilation=2)._linear_input(torch.randn(2, 3, 7, 7)) is None


def test_not_taken_where_it_does_not_apply():
    layer, x = rgkernels.MaskedLinear(8, 6), torch.randn(3, 8)
    with count_fused_calls() as calls:
        _layer_grads(layer, x, "reference")  # reference backend forced
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x).float().sum().backward()
        rgkernels.MaskedConv2d(8, 6, 3, padding=1)(torch.randn(2, 8, 5, 5)).sum().backward()
    assert calls == []


def test_spectral_norm_layer_through_fused_path():
    """The mask is computed on the effective weight; the stored parameter's gradient is masked (§2)."""
    torch.manual_seed(0)
    layer = rgkernels.sparsify(nn.utils.parametrizations.spectral_norm(nn.Linear(16, 24)))
    with torch.no_grad():
        layer.threshold.fill_(0.05)
    x = torch.randn(5, 16)
    with count_fused_calls() as calls:
        layer(x).square().sum().backward()
    assert len(calls) == 1
    stored = layer.parametrizations.weight.original
    m = layer.mask()
    assert m is not None and (~m).any()
    assert (stored.grad[~m] == 0).all() and (stored.grad[m] != 0).any()


def test_torch_compile_masked_linear():
    torch.manual_seed(0)
    layer = rgkernels.MaskedLinear(12, 10)
    with torch.no_grad():
        layer.threshold.copy_(thresholds(layer.weight))
    x = torch.randn(4, 12)
    eager = _layer_grads(layer, x)
    compiled = torch.compile(layer, backend="aot_eager")
    layer.zero_grad(set_to_none=True)
    xc = x.clone().requires_grad_()
    y = compiled(xc)
    y.backward(torch.ones_like(y).normal_(generator=torch.Generator().manual_seed(7)))
    for a, b in zip(eager[:5], [y.detach(), xc.grad, layer.weight.grad, layer.threshold.grad, layer.bias.grad]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# ---- instruction-set variants of the row kernels ------------------------------------------------

def test_isa_list_and_switch():
    ext = _backend.extension()
    isas = ext.cpu_isas()
    assert isas[-1] == "baseline" and ext.cpu_isa() in isas
    assert set(isas) <= {"avx512", "avx2", "baseline"}
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        ext.set_cpu_isa("sse9")
    assert _backend.build_info()["cpu_isa"] == ext.cpu_isa()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_isa_variants_bit_identical(dtype):
    """Every variant the CPU can run gives the baseline's bits (no FMA contraction, fixed sum order)."""
    ops = torch.ops.rgkernels
    w = rand(67, 1031, dtype=dtype, seed=2)  # rows longer than one vector, with tails
    t = thresholds(w, 0.5)
    t[3] = -1.0
    g = rand(67, 1031, dtype=dtype, seed=3)
    ws = w.t().contiguous().t()  # strided path too
    results = {}
    for name in _backend.extension().cpu_isas():
        with isa(name):
            out = [*ops.masked_weight_fwd(w, t.clone(), 0.01), *ops.masked_weight_bwd(g, w, t, 0),
                   *ops.masked_weight_bwd(g, w, t, 1), *ops.masked_weight_bwd(g, ws, t, 0)]
        results[name] = out
    base = results["baseline"]
    for name, out in results.items():
        for a, b in zip(out, base):
            assert torch.equal(a, b), name
    r = ref64(w, t, g)
    assert torch.equal(base[0].double(), r[0]) and torch.equal(base[1], r[1])


@pytest.mark.parametrize("lead", [(4,), (2, 3)])
def test_gradient_penalty_double_backward(lead):
    """R1-style: the input gradient taken with create_graph=True and differentiated again reaches the
    weight, threshold and bias as through the reference composition."""
    torch.manual_seed(0)
    layer = rgkernels.MaskedLinear(8, 6)
    with torch.no_grad():
        layer.threshold.copy_(thresholds(layer.weight))
    x = torch.randn(*lead, 8)
    grads = []
    for backend in (None, "reference"):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        with rgkernels.use_backend(backend):
            out = layer(xx)
            (gx,) = torch.autograd.grad(out.square().sum(), xx, create_graph=True)
            (gx.square().sum() + out.sum()).backward()
        grads.append([layer.weight.grad, layer.threshold.grad, layer.bias.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- entirely pruned rows left out of the forward and input-gradient GEMMs (C++ node) -------------

@pytest.mark.parametrize("dead_share", [0.1, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_dead_rows_compacted(dead_share, bias, impl):
    x, w = rand(2, 5, 40, seed=1), rand(64, 40, seed=2, scale=0.5)
    t = thresholds(w, 0.6)
    n_dead = int(round(dead_share * 64))
    dead = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:n_dead]
    t[dead] = w.abs().max() + 1  # rows entirely pruned
    b = rand(64, seed=4) if bias else None
    dy = rand(2, 5, 64, seed=5)
    guard = None  # all rows dead must stay dead here
    x_, w_, t_ = x.clone().requires_grad_(), w.clone().requires_grad_(), t.clone().requires_grad_()
    b_ = b.clone().requires_grad_() if bias else None
    y, _, counts, n_live = cpu_masked_linear.masked_linear_cpu(x_, w_, t_, b_, 0, -1.0)
    y.backward(dy)
    r = linear_ref64(x, w, t, b, dy, guard=guard)
    compacted = impl != "python" and n_dead * 2 >= 64
    assert (n_live is not None) == compacted
    if compacted:
        assert int(n_live[0]) == 64 - n_dead
    assert (counts[dead] == 0).all()
    for got, want in ((y, r[0]), (x_.grad, r[1]), (w_.grad, r[2]), (t_.grad, r[3])) + (((b_.grad, r[4]),) if bias else ()):
        if want.norm() == 0:
            assert got.abs().max() == 0
        else:
            assert rel_err(got, want) <= TOL[torch.float32], rel_err(got, want)
    if bias:  # dead output channels are exactly the bias
        assert torch.equal(y.reshape(-1, 64)[:, dead], b[dead].expand(10, -1))


def test_executed_flops_count_the_compacted_gemms(impl):
    layer = rgkernels.MaskedLinear(32, 16)
    with torch.no_grad():
        layer.threshold.zero_()
        layer.threshold[:8] = layer.weight.abs().max() + 1  # half the rows dead
    x = torch.randn(4, 32)
    rep = rgkernels.count_flops(layer, x)
    (lf,) = rep.layers.values()
    live = 8 if impl != "python" else 16  # the Python node (torch.compile's) runs the dense GEMMs
    assert lf.forward.executed == 2 * 4 * live * 32 and lf.forward.dense == 2 * 4 * 16 * 32
    assert lf.input_grad.executed == 2 * 4 * live * 32
    assert lf.weight_grad.executed == 2 * 4 * 16 * 32
    assert lf.forward.active == 2 * 4 * 8 * 32


@pytest.mark.parametrize("batch", [7, 300])  # input gradient inside the weight-gradient pass / its own pass
def test_compaction_per_block_of_64_rows(impl, batch):
    """The micro-kernel path decides per block of 64 rows (>= 1/2 of the block dead), ATen's per layer
    (>= 1/2 of the layer); the input gradient skips the rows the forward skipped; values as the reference."""
    o = 200  # blocks of 64, 64, 64, 8 rows
    x, w = rand(batch, 24, seed=1), rand(o, 24, seed=2, scale=0.5)
    t = thresholds(w, 0.6)
    dead = list(range(64, 104)) + [3, 30, 130]  # 40 in block 1 (compacted), 1-2 in blocks 0 and 2 (not)
    t[dead] = w.abs().max() + 1
    b, dy = rand(o, seed=4), rand(batch, o, seed=5)
    x_, w_, t_, b_ = (a.clone().requires_grad_() for a in (x, w, t, b))
    y, _, counts, n_live = cpu_masked_linear.masked_linear_cpu(x_, w_, t_, b_, 0, -1.0)
    y.backward(dy)
    ukernel = impl != "python" and _backend.extension().cpu_gemm() == "ukernel" and impl != "cpp-aten"
    if ukernel:
        assert int(n_live[0]) == o - 40
    else:  # 43 dead rows are < 1/2 of 200: the layer is not compacted
        assert n_live is None
    r = linear_ref64(x, w, t, b, dy, guard=None)
    for got, want in ((y, r[0]), (x_.grad, r[1]), (w_.grad, r[2]), (t_.grad, r[3]), (b_.grad, r[4])):
        assert rel_err(got, want) <= TOL[torch.float32], rel_err(got, want)
    assert torch.equal(y[:, dead], b[dead].expand(batch, -1)), "dead outputs are exactly the bias"


# batch 70 < 150 / 2: the micro-kernel's forward transposes its y^T tiles; 80: the W_hat blocks
@pytest.mark.parametrize("batch", [70, 80])
def test_results_do_not_depend_on_the_thread_count(batch):
    x, w = rand(batch, 150, seed=1), rand(333, 150, seed=2, scale=0.5)
    t, b, dy = thresholds(w), rand(333, seed=3), rand(batch, 333, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_fused(x, w, t, b, dy)
        torch.set_num_threads(2)
        two = run_fused(x, w, t, b, dy)
    finally:
        torch.set_num_threads(before)
    for i in (2, 3, 5, 7):  # dW, dt, counts, mask: computed row by row, each row by one thread
        assert torch.equal(one[i], two[i]), i
    ukernel = _backend.extension().cpu_gemm() == "ukernel"
    for i in (0, 1):  # y, dx: every element by one thread on the micro-kernel; ATen's GEMMs may differ
        assert torch.equal(one[i], two[i]) if ukernel else rel_err(one[i], two[i]) <= 1e-6, i


@pytest.mark.parametrize("k", [1, 15, 16, 17, 63, 64, 65, 100, 512, 513, 1040])
def test_isa_variants_bit_identical_through_the_node(impl, k):
    """The AVX-512 variant's float32 rows (intrinsics: masks as mask registers, bits stored 64 at a time,
    tails under lane masks) give the other variants' bits: mask record, counts, weight and threshold
    gradients, also for NaN, +-inf and -0 in the weight and the output gradient, rows longer than one
    block of the threshold gradient's sum (512) and every tail length."""
    if impl == "python":
        pytest.skip("the Python node runs the masked-weight ops (test_isa_variants_bit_identical)")
    x, w = rand(6, k, seed=1), rand(9, k, seed=2, scale=0.5)
    t = thresholds(w, 0.6)
    t[2] = -0.5  # keeps every entry
    w[0, 0], w[1, -1], w[3, k // 2] = float("nan"), float("inf"), -0.0
    if k > 3:
        w[4, 1], w[4, 2] = -float("inf"), 0.0
    dy = rand(6, 9, seed=3)
    dy[1, 5] = float("nan")  # dW row 5 is NaN in every column, kept or pruned (0 * NaN)
    results = {}
    for name in _backend.extension().cpu_isas():
        with isa(name):
            results[name] = run_fused(x, w, t, None, dy, guard=None)
    base = results["baseline"]
    for name, out in results.items():
        for i in (2, 3, 5, 7):  # dW, dt, counts, mask
            assert torch.equal(out[i].isnan(), base[i].isnan()), (name, i)
            assert torch.equal(out[i].nan_to_num(), base[i].nan_to_num()), (name, i)
            assert torch.equal(out[i].float().signbit(), base[i].float().signbit()), (name, i)
    want = w.abs() - t[:, None] > 0
    assert torch.equal(base[7], want) and torch.equal(base[5], want.sum(1, dtype=torch.int32))


def test_mask_bits_of_nan_inf_and_signed_zeros(impl):
    """The C++ node's bit-packed mask is the mask of DESIGN.md §2 (|W| - t > 0, false for NaN); W_hat (the
    Python node's record) cannot tell a pruned NaN (NaN * 0 = NaN) from a kept one."""
    if impl == "python":
        pytest.skip("the Python node records W_hat, not the mask")
    w = rand(3, 19, seed=2)
    w[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    w[1] = 0.0
    t = torch.tensor([0.5, -0.1, 0.2])  # row 1: t < 0 keeps every entry, zeros included
    x, dy = rand(4, 19, seed=1), rand(4, 3, seed=3)
    _, _, _, _, _, counts, _, mask = run_fused(x, w, t, None, dy, guard=None)
    want = w.abs() - t[:, None] > 0
    assert torch.equal(mask, want) and torch.equal(counts, want.sum(1, dtype=torch.int32))
    assert not mask[0, 0] and mask[0, 1] and mask[0, 2] and mask[1].all()


def test_a_backward_into_the_input_alone_runs_no_weight_gradient(impl):
    """RG-GAN's G step differentiates into G's parameters only (backward(inputs=...)): D's layers must not
    compute their weight and threshold gradients there, as F.linear does not. The Python node asks the
    engine (rgkernels/ops/_autograd.py); the C++ node's needs_input_grad is the engine's own answer."""
    from test_cpu_compact_conv import OpLog

    if impl != "python":
        pytest.skip("the C++ node's GEMMs are not all visible to a dispatch mode (the micro-kernel path)")
    x, w, b = rand(6, 13, seed=1).requires_grad_(), rand(9, 13, seed=2).requires_grad_(), rand(9, seed=3)
    t = thresholds(w.detach(), 0.5).requires_grad_()
    y = cpu_masked_linear.masked_linear_cpu(x, w, t, b.requires_grad_(), 0, 0.01)[0]
    dy = rand(6, 9, seed=4)
    with OpLog() as log:
        (dx,) = torch.autograd.grad(y, [x], dy, retain_graph=True)
    ops = [str(func) for func, _ in log.calls]
    assert ops and not any(op.startswith("rgkernels.masked_linear_bwd") for op in ops), ops
    y.backward(dy)
    torch.testing.assert_close(dx, x.grad, rtol=0, atol=0)
    assert w.grad is not None and t.grad is not None



def test_backward_under_compiled_autograd(impl):
    """An eager forward through the node, its backward under compiled autograd (torch.compile of the
    backward graph): the gradients of the plain backward, bit for bit. Compiled autograd refuses C++ nodes
    that mark outputs non-differentiable (an internal assert), so the C++ node must not."""
    torch.manual_seed(0)
    layer = rgkernels.MaskedLinear(8, 6)
    with torch.no_grad():
        layer.threshold.fill_(0.1)
    x = torch.randn(3, 8)
    grads = []
    for compiled in (False, True):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = layer(xx)
        assert ("MaskedLinearFn" in y.grad_fn.name()) == (impl != "python"), y.grad_fn.name()
        backward(y.square().sum(), compiled)
        grads.append([xx.grad, layer.weight.grad, layer.threshold.grad, layer.bias.grad])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
