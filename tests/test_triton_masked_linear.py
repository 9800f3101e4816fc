"""The sparse-execution Triton ops (mask statistics, masked linear, masked conv) against the PyTorch
reference composition: masked_weight(W, t) then F.linear / F.conv2d, and masked_weight's backward on
the ATen weight gradient (DESIGN.md §2).

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest before
triton is imported) on tiny CPU shapes; `test_compiles_for_sm90` also compiles them for an H100
(no GPU needed) so that dtype / layout errors that the interpreter tolerates are caught.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import triton_missing
from rgkernels.ops import reference as R
from rgkernels.ops import triton_mask_stats as S
from rgkernels.ops import triton_masked_conv  # noqa: F401  (registers the conv ops)
from rgkernels.ops import triton_masked_linear as TL

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_required")]  # conftest: fails on Linux
ops = torch.ops.rgkernels
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Largest error relative to the largest reference entry. Measured in the interpreter (session 9): float32
# 2.2e-7; float16 3.2e-4 (threshold gradient 7e-8); bfloat16 1.0e-2 (the weight gradient: its last bit
# flips where the float32 sums differ in order), 3.6e-3 for the threshold gradient, summed from it. About
# 3x the dtype's eps: room for a GPU's other summation order, not for a wrong row or tile.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def _close(a, b, dtype, what=""):
    a, b = a.float(), b.float()
    scale = b.abs().max().clamp_min(1.0)
    err = (a - b).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g}"


def _layer(c, k, dtype=torch.float32, dead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, k, generator=g)
    t = torch.rand(c, generator=g) * 0.8
    for i in dead:
        if i < c:
            t[i] = 100.0
    return w.to(DEV, dtype), t.to(DEV)


def _stats(w2, t, bias=None, guard=0.01):
    return ops.triton_mask_stats(w2, t, bias, guard)


def _ref_weight_grads(g, w, t, mode):
    return R.masked_weight_bwd(g.reshape(w.shape[0], -1), w.reshape(w.shape[0], -1), t, mode)


# ---- mask statistics ---------------------------------------------------------------------------

@pytest.mark.parametrize("c,k,layout", [(1, 1, "contig"), (37, 45, "contig"), (9, 130, "transposed"),
                                        (300, 20, "sliced")])
def test_stats_match_reference(c, k, layout):
    w, t = _layer(c, k, dead=[i for i in (3, 5) if i < c])
    if layout == "transposed":
        w = w.t().contiguous().t()
    elif layout == "sliced":
        w = torch.randn(c, 2 * k + 1, device=DEV)[:, 1::2]
    t[0] = -0.5 if c > 1 else t[0]  # a negative threshold keeps every entry (zeros too)
    if k > 3:
        w[0, 2] = 0.0
    bias = torch.randn(c, device=DEV)
    bias[5 if c > 5 else 0] = 0.0
    t1, t2 = t.clone(), t.clone()
    got = _stats(w, t1, bias)
    exp = S.reference_stats(w, t2, bias, 0.01)
    for a, b, name in zip(got, exp, ("counts", "bits", "perm", "zperm", "nlive")):
        assert torch.equal(a.cpu(), b.cpu()), name
    assert torch.equal(t1, t2)
    mask = (w.float().abs() - t[:, None]) > 0
    assert torch.equal(S.unpack_bits(got[1], k), mask)


@pytest.mark.parametrize("guard,collapses", [(0.01, True), (None, False)])
def test_stats_collapse_guard(guard, collapses):
    w, t = _layer(40, 30)
    t.fill_(50.0)
    t[0] = 0.0  # 1 row of 40 kept: keep ratio 1/40 ... above 1%; prune most of it below
    with torch.no_grad():
        w[0, 3:] = 0.0  # 3 weights kept of 1200 -> 0.25% <= 1%
    t1 = t.clone()
    counts, bits, perm, zperm, nlive = _stats(w, t1, None, -1.0 if guard is None else guard)
    if collapses:
        assert torch.equal(t1, torch.zeros_like(t1))
        assert torch.equal(counts, (w != 0).sum(1).to(torch.int32))
        assert int(nlive[0]) == 40
    else:
        assert torch.equal(t1, t)
        assert int(nlive[0]) == 1 and int(perm[0]) == 0
    assert torch.equal(S.unpack_bits(bits, 30), (w.abs() - t1[:, None]) > 0)


# ---- linear ------------------------------------------------------------------------------------

def _linear_case(m, c, k, dtype, dead, layout, mode, bias=True, blocks=None):
    w, t = _layer(c, k, dtype, dead)
    b = torch.randn(c, device=DEV, dtype=dtype) if bias else None
    x = torch.randn(m, k, device=DEV).to(dtype)
    if layout == "transposed":
        x = x.t().contiguous().t()
        w = w.t().contiguous().t()
    elif layout == "sliced":
        x = torch.randn(m, 2 * k, device=DEV).to(dtype)[:, ::2]
    dy = torch.randn(m, c, device=DEV).to(dtype)
    if layout == "expanded":  # what y.sum().backward() sends: stride 0
        dy = torch.ones(1, 1, device=DEV, dtype=dtype).expand(m, c)
    # reference composition
    t_ref = t.clone()
    w_hat, counts_ref = R.masked_weight_fwd(w, t_ref, 0.01)
    xr = x.float().clone().requires_grad_()
    wr = w_hat.float().clone().requires_grad_()
    yr = F.linear(xr, wr, None if b is None else b.float())
    yr.backward(dy.float())
    g = wr.grad.to(dtype)  # the ATen composition materialises dL/dW_hat in the weight dtype
    gw_ref, gt_ref = R.masked_weight_bwd(g, w, t_ref, mode)
    # fused ops
    flops = torch.zeros(3, dtype=torch.int64, device=DEV)
    t1 = t.clone()
    ctx = TL._BLOCK_OVERRIDE
    TL._BLOCK_OVERRIDE = blocks
    try:
        counts, bits, perm, zperm, nlive = _stats(w, t1, b)
        y = ops.triton_masked_linear_fwd(x, w, t1, b, perm, nlive, None, None, flops)
        dx = ops.triton_masked_linear_dgrad(dy, w, t1, perm, nlive, None, None, flops)
        gw, gt, cnt = ops.triton_masked_linear_wgrad(dy, x, w, t1, None, None, mode, flops)
    finally:
        TL._BLOCK_OVERRIDE = ctx
    assert torch.equal(t1, t_ref)
    assert torch.equal(counts, counts_ref) and torch.equal(cnt, counts_ref)
    assert y.dtype == dtype and dx.dtype == dtype and gw.dtype == dtype and gt.dtype == torch.float32
    _close(y, yr, dtype, "forward")
    _close(dx, xr.grad, dtype, "input grad")
    _close(gw, gw_ref, dtype, "weight grad")
    _close(gt, gt_ref, dtype, "threshold grad")
    live = int((counts_ref > 0).sum())
    assert flops.tolist() == [2 * m * live * k, 2 * m * live * k, 2 * m * c * k]
    # entirely pruned rows: exactly the bias
    for i in dead:
        if i < c:
            assert torch.equal(y[:, i], (b[i] if b is not None else torch.zeros((), dtype=dtype, device=DEV))
                               .expand(m))
    return y


@pytest.mark.parametrize("m,c,k,layout,mode", [
    (1, 1, 1, "contig", 0),
    (9, 37, 45, "contig", 0),
    (9, 37, 45, "transposed", 1),
    (5, 20, 33, "sliced", 0),
    (6, 17, 24, "expanded", 1),
    (70, 70, 70, "contig", 0),  # several tiles each way (interpreter blocks are <= 64)
])
def test_linear_fp32(m, c, k, layout, mode):
    _linear_case(m, c, k, torch.float32, dead=[1, 4, 16], layout=layout, mode=mode)


def test_linear_small_blocks_and_no_bias():
    # 16x16x16 tiles: many programs, all-dead tiles, a partly live tile, several K / batch steps
    dead = list(range(16, 32)) + [3]
    _linear_case(20, 50, 40, torch.float32, dead=dead, layout="contig", mode=0, bias=False, blocks=(16, 16, 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_low_precision(dtype):
    _linear_case(12, 24, 40, dtype, dead=[2], layout="contig", mode=0)


def test_linear_all_rows_pruned_without_guard():
    w, t = _layer(8, 16, dead=range(8))
    x = torch.randn(4, 16, device=DEV)
    b = torch.randn(8, device=DEV)
    counts, bits, perm, zperm, nlive = _stats(w, t, b, -1.0)
    assert nlive.tolist() == [0, 8]
    flops = torch.zeros(3, dtype=torch.int64, device=DEV)
    y = ops.triton_masked_linear_fwd(x, w, t, b, perm, nlive, None, None, flops)
    assert torch.equal(y, b.expand(4, 8))
    dx = ops.triton_masked_linear_dgrad(torch.randn(4, 8, device=DEV), w, t, perm, nlive, None, None, flops)
    assert torch.equal(dx, torch.zeros_like(dx))
    assert flops.tolist() == [0, 0, 0]


def test_linear_input_channel_compaction():
    """in_perm / in_nlive: the forward and the weight gradient skip input channels that are zero, the
    input gradient writes zeros for them; values equal the reference where it matters."""
    m, c, k = 7, 19, 30
    w, t = _layer(c, k, dead=[0])
    zero_cols = torch.tensor([1, 4, 5, 17, 29])
    x = torch.randn(m, k, device=DEV)
    x[:, zero_cols] = 0.0
    nz = torch.ones(k, dtype=torch.bool)
    nz[zero_cols] = False
    in_perm = torch.argsort((~nz).to(torch.int8), stable=True).to(torch.int32).to(DEV)
    in_nl = torch.tensor([int(nz.sum())], dtype=torch.int32, device=DEV)
    counts, bits, perm, zperm, nlive = _stats(w, t)
    flops = torch.zeros(3, dtype=torch.int64, device=DEV)
    y = ops.triton_masked_linear_fwd(x, w, t, None, perm, nlive, in_perm, in_nl, flops)
    dy = torch.randn(m, c, device=DEV)
    dx = ops.triton_masked_linear_dgrad(dy, w, t, perm, nlive, in_perm, in_nl, flops)
    gw, gt, cnt = ops.triton_masked_linear_wgrad(dy, x, w, t, in_perm, in_nl, 0, flops)
    w_hat, _ = R.masked_weight_fwd(w, t.clone(), 0.01)
    torch.testing.assert_close(y, x @ w_hat.t())
    dx_ref = dy @ w_hat
    dx_ref[:, zero_cols] = 0.0
    torch.testing.assert_close(dx, dx_ref)
    gw_ref, gt_ref = R.masked_weight_bwd(dy.t() @ x, w, t, 0)
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(gt, gt_ref)
    assert torch.equal(cnt, counts)
    live, kl = int(nlive[0]), int(in_nl[0])
    assert flops.tolist() == [2 * m * live * kl, 2 * m * live * kl, 2 * m * c * kl]


# ---- conv --------------------------------------------------------------------------------------

CONV = [  # (co, ci, kh, kw, stride, padding, dilation, H, W)
    (6, 4, 3, 3, (1, 1), (1, 1), (1, 1), 7, 6),
    (5, 3, 3, 2, (2, 1), (2, 0), (1, 2), 9, 8),
    (7, 5, 1, 1, (1, 1), (0, 0), (1, 1), 4, 4),
    (4, 3, 4, 4, (2, 2), (1, 1), (1, 1), 8, 8),
]


def _conv_case(co, ci, kh, kw, stride, padding, dilation, h, wd, dtype=torch.float32, mode=0,
               channels_last=False, in_zero=None, transposed=False, out_pad=(0, 0), blocks=None):
    """One conv (or transposed conv: `w` is then the [Co, Ci, KH, KW] row view of its [Ci, Co, KH, KW]
    weight, as the layers pass it) through the three ops, against F.conv2d / F.conv_transpose2d on the
    reference masked weight, in float32."""
    w, t = _layer(co, ci * kh * kw, dtype, dead=[1])
    w = w.view(co, ci, kh, kw)
    if transposed:  # the parameter is [Ci, Co, KH, KW]; the ops get its transpose, a strided view
        w = w.transpose(0, 1).contiguous().transpose(0, 1)
    b = torch.randn(co, device=DEV).to(dtype)
    x = torch.randn(2, ci, h, wd, device=DEV).to(dtype)
    if in_zero is not None:
        x[:, in_zero] = 0.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    t_ref = t.clone()
    w_hat, counts_ref = R.masked_weight_fwd(w.reshape(co, -1), t_ref, 0.01)
    xr = x.float().clone().requires_grad_()
    if transposed:
        wr = w_hat.view(co, ci, kh, kw).transpose(0, 1).float().clone().requires_grad_()
        yr = F.conv_transpose2d(xr, wr, b.float(), stride, padding, out_pad, 1, dilation)
    else:
        wr = w_hat.view(co, ci, kh, kw).float().clone().requires_grad_()
        yr = F.conv2d(xr, wr, b.float(), stride, padding, dilation)
    dy = torch.randn_like(yr).to(dtype)
    yr.backward(dy.float())
    g_rows = wr.grad.transpose(0, 1) if transposed else wr.grad
    gw_ref, gt_ref = _ref_weight_grads(g_rows.to(dtype), w, t_ref, mode)
    geo = (list(stride), list(padding), list(dilation), transposed)
    flops = torch.zeros(3, dtype=torch.int64, device=DEV)
    t1 = t.clone()
    w_rows = w.flatten(2) if transposed else w.reshape(co, -1)  # the transposed rows: a 3-D view, no copy
    assert not transposed or w_rows.data_ptr() == w.data_ptr()
    counts, bits, perm, zperm, nlive = _stats(w_rows, t1, b)
    ip = inl = None
    if in_zero is not None:
        nz = torch.ones(ci, dtype=torch.bool)
        nz[in_zero] = False
        ip = torch.argsort((~nz).to(torch.int8), stable=True).to(torch.int32).to(DEV)
        inl = torch.tensor([int(nz.sum())], dtype=torch.int32, device=DEV)
    saved, TL._BLOCK_OVERRIDE = TL._BLOCK_OVERRIDE, blocks
    try:
        y = ops.triton_masked_conv_fwd(x, w, t1, b, perm, nlive, ip, inl, flops, *geo, list(out_pad))
        dx = ops.triton_masked_conv_dgrad(dy, w, t1, perm, nlive, None, None, flops, [h, wd], *geo)
        gw, gt, cnt = ops.triton_masked_conv_wgrad(dy, x, w, t1, ip, inl, mode, flops, *geo)
    finally:
        TL._BLOCK_OVERRIDE = saved
    assert torch.equal(t1, t_ref) and torch.equal(cnt, counts_ref) and torch.equal(counts, counts_ref)
    ref_bits = S.reference_stats(w, t_ref.clone(), b, 0.01)[1]
    assert torch.equal(bits, ref_bits)
    assert y.shape == yr.shape and dx.shape == xr.shape and gw.shape == w.shape
    _close(y, yr, dtype, "forward")
    _close(dx, xr.grad, dtype, "input grad")
    _close(gw.reshape(co, -1), gw_ref, dtype, "weight grad")
    _close(gt, gt_ref, dtype, "threshold grad")
    # positions each weight meets: output positions of a conv, input positions of a transposed conv
    uses = 2 * h * wd if transposed else 2 * yr.shape[2] * yr.shape[3]
    live = int((counts_ref > 0).sum())
    kin = ci if in_zero is None else ci - len(in_zero)
    assert flops.tolist() == [2 * uses * live * kin * kh * kw, 2 * uses * live * ci * kh * kw,
                              2 * uses * co * kin * kh * kw]


@pytest.mark.parametrize("case", CONV)
def test_conv_fp32(case):
    _conv_case(*case)


@pytest.mark.parametrize("transposed", [False, True])
def test_conv_small_blocks_several_tiles_each_way(transposed):
    """16x16x16 tiles: the weight-gradient grid has several output-channel tiles and several column
    tiles (its flat program index is split into both), the forward and input gradient several of each."""
    _conv_case(37, 5, 3, 3, (1, 1), (1, 1), (1, 1), 5, 4, transposed=transposed, blocks=(16, 16, 16))


def test_conv_channels_last_masked_mode_and_input_compaction():
    _conv_case(6, 5, 3, 3, (1, 1), (1, 1), (1, 1), 6, 5, mode=1, channels_last=True, in_zero=[0, 3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_low_precision(dtype):
    _conv_case(6, 4, 3, 3, (2, 2), (1, 1), (1, 1), 7, 7, dtype=dtype)


CONV_T = [  # transposed: (co, ci, kh, kw, stride, padding, dilation, H, W, output_padding)
    (6, 4, 4, 4, (1, 1), (0, 0), (1, 1), 1, 1, (0, 0)),  # FastGAN's first layer: 1x1 noise -> 4x4
    (5, 3, 4, 4, (2, 2), (1, 1), (1, 1), 4, 5, (0, 0)),  # 2x up-sampling
    (4, 5, 3, 2, (2, 3), (1, 0), (1, 2), 5, 4, (1, 2)),  # odd strides, dilation, output padding
    (7, 3, 3, 3, (1, 1), (1, 1), (2, 1), 6, 5, (0, 0)),
]


@pytest.mark.parametrize("case", CONV_T)
def test_conv_transpose_fp32(case):
    *geo, out_pad = case
    _conv_case(*geo, transposed=True, out_pad=out_pad)


def test_conv_transpose_masked_mode_input_compaction_and_low_precision():
    _conv_case(6, 5, 3, 3, (2, 2), (1, 1), (1, 1), 4, 4, mode=1, transposed=True, out_pad=(1, 1), in_zero=[1, 4])
    _conv_case(6, 4, 4, 4, (2, 2), (1, 1), (1, 1), 3, 3, dtype=torch.bfloat16, transposed=True)


def test_opcheck_linear():
    w, t = _layer(9, 12, dead=[2])
    x = torch.randn(5, 12, device=DEV)
    counts, bits, perm, zperm, nlive = _stats(w, t)
    flops = torch.zeros(3, dtype=torch.int64, device=DEV)
    torch.library.opcheck(ops.triton_masked_linear_fwd, (x, w, t, None, perm, nlive, None, None, flops),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.triton_mask_stats, (w, t.clone(), None, 0.01),
                          test_utils=("test_schema", "test_faketensor"))
    dy = torch.randn(5, 9, device=DEV)
    torch.library.opcheck(ops.triton_masked_linear_dgrad, (dy, w, t, perm, nlive, None, None, flops),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.triton_masked_linear_wgrad, (dy, x, w, t, None, None, 0, flops),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("transposed", [False, True])
def test_opcheck_conv(transposed):
    """The conv ops' fake implementations give the real ops' output shapes and dtypes (torch.compile)."""
    co, ci, kh, kw, h, wd = 5, 3, 3, 2, 6, 5
    stride, padding, dilation, out_pad = [2, 1], [1, 0], [1, 2], [1, 0]
    w, t = _layer(co, ci * kh * kw, dead=[1])
    w = w.view(co, ci, kh, kw)
    if transposed:  # the [Co, Ci, KH, KW] row view of a [Ci, Co, KH, KW] parameter, as the layers pass it
        w = w.transpose(0, 1).contiguous().transpose(0, 1)
    b = torch.randn(co, device=DEV)
    x = torch.randn(2, ci, h, wd, device=DEV)
    counts, bits, perm, zperm, nlive = _stats(w.flatten(2) if transposed else w.reshape(co, -1), t, b)
    flops = torch.zeros(3, dtype=torch.int64, device=DEV)
    geo = [stride, padding, dilation, transposed]
    if not transposed:
        out_pad = [0, 0]
    y = ops.triton_masked_conv_fwd(x, w, t, b, perm, nlive, None, None, flops, *geo, out_pad)
    dy = torch.randn_like(y)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.triton_masked_conv_fwd, (x, w, t, b, perm, nlive, None, None, flops, *geo, out_pad),
                          test_utils=utils)
    torch.library.opcheck(ops.triton_masked_conv_dgrad, (dy, w, t, perm, nlive, None, None, flops, [h, wd], *geo),
                          test_utils=utils)
    torch.library.opcheck(ops.triton_masked_conv_wgrad, (dy, x, w, t, None, None, 0, flops, *geo),
                          test_utils=utils)


def test_bad_inputs():
    w, t = _layer(4, 6)
    counts, bits, perm, zperm, nlive = _stats(w, t)
    flops = torch.zeros(3, dtype=torch.int64, device=DEV)
    with pytest.raises(TypeError):
        ops.triton_masked_linear_fwd(torch.randn(2, 6, device=DEV, dtype=torch.float16), w, t, None, perm, nlive,
                                     None, None, flops)
    with pytest.raises(ValueError):
        ops.triton_masked_linear_fwd(torch.randn(2, 5, device=DEV), w, t, None, perm, nlive, None, None, flops)
    with pytest.raises(ValueError):
        ops.triton_masked_linear_wgrad(torch.randn(2, 4, device=DEV), torch.randn(2, 6, device=DEV), w, t,
                                       None, None, 3, flops)
    with pytest.raises(TypeError):
        ops.triton_mask_stats(w.double(), t, None, 0.01)


_COMPILE = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from rgkernels.ops import _triton_util as U, triton_mask_stats as S, triton_masked_linear as L, \\
        triton_masked_conv as C
    TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
          torch.int64: "i64", torch.uint8: "u8"}
    done = []
    class Compile:  # stands in for `kernel[grid]`: compiles for sm_90 with the launch's signature
        def __init__(self, fn):
            self.fn = fn
        def __getitem__(self, grid):
            def call(*args, **kw):
                warps = kw.pop("num_warps", 4); kw.pop("num_stages", None)
                vals = dict(zip(self.fn.arg_names, args)); vals.update(kw)
                sig, const = {}, {}
                for p, name in zip(self.fn.params, self.fn.arg_names):
                    v = vals[name]
                    if p.is_constexpr or v is None or (type(v) is int and v == 1 and not p.do_not_specialize):
                        sig[name] = "constexpr"; const[name] = v
                    elif isinstance(v, torch.Tensor):
                        sig[name] = "*" + TY[v.dtype]
                    else:
                        sig[name] = "i32"
                src = triton.compiler.ASTSource(fn=self.fn, signature=sig, constexprs=const)
                ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
                done.append((self.fn.__name__, "mma" in ck.asm["ptx"]))
            return call
    U.require = lambda kernels, device, op: kernels.build() and False
    for mod, names in ((S, ["_k_mask_stats"]), (L, ["_k_lin_fwd", "_k_lin_wgrad"]),
                       (C, ["_k_conv_fwd", "_k_conv_dgrad", "_k_conv_wgrad"])):
        mod._KERNELS.build()
        for n in names:
            setattr(mod, n, Compile(getattr(mod, n)))
    dt = torch.bfloat16
    w = torch.randn(64, 96, dtype=dt); t = torch.rand(64); b = torch.randn(64, dtype=dt)
    perm = torch.zeros(64, dtype=torch.int32); nl = torch.zeros(2, dtype=torch.int32)
    fl = torch.zeros(3, dtype=torch.int64); ip = torch.zeros(96, dtype=torch.int32)
    S._impl(w, t, b, 0.01)
    L._fwd_impl(torch.randn(128, 96, dtype=dt), w, t, b, perm, nl, ip, nl, fl)
    L._wgrad_impl(torch.randn(128, 64, dtype=dt), torch.randn(128, 96, dtype=dt), w, t, None, None, 0, fl)
    C._dgrad_impl(torch.randn(2, 64, 4, 4, dtype=dt), torch.randn(64, 32, 3, 3, dtype=dt), t, perm, nl,
                  None, None, fl, [8, 8], [2, 2], [1, 1], [1, 1], False)
    wt = torch.randn(32, 64, 4, 4, dtype=dt).transpose(0, 1)  # transposed conv: rows view of [Ci, Co, KH, KW]
    S._impl(wt.flatten(2), t, b, 0.01)
    xt, dyt = torch.randn(2, 32, 8, 8, dtype=dt), torch.randn(2, 64, 16, 16, dtype=dt)
    C._fwd_impl(xt, wt, t, b, perm, nl, None, None, fl, [2, 2], [1, 1], [1, 1], True, [0, 0])
    C._dgrad_impl(dyt, wt, t, perm, nl, None, None, fl, [8, 8], [2, 2], [1, 1], [1, 1], True)
    C._wgrad_impl(dyt, xt, wt, t, None, None, 0, fl, [2, 2], [1, 1], [1, 1], True)
    print(done)
    assert len(done) == 8 and all(mma for name, mma in done if name != "_k_mask_stats"), done
""")


def test_compiles_for_sm90():
    """The GEMM kernels compile for an H100 (tensor-core MMAs in the PTX) without a GPU: bfloat16
    forward with input compaction, the weight gradient with its epilogue, the conv input gradient,
    the mask statistics of a transposed conv's 3-D row view and its three kernels."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover
        triton_missing(f"no NVIDIA Triton backend: {exc}")
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, cwd=root,
                         timeout=300)
    if res.returncode != 0 and "ptxas" in (res.stderr or "") and "not found" in res.stderr:
        triton_missing("ptxas unavailable")
    assert res.returncode == 0, res.stderr[-3000:]


def test_dot_precision_follows_torch():
    from rgkernels.ops import _triton_util as U

    mm, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    old = (mm.fp32_precision, conv.fp32_precision)
    try:
        mm.fp32_precision, conv.fp32_precision = "tf32", "ieee"
        assert U.dot_precision("linear") == "tf32" and U.dot_precision("conv") == "ieee"
        mm.fp32_precision, conv.fp32_precision = "ieee", "tf32"
        assert U.dot_precision("linear") == "ieee" and U.dot_precision("conv") == "tf32"
    finally:
        mm.fp32_precision, conv.fp32_precision = old
