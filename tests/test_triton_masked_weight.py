"""The Triton masked-weight ops against the PyTorch reference ops (DESIGN.md §2).

Without a CUDA device the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set below
before anything imports triton), on CPU tensors and small shapes; with one they run compiled,
on CUDA tensors. Forward outputs, keep counts and thresholds must match the reference exactly;
float32 gradients within 1e-5 relative.
"""
import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from rgkernels.ops import reference as ref  # noqa: E402,F401  (registers the ref ops)
from rgkernels.ops import triton_masked_weight as tmw  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_required")]  # conftest: fails on Linux

ops = torch.ops.rgkernels

if torch.cuda.is_available():
    DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)]
else:
    DEVICES = ["cpu"]

# small blocks force several programs per layer and several K iterations per row (the last-ticket
# guard and the K loop are then exercised even on tiny shapes)
SMALL = (4, 16)


def _weight(c, k, dtype=torch.float32, layout="contig", device="cpu"):
    if layout == "contig":
        w = torch.randn(c, k)
    elif layout == "transposed":  # stride (1, C)
        w = torch.randn(k, c).t()
    elif layout == "sliced":  # stride (2K + 1, 2), storage offset 1
        w = torch.randn(c, 2 * k + 1)[:, 1::2]
    elif layout == "rows":  # every other row
        w = torch.randn(2 * c, k)[::2]
    else:
        raise ValueError(layout)
    return w.to(device=device, dtype=dtype)


def _threshold(c, device="cpu", lo=-0.1, hi=0.9):
    t = torch.rand(c) * (hi - lo) + lo
    if c > 2:
        t[1] = 100.0  # one row entirely pruned
        t[2] = -0.5  # a negative threshold keeps every entry, zeros included
    return t.to(device)


def _fwd_both(w, t, guard=0.01, blocks=None):
    t_tri, t_ref = t.clone(), t.clone()
    if blocks is None:
        out, cnt = ops.triton_masked_weight_fwd(w, t_tri, guard)
    else:
        with tmw._block_override(*blocks):
            out, cnt = ops.triton_masked_weight_fwd(w, t_tri, guard)
    rout, rcnt = ops.ref_masked_weight_fwd(w, t_ref, guard)
    return (out, cnt, t_tri), (rout, rcnt, t_ref)


def _assert_fwd_equal(got, want):
    out, cnt, t = got
    rout, rcnt, rt = want
    assert out.is_contiguous() and out.shape == rout.shape and out.dtype == rout.dtype
    assert torch.equal(out, rout)
    assert cnt.dtype == torch.int32 and torch.equal(cnt, rcnt)
    assert torch.equal(t, rt)


def _tols(dtype):
    """(grad_weight rtol, atol) per dtype. bf16: the interpreter truncates fp32 -> bf16."""
    return {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12),
            torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}[dtype]


def _assert_bwd_close(g, w, t, mode, blocks=None):
    if blocks is None:
        gw, gt = ops.triton_masked_weight_bwd(g, w, t, mode)
    else:
        with tmw._block_override(*blocks):
            gw, gt = ops.triton_masked_weight_bwd(g, w, t, mode)
    rgw, rgt = ops.ref_masked_weight_bwd(g, w, t, mode)
    assert gw.is_contiguous() and gw.dtype == w.dtype and gt.dtype == torch.float32
    rtol, atol = _tols(w.dtype)
    torch.testing.assert_close(gw, rgw, rtol=rtol, atol=atol)
    # grad_threshold is accumulated in float32 (float64 for float64 weights) from the same inputs
    gtol = 1e-12 if w.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(gt, rgt, rtol=gtol, atol=gtol)


# ---- single layer ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contig", "transposed", "sliced"])
@pytest.mark.parametrize("c", [1, 3, 17, 65])
@pytest.mark.parametrize("k", [1, 3, 17, 65])
def test_fp32_odd_shapes(device, layout, c, k):
    w = _weight(c, k, layout=layout, device=device)
    t = _threshold(c, device)
    _assert_fwd_equal(*_fwd_both(w, t, blocks=SMALL))
    g = _weight(c, k, layout="transposed" if layout == "contig" else "contig", device=device)
    for mode in (0, 1):
        _assert_bwd_close(g, w, t, mode, blocks=SMALL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,k", [(4, 16), (5, 17), (8, 32), (3, 15), (9, 33), (16, 48)])
def test_block_boundaries(device, c, k):
    """Shapes at, just under and just over multiples of the forced (4, 16) blocks."""
    w = _weight(c, k, layout="rows", device=device)
    t = _threshold(c, device)
    _assert_fwd_equal(*_fwd_both(w, t, blocks=SMALL))
    g = _weight(c, k, layout="sliced", device=device)
    _assert_bwd_close(g, w, t, 0, blocks=SMALL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,k", [(1, 700), (33, 9), (7, 130)])
def test_heuristic_blocks(device, c, k):
    """The default block sizes (whatever the heuristic picks)."""
    w = _weight(c, k, device=device)
    t = _threshold(c, device)
    _assert_fwd_equal(*_fwd_both(w, t))
    g = _weight(c, k, layout="transposed", device=device)
    for mode in (0, 1):
        _assert_bwd_close(g, w, t, mode)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_threshold(device):
    c, k = 9, 20
    w = _weight(c, k, device=device)
    t = (torch.rand(2 * c, device=device) * 0.5)[::2]  # stride 2 (the bwd reads it as is)
    t_big = torch.full((2 * c,), 9.0, device=device)
    t_view = t_big[::2]  # collapses: the reset must write through the stride
    with tmw._block_override(*SMALL):
        out, cnt = ops.triton_masked_weight_fwd(w, t_view, 0.01)
    assert torch.equal(out, w) and torch.equal(t_big[::2], torch.zeros(c, device=device))
    assert torch.equal(t_big[1::2], torch.full((c,), 9.0, device=device))
    _assert_fwd_equal(*_fwd_both(w, t, blocks=SMALL))
    _assert_bwd_close(_weight(c, k, device=device), w, t, 0, blocks=SMALL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contig", "transposed"])
def test_low_and_double_precision(device, dtype, layout):
    c, k = 17, 33
    w = _weight(c, k, dtype=dtype, layout=layout, device=device)
    t = _threshold(c, device)
    _assert_fwd_equal(*_fwd_both(w, t, blocks=SMALL))  # W * {0, 1} is exact in any dtype
    g = _weight(c, k, dtype=dtype, device=device)
    for mode in (0, 1):
        _assert_bwd_close(g, w, t, mode, blocks=SMALL)


@pytest.mark.parametrize("device", DEVICES)
def test_pruned_rows_negative_thresholds_and_zeros(device):
    w = _weight(6, 20, device=device)
    w[:, ::5] = 0.0  # exact zeros: kept only where t < 0
    w[0, 3] = float("nan")  # NaN propagates through W * M like in the reference
    t = torch.tensor([0.2, 50.0, -0.3, 0.0, 50.0, -1e-6], device=device)
    got, want = _fwd_both(w, t, blocks=SMALL)
    _assert_fwd_equal((got[0].nan_to_num(7.0), got[1], got[2]), (want[0].nan_to_num(7.0), want[1], want[2]))
    assert torch.isnan(got[0][0, 3])
    cnt = got[1]
    assert cnt[1] == 0 and cnt[4] == 0  # entirely pruned rows
    assert cnt[2] == 20 and cnt[5] == 20  # negative thresholds keep zeros too
    assert cnt[3] == 16  # t = 0: exact zeros are pruned (strict >)
    assert torch.equal(got[0][1], torch.zeros(20, device=device))
    g = _weight(6, 20, device=device)
    w2 = w.nan_to_num(0.5)
    _assert_bwd_close(g, w2, t, 0, blocks=SMALL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", [None, SMALL, (1, 16)])
def test_guard_collapses(device, blocks):
    """A threshold above every |W| keeps nothing: the threshold is reset to 0 and out == W."""
    c, k = 9, 40
    w = _weight(c, k, device=device)
    w[0, 0] = 0.0
    t = torch.full((c,), 10.0, device=device)
    got, want = _fwd_both(w, t, blocks=blocks)
    _assert_fwd_equal(got, want)
    out, cnt, t_new = got
    assert torch.equal(t_new, torch.zeros(c, device=device))
    assert torch.equal(out, w)
    assert int(cnt.sum()) == c * k - 1
    # the last program leaves the cached workspace zeroed for the next launch
    for ws in tmw._WORKSPACES.values():
        assert int(ws.abs().sum()) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kept,collapses", [(0, True), (1, True), (2, False), (5, False)])
def test_guard_boundary(device, kept, collapses):
    """numel = 100, guard 0.01: keep ratio 1/100 collapses (<=), 2/100 does not."""
    c, k = 10, 10
    w = torch.full((c, k), 0.5, device=device)
    w.view(-1)[torch.arange(kept) * 7] = 2.0
    t = torch.ones(c, device=device)
    got, want = _fwd_both(w, t, guard=0.01, blocks=(2, 16))
    _assert_fwd_equal(got, want)
    if collapses:
        assert torch.equal(got[2], torch.zeros(c, device=device)) and torch.equal(got[0], w)
    else:
        assert torch.equal(got[2], t) and int(got[1].sum()) == kept
    # guard off (negative ratio): nothing is reset even with nothing kept
    got, want = _fwd_both(w, t, guard=-1.0, blocks=(2, 16))
    _assert_fwd_equal(got, want)
    assert torch.equal(got[2], t)


def test_collapse_limit_matches_float64_division():
    for numel in [1, 3, 7, 100, 999, 12345, 2**31 + 11]:
        for r in [0.0, 1e-9, 0.01, 1 / 3, 0.1, 0.5, 0.999999, 1.0, 2.0, -0.5, float("nan")]:
            kmax = tmw._collapse_limit(r, numel)
            if not r >= 0:
                assert kmax == -1
                continue
            for kept in {0, 1, kmax - 1, kmax, kmax + 1, numel}:
                if 0 <= kept <= numel:
                    want = bool(torch.tensor(float(kept), dtype=torch.float64) / numel <= r)
                    assert (kept <= kmax) == want, (numel, r, kept, kmax)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,k", [(0, 5), (5, 0), (0, 0)])
def test_empty(device, c, k):
    w = torch.empty(c, k, device=device)
    t = torch.full((c,), 100.0, device=device)  # the guard is skipped for numel == 0
    launches = _count_launches()
    got, want = _fwd_both(w, t)
    _assert_fwd_equal(got, want)
    g = torch.empty(c, k, device=device)
    gw, gt = ops.triton_masked_weight_bwd(g, w, t, 0)
    rgw, rgt = ops.ref_masked_weight_bwd(g, w, t, 0)
    assert gw.shape == (c, k) and torch.equal(gt, rgt)
    assert launches.total() == 0


# ---- grouped ---------------------------------------------------------------------------------

def _group(device, dtype=torch.float32):
    shapes = [(3, 5), (17, 9), (4, 70), (0, 3), (6, 0), (65, 17)]
    layouts = ["contig", "transposed", "contig", "contig", "contig", "sliced"]
    ws = [_weight(c, k, dtype=dtype, layout=lay, device=device) for (c, k), lay in zip(shapes, layouts)]
    ts = [_threshold(c, device) for c, _ in shapes]
    ts[2] += 100.0  # layer 2 collapses
    return ws, ts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("blocks", [None, SMALL])
def test_grouped_fwd(device, dtype, blocks):
    ws, ts = _group(device, dtype)
    t_tri = [t.clone() for t in ts]
    t_ref = [t.clone() for t in ts]
    launches = _count_launches()
    if blocks is None:
        out, cnt = ops.triton_masked_weight_grouped_fwd(ws, t_tri, 0.01)
    else:
        with tmw._block_override(*blocks):
            out, cnt = ops.triton_masked_weight_grouped_fwd(ws, t_tri, 0.01)
    assert launches.counts == {"_k_grouped_fwd": 1}  # one launch for the whole group
    rout, rcnt = ops.ref_masked_weight_grouped_fwd(ws, t_ref, 0.01)
    assert out.dtype == dtype and out.shape == rout.shape and torch.equal(out, rout)
    assert cnt.dtype == torch.int32 and torch.equal(cnt, rcnt)
    for a, b in zip(t_tri, t_ref):
        assert torch.equal(a, b)
    assert torch.equal(t_tri[2], torch.zeros_like(t_tri[2]))  # the collapsing layer was reset
    assert not torch.equal(t_tri[0], torch.zeros_like(t_tri[0]))
    for ws_ in tmw._WORKSPACES.values():
        assert int(ws_.abs().sum()) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [0, 1])
def test_grouped_bwd(device, mode):
    ws, ts = _group(device)
    ws[1] = ws[1].to(torch.float64)  # mixed dtypes: one launch per dtype
    gs = [_weight(*w.shape, dtype=w.dtype, layout="transposed", device=device) for w in ws]
    launches = _count_launches()
    with tmw._block_override(*SMALL):
        gws, gts = ops.triton_masked_weight_grouped_bwd(gs, ws, ts, mode)
    assert launches.counts == {"_k_grouped_bwd": 2}
    rgws, rgts = ops.ref_masked_weight_grouped_bwd(gs, ws, ts, mode)
    assert len(gws) == len(gts) == len(ws)
    for gw, gt, rgw, rgt, w in zip(gws, gts, rgws, rgts, ws):
        assert gw.shape == w.shape and gw.dtype == w.dtype and gw.is_contiguous()
        tol = 1e-12 if w.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(gw, rgw, rtol=tol, atol=tol)
        torch.testing.assert_close(gt, rgt, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_heuristic_blocks_bwd(device):
    ws, ts = _group(device, torch.float16)
    gs = [_weight(*w.shape, dtype=w.dtype, device=device) for w in ws]
    gws, gts = ops.triton_masked_weight_grouped_bwd(gs, ws, ts, 0)
    rgws, rgts = ops.ref_masked_weight_grouped_bwd(gs, ws, ts, 0)
    for gw, gt, rgw, rgt in zip(gws, gts, rgws, rgts):
        torch.testing.assert_close(gw, rgw, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(gt, rgt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_edge_cases(device):
    w = torch.randn(3, 4, device=device)
    t = torch.zeros(3, device=device)
    with pytest.raises(TypeError, match="one dtype"):
        ops.triton_masked_weight_grouped_fwd([w, w.double()], [t, t.clone()], 0.01)
    with pytest.raises(ValueError, match="at least one layer"):
        ops.triton_masked_weight_grouped_fwd([], [], 0.01)
    with pytest.raises(ValueError, match="entries"):
        ops.triton_masked_weight_grouped_fwd([w, w], [t], 0.01)
    assert ops.triton_masked_weight_grouped_bwd([], [], [], 0) == ([], [])
    # only empty layers: no launch
    launches = _count_launches()
    e = [torch.empty(0, 3, device=device), torch.empty(2, 0, device=device)]
    et = [torch.empty(0, device=device), torch.full((2,), 9.0, device=device)]
    out, cnt = ops.triton_masked_weight_grouped_fwd(e, et, 0.01)
    assert out.shape == (0,) and torch.equal(cnt, torch.zeros(2, dtype=torch.int32, device=device))
    assert torch.equal(et[1], torch.full((2,), 9.0, device=device))
    gws, gts = ops.triton_masked_weight_grouped_bwd(e, e, et, 0)
    assert [g.shape for g in gws] == [(0, 3), (2, 0)] and torch.equal(gts[1], torch.zeros(2, device=device))
    assert launches.total() == 0


# ---- launches, validation, registration --------------------------------------------------------

class _Launches:
    def __init__(self):
        self.counts = {}

    def total(self):
        return sum(self.counts.values())


_LAUNCHES = None


def _count_launches():
    """Count kernel launches (`kernel[grid]`) from here to the end of the test."""
    launches = _Launches()
    _LAUNCHES.append(launches)
    return launches


class _CountingKernel:
    def __init__(self, name, kernel):
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid):
        for launches in _LAUNCHES:
            launches.counts[self.name] = launches.counts.get(self.name, 0) + 1
        return self.kernel[grid]


@pytest.fixture(autouse=True)
def _launch_counter(monkeypatch, triton_required):
    global _LAUNCHES
    tmw._build_kernels()
    _LAUNCHES = []
    for name in ("_k_fwd", "_k_bwd", "_k_grouped_fwd", "_k_grouped_bwd"):
        monkeypatch.setattr(tmw, name, _CountingKernel(name, getattr(tmw, name)))
    yield
    _LAUNCHES = None


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_per_op(device):
    w = _weight(17, 65, layout="transposed", device=device)
    t = _threshold(17, device)
    launches = _count_launches()
    with tmw._block_override(*SMALL):
        ops.triton_masked_weight_fwd(w, t, 0.01)
        ops.triton_masked_weight_bwd(w, w, t, 0)
    assert launches.counts == {"_k_fwd": 1, "_k_bwd": 1}


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    w = torch.randn(4, 5, device=device)
    t = torch.zeros(4, device=device)
    fwd, bwd = ops.triton_masked_weight_fwd, ops.triton_masked_weight_bwd
    with pytest.raises(TypeError, match="float32"):
        fwd(w, t.double(), 0.01)
    with pytest.raises(TypeError, match="float32"):
        fwd(w, t.half(), 0.01)
    with pytest.raises(ValueError, match="entries"):
        fwd(w, torch.zeros(3, device=device), 0.01)
    with pytest.raises(ValueError, match="1-D"):
        fwd(w, torch.zeros(4, 1, device=device), 0.01)
    with pytest.raises(TypeError, match="floating point"):
        fwd(torch.ones(4, 5, dtype=torch.int32, device=device), t, 0.01)
    with pytest.raises(ValueError, match="2-D"):
        fwd(torch.randn(4, 5, 1, device=device), t, 0.01)
    # a second device: CPU next to CUDA; without CUDA, "meta" (a meta argument would send the op
    # to its fake implementation, so the implementation is called directly then)
    other = "cpu" if device == "cuda" else "meta"
    if other == "meta":
        fwd, bwd = tmw._fwd_impl, tmw._bwd_impl
        gfwd = tmw._grouped_fwd_impl
    else:
        gfwd = ops.triton_masked_weight_grouped_fwd
    with pytest.raises(ValueError, match="is on"):
        fwd(w, torch.zeros(4, device=other), 0.01)
    with pytest.raises(ValueError, match="shape"):
        bwd(torch.randn(4, 6, device=device), w, t, 0)
    with pytest.raises(TypeError, match="dtype"):
        bwd(w.double(), w, t, 0)
    with pytest.raises(ValueError, match="is on"):
        bwd(torch.randn(4, 5, device=other), w, t, 0)
    with pytest.raises(ValueError, match="grad_mode"):
        bwd(w, w, t, 2)
    with pytest.raises(ValueError, match="one device"):
        gfwd([w, torch.randn(4, 5, device=other)], [t, torch.zeros(4, device=other)], 0.01)
    with pytest.raises(TypeError, match="float32"):
        ops.triton_masked_weight_grouped_bwd([w], [w], [t.double()], 0)


def _opcheck(op, args):
    # All of opcheck's tests, the dynamic-shape AOT dispatch test included, run on these tiny
    # shapes in a few seconds under the interpreter.
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fwd(device):
    w = _weight(5, 7, layout="transposed", device=device)
    _opcheck(ops.triton_masked_weight_fwd.default, (w, _threshold(5, device), 0.01))
    _opcheck(ops.triton_masked_weight_fwd.default, (w, torch.full((5,), 9.0, device=device), 0.01))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_bwd(device):
    w = _weight(5, 7, device=device)
    g = _weight(5, 7, layout="sliced", device=device)
    _opcheck(ops.triton_masked_weight_bwd.default, (g, w, _threshold(5, device), 0))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_grouped(device):
    ws = [_weight(3, 4, device=device), _weight(5, 2, layout="transposed", device=device)]
    ts = [_threshold(3, device), torch.full((5,), 9.0, device=device)]
    _opcheck(ops.triton_masked_weight_grouped_fwd.default, (ws, ts, 0.01))
    gs = [torch.randn_like(w) for w in ws]
    ts = [_threshold(3, device), _threshold(5, device)]
    _opcheck(ops.triton_masked_weight_grouped_bwd.default, (gs, ws, ts, 1))


def test_available_and_import_without_triton():
    ok, why = tmw.available()
    assert ok and isinstance(why, str)
    # the module imports without triton; its ops then raise a clear error when called
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None
        import torch
        from rgkernels.ops import triton_masked_weight as tmw
        ok, why = tmw.available()
        assert not ok and "triton" in why, why
        try:
            torch.ops.rgkernels.triton_masked_weight_fwd(torch.randn(2, 3), torch.zeros(2), 0.01)
        except RuntimeError as e:
            assert "triton cannot be imported" in str(e), e
        else:
            raise AssertionError("no error")
        print("OK")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
