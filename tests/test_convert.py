"""sparsify / set_sparse / statistics / regulariser (rgkernels/convert.py), spectral norm in both forms."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import rgkernels
from conftest import cpu_gemm, cpu_gemms
from test_flops import keep_thresholds, known_rows
from test_masked_weight import _Step as Step  # S with H' for S' (DESIGN.md section 2)


def _model(dtype=torch.float32):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
    ).to(dtype)


def test_sparsify_in_place_keeps_parameters_and_dense_outputs():
    ref = _model(torch.float64)
    m = copy.deepcopy(ref)
    params_before = [p for p in m.parameters()]
    assert rgkernels.sparsify(m) is m
    assert [type(l) for l in m] == [rgkernels.MaskedConv2d, nn.LeakyReLU, rgkernels.MaskedConvTranspose2d,
                                    nn.LeakyReLU, nn.Flatten, rgkernels.MaskedLinear]
    # same Parameter objects (an optimiser built before still holds them), plus the thresholds
    assert all(any(p is q for q in m.parameters()) for p in params_before)
    for _, layer in rgkernels.masked_layers(m):
        assert layer.sparse and layer.threshold.dtype == torch.float32 and not layer.threshold.any()
        assert layer.weight.dtype == torch.float64
    rgkernels.set_sparse(m, False)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(m(x), ref(x))
    # already masked layers are untouched
    t0 = m[0].threshold
    rgkernels.sparsify(m)
    assert m[0].threshold is t0 and not m[0].sparse


def test_sparsify_converts_root_and_skips_subclasses():
    class MyLinear(nn.Linear):
        pass

    lin = rgkernels.sparsify(nn.Linear(3, 2))
    assert isinstance(lin, rgkernels.MaskedLinear)
    holder = nn.Sequential(MyLinear(3, 2), nn.Conv1d(2, 2, 1), nn.LazyLinear(3), nn.Linear(2, 2))
    with pytest.warns(rgkernels.RGKernelsWarning, match=r"left 3 layer.*0 \(MyLinear\), 1 \(Conv1d\), 2 \(LazyLinear\)"):
        rgkernels.sparsify(holder)
    assert type(holder[0]) is MyLinear
    assert [n for n, _ in rgkernels.masked_layers(holder)] == ["3"]
    holder[2](torch.randn(1, 5))  # a lazy layer becomes an nn.Linear at its first forward
    with warnings.catch_warnings():
        warnings.simplefilter("error", rgkernels.RGKernelsWarning)
        rgkernels.sparsify(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))  # nothing left alone: no warning
    with pytest.warns(rgkernels.RGKernelsWarning, match="left 2 layer"):
        rgkernels.sparsify(holder)
    assert isinstance(holder[2], rgkernels.MaskedLinear)


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("form", ["parametrization", "hook"])
def test_weight_norm_is_refused_clearly(order, form):
    """Weight norm stores a direction and a per-channel magnitude, not a weight-shaped tensor whose
    pruned entries could be frozen: sparsify refuses it before converting anything, and a masked layer
    put under it afterwards refuses its first sparse forward."""
    wn = parametrizations.weight_norm if form == "parametrization" else nn.utils.weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook form is deprecated
        if order == "before":
            model = nn.Sequential(nn.Linear(3, 3), wn(nn.Conv2d(3, 4, 3)))
            with pytest.raises(NotImplementedError, match="layer 1 .*weight.norm"):
                rgkernels.sparsify(model)
            assert rgkernels.masked_layers(model) == []  # not half converted
        else:
            layer = wn(rgkernels.sparsify(nn.Conv2d(3, 4, 3)))
            with pytest.raises(NotImplementedError, match="weight.norm"):
                layer(torch.randn(1, 3, 5, 5))
            rgkernels.set_sparse(layer, False)
            layer(torch.randn(1, 3, 5, 5))  # dense mode is the nn layer: fine


@pytest.mark.parametrize("gemm", cpu_gemms())
def test_sparse_mode_at_zero_threshold_matches_dense(gemm):
    m = rgkernels.sparsify(_model())
    x = torch.randn(2, 3, 4, 4)
    with cpu_gemm(gemm):
        y_sparse = m(x)
    rgkernels.set_sparse(m, False)
    assert all(not l.sparse for _, l in rgkernels.masked_layers(m))
    if gemm == "aten":  # t = 0 keeps every nonzero weight, and the GEMMs are the nn layers' own
        assert torch.equal(y_sparse, m(x))
    else:  # the CPU masked linear's micro-kernel GEMM: the same product up to float32 rounding
        torch.testing.assert_close(y_sparse, m(x), rtol=1e-6, atol=1e-6)
    rgkernels.set_sparse(m, True)
    assert all(l.sparse for _, l in rgkernels.masked_layers(m))


# ---- spectral norm ---------------------------------------------------------------------------------

def _hook_sn(layer):
    return nn.utils.spectral_norm(layer)


def _param_sn(layer):
    return parametrizations.spectral_norm(layer)


def _stored(layer):
    if "weight_orig" in layer._parameters:
        return layer.weight_orig
    return layer.parametrizations.weight.original


def _effective_weight(layer):
    """The weight the last training forward used (eval: no further power iteration)."""
    layer.eval()
    with torch.no_grad():
        w = layer.weight.detach().clone()  # hook form: the attribute set by the last forward
    layer.train()
    return w


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_transpose"])
@pytest.mark.parametrize("sn", [_hook_sn, _param_sn], ids=["hook", "parametrization"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_spectral_norm_mask_on_effective_weight(kind, sn, order):
    make = {"linear": lambda: nn.Linear(6, 5),
            "conv": lambda: nn.Conv2d(3, 5, 3, padding=1),
            "conv_transpose": lambda: nn.ConvTranspose2d(3, 5, 3, stride=2, groups=1)}[kind]
    layer = make()
    with torch.no_grad():
        layer.weight.mul_(8.0)  # sigma >> 1: |W_orig| and |W_eff| = |W_orig| / sigma are far apart
    if order == "before":
        layer = rgkernels.sparsify(sn(layer))
    else:
        layer = sn(rgkernels.sparsify(layer))
    assert isinstance(layer, rgkernels.MaskedLayer)
    x = torch.randn(2, 6) if kind == "linear" else torch.randn(2, 3, 5, 5)
    layer(x)  # first forward: power iteration settles u, v
    w_orig = _stored(layer).detach()
    w_eff = _effective_weight(layer)
    rows = layer._to_rows(w_eff).reshape(layer.mask_rows, -1)
    t = rows.abs().median(dim=1).values  # about half of each row pruned on the effective weight
    with torch.no_grad():
        layer.threshold.copy_(t)
    layer.zero_grad()
    y = layer(x)
    w_eff = _effective_weight(layer)
    expected = layer._from_rows(((layer._to_rows(w_eff).abs() - t.view(-1, *[1] * (w_eff.dim() - 1))) > 0))
    mask = layer.mask()
    assert torch.equal(mask, expected)
    assert 0.3 < mask.float().mean() < 0.7
    on_stored = layer._from_rows((layer._to_rows(w_orig).abs() - t.view(-1, *[1] * (w_eff.dim() - 1))) > 0)
    assert on_stored.float().mean() > 0.8  # the mask would be very different on the stored weight
    # output = the functional on W_eff * M
    if kind == "linear":
        y_ref = F.linear(x, w_eff * mask, layer.bias)
    elif kind == "conv":
        y_ref = F.conv2d(x, w_eff * mask, layer.bias, padding=1)
    else:
        y_ref = F.conv_transpose2d(x, w_eff * mask, layer.bias, stride=2)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    g = _stored(layer).grad
    assert torch.equal(g[~mask], torch.zeros_like(g[~mask]))  # exactly zero where M == 0
    assert (g[mask] != 0).float().mean() > 0.9
    assert layer.threshold.grad.abs().sum() > 0


def _sn_state(layer):
    """(stored weight, u, v, dim) of either spectral-norm form."""
    if "weight_orig" in layer._parameters:
        hook = next(h for h in layer._forward_pre_hooks.values() if type(h).__name__ == "SpectralNorm")
        return layer.weight_orig, layer.weight_u, layer.weight_v, hook.dim
    sn = layer.parametrizations.weight[0]
    return layer.parametrizations.weight.original, sn._u, sn._v, sn.dim


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_transpose"])
@pytest.mark.parametrize("sn", [_hook_sn, _param_sn], ids=["hook", "parametrization"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_spectral_norm_gradients_match_float64_autograd(kind, sn, order):
    """Values, not only zeros: with u, v fixed (eval), y and the gradients of the stored weight, the
    threshold and the bias equal float64 autograd through W_eff = W / (u . W v), W_hat = W_eff * S(|W_eff| - t)
    with H' for S', the gradient at W_eff multiplied by M ("dst") and the stored weight's gradient by M."""
    torch.manual_seed(3)
    layer = {"linear": lambda: nn.Linear(6, 5), "conv": lambda: nn.Conv2d(3, 5, 3, padding=1),
             "conv_transpose": lambda: nn.ConvTranspose2d(3, 5, 3, stride=2)}[kind]()
    with torch.no_grad():
        layer.weight.mul_(8.0)
    layer = rgkernels.sparsify(sn(layer)) if order == "before" else sn(rgkernels.sparsify(layer))
    x = torch.randn(2, 6) if kind == "linear" else torch.randn(2, 3, 5, 5)
    layer(x)  # the power iteration settles u, v
    layer.eval()
    stored, u, v, dim = _sn_state(layer)
    w64 = stored.detach().double().clone().requires_grad_()
    mat = w64.movedim(dim, 0).reshape(w64.shape[dim], -1)
    w_eff = w64 / torch.dot(u.double(), mat @ v.double())
    rows = w_eff.detach().movedim(1 if kind == "conv_transpose" else 0, 0).reshape(5, -1).abs().sort(dim=1).values
    k = rows.shape[1] // 2
    t = ((rows[:, k - 1] + rows[:, k]) / 2).float()  # between two entries: no ties in float32 or float64
    with torch.no_grad():
        layer.threshold.copy_(t)
    shape = (1, -1, 1, 1) if kind == "conv_transpose" else (-1,) + (1,) * (w64.dim() - 1)
    t64 = t.double().clone().requires_grad_()
    xm = w_eff.abs() - t64.view(shape)
    m = (xm > 0).double().detach()
    w_eff.register_hook(lambda g: g * m)  # mode "dst": the weight gradient times M
    w_hat = w_eff * Step.apply(xm)
    b64 = layer.bias.detach().double().clone().requires_grad_()
    fn = {"linear": lambda a: F.linear(a, w_hat, b64), "conv": lambda a: F.conv2d(a, w_hat, b64, padding=1),
          "conv_transpose": lambda a: F.conv_transpose2d(a, w_hat, b64, stride=2)}[kind]
    y64 = fn(x.double())
    y64.square().sum().backward()

    layer.zero_grad()
    y = layer(x)
    y.square().sum().backward()
    assert torch.equal(layer.mask(), m.bool())
    assert 0.3 < m.mean() < 0.7
    for what, a, b in (("y", y, y64), ("stored weight", stored.grad, w64.grad * m),
                       ("threshold", layer.threshold.grad, t64.grad), ("bias", layer.bias.grad, b64.grad)):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err <= 1e-5, f"{what}: rel err {err:.3g}"
    assert bool((t64.grad != 0).all())


def test_spectral_norm_stored_gradient_not_masked_in_dense_mode():
    layer = rgkernels.sparsify(parametrizations.spectral_norm(nn.Linear(6, 5)))
    with torch.no_grad():
        layer.threshold.fill_(0.2)
    x = torch.randn(3, 6)
    layer(x)
    layer.sparse = False
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert (layer.parametrizations.weight.original.grad != 0).all()
    assert layer.threshold.grad is None


def test_spectral_norm_deepcopy_masks_its_own_gradient():
    layer = rgkernels.sparsify(parametrizations.spectral_norm(nn.Linear(6, 5)))
    x = torch.randn(3, 6)
    layer(x)
    twin = copy.deepcopy(layer)
    layer.guard_ratio = None  # so that everything can be pruned
    with torch.no_grad():
        layer.threshold.fill_(10.0)  # original: everything pruned
        twin.threshold.fill_(0.0)  # copy: nothing pruned
    layer(x).sum().backward()
    twin(x).square().sum().backward()
    assert not layer.parametrizations.weight.original.grad.any()
    assert (twin.parametrizations.weight.original.grad != 0).all()


# ---- statistics ------------------------------------------------------------------------------------

def _linear_with_known_weights():
    lin = rgkernels.MaskedLinear(10, 4, bias=False)
    lin.guard_ratio = None
    with torch.no_grad():  # row i holds 0.05, 0.15, ..., 0.95 (signs alternate)
        base = (torch.arange(10) + 0.5) / 10 * torch.tensor([1.0, -1.0]).repeat(5)
        lin.weight.copy_(base.repeat(4, 1))
    return lin


def test_keep_ratio_known_by_construction():
    model = nn.Sequential(_linear_with_known_weights(), nn.ReLU(), rgkernels.MaskedLinear(4, 2))
    assert rgkernels.keep_ratio(model) == 1.0  # no forward yet: M = 1
    with torch.no_grad():
        model[0].threshold.copy_(torch.tensor([0.3, 0.5, 0.7, 1.0]))  # keeps 7, 5, 3, 0 of 10
    model(torch.randn(2, 10))
    assert rgkernels.keep_ratio(model) == (7 + 5 + 3 + 0 + 8) / 48
    stats = rgkernels.layer_stats(model)
    assert stats["0"] == {"keep_ratio": 15 / 40, "rows_pruned": 1, "regenerations": 0}
    assert stats["2"] == {"keep_ratio": 1.0, "rows_pruned": 0, "regenerations": 0}
    rgkernels.set_sparse(model, False)
    assert rgkernels.keep_ratio(model) == 1.0


def test_layer_stats_counts_regenerations():
    lin = _linear_with_known_weights()
    x = torch.randn(2, 10)
    with torch.no_grad():
        lin.threshold.fill_(0.6)  # keeps 0.65 .. 0.95: 4 per row
    lin(x)
    assert rgkernels.layer_stats(lin)[""] == {"keep_ratio": 0.4, "rows_pruned": 0, "regenerations": 0}
    with torch.no_grad():
        lin.threshold.copy_(torch.tensor([0.2, 0.6, 0.9, 0.4]))  # 8, 4, 1, 6 kept
    lin(x)
    s = rgkernels.layer_stats(lin)[""]
    assert s == {"keep_ratio": 19 / 40, "rows_pruned": 0, "regenerations": 4 + 0 + 0 + 2}
    lin(x)  # no change since the last call
    assert rgkernels.layer_stats(lin)[""]["regenerations"] == 0
    lin.sparse = False  # dense mode: every pruned weight comes back
    assert rgkernels.layer_stats(lin)[""]["regenerations"] == 40 - 19


STATS_LAYERS = {  # the ways a layer's mask reaches the statistics
    "conv": (lambda: rgkernels.MaskedConv2d(3, 4, 3, padding=1), (2, 3, 5, 5)),  # from W_hat
    "conv_one_position": (lambda: rgkernels.MaskedConv2d(3, 4, 3), (2, 3, 3, 3)),  # the linear node's bits
    "conv_transpose_grouped": (lambda: rgkernels.MaskedConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 3, 3)),
    "conv_transpose_1x1_map": (lambda: rgkernels.MaskedConvTranspose2d(4, 6, 4), (2, 4, 1, 1)),  # bits, regrouped
}


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("kind", list(STATS_LAYERS))
def test_layer_stats_by_construction_every_layer_kind(kind, backend):
    """Known keep counts per output channel (|w| = 1..K / K in every mask row, thresholds between
    them): keep ratio, entirely pruned rows, regenerations and the mask itself, on every layer kind."""
    make, shape = STATS_LAYERS[kind]
    layer = make()
    rows, k = layer.mask_rows, known_rows(layer, signed=True)
    x = torch.randn(shape)

    def run(keep):
        with torch.no_grad():
            layer.threshold.copy_(keep_thresholds(k, keep))
        with rgkernels.use_backend(backend):
            layer(x)
        want = layer._to_rows(layer.weight.detach()).flatten(1).abs() > layer.threshold.detach()[:, None]
        assert torch.equal(layer._to_rows(layer.mask()).flatten(1), want)
        assert want.sum(1).tolist() == keep
        return rgkernels.layer_stats(layer)[""]

    first = [[k, k // 2, 0, 1][i % 4] for i in range(rows)]
    second = [[k // 2, k, 1, 0][i % 4] for i in range(rows)]
    assert run(first) == {"keep_ratio": sum(first) / (rows * k), "rows_pruned": first.count(0), "regenerations": 0}
    regrown = sum(max(0, b - a) for a, b in zip(first, second))  # the largest |w| are kept: n -> m regrows m - n
    assert run(second) == {"keep_ratio": sum(second) / (rows * k), "rows_pruned": second.count(0),
                           "regenerations": regrown}


def test_layer_stats_state_carries_regenerations_across_a_copy():
    """stats_state / load_stats_state: a resumed run counts regenerations as the original would."""
    lin = _linear_with_known_weights()
    x = torch.randn(2, 10)
    with torch.no_grad():
        lin.threshold.fill_(0.6)
    lin(x)
    rgkernels.layer_stats(lin)
    saved = {k: v.clone() for k, v in rgkernels.stats_state(lin).items()}
    resumed = copy.deepcopy(lin)
    rgkernels.load_stats_state(resumed, saved)
    for m in (lin, resumed):
        with torch.no_grad():
            m.threshold.copy_(torch.tensor([0.2, 0.6, 0.9, 0.4]))
        m(x)
    assert rgkernels.layer_stats(resumed)[""]["regenerations"] == 6
    assert rgkernels.layer_stats(lin)[""]["regenerations"] == 6
    fresh = copy.deepcopy(resumed)
    rgkernels.load_stats_state(fresh, {})  # nothing saved: starts afresh
    assert rgkernels.layer_stats(fresh)[""]["regenerations"] == 0


def test_stats_sync_host_once(monkeypatch):
    """One device-to-host copy per call, not one per layer: every way a tensor reaches the host is
    watched (on a GPU each is a sync)."""
    model = rgkernels.sparsify(_model())
    x = torch.randn(1, 3, 4, 4)
    model(x)
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or real(self))
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, **k: pytest.fail(f"host sync: {_n}"))
    rgkernels.layer_stats(model)
    rgkernels.keep_ratio(model)
    assert len(calls) == 2
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or real(self))
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, **k: pytest.fail(f"host sync: {_n}"))
    rgkernels.count_flops(model, x)  # its own forward's counts, gathered once as well
    assert len(calls) <= 1


# ---- regulariser -----------------------------------------------------------------------------------

def test_threshold_regularizer_value_and_gradient():
    model = rgkernels.sparsify(_model())
    lam = 0.5
    ts = [l.threshold for _, l in rgkernels.masked_layers(model)]
    with torch.no_grad():
        for t in ts:
            t.uniform_(-0.5, 0.5)
    reg = rgkernels.threshold_regularizer(model, lam)
    expected = lam * sum(torch.exp(-t.detach().double()).sum() for t in ts)
    torch.testing.assert_close(reg.double(), expected)
    reg.backward()
    for t in ts:
        torch.testing.assert_close(t.grad, -lam * torch.exp(-t.detach()))
    # only sparse layers count; dense mode gives 0
    model[0].sparse = False
    part = rgkernels.threshold_regularizer(model, lam)
    torch.testing.assert_close(part.double(), expected - lam * torch.exp(-ts[0].detach().double()).sum())
    rgkernels.set_sparse(model, False)
    zero = rgkernels.threshold_regularizer(model, lam)
    assert zero.item() == 0.0 and not zero.requires_grad


# ---- bad input: clear errors that name the problem --------------------------------------------

@pytest.mark.parametrize("fn", [rgkernels.sparsify, rgkernels.keep_ratio, rgkernels.layer_stats,
                                rgkernels.stats_state, lambda m: rgkernels.set_sparse(m, True),
                                lambda m: rgkernels.load_stats_state(m, {}),
                                lambda m: rgkernels.threshold_regularizer(m, 1.0),
                                lambda m: rgkernels.count_flops(m, torch.randn(2, 3))])
@pytest.mark.parametrize("bad", ["model.pt", None])
def test_module_functions_reject_non_modules(fn, bad):
    with pytest.raises(TypeError, match="nn.Module"):
        fn(bad)


def test_count_flops_without_inputs_says_so():
    with pytest.raises(TypeError, match="example_inputs"):
        rgkernels.count_flops(rgkernels.sparsify(nn.Linear(3, 2)))


@pytest.mark.parametrize("flag", ["False", None, 0, 1.0])
def test_mode_flag_must_be_a_bool(flag):
    """bool("False") is True: a string or None from a config must not switch the mode silently."""
    m = rgkernels.sparsify(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(TypeError, match="sparse must be True"):
        rgkernels.set_sparse(m, flag)
    with pytest.raises(TypeError, match="sparse must be True"):
        m[0].sparse = flag
    assert m[0].sparse is True  # unchanged
    import numpy as np

    rgkernels.set_sparse(m, np.bool_(False))
    assert m[0].sparse is False


@pytest.mark.parametrize("ratio", [1, 1.5, -0.01, float("nan")])
def test_guard_ratio_out_of_range_is_an_error(ratio):
    """guard_ratio=1 (meant as 1%) would reset every threshold in every call: never silently."""
    w, t = torch.randn(4, 3), torch.full((4,), 0.5)
    with pytest.raises(ValueError, match="guard_ratio"):
        rgkernels.masked_weight(w, t, guard_ratio=ratio)
    with pytest.raises(ValueError, match="guard_ratio"):
        rgkernels.masked_weight_grouped([w], [t], guard_ratio=ratio)
    lin = rgkernels.sparsify(nn.Linear(3, 4))
    lin.guard_ratio = ratio
    with pytest.raises(ValueError, match="guard_ratio"):
        lin(torch.randn(2, 3))
    assert torch.equal(t, torch.full((4,), 0.5))  # nothing reset


def test_load_stats_state_rejects_a_mask_of_another_shape():
    lin = rgkernels.sparsify(nn.Linear(6, 4))
    lin(torch.randn(2, 6))
    rgkernels.layer_stats(lin)
    with pytest.raises(ValueError, match="shape"):
        rgkernels.load_stats_state(lin, {"": torch.ones(4, 1, dtype=torch.bool)})  # would broadcast


def test_fused_inside_grouped_masks_warns(monkeypatch):
    from rgkernels import _backend

    monkeypatch.setattr(_backend, "_warned", set())  # once per process: another test may have had it
    lin = rgkernels.sparsify(nn.Sequential(nn.Linear(3, 4)))
    lin[0].execution = "fused"
    with pytest.warns(rgkernels.RGKernelsWarning, match="grouped_masks"):
        with rgkernels.grouped_masks(lin):
            lin(torch.randn(2, 3))


def test_dense_checkpoint_loads_into_a_sparsified_model():
    """The nn layers' state (no thresholds) loads strictly: weights taken, thresholds back to 0 as after
    sparsify; a checkpoint that lacks a weight is still refused, and a sparsified one keeps its thresholds."""
    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), parametrizations.spectral_norm(nn.Linear(4, 2)),
                             nn.utils.spectral_norm(nn.ConvTranspose2d(2, 2, 1)))

    dense = make()
    model = rgkernels.sparsify(make())
    for _, layer in rgkernels.masked_layers(model):
        with torch.no_grad():
            layer.threshold.fill_(0.3)
    model.load_state_dict(dense.state_dict())
    assert all(not layer.threshold.any() for _, layer in rgkernels.masked_layers(model))
    for k, v in dense.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"0.weight"'):
        model.load_state_dict({k: v for k, v in dense.state_dict().items() if k != "0.weight"})
    other = rgkernels.sparsify(make())
    with torch.no_grad():
        other[0].threshold.fill_(0.2)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model[0].threshold.detach(), torch.full((4,), 0.2))
