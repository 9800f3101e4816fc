"""Execution modes of the masked layers (rgkernels/sparse_exec.py): "fused" against the reference
composition ("masked_weight": masked_weight + F.linear / F.conv2d) at the layer level, row and chain
compaction, the collapse guard, masks / statistics / protect_pruned on the fused path, executed-FLOP
counting, and the "auto" decision and its cache. Triton runs in the interpreter without a GPU."""
import copy
import json
import pickle
import warnings

import pytest
import torch
from torch import nn

import rgkernels
from rgkernels import sparse_exec as SE

from test_cpu_masked_linear import linear_ref64
from test_masked_weight import rel_err

needs_triton = pytest.mark.usefixtures("triton_required")  # fails on Linux without Triton (conftest)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _prune(layer, dead=(), hi=0.3):
    """Thresholds uniform in [0, hi), the rows in `dead` entirely pruned: their threshold 0.05-0.5 above the
    row's largest |W| (of the effective weight under spectral norm), where H' is not 0, so that their
    threshold gradient is not 0 either and a path that left pruned rows out of the weight-gradient pass
    (not only out of the forward and input-gradient GEMMs) would be caught."""
    with torch.no_grad():
        layer.threshold.uniform_(0.0, hi)
        if len(dead):
            rows = layer._to_rows(layer.weight.detach()).flatten(1).abs().amax(dim=1)
            for i in dead:
                layer.threshold[i] = rows[i] + 0.05 + 0.45 * torch.rand(()).item()
    return layer


def _ref64(model):
    """A float64 copy of `model` whose masked layers run the reference backend's masked weight (plain
    PyTorch, DESIGN.md section 2) and then F.linear / F.conv2d / F.conv_transpose2d: the independent
    reference for the paths under test. Run it inside `rgkernels.use_backend("reference")`."""
    m = copy.deepcopy(model).double()
    SE.set_execution(m, "masked_weight")
    return m


def _check_against_ref64(r64, model, x, g, y, calls=1, tol=1e-5, **call):
    """`model`'s output `y` and its gradients (already computed with output gradient `g` from input x)
    against `r64`, norm-wise within `tol`; every entirely pruned row's threshold gradient is not 0."""
    x64 = x.detach().double().requires_grad_()
    with rgkernels.use_backend("reference"):
        y64 = sum(r64(x64, **call) for _ in range(calls))
    y64.backward(g.double())
    assert rel_err(y, y64) <= tol, f"y: {rel_err(y, y64):.3g}"
    got, want = _params(model), _params(r64)
    for name, p in want.items():
        if p.grad is None:
            assert got[name].grad is None, name
            continue
        assert rel_err(got[name].grad, p.grad) <= tol, f"{name}: {rel_err(got[name].grad, p.grad):.3g}"
    dead_dt = []  # threshold gradients of the entirely pruned rows (the collapse guard revives all-dead layers)
    for (_, a), (_, b) in zip(rgkernels.masked_layers(model), rgkernels.masked_layers(r64)):
        assert torch.equal(a.mask(), b.mask())
        dead = b.last_counts == 0
        if b.threshold.grad is not None and not bool(dead.all()):
            dead_dt.append(b.threshold.grad[dead])
    if dead_dt and torch.cat(dead_dt).numel():
        # (a row can have none legitimately, e.g. a channel without bias feeding a ReLU: dL/dy = 0 there)
        assert bool((torch.cat(dead_dt) != 0).any()), "no pruned row with a threshold gradient: the test is blind"
    return x64.grad


def _pair(make, mode="fused"):
    ref = make().to(DEV)
    fused = copy.deepcopy(ref)
    SE.set_execution(fused, mode)
    return ref, fused


def _params(m):
    return dict(m.named_parameters())


def _check_same(ref, fused, x, rtol=1e-5, atol=1e-6, calls=1):
    """`fused` against `ref` (the same layers on the masked-weight path, elementwise) and against a float64
    copy of `ref` on the reference backend (norm-wise): output, input gradient, every parameter gradient."""
    r64 = _ref64(ref)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = sum(ref(x1) for _ in range(calls))
    y2 = sum(fused(x2) for _ in range(calls))
    torch.testing.assert_close(y2, y1, rtol=rtol, atol=atol)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=rtol, atol=atol)
    dx64 = _check_against_ref64(r64, fused, x, g, y2, calls=calls, tol=max(rtol, 1e-5))
    assert rel_err(x2.grad, dx64) <= max(rtol, 1e-5)
    p1, p2 = _params(ref), _params(fused)
    for name in p1:
        if p1[name].grad is None:
            assert p2[name].grad is None, name
            continue
        torch.testing.assert_close(p2[name].grad, p1[name].grad, rtol=rtol, atol=atol, msg=name)
    for (_, a), (_, b) in zip(rgkernels.masked_layers(ref), rgkernels.masked_layers(fused)):
        assert torch.equal(a.threshold, b.threshold)
        assert torch.equal(a.last_counts, b.last_counts)
        assert torch.equal(a.mask(), b.mask())


# ---- mode API ------------------------------------------------------------------------------------

def test_mode_api(monkeypatch):
    lin = rgkernels.MaskedLinear(4, 3)
    assert lin.execution == "masked_weight"  # opt-in
    monkeypatch.setenv("RGKERNELS_EXECUTION", "auto")
    assert lin.execution == "auto"
    lin.execution = "fused"
    assert lin.execution == "fused"
    with pytest.raises(ValueError):
        lin.execution = "sparse"
    model = nn.Sequential(rgkernels.MaskedLinear(4, 4), nn.ReLU(), rgkernels.MaskedConv2d(2, 2, 3))
    assert SE.set_execution(model, "auto") is model
    assert all(m.execution == "auto" for _, m in rgkernels.masked_layers(model))
    lin2 = pickle.loads(pickle.dumps(lin))
    assert lin2.execution == "fused"


def test_auto_is_masked_weight_on_cpu():
    SE.clear_decisions()
    lin = _prune(rgkernels.MaskedLinear(8, 6), dead=[1, 3, 4])
    lin.execution = "auto"
    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*execution.*", category=rgkernels.RGKernelsWarning)
        y = lin(x)
    assert SE.resolve(lin, x, lin.weight) == "masked_weight"
    mask = lin.mask()
    assert torch.equal(mask, lin.weight.abs() - lin.threshold[:, None] > 0)
    # The CPU masked-weight path of a linear layer (the fused C++ node) leaves the three dead rows of six
    # out of its GEMMs and records that for count_flops (the compiled extension is required: see
    # test_cpu_masked_linear).
    rec = lin._exec_record
    assert rec is not None and int(rec["nlive"][0]) == 3 and rec["cout"] == 6
    assert SE.decisions() == {}
    torch.testing.assert_close(y, nn.functional.linear(x, lin.weight * mask, lin.bias))


@needs_triton
def test_forced_fused_unavailable_warns_once_and_falls_back():
    SE.clear_decisions()
    tconv = rgkernels.MaskedConvTranspose2d(4, 6, 3, groups=2).to(DEV)
    ref = copy.deepcopy(tconv)
    tconv.execution = "fused"
    x = torch.randn(2, 4, 5, 5, device=DEV)
    with pytest.warns(rgkernels.RGKernelsWarning, match="fused.*unavailable.*MaskedConvTranspose2d.*grouped"):
        y = tconv(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*execution.*", category=rgkernels.RGKernelsWarning)
        tconv(x)  # once per reason
    torch.testing.assert_close(y, ref(x))
    lin = rgkernels.MaskedLinear(5, 4).double().to(DEV)
    lin.execution = "fused"
    with pytest.warns(rgkernels.RGKernelsWarning, match="float64"):
        x64 = torch.randn(2, 5, dtype=torch.float64, device=DEV)
        y64 = lin(x64)
    mask = lin.mask()  # the masked-weight path's statistics
    assert torch.equal(mask, lin.weight.abs() - lin.threshold[:, None] > 0)
    torch.testing.assert_close(y64, nn.functional.linear(x64, lin.weight * mask, lin.bias))


def test_fused_without_triton_falls_back(monkeypatch):
    monkeypatch.setattr(SE, "_triton_ok", lambda device, kind: (False, "no Triton here"))
    lin = _prune(rgkernels.MaskedLinear(6, 5), dead=[0])
    ref = copy.deepcopy(lin)
    lin.execution = "fused"
    with pytest.warns(rgkernels.RGKernelsWarning, match="no Triton here"):
        _check_same(ref, lin, torch.randn(3, 6))


# ---- fused layers against the reference composition ------------------------------------------------

LINEAR_INPUTS = [(5, 12), (2, 3, 12), (12,)]


@needs_triton
@pytest.mark.parametrize("shape", LINEAR_INPUTS)
@pytest.mark.parametrize("grad_mode", ["dst", "masked"])
def test_fused_linear_layer(shape, grad_mode):
    def make():
        m = _prune(rgkernels.MaskedLinear(12, 10), dead=[2, 7])
        m.grad_mode = grad_mode
        return m

    ref, fused = _pair(make)
    x = torch.randn(shape, device=DEV)
    _check_same(ref, fused, x)
    assert SE.resolve(fused, x, fused.weight) == "fused" and SE.resolve(ref, x, ref.weight) == "masked_weight"
    assert fused._last_bits is not None and fused._last_masked is None
    assert torch.equal(fused.mask(), ref.mask()) and torch.equal(fused.last_counts, ref.last_counts)


@needs_triton
def test_fused_linear_non_contiguous_input_and_threshold_only_grad():
    ref, fused = _pair(lambda: _prune(rgkernels.MaskedLinear(9, 7, bias=False), dead=[0]))
    x = torch.randn(9, 6, device=DEV).t()  # [6, 9] with strides (1, 6)
    _check_same(ref, fused, x)
    for m in (ref, fused):
        m.weight.requires_grad_(False)
        m.zero_grad()
    y1, y2 = ref(x).square().sum(), fused(x).square().sum()
    y1.backward()
    y2.backward()
    torch.testing.assert_close(fused.threshold.grad, ref.threshold.grad)


CONV_KW = [
    dict(in_channels=3, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=5, kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2)),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", bias=False),
]


@needs_triton
@pytest.mark.parametrize("kw", CONV_KW)
def test_fused_conv_layer(kw):
    ref, fused = _pair(lambda: _prune(rgkernels.MaskedConv2d(**kw), dead=[1]))
    _check_same(ref, fused, torch.randn(2, kw["in_channels"], 7, 6, device=DEV))


@needs_triton
def test_fused_conv_unbatched_channels_last_and_two_calls_before_backward():
    kw = dict(in_channels=3, out_channels=5, kernel_size=3, padding=1)
    ref, fused = _pair(lambda: _prune(rgkernels.MaskedConv2d(**kw), dead=[0]))
    _check_same(ref, fused, torch.randn(3, 6, 6, device=DEV))
    ref.zero_grad()
    fused.zero_grad()
    x = torch.randn(2, 3, 6, 6, device=DEV).contiguous(memory_format=torch.channels_last)
    _check_same(ref, fused, x, calls=2)  # D(real) + D(fake) before one backward


CONV_T_KW = [  # (layer kwargs, input H x W, forward kwargs)
    (dict(in_channels=8, out_channels=6, kernel_size=4), (1, 1), {}),  # FastGAN's InitLayer: noise -> 4x4
    (dict(in_channels=3, out_channels=5, kernel_size=4, stride=2, padding=1), (4, 5), {}),
    (dict(in_channels=4, out_channels=3, kernel_size=3, stride=2, padding=1, bias=False), (4, 4),
     dict(output_size=[8, 8])),  # output_size picks output_padding = 1 per call
    (dict(in_channels=3, out_channels=4, kernel_size=(3, 2), stride=(1, 2), padding=(0, 1), dilation=(2, 1),
          output_padding=(0, 1)), (3, 4), {}),
]


@needs_triton
@pytest.mark.parametrize("kw,hw,call", CONV_T_KW)
def test_fused_conv_transpose_layer(kw, hw, call):
    ref, fused = _pair(lambda: _prune(rgkernels.MaskedConvTranspose2d(**kw), dead=[1]))
    r64 = _ref64(ref)
    x = torch.randn(2, kw["in_channels"], *hw, device=DEV)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1, **call), fused(x2, **call)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    for name, p in _params(ref).items():
        torch.testing.assert_close(_params(fused)[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert rel_err(x2.grad, _check_against_ref64(r64, fused, x, g, y2, **call)) <= 1e-5
    # the fused forward ran (bit-packed mask, no masked weight) and its mask is the reference's
    assert fused._last_bits is not None and fused._last_masked is None
    assert fused.mask().shape == fused.weight.shape and torch.equal(fused.mask(), ref.mask())
    assert torch.equal(fused.last_counts, ref.last_counts) and int(fused.last_counts[1]) == 0
    xc = x.contiguous(memory_format=torch.channels_last)  # any input strides
    torch.testing.assert_close(fused(xc, **call), ref(x, **call), rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_linear_low_precision(dtype):
    """fp16 / bf16: the fused kernels and the ATen composition both within a few units of the dtype's
    rounding of the float64 result (norm-wise), the threshold gradient within float32's (it is summed
    in float32 from dL/dW_hat rounded to the weight dtype, as ATen's composition rounds it)."""
    ref, fused = _pair(lambda: _prune(rgkernels.MaskedLinear(16, 12), dead=[3]).to(dtype))
    x = torch.randn(6, 16, device=DEV, dtype=dtype)
    g = torch.randn(6, 12, device=DEV, dtype=dtype)
    y64, dx64, dw64, dt64, db64, _, _ = linear_ref64(x.cpu(), ref.weight.detach().cpu(), ref.threshold.detach().cpu(),
                                                     ref.bias.detach().cpu(), g.cpu(), ref.grad_mode, guard=None)
    want = (y64, dx64, dw64, db64, dt64)
    eps = torch.finfo(dtype).eps
    for layer in (ref, fused):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(g)
        got = (y, xi.grad, layer.weight.grad, layer.bias.grad)
        for what, a, b in zip(("y", "dx", "dW", "db"), got, want):
            assert a.dtype == dtype
            assert rel_err(a, b) <= 2 * eps, f"{layer.execution}: {what} rel err {rel_err(a, b):.3g} (eps {eps:.3g})"
        assert layer.threshold.grad.dtype == torch.float32
        # dW_hat is rounded to the weight dtype before the sum: about eps relative, not float32's
        assert rel_err(layer.threshold.grad, want[4]) <= 2 * eps, f"{layer.execution}: dt"
    assert torch.equal(fused.mask(), ref.mask())
    torch.testing.assert_close(fused.threshold.grad, ref.threshold.grad, rtol=4 * eps, atol=4 * eps * float(
        ref.threshold.grad.abs().max()))


@needs_triton
def test_collapse_guard_on_fused_path():
    ref, fused = _pair(lambda: _prune(rgkernels.MaskedLinear(10, 8), dead=range(8)))
    _check_same(ref, fused, torch.randn(4, 10, device=DEV))
    assert torch.equal(fused.threshold, torch.zeros(8, device=DEV))  # reset in place (§1)
    assert int(fused.last_counts.sum()) == 80
    # guard off: every row pruned, output = bias, nothing executed in forward / input grad
    ref, fused = _pair(lambda: _prune(rgkernels.MaskedLinear(10, 8), dead=range(8)))
    ref.guard_ratio = fused.guard_ratio = None
    _check_same(ref, fused, torch.randn(4, 10, device=DEV))
    rep = rgkernels.count_flops(fused, torch.randn(4, 10, device=DEV))
    assert rep.forward.executed == 0 and rep.input_grad.executed == 0
    assert rep.weight_grad.executed == rep.weight_grad.dense


SN_CASES = [  # (module, input shape, dead rows, threshold scale, seed)
    (lambda: nn.Linear(8, 6), (3, 8), [4], 0.1, 1),
    # a ConvTranspose2d's spectral norm runs over dim 1 (its output channels); unbatched input
    (lambda: nn.ConvTranspose2d(4, 5, 3, stride=2, padding=1), (4, 3, 3), [2], 0.05, 2),
]


@needs_triton
@pytest.mark.parametrize("module,shape,dead,hi,seed", SN_CASES, ids=["linear", "conv_transpose"])
def test_spectral_norm_reparametrised(module, shape, dead, hi, seed):
    def make():
        m = nn.utils.parametrizations.spectral_norm(module())
        rgkernels.sparsify(m)
        return _prune(m, dead=dead, hi=hi)

    torch.manual_seed(seed)
    ref, fused = _pair(make)
    fused.load_state_dict(ref.state_dict())
    ref.eval()
    fused.eval()  # no power iteration: both see the same effective weight
    _check_same(ref, fused, torch.randn(shape, device=DEV))
    # the stored parameter's gradient is masked with the fused forward's mask (bits)
    assert fused._last_bits is not None
    orig = fused.parametrizations.weight.original
    assert bool((~fused.mask()).any()) and torch.all(orig.grad[~fused.mask()] == 0)


@needs_triton
def test_protect_pruned_and_stats_on_fused_path():
    ref, fused = _pair(lambda: _prune(rgkernels.MaskedLinear(12, 9), dead=[0, 5]))
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ref, fused)]
    for m, o in zip((ref, fused), opts):
        rgkernels.protect_pruned(m, o)
    x = torch.randn(4, 12, device=DEV)
    for _ in range(2):
        for m, o in zip((ref, fused), opts):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    torch.testing.assert_close(fused.weight, ref.weight)
    torch.testing.assert_close(fused.threshold, ref.threshold)
    fused(x)
    ref(x)
    assert rgkernels.layer_stats(fused) == rgkernels.layer_stats(ref)
    assert rgkernels.keep_ratio(fused) == rgkernels.keep_ratio(ref)
    assert SE.live_rows(fused).tolist() == [i for i in range(9) if i not in (0, 5)]


@needs_triton
def test_grouped_masks_context_uses_the_precomputed_weights():
    ref, fused = _pair(lambda: nn.Sequential(_prune(rgkernels.MaskedLinear(6, 5), dead=[1]), nn.ReLU(),
                                             _prune(rgkernels.MaskedLinear(5, 3))))
    x = torch.randn(2, 6, device=DEV)
    with rgkernels.grouped_masks(fused):
        y = fused(x)
    torch.testing.assert_close(y, ref(x))
    assert fused[0]._exec_record is None and fused[0]._last_masked is not None


# ---- chains -----------------------------------------------------------------------------------------

def _mlp():
    return nn.Sequential(
        _prune(rgkernels.MaskedLinear(12, 20, bias=False), dead=[1, 2, 3, 9]), nn.ReLU(),
        _prune(rgkernels.MaskedLinear(20, 9), dead=[0, 4]), nn.LeakyReLU(0.2),
        _prune(rgkernels.MaskedLinear(9, 5)), nn.Sigmoid(),
        _prune(rgkernels.MaskedLinear(5, 4)))


@needs_triton
def test_chain_linear():
    ref, fused = _pair(_mlp)
    with torch.no_grad():
        fused[2].bias[4] = 0.0  # pruned row 4 of layer 2 with a zero bias: a zero channel for layer 4
        ref[2].bias[4] = 0.0
    h = SE.compact_chains(fused)
    # 0 -> 2 through ReLU (input gradient skipped too), 2 -> 4 through LeakyReLU (forward only);
    # no link through Sigmoid (sigmoid(0) != 0)
    assert h.links == [("0", "2", True), ("2", "4", False)]
    x = torch.randn(7, 12, device=DEV)
    _check_same(ref, fused, x)
    live = [int((fused[i].last_counts > 0).sum()) for i in (0, 2, 4, 6)]
    nonzero2 = int(((fused[2].last_counts > 0) | (fused[2].bias != 0)).sum())
    assert live[0] <= 16 and nonzero2 <= 8  # rows 1, 2, 3, 9 of layer 0 and 4 of layer 2 are zero channels
    assert fused[2]._exec_record["in_nlive"].tolist() == [live[0]]
    assert fused[4]._exec_record["in_nlive"].tolist() == [nonzero2]
    assert fused[6]._exec_record["in_nlive"] is None
    # count_flops: executed figures from the kernels' live counts; dense / active as on the reference
    SE.reset_executed_flops(fused)
    r_ref, r_fused = rgkernels.count_flops(ref, x), rgkernels.count_flops(fused, x)
    for name in r_ref.layers:
        a, b = r_ref.layers[name], r_fused.layers[name]
        assert (a.forward.dense, a.forward.active, a.step.dense, a.step.active) == \
               (b.forward.dense, b.forward.active, b.step.dense, b.step.active)
    m = 7
    exp = {"0": (2 * m * live[0] * 12, 2 * m * live[0] * 12, 2 * m * 20 * 12),
           "2": (2 * m * live[1] * live[0], 2 * m * live[1] * live[0], 2 * m * 9 * live[0]),
           "4": (2 * m * live[2] * nonzero2, 2 * m * live[2] * 9, 2 * m * 5 * nonzero2),
           "6": (2 * m * live[3] * 5, 2 * m * live[3] * 5, 2 * m * 4 * 5)}
    got = {n: (lf.forward.executed, lf.input_grad.executed, lf.weight_grad.executed)
           for n, lf in r_fused.layers.items()}
    assert got == exp
    # the device counters agree with count_flops after a real forward + backward
    SE.reset_executed_flops(fused)
    fused(x.clone().requires_grad_()).sum().backward()
    dev = SE.executed_flops(fused)
    assert {n: (d["forward"], d["input_grad"], d["weight_grad"]) for n, d in dev.items()} == exp
    h.remove()
    fused(x)
    assert fused[2]._exec_record["in_nlive"] is None


@needs_triton
def test_chain_conv_and_mixed_paths():
    def make():
        return nn.Sequential(
            _prune(rgkernels.MaskedConv2d(3, 8, 3, padding=1, bias=False), dead=[0, 5]), nn.ReLU(inplace=True),
            _prune(rgkernels.MaskedConv2d(8, 6, 3, stride=2, padding=1), dead=[2]))

    ref, fused = _pair(make)
    h = SE.compact_chains(fused)
    assert h.links == [("0", "2", True)]
    x = torch.randn(2, 3, 6, 6, device=DEV)
    _check_same(ref, fused, x)
    live0, live2 = (int((fused[i].last_counts > 0).sum()) for i in (0, 2))
    assert live0 <= 6 and live2 <= 5
    assert fused[2]._exec_record["in_nlive"].tolist() == [live0]
    r = rgkernels.count_flops(fused, x)
    uses = 2 * 3 * 3
    assert r.layers["2"].forward.executed == 2 * uses * live2 * live0 * 9
    assert r.layers["2"].input_grad.executed == 2 * uses * live2 * live0 * 9
    assert r.layers["2"].weight_grad.executed == 2 * uses * 6 * live0 * 9
    # the producer on the masked-weight path: the consumer runs without input skipping
    fused[0].execution = "masked_weight"
    ref.zero_grad()
    fused.zero_grad()
    _check_same(ref, fused, x)
    assert fused[2]._exec_record["in_nlive"] is None
    # the consumer called on its own (outside the Sequential): no stale chain information
    fused[0].execution = "fused"
    fused(x)
    y = fused[2](torch.randn(2, 8, 6, 6, device=DEV))
    assert fused[2]._exec_record["in_nlive"] is None and y.shape == (2, 6, 3, 3)


# ---- executed FLOPs --------------------------------------------------------------------------------

@needs_triton
def test_count_flops_executed_single_conv():
    conv = _prune(rgkernels.MaskedConv2d(4, 6, 3, padding=1), dead=[1, 3], hi=0.05).to(DEV)
    conv.execution = "fused"
    x = torch.randn(2, 4, 5, 5, device=DEV)
    r = rgkernels.count_flops(conv, x)
    uses, k = 2 * 25, 4 * 9
    assert r.forward.dense == 2 * uses * 6 * k
    assert r.forward.executed == r.input_grad.executed == 2 * uses * 4 * k
    assert r.weight_grad.executed == 2 * uses * 6 * k
    assert r.forward.active == 2 * uses * int(conv.last_counts.sum())
    conv.execution = "masked_weight"
    r2 = rgkernels.count_flops(conv, x)
    assert r2.step.executed == r2.step.dense and r2.forward.active == r.forward.active


@needs_triton
def test_count_flops_executed_conv_transpose_matches_the_kernel_counters():
    tconv = _prune(rgkernels.MaskedConvTranspose2d(5, 6, 4, stride=2, padding=1), dead=[0, 4], hi=0.05).to(DEV)
    tconv.execution = "fused"
    x = torch.randn(3, 5, 3, 4, device=DEV)
    SE.reset_executed_flops(tconv)
    r = rgkernels.count_flops(tconv, x)
    uses, k = 3 * 12, 5 * 16  # input positions; each weight row has Ci * KH * KW entries
    assert r.forward.dense == 2 * uses * 6 * k
    assert r.forward.executed == r.input_grad.executed == 2 * uses * 4 * k
    assert r.weight_grad.executed == 2 * uses * 6 * k
    # what the kernels themselves counted on the device (forward only: count_flops runs no backward)
    tconv.train()
    xx = x.clone().requires_grad_()
    tconv(xx).sum().backward()
    assert SE.executed_flops(tconv)[""] == {"forward": 2 * r.forward.executed, "input_grad": r.input_grad.executed,
                                            "weight_grad": r.weight_grad.executed}


# ---- the "auto" decision and its cache ---------------------------------------------------------------

def test_decide_and_disk_cache(tmp_path, monkeypatch):
    SE.clear_decisions()
    path = tmp_path / "exec.json"
    SE.set_decision_cache(str(path))
    try:
        fake = {"masked_weight": 1.0, "fused": 0.5}
        timer = lambda fn: fake[fn()]  # noqa: E731
        cands = {"masked_weight": lambda: "masked_weight", "fused": lambda: "fused"}
        assert SE.decide("k1", cands, timer) == "fused"
        fake["fused"] = 0.99  # within the hysteresis: stay on the existing path
        assert SE.decide("k2", cands, timer) == "masked_weight"
        fake["fused"] = 0.01
        assert SE.decide("k2", cands, timer) == "masked_weight"  # cached: not measured again
        assert json.loads(path.read_text())["decisions"] == {"k1": "fused", "k2": "masked_weight"}
        SE.clear_decisions()
        assert SE.decisions() == {"k1": "fused", "k2": "masked_weight"}  # read back from disk
        calls = []
        assert SE.decide("k1", cands, lambda fn: calls.append(1) or 1.0) == "fused" and not calls
    finally:
        SE.set_decision_cache(None)
        SE.clear_decisions()


@needs_triton
@pytest.mark.parametrize("kind", ["linear", "conv", "conv_transpose"])
def test_auto_candidates_run_both_paths_on_copies(kind):
    """What "auto" times on a GPU: one forward + backward of each path, on copies (the layer's
    parameters, gradients and thresholds untouched). Run here under the interpreter."""
    make = {"linear": lambda: rgkernels.MaskedLinear(6, 5),
            "conv": lambda: rgkernels.MaskedConv2d(3, 4, 3, padding=1),
            "conv_transpose": lambda: rgkernels.MaskedConvTranspose2d(3, 4, 4, stride=2, padding=1)}[kind]
    layer = _prune(make(), dead=[0]).to(DEV)
    x = torch.randn((4, 6) if kind == "linear" else (2, 3, 3, 3), device=DEV, requires_grad=True)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    cands = SE._measure_candidates(layer, x, layer.weight, kind)
    ran = []
    assert SE.decide(f"test-{kind}", cands, lambda fn: fn() or ran.append(1) or float(len(ran))) == "masked_weight"
    assert len(ran) == 2 and x.grad is None
    for n, p in layer.named_parameters():
        assert p.grad is None and torch.equal(p, before[n]), n
    SE.clear_decisions()


@needs_triton
def test_auto_choice_memo_per_call_signature(monkeypatch):
    """"auto"'s decision found again through the layer's memo: the checks and the decision key run once
    per call signature and share of dead rows; a new batch size, no_grad, a dead-row share in another
    eighth, or forgotten decisions each go back to the decision (run on the CPU under the interpreter;
    `resolve` itself sends only CUDA calls here)."""
    SE.clear_decisions()
    layer = _prune(rgkernels.MaskedLinear(6, 8)).to(DEV)
    built, timed = [], []
    real_key = SE._decision_key
    monkeypatch.setattr(SE, "_decision_key", lambda *a, **k: built.append(a[4]) or real_key(*a, **k))
    fake = {"masked_weight": 2.0, "fused": 1.0}
    monkeypatch.setattr(SE, "_cuda_time", lambda fn: timed.append(1) or fake[next(iter(k for k, v in cands.items()
                                                                                       if v is fn))])
    real_measure = SE._measure_candidates
    cands = {}

    def measure(*a, **k):
        cands.clear()
        cands.update(real_measure(*a, **k))
        return cands
    monkeypatch.setattr(SE, "_measure_candidates", measure)

    x = torch.randn(4, 6, device=DEV, requires_grad=True)
    assert SE.auto_choice(layer, x, layer.weight) == "fused" and len(built) == 1 and len(timed) == 2
    for _ in range(3):
        assert SE.auto_choice(layer, x, layer.weight) == "fused"
    assert len(built) == 1 and len(timed) == 2  # memo hits: neither key nor timing
    fake["fused"] = 3.0
    assert SE.auto_choice(layer, torch.randn(5, 6, device=DEV), layer.weight) == "masked_weight"  # new shape
    assert len(built) == 2 and len(timed) == 4
    with torch.no_grad():  # no gradients: another key, measured
        assert SE.auto_choice(layer, x, layer.weight) == "masked_weight"
    assert len(built) == 3
    assert SE.auto_choice(layer, x, layer.weight) == "fused" and len(built) == 3  # the first one, still memoised
    layer._exec_state["bucket"] = 4  # half the rows found dead by the asynchronous re-check
    assert SE.auto_choice(layer, x, layer.weight) == "masked_weight" and built[-1] == 4
    SE.clear_decisions()  # forgotten: measured again (fused is slower now)
    layer._exec_state["bucket"] = 0
    assert SE.auto_choice(layer, x, layer.weight) == "masked_weight" and len(built) == 5 and built[-1] == 0
    assert SE.decisions() and all(v == "masked_weight" for v in SE.decisions().values())
    SE.clear_decisions()


@needs_triton
def test_auto_choice_under_torch_compile(monkeypatch):
    """Under torch.compile (fullgraph: no timing, sync or event in the graph) "auto" runs the decision the
    layer's eager calls made for that call, and "masked_weight" for a layer or a call never decided."""
    SE.clear_decisions()
    layer = _prune(rgkernels.MaskedLinear(6, 8)).to(DEV)
    fresh = copy.deepcopy(layer)
    monkeypatch.setattr(SE, "_measure_candidates", lambda *a, **k: {"masked_weight": "m", "fused": "f"})
    monkeypatch.setattr(SE, "_cuda_time", {"m": 2.0, "f": 1.0}.get)
    x = torch.randn(4, 6, device=DEV, requires_grad=True)
    assert SE.auto_choice(layer, x, layer.weight) == "fused"  # eager: measured (fake timings) and cached
    # The dead-row count syncs, or on a GPU queries an event of an asynchronous copy: never in a graph.
    monkeypatch.setattr(SE, "_dead_bucket", lambda *a: pytest.fail("dead rows counted inside the graph"))

    def path_code(m, inp):  # the choice, as a number the compiled graph returns
        return inp.sum() * 0 + (1 if SE.auto_choice(m, inp, m.weight) == "fused" else 2)

    compiled = torch.compile(path_code, backend="aot_eager", fullgraph=True)
    assert compiled(layer, x).item() == 1
    assert compiled(fresh, x).item() == 2  # no eager call: no dead-row count, nothing decided
    assert compiled(layer, torch.randn(3, 6, device=DEV)).item() == 2  # a call signature never measured
    layer._exec_state["bucket"] = 8  # every row found dead: another decision key, not measured
    assert compiled(layer, x).item() == 2
    SE.clear_decisions()


@needs_triton
def test_auto_choice_memo_unsupported_calls_and_copies(monkeypatch):
    """Calls the fused kernels cannot run are memoised as such (no dead-row count either), and the memo
    goes neither into pickles nor deep copies."""
    SE.clear_decisions()
    conv = rgkernels.MaskedConv2d(4, 4, 3, padding=1, groups=2).to(DEV)
    checks = []
    real = SE.fused_support
    monkeypatch.setattr(SE, "fused_support", lambda *a: checks.append(1) or real(*a))
    x = torch.randn(1, 4, 5, 5, device=DEV)
    for _ in range(3):
        assert SE.auto_choice(conv, x, conv.weight) == "masked_weight"
    assert len(checks) == 1 and conv._exec_state is None and not SE.decisions()
    conv.groups = 1  # what the fused kernels depend on is in the signature (a new module would be usual)
    conv.weight = nn.Parameter(conv.weight.detach().repeat(1, 2, 1, 1))
    monkeypatch.setattr(SE, "_cuda_time", lambda fn: 1.0)
    assert SE.auto_choice(conv, x, conv.weight) == "masked_weight" and len(checks) == 2 and len(SE.decisions()) == 1
    assert conv._exec_memo
    for clone in (pickle.loads(pickle.dumps(conv)), copy.deepcopy(conv)):
        assert clone._exec_memo is None and clone._exec_state is None
    SE.clear_decisions()


@needs_triton
def test_fused_support_refuses_more_gemm_rows_than_32_bit_indices_hold():
    """The fused kernels index GEMM rows (batch x positions) in 32 bits: a call with more runs
    masked_weight + cuDNN / cuBLAS instead (expanded inputs: nothing is allocated)."""
    lin = rgkernels.MaskedLinear(8, 4).to(DEV)
    conv = rgkernels.MaskedConv2d(2, 4, 3, padding=1).to(DEV)
    tconv = rgkernels.MaskedConvTranspose2d(2, 4, 4, stride=2, padding=1).to(DEV)
    limit = SE._INDEX_LIMIT
    one = torch.zeros((), device=DEV)
    assert SE.fused_support(lin, one.expand(limit - 1, 8), lin.weight)[0]
    ok, why = SE.fused_support(lin, one.expand(2, limit // 2 + 1, 8), lin.weight)
    assert not ok and "32 bits" in why
    assert SE.fused_support(conv, one.expand(64, 2, 64, 64), conv.weight)[0]
    assert not SE.fused_support(conv, one.expand(4096, 2, 1024, 1024), conv.weight)[0]
    # a transposed conv's output is about stride^2 times its input: the bound follows it
    n = limit // (2 * 512 * 2 * 512) + 1
    assert SE.fused_support(tconv, one.expand(n, 2, 256, 256), tconv.weight)[0]
    assert not SE.fused_support(tconv, one.expand(n, 2, 512, 512), tconv.weight)[0]


@needs_triton
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fused_ops_called_directly_in_eager_mode_and_registered_under_a_dispatch_mode(monkeypatch, kind):
    """In eager mode the fused path calls the ops' Python implementations directly (a custom op's
    dispatch is host time on every call); the numbers are the registered ops' bit for bit, and a dispatch
    mode (FlopCounterMode, fake tensors, ...) still sees the registered ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    make = (lambda: rgkernels.MaskedLinear(12, 9)) if kind == "linear" else (
        lambda: rgkernels.MaskedConv2d(3, 6, 3, padding=1))
    shape = (5, 12) if kind == "linear" else (2, 3, 5, 5)
    torch.manual_seed(0)
    base = _prune(make(), dead=[2]).to(DEV)
    x = torch.randn(shape, device=DEV)
    results = {}
    for direct in (True, False):
        monkeypatch.setattr(SE, "DIRECT_CALLS", direct)
        layer = copy.deepcopy(base)
        SE.set_execution(layer, "fused")
        xx = x.clone().requires_grad_()
        version = layer.threshold._version
        y = layer(xx)
        bumped = layer.threshold._version != version
        y.square().sum().backward()
        results[direct] = (y, xx.grad, layer.weight.grad, layer.threshold.grad, layer.bias.grad, bumped)
    for a, b in zip(results[True][:5], results[False][:5]):
        assert torch.equal(a, b)
    assert not results[True][5] and results[False][5]  # the registered op declares its threshold mutation
    monkeypatch.setattr(SE, "DIRECT_CALLS", True)
    layer = copy.deepcopy(base)
    SE.set_execution(layer, "fused")
    with Seen() as seen:
        layer(x.clone().requires_grad_()).sum().backward()
    want = {f"rgkernels.triton_mask_stats", f"rgkernels.triton_masked_{kind}_fwd", f"rgkernels.triton_masked_{kind}_dgrad",
            f"rgkernels.triton_masked_{kind}_wgrad"}
    assert want <= seen.ops, seen.ops


def _compiled_matches_eager(model, x, steps=3, fullgraph=True, tol=0.0, backend="aot_eager"):
    """`model` compiled (AOT autograd, the graph partitioned into forward and backward) against an eager
    deep copy, over `steps` training steps: outputs, every gradient, the masks of the last forward and the
    executed-FLOP counters (which only the fused kernels advance) all equal. With fullgraph, the graph is
    also never compiled again (a cache of ours filled while tracing would recompile it at the second
    call). `tol`: 0 where both run the same kernels; on the CPU's default path eager mode runs the C++
    nodes and compiled graphs their Python forms (other GEMM calls), and spectral norm's backward of two
    calls sums in another order in a graph (plain nn.Linear's too: ~1e-7). Returns the counters."""
    import torch._dynamo

    torch._dynamo.reset()  # another test's graphs of the same code are not recompilations of this one
    eager = copy.deepcopy(model)
    for m in (model, eager):
        SE.compact_chains(m)
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
    for _ in range(steps):
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        with warnings.catch_warnings(), torch._dynamo.config.patch(error_on_recompile=fullgraph):
            warnings.simplefilter("error")  # no fallback to masked_weight (it warns)
            yc = compiled(xc)
            # called twice before one backward, as D is on real and fake images
            (yc.square().sum() + compiled(xc.flip(0)).sum()).backward()
        ye = eager(xe)
        (ye.square().sum() + eager(xe.flip(0)).sum()).backward()
        torch.testing.assert_close(yc, ye, rtol=tol, atol=tol)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=tol, atol=tol)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol, msg=name)
        for (name, a), (_, b) in zip(rgkernels.masked_layers(model), rgkernels.masked_layers(eager)):
            assert torch.equal(a.mask(), b.mask()), name
    flops = SE.executed_flops(model)
    assert flops == SE.executed_flops(eager)
    return flops


@needs_triton
@pytest.mark.parametrize("kind", ["linear", "conv", "conv_transpose"])
def test_fused_layer_under_torch_compile(kind):
    """The fused node compiles (fullgraph): the same numbers as the eager fused layer, and the kernels ran
    (their FLOP counter moved by the fused forward's, input-gradient's and weight-gradient's counts)."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = rgkernels.MaskedLinear(12, 9), torch.randn(5, 12)
    elif kind == "conv":
        layer, x = rgkernels.MaskedConv2d(4, 6, 3, padding=1, stride=2), torch.randn(2, 4, 7, 6)
    else:
        layer, x = rgkernels.sparsify(nn.ConvTranspose2d(4, 6, 3, stride=2)), torch.randn(2, 4, 3, 4)
    layer = _prune(layer, dead=[3]).to(DEV)
    SE.set_execution(layer, "fused")
    flops = _compiled_matches_eager(layer, x.to(DEV))[""]
    assert min(flops.values()) > 0, flops
    layer.zero_grad()
    r = rgkernels.count_flops(layer, x.to(DEV))  # the executed figures of one more forward
    assert r.forward.executed < r.forward.dense  # row 3 skipped


@needs_triton
def test_fused_model_under_inductor():
    """Inductor generates the code around the fused ops (its own kernels on the GPU, C++ on the CPU): the
    same numbers as eager mode within rounding (it fuses the elementwise work differently)."""
    torch.manual_seed(6)
    model = rgkernels.sparsify(nn.Sequential(nn.Linear(9, 12), nn.LeakyReLU(0.2), nn.Linear(12, 5), nn.Tanh()))
    for _, m in rgkernels.masked_layers(model):
        _prune(m, dead=[1], hi=0.1)
    model = SE.set_execution(model.to(DEV), "fused")
    flops = _compiled_matches_eager(model, torch.randn(6, 9, device=DEV), steps=2, tol=1e-5, backend="inductor")
    assert min(f["forward"] for f in flops.values()) > 0, flops


@needs_triton
@pytest.mark.parametrize("family", ["linear", "conv"])
def test_fused_chain_under_torch_compile(family):
    """A chained Sequential with spectral norm compiles (fullgraph): the consumer skips the producer's zero
    channels as in eager mode (same executed FLOPs), with the same numbers."""
    torch.manual_seed(1)
    sn = nn.utils.parametrizations.spectral_norm
    if family == "linear":
        model, x = nn.Sequential(sn(nn.Linear(6, 8)), nn.ReLU(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)), \
            torch.randn(4, 6)
    else:
        model, x = nn.Sequential(sn(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.LeakyReLU(0.2),
                                 nn.Conv2d(6, 4, 1)), torch.randn(2, 3, 8, 8)
    model = rgkernels.sparsify(model)
    for _, m in rgkernels.masked_layers(model):
        _prune(m, dead=[1], hi=0.05)
        if m.bias is not None:
            with torch.no_grad():
                m.bias[1] = 0  # channel 1's output identically zero: the next layer may skip it
    model = SE.set_execution(model.to(DEV), "fused")
    flops = _compiled_matches_eager(model, x.to(DEV), tol=1e-5)
    layer1 = dict(rgkernels.masked_layers(model))["2"]
    dense = 6 * 2 * (x.shape[0] * (1 if family == "linear" else 16)) * layer1.weight[0].numel() * \
        layer1.weight.shape[0]  # the second layer's six forwards (_compiled_matches_eager), every channel
    assert flops["2"]["forward"] < dense, (flops["2"], dense)


@pytest.mark.parametrize("execution", ["masked_weight", "fused"])
def test_model_under_torch_compile_fullgraph(execution, request):
    """A model of every masked layer kind, spectral norm included, compiles as one graph that is never
    compiled again, and matches eager mode, on its default path (on the CPU: the one-node masked linear,
    the conv's masked weight + oneDNN) as on the fused one."""
    if execution == "fused":
        request.getfixturevalue("triton_required")
    torch.manual_seed(3)
    sn = nn.utils.parametrizations.spectral_norm
    model = rgkernels.sparsify(nn.Sequential(
        sn(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.ConvTranspose2d(8, 6, 3, stride=2), nn.LeakyReLU(0.2),
        nn.Conv2d(6, 6, 5, stride=3), nn.Flatten(), sn(nn.Linear(6 * 3 * 3, 7)), nn.ReLU(), nn.Linear(7, 3)))
    for _, m in rgkernels.masked_layers(model):
        _prune(m, dead=[1], hi=0.05)
    model = SE.set_execution(model.to(DEV), execution)
    flops = _compiled_matches_eager(model, torch.randn(2, 3, 8, 8, device=DEV), tol=1e-5)
    assert (min(f["forward"] for f in flops.values()) > 0) == (execution == "fused"), flops


@needs_triton
def test_fused_layer_under_torch_compile_without_a_counter():
    """A layer pickled before the FLOP counter was made with the layer gets it from the first compiled call
    (made outside the graph: a graph break, so not with fullgraph=True)."""
    torch.manual_seed(2)
    layer = SE.set_execution(_prune(rgkernels.MaskedLinear(7, 5), dead=[0]).to(DEV), "fused")
    layer._exec_flops = None
    flops = _compiled_matches_eager(layer, torch.randn(3, 7, device=DEV), fullgraph=False)
    assert layer._exec_flops is not None and flops[""]["forward"] > 0


@needs_triton
def test_compiled_backward_flops_reach_the_counter_through_the_sink():
    """In a graph the backward's kernels count into a zeroed tensor that becomes the sink's gradient;
    executed_flops, reset_executed_flops and a move of the layer fold it into the counter."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(4)
    layer = SE.set_execution(_prune(rgkernels.MaskedLinear(7, 5), dead=[2]).to(DEV), "fused")
    eager = copy.deepcopy(layer)
    x = torch.randn(3, 7, device=DEV, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    eager(x).sum().backward()
    fwd, dgrad, wgrad = layer._exec_flops.tolist()
    assert fwd > 0 and dgrad == wgrad == 0  # the backward's counts are in the sink until read
    assert layer._exec_flops_sink.grad.tolist() == eager._exec_flops[1:].double().tolist()
    layer.to(DEV)  # nn.Module._apply: folded, then a fresh sink on the device
    assert layer._exec_flops.tolist() == eager._exec_flops.tolist() and layer._exec_flops_sink.grad is None
    assert layer._exec_flops_sink.is_leaf and layer._exec_flops_sink.requires_grad
    compiled(x).sum().backward()
    assert SE.executed_flops(layer)[""]["weight_grad"] == 2 * wgrad + 2 * eager._exec_flops[2].item() - 2 * wgrad
    SE.reset_executed_flops(layer)
    assert layer._exec_flops_sink.grad is None and SE.executed_flops(layer)[""] == dict.fromkeys(
        ("forward", "input_grad", "weight_grad"), 0)


def test_conv_transpose_on_one_position_under_torch_compile_with_the_guard():
    """FastGAN's first layer (a transposed conv on a 1x1 map: the mask on the stacked rows and one GEMM; its
    collapse guard writes the threshold back) compiles as one graph; the guard fires as in eager mode."""
    torch.manual_seed(5)
    layer = rgkernels.sparsify(nn.ConvTranspose2d(8, 6, 4))
    with torch.no_grad():
        layer.threshold.fill_(1e3)  # everything pruned: the guard resets the thresholds to 0
    fired = copy.deepcopy(layer)
    flops = _compiled_matches_eager(layer, torch.randn(2, 8, 1, 1), tol=1e-5)
    assert torch.equal(layer.threshold, torch.zeros(6)) and flops
    eager = copy.deepcopy(fired)
    eager(torch.randn(2, 8, 1, 1))
    assert torch.equal(eager.threshold, torch.zeros(6))


@needs_triton
def test_fused_fallback_warns_while_tracing(monkeypatch):
    """A layer set to "fused" that the kernels cannot run (a grouped conv), compiled before any eager call:
    the fallback's warning line is issued while the graph is traced, which fullgraph=True allows."""
    monkeypatch.setattr(rgkernels._backend, "_warned", set())
    import torch._dynamo

    torch._dynamo.reset()
    layer = SE.set_execution(_prune(rgkernels.MaskedConv2d(4, 8, 3, groups=2)), "fused")
    eager = copy.deepcopy(layer)
    x = torch.randn(2, 4, 7, 7)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with pytest.warns(rgkernels.RGKernelsWarning, match="grouped convolution") as rec:
        y = compiled(x)
    assert len([r for r in rec if "grouped convolution" in str(r.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        y2 = compiled(x)
    torch.testing.assert_close(y, eager(x))
    torch.testing.assert_close(y2, y)


def test_eager_calls_between_compiled_steps_do_not_recompile():
    """An eager call of the model between compiled steps (a sample grid, count_flops) leaves per-forward
    records (the CPU node's skipped rows) that the graph must not guard on."""
    import torch._dynamo

    torch._dynamo.reset()
    model = rgkernels.sparsify(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    with torch.no_grad():
        for _, m in rgkernels.masked_layers(model):
            m.threshold[: m.threshold.shape[0] // 2] = 1e3  # half the rows pruned: the CPU node skips them
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(torch.randn(4, 6)).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            with torch.no_grad():
                model(torch.randn(4, 6))
            rgkernels.count_flops(model, torch.randn(4, 6))
            compiled(torch.randn(4, 6)).sum().backward()


@needs_triton
def test_meta_built_model_with_assigned_weights():
    """A model built on meta whose weights come with load_state_dict(assign=True) keeps meta counters (only
    `_apply` moves them): executed_flops leaves them out, and the first fused forward starts from zero."""
    src = rgkernels.sparsify(nn.Linear(4, 6)).to(DEV)
    with torch.device("meta"):
        layer = rgkernels.sparsify(nn.Linear(4, 6))
    layer.load_state_dict(src.state_dict(), assign=True)
    assert layer._exec_flops.is_meta and SE.executed_flops(layer) == {}
    SE.set_execution(layer, "fused")
    layer(torch.randn(3, 4, device=DEV)).sum().backward()
    assert SE.executed_flops(layer)[""] == {"forward": 2 * 3 * 4 * 6, "input_grad": 0, "weight_grad": 2 * 3 * 4 * 6}


@needs_triton
def test_pickling_folds_the_compiled_backward_counts():
    """Pickling drops a tensor's .grad: counts still in the sink's gradient go to the counter first."""
    import torch._dynamo

    torch._dynamo.reset()
    layer = SE.set_execution(rgkernels.MaskedLinear(5, 2).to(DEV), "fused")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(torch.randn(1, 5, device=DEV, requires_grad=True)).sum().backward()
    assert layer._exec_flops_sink.grad is not None
    want = {"forward": 20, "input_grad": 20, "weight_grad": 20}
    assert SE.executed_flops(pickle.loads(pickle.dumps(layer)))[""] == want
    assert SE.executed_flops(layer)[""] == want  # (pickling folded the original's too: nothing counted twice)


def test_flop_counter_made_with_the_layer_and_moved_from_meta():
    """Every masked layer has its int64 counter from construction; a model built on the meta device gets
    zeroed counters from to_empty(), and .double() leaves them int64."""
    with torch.device("meta"):
        model = rgkernels.sparsify(nn.Sequential(nn.Linear(3, 4), nn.Conv2d(2, 3, 3)))
    for _, m in rgkernels.masked_layers(model):
        assert m._exec_flops.is_meta
    model.to_empty(device="cpu").double()
    for _, m in rgkernels.masked_layers(model):
        assert m._exec_flops.dtype == torch.int64 and m._exec_flops.device.type == "cpu"
        assert torch.equal(m._exec_flops, torch.zeros(3, dtype=torch.int64))


def test_chain_links_under_spectral_norm():
    """Parametrised layers each get their own class: the links must not depend on the exact type."""
    sn = nn.utils.parametrizations.spectral_norm
    for norm in (lambda m: m, sn):
        model = rgkernels.sparsify(nn.Sequential(norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), norm(nn.Conv2d(8, 8, 3)),
                                                 nn.ReLU(), nn.Flatten(), norm(nn.Linear(8, 8)), nn.ReLU(),
                                                 norm(nn.Linear(8, 4))))
        h = SE.compact_chains(model)
        assert h.links == [("0", "2", True), ("5", "7", True)]
        h.remove()


def test_compaction_helper():
    counts = torch.tensor([3, 0, 5, 0, 1], dtype=torch.int32)
    bias = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0])
    perm, zperm, nlive = SE.compaction(counts, bias)
    assert perm.tolist() == [0, 2, 4, 1, 3] and zperm.tolist() == [0, 1, 2, 4, 3] and nlive.tolist() == [3, 4]


@needs_triton
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_backward_into_the_input_alone_runs_no_weight_gradient_kernel(kind):
    """RG-GAN's G step differentiates into G's parameters only (backward(inputs=...)): D's fused layers must
    not launch their weight-gradient kernel there (ATen's layers skip that GEMM too)."""
    from test_cpu_compact_conv import OpLog

    if kind == "linear":
        layer, x = rgkernels.MaskedLinear(12, 10), torch.randn(4, 12, device=DEV, requires_grad=True)
    else:
        layer, x = rgkernels.MaskedConv2d(3, 5, 3, padding=1), torch.randn(2, 3, 5, 5, device=DEV, requires_grad=True)
    layer = _prune(layer.to(DEV), dead=[1])
    layer.execution = "fused"
    y = layer(x)
    assert layer._last_bits is not None  # the fused path ran
    g = torch.randn_like(y)
    with OpLog() as log:
        (dx,) = torch.autograd.grad(y, [x], g, retain_graph=True)
    ops = [str(func) for func, _ in log.calls]
    assert any("dgrad" in op for op in ops) and not any("wgrad" in op for op in ops), ops
    y.backward(g)  # the full backward: the same input gradient, and the weight's (the wgrad kernel)
    torch.testing.assert_close(dx, x.grad, rtol=0, atol=0)
    assert layer.weight.grad is not None and layer.threshold.grad is not None


@needs_triton
@pytest.mark.parametrize("kind", ["linear", "conv", "conv_transpose"])
def test_gradient_penalty_double_backward(kind):
    """R1-style: the input gradient taken with create_graph=True and differentiated again reaches the
    weights and thresholds exactly as through the reference composition."""
    if kind == "linear":
        make, shape = (lambda: _prune(rgkernels.MaskedLinear(8, 6), dead=[1], hi=0.1)), (4, 8)
    elif kind == "conv":
        make, shape = (lambda: _prune(rgkernels.MaskedConv2d(3, 4, 3, padding=1), dead=[1], hi=0.1)), (2, 3, 5, 5)
    else:
        make = lambda: _prune(rgkernels.MaskedConvTranspose2d(3, 4, 4, 2, 1), dead=[1], hi=0.1)  # noqa: E731
        shape = (2, 3, 3, 3)
    ref, fused = _pair(make)
    x = torch.randn(shape, device=DEV)
    for m in (ref, fused):
        xx = x.clone().requires_grad_()
        out = m(xx)
        (gx,) = torch.autograd.grad(out.square().sum(), xx, create_graph=True)
        (gx.square().sum() + out.sum()).backward()
    for name, p in _params(ref).items():
        torch.testing.assert_close(_params(fused)[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("rows_dead", [0, 48])
def test_auto_on_gpu_measures_once_and_matches_reference(rows_dead):
    SE.clear_decisions()
    ref, auto = _pair(lambda: _prune(rgkernels.MaskedLinear(256, 96), dead=range(rows_dead), hi=0.02), "auto")
    x = torch.randn(64, 256, device=DEV)
    _check_same(ref, auto, x)
    keys = list(SE.decisions())
    assert len(keys) == 1 and f"dead{round(8 * rows_dead / 96)}/8" in keys[0]
    for _ in range(3):
        auto(x)
    assert list(SE.decisions()) == keys  # measured once
    SE.clear_decisions()


@pytest.mark.gpu
def test_auto_on_gpu_conv_transpose_matches_reference():
    SE.clear_decisions()
    ref, auto = _pair(lambda: _prune(rgkernels.MaskedConvTranspose2d(64, 32, 4, stride=2, padding=1), dead=range(8),
                                     hi=0.02), "auto")
    _check_same(ref, auto, torch.randn(8, 64, 8, 8, device=DEV), rtol=1e-4, atol=1e-5)
    (key,) = SE.decisions()
    assert key.startswith("conv_transpose|") and "op(0, 0)" in key
    SE.clear_decisions()


@needs_triton
def test_chained_model_pickles_and_deepcopies():
    model = _mlp().to(DEV)
    SE.set_execution(model, "fused")
    SE.compact_chains(model)
    x = torch.randn(3, 12, device=DEV)
    y = model(x)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        torch.testing.assert_close(clone(x), y)
        assert clone[2]._exec_record["in_nlive"] is None  # links are not carried over
        SE.compact_chains(clone)
        torch.testing.assert_close(clone(x), y)
        assert clone[2]._exec_record["in_nlive"] is not None
