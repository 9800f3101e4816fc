"""rgkernels.masked_weight on every backend against an independent float64 reference (DESIGN.md §2).

Two references:
  * `ref64` below: the formulas of §2 evaluated in float64 (x = |W| - t taken in the op's compute
    precision, float32, so that the mask is the op's exact mask);
  * an autograd composition (abs, subtract, a step with the surrogate gradient, multiply, then the
    weight gradient multiplied by the mask) that checks the reference backend itself.
Every available backend runs here: the compiled CPU kernels, the PyTorch reference, Triton (under
TRITON_INTERPRET=1 without a GPU, on small shapes), and on a GPU the compiled CUDA kernels.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rgkernels
from rgkernels import _backend

DEVICE_BACKENDS = [("cpu", "reference"), ("cpu", "cpu"), ("cpu", "triton")]
if torch.cuda.is_available():
    DEVICE_BACKENDS += [("cuda", "reference"), ("cuda", "cuda"), ("cuda", "triton")]


def _params(small_only_triton=True):
    out = []
    for dev, be in DEVICE_BACKENDS:
        marks = []
        if be == "triton":
            marks.append(pytest.mark.triton)
        if dev == "cuda":
            marks.append(pytest.mark.gpu)
        out.append(pytest.param(dev, be, id=f"{dev}-{be}", marks=marks))
    return out


def _require(dev, be):
    ok, why = _backend.availability(be, dev)
    if not ok:
        if be == "cpu":  # the compiled CPU kernels must be built wherever the tests run
            pytest.fail(f"compiled CPU backend unavailable: {why}")
        pytest.skip(f"{be} backend unavailable on {dev}: {why}")


def hprime(x):
    ax = x.abs()
    return torch.where(ax <= 0.4, 2 - 4 * ax, torch.where(ax <= 1, torch.full_like(ax, 0.4), torch.zeros_like(ax)))


def ref64(w, t, g, mode="dst", guard=0.01):
    """§2 in float64. Returns (out, counts, new_threshold, grad_w, grad_t)."""
    c = w.shape[0]
    w2 = w.reshape(c, -1)
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    t = t.clone()
    x = (w2.to(cdt).abs() - t.to(cdt)[:, None]).double()
    m = x > 0
    if guard is not None and w2.numel() > 0 and m.sum().item() / w2.numel() <= guard:
        t.zero_()
        x = (w2.to(cdt).abs() - t.to(cdt)[:, None]).double()
        m = x > 0
    wd, gd = w2.double(), g.reshape(c, -1).double()
    out = wd * m
    h = hprime(x)
    gt = -(gd * wd * h).sum(1)
    gw = m * gd * (1 + wd.abs() * h) if mode == "dst" else m * gd
    return out.reshape(w.shape), m.sum(1).int(), t, gw.reshape(w.shape), gt


class _Step(torch.autograd.Function):
    """S(x) = [x > 0] with the long-tailed surrogate H'(x) as its derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * hprime(x)


def autograd_composition(w, t, g, mode="dst"):
    w = w.detach().double().requires_grad_()
    t = t.detach().double().requires_grad_()
    x = w.abs() - t.view(-1, *([1] * (w.dim() - 1)))
    m = _Step.apply(x)
    out = w * m
    out.backward(g.double())
    mask = (x > 0).double()
    gw = w.grad * mask if mode == "dst" else g.double() * mask
    return out.detach(), gw, t.grad


def run(w, t, g, mode="dst", backend="reference", guard=0.01):
    w = w.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out, counts = rgkernels.masked_weight(w, t, mode, guard_ratio=guard, backend=backend, return_counts=True)
    out.backward(g)
    return out.detach(), counts, t.detach(), w.grad, t.grad


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def check(dev, be, w, t, g, mode="dst", guard=0.01):
    out, counts, t_after, gw, gt = run(w, t, g, mode, be, guard)
    r_out, r_counts, r_t, r_gw, r_gt = ref64(w.cpu(), t.cpu(), g.cpu(), mode, guard)
    assert out.dtype == w.dtype and out.shape == w.shape and out.device == w.device
    assert torch.equal(out.cpu().double(), r_out), "forward must be exact"
    assert torch.equal(counts.cpu(), r_counts)
    assert torch.equal(t_after.cpu(), r_t.to(t_after.dtype))
    assert gw.dtype == w.dtype and gt.dtype == t.dtype
    tol = TOL[w.dtype]
    if w.dtype in (torch.float16, torch.bfloat16):  # the gradient itself is rounded to the dtype
        r_gw = r_gw.to(w.dtype).double()
    assert rel_err(gw, r_gw) <= tol, f"grad_weight rel err {rel_err(gw, r_gw)}"
    # The threshold gradient is a float32 (float64) sum of products of values exact in that type, in
    # every weight dtype: float32's tolerance, not the weight dtype's. A sum's rounding error is bounded
    # relative to the sum of its terms' magnitudes, not to the sum: a row whose terms cancel has a small
    # sum and, in any summation order, a larger relative error (hypothesis found one: 2e-5 on a row of
    # 33). sum_j |g W H'(x)| per row is ref64's threshold gradient of |W| and |g| (H' >= 0, and x = |W| - t
    # is unchanged); a row whose terms are all 0 must give exactly 0.
    gt_tol = TOL[torch.float64] if gt.dtype == torch.float64 else TOL[torch.float32]
    terms = ref64(w.cpu().abs(), t.cpu(), g.cpu().abs(), mode, guard)[4].abs()
    err = (gt.cpu().double() - r_gt).abs()
    assert (err <= gt_tol * terms).all(), \
        f"grad_threshold error {err.max().item()} > {gt_tol} x the row's sum of |terms| (rel err {rel_err(gt, r_gt)})"
    # per-entry: pruned weights get exactly zero gradient
    mask = r_out != 0
    assert (gw.cpu()[~mask.reshape(gw.shape) & (w.cpu() != 0)] == 0).all()


def rand(shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


# ---- the reference against the autograd composition ----------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (8, 4, 3, 3), (17, 65)])
@pytest.mark.parametrize("mode", ["dst", "masked"])
def test_reference_matches_autograd_composition(shape, mode):
    w = rand(shape, torch.float64)
    t = rand(shape[:1], torch.float64, scale=0.5)
    g = rand(shape, torch.float64)
    out, _, _, gw, gt = run(w, t, g, mode, "reference", guard=None)
    a_out, a_gw, a_gt = autograd_composition(w, t, g, mode)
    assert torch.equal(out, a_out)
    torch.testing.assert_close(gw, a_gw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gt, a_gt, rtol=1e-12, atol=1e-12)


# ---- every backend against ref64 ------------------------------------------------------------

SHAPES = [(1, 1), (3, 7), (17, 65), (6, 3, 3, 3), (33, 5, 1, 2), (4, 130)]


@pytest.mark.parametrize("dev,be", _params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["dst", "masked"])
def test_fp32(dev, be, shape, mode):
    _require(dev, be)
    w = rand(shape, device=dev)
    t = rand(shape[:1], device=dev, scale=0.7)
    g = rand(shape, device=dev)
    check(dev, be, w, t, g, mode)


@pytest.mark.parametrize("dev,be", _params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dev, be, dtype):
    _require(dev, be)
    shape = (9, 2, 3, 3)
    check(dev, be, rand(shape, dtype, dev), rand(shape[:1], device=dev, scale=0.7), rand(shape, dtype, dev))


@pytest.mark.parametrize("dev,be", _params())
def test_non_contiguous(dev, be):
    _require(dev, be)
    base = rand((12, 20), device=dev)
    w = base.t()  # [20, 12], strides (1, 20)
    g = rand((12, 20), device=dev).t()
    assert not w.is_contiguous() and not g.is_contiguous()
    check(dev, be, w, rand((20,), device=dev, scale=0.6), g)
    w2 = rand((10, 9, 4), device=dev)[::2, :, 1:3]  # sliced: rows strided, trailing dims not mergeable
    g2 = rand((5, 9, 2), device=dev)
    check(dev, be, w2, rand((5,), device=dev, scale=0.6), g2)


@pytest.mark.parametrize("dev,be", _params())
def test_pruned_rows_negative_thresholds(dev, be):
    _require(dev, be)
    w = rand((6, 11), device=dev)
    t = torch.tensor([10.0, -0.3, 0.5, 10.0, -2.0, 0.0], device=dev)  # rows 0, 3 entirely pruned
    out, counts, *_ = run(w, t, rand((6, 11), device=dev), backend=be)
    assert counts[0] == 0 and counts[3] == 0 and (out[[0, 3]] == 0).all()
    assert counts[1] == 11 and counts[4] == 11
    check(dev, be, w, t, rand((6, 11), device=dev))


@pytest.mark.parametrize("dev,be", _params())
def test_collapse_guard(dev, be):
    _require(dev, be)
    w = rand((5, 20), device=dev)
    g = rand((5, 20), device=dev)
    # everything pruned: the guard resets the threshold to 0 and recomputes the mask
    t = torch.full((5,), 100.0, device=dev)
    out, counts, t_after, *_ = run(w, t, g, backend=be)
    assert (t_after == 0).all()
    assert torch.equal(out, w) and (counts == 20).all()
    check(dev, be, w, t, g)
    # exactly 1 of 100 kept: ratio 0.01 <= 0.01 collapses
    t = torch.full((5,), 100.0, device=dev)
    w1 = w.clone()
    w1[2, 7] = 1000.0
    _, counts, t_after, *_ = run(w1, t, g, backend=be)
    assert (t_after == 0).all()
    # 2 of 100 kept: above the ratio, nothing changes
    w2 = w1.clone()
    w2[4, 1] = -1000.0
    _, counts, t_after, *_ = run(w2, t, g, backend=be)
    assert (t_after == 100.0).all() and counts.sum() == 2
    # guard disabled
    _, counts, t_after, *_ = run(w, t, g, backend=be, guard=None)
    assert (t_after == 100.0).all() and counts.sum() == 0
    check(dev, be, w, t, g, guard=None)


@pytest.mark.parametrize("dev,be", _params())
@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0, 3, 3)], ids=str)
def test_empty(dev, be, shape):
    _require(dev, be)
    w = torch.empty(shape, device=dev, requires_grad=True)
    t = torch.zeros(shape[0], device=dev, requires_grad=True)
    out, counts = rgkernels.masked_weight(w, t, backend=be, return_counts=True)
    assert out.shape == w.shape and counts.shape == (shape[0],)
    out.sum().backward()
    assert w.grad.shape == w.shape and t.grad.shape == t.shape and (t.grad == 0).all()


def test_bad_inputs():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="threshold must have shape \\[4\\]"):
        rgkernels.masked_weight(w, torch.zeros(3))
    with pytest.raises(TypeError, match="floating-point"):
        rgkernels.masked_weight(torch.ones(4, 3, dtype=torch.int32), torch.zeros(4))
    with pytest.raises(TypeError, match="threshold must be a floating-point"):
        rgkernels.masked_weight(w, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="is on meta"):
        rgkernels.masked_weight(w, torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="grad_mode"):
        rgkernels.masked_weight(w, torch.zeros(4), "straight")
    with pytest.raises(ValueError, match="unknown backend"):
        rgkernels.masked_weight(w, torch.zeros(4), backend="tpu")


def test_compiled_ops_check_inputs():
    """The compiled ops validate on their own too (clear messages, not crashes)."""
    if _backend.extension() is None:
        pytest.fail(f"compiled extension unavailable: {_backend.extension_error()}")
    ops = torch.ops.rgkernels
    with pytest.raises(RuntimeError, match="threshold has 3 entries"):
        ops.masked_weight_fwd(torch.randn(4, 3), torch.zeros(3), 0.01)
    with pytest.raises(RuntimeError, match="float32"):
        ops.masked_weight_fwd(torch.randn(4, 3), torch.zeros(4, dtype=torch.float64), 0.01)
    with pytest.raises(RuntimeError, match="grad_mode"):
        ops.masked_weight_bwd(torch.randn(4, 3), torch.randn(4, 3), torch.zeros(4), 7)


# ---- the grouped op -------------------------------------------------------------------------

SNGAN_LIKE = [(32, 16), (16, 16, 3, 3), (16, 8, 3, 3), (3, 16, 3, 3), (1, 16), (8, 3, 1, 1)]


@pytest.mark.parametrize("dev,be", _params())
@pytest.mark.parametrize("mode", ["dst", "masked"])
def test_grouped_matches_per_layer(dev, be, mode):
    _require(dev, be)
    ws = [rand(s, device=dev) for s in SNGAN_LIKE]
    ts = [rand(s[:1], device=dev, scale=0.6) for s in SNGAN_LIKE]
    ts[2] = torch.full_like(ts[2], 50.0)  # this layer collapses
    gs = [rand(s, device=dev) for s in SNGAN_LIKE]
    wl = [w.clone().requires_grad_() for w in ws]
    tl = [t.clone().requires_grad_() for t in ts]
    outs, counts = rgkernels.masked_weight_grouped(wl, tl, mode, backend=be)
    torch.autograd.backward(outs, gs)
    for i, (w, t, g) in enumerate(zip(ws, ts, gs)):
        r_out, r_counts, r_t, r_gw, r_gt = ref64(w.cpu(), t.cpu(), g.cpu(), mode)
        assert torch.equal(outs[i].detach().cpu().double(), r_out), i
        assert torch.equal(counts[i].cpu(), r_counts), i
        assert torch.equal(tl[i].detach().cpu(), r_t.float()), i
        assert rel_err(wl[i].grad, r_gw) <= 1e-5, i
        assert rel_err(tl[i].grad, r_gt) <= 1e-5, i
    assert (tl[2].detach() == 0).all()


def test_grouped_mixed_dtypes_and_errors():
    ws = [rand((4, 3)), rand((5, 2), torch.float64)]
    ts = [torch.zeros(4), torch.zeros(5)]
    outs, counts = rgkernels.masked_weight_grouped(ws, ts)
    assert outs[1].dtype == torch.float64 and torch.equal(outs[1], ws[1])
    with pytest.raises(ValueError, match="2 weights but 1 thresholds"):
        rgkernels.masked_weight_grouped(ws, ts[:1])
    with pytest.raises(ValueError, match="layer 1"):
        rgkernels.masked_weight_grouped(ws, [torch.zeros(4), torch.zeros(4)])
    assert rgkernels.masked_weight_grouped([], []) == ([], [])


# ---- property tests -------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=st.integers(1, 9),
    k=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    tscale=st.floats(-1.5, 3.0),
    mode=st.sampled_from(["dst", "masked"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_compiled_cpu(c, k, dtype, tscale, mode, seed):
    _require("cpu", "cpu")
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(c, k, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.rand(c, generator=gen, dtype=torch.float64).float() * tscale
    g = torch.randn(c, k, generator=gen, dtype=torch.float64).to(dtype)
    check("cpu", "cpu", w, t, g, mode)
    check("cpu", "reference", w, t, g, mode)


@pytest.mark.triton
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=st.integers(1, 6), k=st.integers(1, 24), tscale=st.floats(-1.0, 2.5), seed=st.integers(0, 2**31 - 1))
def test_property_triton(c, k, tscale, seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _require(dev, "triton")
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(c, k, generator=gen).to(dev)
    t = (torch.rand(c, generator=gen) * tscale).to(dev)
    g = torch.randn(c, k, generator=gen).to(dev)
    check(dev, "triton", w, t, g)


# ---- torch.library / torch.compile ----------------------------------------------------------

def _opcheck_args(dev):
    w = rand((7, 5), device=dev)
    t = rand((7,), device=dev, scale=0.5)
    g = rand((7, 5), device=dev)
    return w, t, g


@pytest.mark.parametrize("prefix", ["", "ref_"])
def test_opcheck(prefix):
    if prefix == "" and _backend.extension() is None:
        pytest.fail("compiled extension unavailable")
    ns = torch.ops.rgkernels
    w, t, g = _opcheck_args("cpu")
    torch.library.opcheck(getattr(ns, f"{prefix}masked_weight_fwd"), (w, t, 0.01))
    torch.library.opcheck(getattr(ns, f"{prefix}masked_weight_bwd"), (g, w, t, 0))
    torch.library.opcheck(getattr(ns, f"{prefix}masked_weight_grouped_fwd"), ([w, w[:3].t()], [t, t[:5].clone()], 0.01))
    torch.library.opcheck(getattr(ns, f"{prefix}masked_weight_grouped_bwd"), ([g, g[:2]], [w, w[:2]], [t, t[:2]], 1))


@pytest.mark.parametrize("be", ["cpu", "reference"])
def test_torch_compile(be):
    _require("cpu", be)
    w0, t0, g = _opcheck_args("cpu")

    def f(w, t):
        return (rgkernels.masked_weight(w, t, backend=be) * 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    w1, t1 = w0.clone().requires_grad_(), t0.clone().requires_grad_()
    w2, t2 = w0.clone().requires_grad_(), t0.clone().requires_grad_()
    f(w1, t1).backward()
    compiled(w2, t2).backward()
    assert torch.equal(w1.grad, w2.grad) and torch.equal(t1.grad, t2.grad)


@pytest.mark.parametrize("be", ["cpu", "reference"])
def test_torch_compile_grouped(be):
    _require("cpu", be)
    ws0 = [rand(s) for s in SNGAN_LIKE[:3]]
    ts0 = [rand(s[:1], scale=0.5) for s in SNGAN_LIKE[:3]]

    def f(ws, ts):
        outs, _ = rgkernels.masked_weight_grouped(ws, ts, backend=be)
        return sum((o * o).sum() for o in outs)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a = [w.clone().requires_grad_() for w in ws0], [t.clone().requires_grad_() for t in ts0]
    b = [w.clone().requires_grad_() for w in ws0], [t.clone().requires_grad_() for t in ts0]
    f(*a).backward()
    compiled(*b).backward()
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x.grad, y.grad)


@pytest.mark.slow
def test_torch_compile_inductor_guard_mutation_visible():
    """Under the default (inductor) backend the op gives the eager gradients, and the collapse
    guard's in-place reset of the threshold reaches the caller's tensor."""
    _require("cpu", "cpu")
    w0, _, _ = _opcheck_args("cpu")

    def f(w, t):
        return (rgkernels.masked_weight(w, t) * 2).sum()

    compiled = torch.compile(f, fullgraph=True)
    for t_init in (rand((7,), scale=0.5), torch.full((7,), 100.0)):  # normal, then collapsing
        w1, t1 = w0.clone().requires_grad_(), t_init.clone().requires_grad_()
        w2, t2 = w0.clone().requires_grad_(), t_init.clone().requires_grad_()
        f(w1, t1).backward()
        compiled(w2, t2).backward()
        assert torch.equal(t1.detach(), t2.detach())
        assert torch.equal(w1.grad, w2.grad) and torch.equal(t1.grad, t2.grad)
    assert (t2.detach() == 0).all()


# ---- the C++ autograd node of the compiled backends (csrc/masked_weight_node.cpp) -------------------

def _node_params():
    out = [pytest.param("cpu", id="cpu")]
    if torch.cuda.is_available():
        out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))
    return out


def _node_run(monkeypatch, cpp, w, t, g, **kw):
    """masked_weight forward + backward through the C++ node (cpp=True) or the Python Function: output,
    counts, the threshold after the call, grad W, grad t, and the name of the node autograd recorded."""
    from rgkernels.ops import masked_weight as MW

    monkeypatch.setattr(MW, "CPP_NODE", cpp)
    w = w.clone().requires_grad_(kw.pop("w_grad", True))
    t = t.clone().requires_grad_(kw.pop("t_grad", True))
    out, counts = rgkernels.masked_weight(w, t, return_counts=True, **kw)
    node = out.grad_fn.name() if out.grad_fn is not None else None
    if out.requires_grad:
        out.backward(g)
    return out.detach(), counts, t.detach(), w.grad, t.grad, node


@pytest.mark.parametrize("dev", _node_params())
@pytest.mark.parametrize("shape", [(3, 7), (6, 3, 3, 3), (17, 65), (0, 4), (2, 0, 3, 3)], ids=str)
@pytest.mark.parametrize("mode", ["dst", "masked"])
def test_cpp_node_matches_python_function(monkeypatch, dev, shape, mode):
    """Bit for bit the Python Function's results (both call the same kernels), recorded as a C++ node."""
    _require(dev, dev)
    w = rand(shape, device=dev)
    t = (torch.rand(shape[0], device=dev) * 0.8) if shape[0] else torch.zeros(0, device=dev)
    g = rand(shape, device=dev)
    cpp = _node_run(monkeypatch, True, w, t, g, grad_mode=mode)
    py = _node_run(monkeypatch, False, w, t, g, grad_mode=mode)
    assert "CppNode" in cpp[5] and "MaskedWeightFn" in cpp[5], cpp[5]
    assert "CppNode" not in py[5]
    for a, b in zip(cpp[:5], py[:5]):
        assert a.shape == b.shape and torch.equal(a, b)
    if w.numel() == 0:
        return
    ref = ref64(w, t, g, mode)  # and both are the §2 reference
    torch.testing.assert_close(cpp[3].double(), ref[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cpp[4].double(), ref[4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dev", _node_params())
def test_cpp_node_inputs_strides_guard_and_needs(monkeypatch, dev):
    _require(dev, dev)
    base = rand((12, 10), device=dev)
    w = base.t()[:, ::2].t()  # [6, 10], strided (every other row of base)
    t = torch.full((w.shape[0],), 0.3, device=dev)
    g = rand(tuple(w.shape), device=dev)
    for kw in ({}, {"w_grad": False}, {"t_grad": False}):
        cpp = _node_run(monkeypatch, True, w, t, g, **kw)
        py = _node_run(monkeypatch, False, w, t, g, **kw)
        for a, b in zip(cpp[:5], py[:5]):
            assert (a is None and b is None) or torch.equal(a, b)
    # neither input needs a gradient: no graph at all
    out = _node_run(monkeypatch, True, w, t, g, w_grad=False, t_grad=False)
    assert out[5] is None
    # the collapse guard resets the threshold in place, as in the Python Function
    t_all = torch.full((w.shape[0],), 100.0, device=dev)
    cpp = _node_run(monkeypatch, True, w, t_all, g)
    py = _node_run(monkeypatch, False, w, t_all, g)
    assert (cpp[2] == 0).all() and torch.equal(cpp[0], w) and torch.equal(cpp[4], py[4])


@pytest.mark.parametrize("dev", _node_params())
def test_cpp_node_layer_reused_and_gradient_penalty(monkeypatch, dev):
    """A conv layer called twice before one backward (D(real), D(fake)), then an R1-style penalty (the
    input gradient differentiated again, create_graph=True): every gradient equals the Python Function's."""
    _require(dev, dev)
    from rgkernels.ops import masked_weight as MW

    torch.manual_seed(0)
    layer = rgkernels.MaskedConv2d(3, 6, 3, padding=1).to(dev)
    with torch.no_grad():
        layer.threshold.fill_(0.05)
    x1, x2 = torch.randn(2, 3, 5, 5, device=dev), torch.randn(2, 3, 5, 5, device=dev)
    results = {}
    for cpp in (True, False):
        monkeypatch.setattr(MW, "CPP_NODE", cpp)
        layer.zero_grad(set_to_none=True)
        a = x1.clone().requires_grad_()
        y = layer(a).square().sum() + layer(x2).sin().sum()
        (ga,) = torch.autograd.grad(y, a, create_graph=True)
        (y + ga.square().sum()).backward()
        results[cpp] = [p.grad.clone() for p in (layer.weight, layer.threshold, layer.bias)]
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert results[True][1].abs().sum() > 0  # the threshold gradient is not trivially 0


def test_cpp_node_saved_tensor_hooks_and_dispatch_modes(monkeypatch):
    """The node saves through autograd's saved-tensor hooks, and its ops pass the dispatcher (a dispatch
    mode sees them), as the Python Function's do."""
    _require("cpu", "cpu")
    from torch.utils._python_dispatch import TorchDispatchMode

    from rgkernels.ops import masked_weight as MW

    monkeypatch.setattr(MW, "CPP_NODE", True)
    w = rand((4, 9)).requires_grad_()
    t = torch.full((4,), 0.2, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: packed.append(x.shape) or x, lambda x: x):
        out = rgkernels.masked_weight(w, t)
    assert "CppNode" in out.grad_fn.name() and torch.Size([4, 9]) in packed

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log() as log:
        out = rgkernels.masked_weight(w, t)
        out.backward(torch.ones_like(out))
    assert any("masked_weight_fwd" in o for o in log.ops) and any("masked_weight_bwd" in o for o in log.ops)


def test_cpp_node_backward_under_compiled_autograd(monkeypatch):
    """An eager forward through the C++ node, its backward under compiled autograd: the plain backward's
    gradients (compiled autograd refuses C++ nodes that mark outputs non-differentiable; the counts are
    int32, which autograd never differentiates anyway)."""
    _require("cpu", "cpu")
    from conftest import backward

    from rgkernels.ops import masked_weight as MW

    monkeypatch.setattr(MW, "CPP_NODE", True)
    w0, t0 = rand((4, 6)), torch.full((4,), 0.3)
    grads = []
    for compiled in (False, True):
        w, t = w0.clone().requires_grad_(), t0.clone().requires_grad_()
        out, counts = rgkernels.masked_weight(w, t, return_counts=True)
        assert "CppNode" in out.grad_fn.name() and not counts.requires_grad
        backward(out.square().sum(), compiled)
        grads.append((w.grad, t.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
