"""Convolutions on the CPU that skip their entirely pruned output channels (rgkernels/ops/cpu_compact_conv.py),
against the float64 reference composition (reference masked weight, then the plain F.conv2d /
F.conv_transpose2d over every channel): output, input / weight / threshold / bias gradients, double
backward, executed FLOPs, output layout, and when the path is taken. For every fast CPU path of the masked
layers (this one and the linear node of cpu_masked_linear.py): a parametrised bias and forward-mode AD."""
import copy
import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rgkernels
from rgkernels import sparse_exec as SE
from rgkernels.ops import cpu_compact_conv as CC

from test_masked_weight import rel_err
from test_sparse_exec import _check_against_ref64, _prune, _ref64


@pytest.fixture
def always(monkeypatch):
    """Compaction from one dead row on, whatever the size (the tests' shapes are far below the gate)."""
    monkeypatch.setattr(CC, "_FORCED", True)


CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
    dict(kernel_size=2, padding="valid"),
    dict(kernel_size=(3, 5), padding="same", dilation=(1, 2)),
]
TRANSPOSED = [
    dict(kernel_size=4, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, output_padding=1, bias=False),
    dict(kernel_size=(3, 2), stride=(1, 2), dilation=(2, 1)),
]


def _layer(cls, kw, cin=5, cout=7, dead=(1, 4, 5), dtype=torch.float32):
    layer = cls(cin, cout, **kw)
    # live rows keep ~70% of their weights; the dead rows' thresholds lie inside H''s support, so that
    # their threshold gradient is not 0
    _prune(layer, dead, hi=0.3 * layer.weight.detach().abs().max().item())
    return layer.to(dtype)


def _input(shape, layout, dtype):
    if layout == "channels_last":
        return torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        n, c, h, w = shape
        return torch.randn(n, c, h, 2 * w, dtype=dtype)[..., ::2]
    return torch.randn(shape, dtype=dtype)


def _run(layer, x):
    x = x.detach().requires_grad_()
    y = layer(x)
    g = torch.randn(y.shape, dtype=y.dtype)
    y.backward(g)
    return x, y, g


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("cls,kw", [(rgkernels.MaskedConv2d, kw) for kw in CONVS]
                         + [(rgkernels.MaskedConvTranspose2d, kw) for kw in TRANSPOSED])
def test_matches_reference(always, cls, kw, layout):
    layer = _layer(cls, kw)
    r64 = _ref64(layer)
    x, y, g = _run(layer, _input((3, 5, 9, 8), layout, torch.float32))
    rec = layer._exec_record
    assert rec is not None and int(rec["nlive"][0]) == 4, "the compacted path did not run"
    dx64 = _check_against_ref64(r64, layer, x, g, y)
    assert rel_err(x.grad, dx64) <= 1e-5
    assert bool((layer.threshold.grad[[1, 4, 5]] != 0).all())  # the weight gradient covered the dead rows
    if "bias" not in kw:  # a dead channel's output is its bias
        torch.testing.assert_close(y[:, 4], layer.bias[4].detach().expand_as(y[:, 4]), rtol=0, atol=0)


def test_transposed_with_output_size(always):
    """ConvTranspose2d's output_size picks the output padding per call; the compacted path follows it."""
    layer = _layer(rgkernels.MaskedConvTranspose2d, dict(kernel_size=3, stride=2, padding=1))
    r64 = _ref64(layer)
    x = torch.randn(2, 5, 4, 5, requires_grad=True)
    y = layer(x, output_size=[8, 10])  # output padding (1, 1)
    assert y.shape == (2, 7, 8, 10) and layer._exec_record is not None
    g = torch.randn_like(y)
    y.backward(g)
    dx64 = _check_against_ref64(r64, layer, x, g, y, output_size=[8, 10])
    assert rel_err(x.grad, dx64) <= 1e-5


class _Scaled(nn.Module):
    """A bias parametrisation (equalised learning rate style): the layer's bias is 2 * the stored one."""

    def forward(self, b):
        return 2.0 * b


# every CPU path of the masked layers: the compacted conv (forced), and the linear node (a linear layer, a
# conv with one output position) and the GEMM of a transposed conv of a 1x1 map
CPU_PATHS = [
    pytest.param(lambda: rgkernels.MaskedConv2d(5, 7, 3, padding=1), (2, 5, 6, 5), id="conv-compact"),
    pytest.param(lambda: rgkernels.MaskedConvTranspose2d(5, 7, 3, stride=2), (2, 5, 3, 4), id="transposed-compact"),
    pytest.param(lambda: rgkernels.MaskedLinear(5, 7), (3, 5), id="linear-node"),
    pytest.param(lambda: rgkernels.MaskedConv2d(5, 7, 3), (2, 5, 3, 3), id="conv-one-position-node"),
    pytest.param(lambda: rgkernels.MaskedConvTranspose2d(5, 7, 3), (2, 5, 1, 1), id="transposed-1x1-gemm"),
]


def _pruned(make):
    layer = make()
    _prune(layer, (1, 4, 5), hi=0.3 * layer.weight.detach().abs().max().item())
    return layer


@pytest.mark.parametrize("make,shape", CPU_PATHS)
def test_parametrised_bias(always, make, shape):
    """A reparametrised bias (not in _parameters) is the one the fast CPU paths add, and its stored
    parameter gets its gradient."""
    layer = _pruned(make)
    torch.nn.utils.parametrize.register_parametrization(layer, "bias", _Scaled())
    r64 = _ref64(layer)
    x, y, g = _run(layer, torch.randn(shape))
    dx64 = _check_against_ref64(r64, layer, x, g, y)
    assert rel_err(x.grad, dx64) <= 1e-5
    assert layer.parametrizations.bias.original.grad is not None


@pytest.mark.parametrize("make,shape", CPU_PATHS)
def test_forward_mode_ad(always, make, shape):
    """A JVP with respect to the input (dual tensors) runs where the plain composition does, with its
    tangent."""
    import torch.autograd.forward_ad as fwAD

    layer = _pruned(make)
    x, v = torch.randn(shape), torch.randn(shape)
    tangents = []
    for backend in (None, "reference"):
        with rgkernels.use_backend(backend), fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(layer(fwAD.make_dual(x, v))).tangent)
    assert tangents[0] is not None
    torch.testing.assert_close(tangents[0], tangents[1])


@pytest.mark.parametrize("cls", [rgkernels.MaskedConv2d, rgkernels.MaskedConvTranspose2d])
def test_output_layout_follows_the_input(always, cls):
    """channels_last in, channels_last out, as the plain convolution does, also with a single live channel
    (whose output alone is contiguous in both layouts)."""
    layer = _layer(cls, dict(kernel_size=3, padding=1), dead=[i for i in range(7) if i != 2])
    layer.guard_ratio = None  # 1 of 7 rows live may be under the collapse guard's keep ratio
    x = torch.randn(2, 5, 6, 6).contiguous(memory_format=torch.channels_last)
    y = layer(x)
    assert int(layer._exec_record["nlive"][0]) == 1
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("cls,kw", [(rgkernels.MaskedConv2d, CONVS[0]), (rgkernels.MaskedConvTranspose2d, TRANSPOSED[0])])
def test_other_dtypes(always, cls, kw, dtype, tol):
    layer = _layer(cls, kw, dtype=dtype)
    r64 = _ref64(layer)
    x, y, g = _run(layer, torch.randn(2, 5, 6, 7, dtype=dtype))
    assert layer._exec_record is not None
    dx64 = _check_against_ref64(r64, layer, x, g, y, tol=tol)
    assert rel_err(x.grad, dx64) <= tol


@pytest.mark.parametrize("cls,kw", [(rgkernels.MaskedConv2d, CONVS[2]), (rgkernels.MaskedConvTranspose2d, TRANSPOSED[0])])
def test_double_backward(always, cls, kw):
    """create_graph through the compacted node (R1-style penalty: |dD/dx|^2 differentiated again). With a
    bias, a dead channel's output and so its dy are not 0: the penalty's gradient then reaches the dead
    rows through dx, which the input gradient over live rows alone would miss."""
    layer = _layer(cls, kw, dtype=torch.float64)
    ref = copy.deepcopy(layer)
    x0 = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    results = []
    for model, backend in ((layer, None), (ref, "reference")):
        x = x0.clone().requires_grad_()
        with rgkernels.use_backend(backend):
            y = model(x)
            (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            dx.square().sum().backward()
        results.append([dx] + [p.grad for p in (model.weight, model.threshold, model.bias) if p is not None])
    assert layer._exec_record is not None
    for got, want in zip(*results):
        assert rel_err(got, want) <= 1e-12
    assert bool((layer.threshold.grad[[1, 4, 5]] != 0).all())


def test_spectral_norm_and_grouped_masks(always):
    """The effective weight of spectral norm is masked, its stored weight's gradient masked (§2), also when
    the masked weights come from the trainer's grouped launch."""
    torch.manual_seed(3)
    model = rgkernels.sparsify(nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 6, 3, padding=1)),
                                             nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1)))
    for (_, m), dead in zip(rgkernels.masked_layers(model), ((0, 2, 3), (1, 4))):
        _prune(m, dead)
    r64 = _ref64(model)
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    with rgkernels.grouped_masks(model):
        y = model(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert all(m._exec_record is not None for _, m in rgkernels.masked_layers(model))
    _check_against_ref64(r64, model, x, g, y)
    stored = model[0].parametrizations.weight.original
    assert bool((stored.grad[[0, 2, 3]] == 0).all())


@pytest.mark.parametrize("cls,kw,uses", [
    (rgkernels.MaskedConv2d, dict(kernel_size=3, stride=2, padding=1), 2 * 5 * 4),  # batch x output positions
    (rgkernels.MaskedConvTranspose2d, dict(kernel_size=3, stride=2, padding=1), 2 * 9 * 8),  # x input positions
])
def test_executed_flops(always, cls, kw, uses):
    """count_flops reports what ran: forward and input gradient over the live output channels only, the
    weight gradient over all of them (analytic counts)."""
    layer = _layer(cls, kw, dead=(0, 3, 6))
    x = torch.randn(2, 5, 9, 8)
    rep = rgkernels.count_flops(layer, x)
    assert int(layer._exec_record["nlive"][0]) == 4
    live, k = 4, 5 * 9
    assert rep.forward.executed == 2 * uses * live * k
    assert rep.step.executed == 2 * uses * live * k * 2 + 2 * uses * 7 * k
    assert rep.forward.dense == 2 * uses * 7 * k


class OpLog(TorchDispatchMode):
    """The ATen (and custom) ops dispatched inside the block, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def test_a_backward_into_the_input_alone_runs_no_weight_gradient(always):
    """RG-GAN's G step differentiates into G's parameters only (backward(inputs=...)): D's compacted convs
    must not run their weight-gradient convolution there, as the plain convolution does not."""
    layer = _layer(rgkernels.MaskedConv2d, CONVS[0])
    x = torch.randn(2, 5, 6, 6, requires_grad=True)
    y = layer(x)
    assert layer._exec_record is not None
    g = torch.randn_like(y)
    with OpLog() as log:
        (dx,) = torch.autograd.grad(y, [x], g, retain_graph=True)
    masks = [args[-1] for func, args in log.calls if func is torch.ops.aten.convolution_backward.default]
    assert masks and all(list(m) == [True, False, False] for m in masks), masks
    y.backward(g)  # the full backward: the same input gradient, and the weight's
    torch.testing.assert_close(dx, x.grad, rtol=0, atol=0)
    assert layer.weight.grad is not None and layer.threshold.grad is not None


def test_when_it_runs(always, monkeypatch, fresh_decisions):
    x = torch.randn(2, 5, 6, 6)
    layer = _layer(rgkernels.MaskedConv2d, CONVS[0], dead=())
    layer(x)
    assert layer._exec_record is None  # nothing dead: the plain convolution
    _prune(layer, dead=range(7))
    layer.guard_ratio = None
    y = layer(x)
    assert layer._exec_record is None  # everything dead: nothing to convolve, the plain path
    torch.testing.assert_close(y, layer.bias.detach().view(1, -1, 1, 1).expand_as(y), rtol=0, atol=0)
    _prune(layer, dead=(2,), hi=0.3 * layer.weight.detach().abs().max().item())
    layer(x)
    assert int(layer._exec_record["nlive"][0]) == 6  # one row dead exactly
    with rgkernels.use_backend("reference"):
        layer(x)
    assert layer._exec_record is None  # the forced reference backend is the plain composition
    assert layer(x[:0]).shape == (0, 7, 6, 6) and layer._exec_record is None  # empty batch: the plain path
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the plain path, whose casts autograd sees
        y = layer(x.requires_grad_())
    assert layer._exec_record is None and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    grouped = rgkernels.MaskedConv2d(4, 6, 3, groups=2)
    _prune(grouped, dead=(1,))
    grouped(torch.randn(1, 4, 5, 5))
    assert grouped._exec_record is None  # groups: not taken
    uneven = _layer(rgkernels.MaskedConv2d, dict(kernel_size=2, padding="same"), dead=(1,))
    uneven(torch.randn(1, 5, 5, 5))
    assert uneven._exec_record is None  # asymmetric "same" padding: not taken
    # Not forced: measured from TRY_FROM on (here the measurement always finds compaction faster)
    monkeypatch.setattr(CC, "_FORCED", None)
    monkeypatch.setattr(SE, "_cpu_times", lambda cands: {name: 1.0 if name == "compact" else 2.0 for name in cands})
    monkeypatch.setattr(CC, "TRY_FROM", (0.1, 0.0))
    layer(x)
    assert layer._exec_record is not None  # 1 of 7 dead: above a share of 0.1
    monkeypatch.setattr(CC, "TRY_FROM", (0.2, 0.0))
    layer(x)
    assert layer._exec_record is None  # below a share of 0.2
    monkeypatch.setattr(CC, "TRY_FROM", (0.1, 3e7))
    layer(x)
    assert layer._exec_record is None  # tiny: below the work gate


@pytest.fixture
def fresh_decisions():
    """No decision of another test, and none of this one's (fake timings) left for the next."""
    SE.clear_decisions()
    yield
    SE.set_decision_cache(None)
    SE.clear_decisions()


def _fake_times(winner):
    def times(cands):
        assert set(cands) == {"compact", "plain"}
        return {name: 1.0 if name == winner else 2.0 for name in cands}
    return times


def _never(cands):
    pytest.fail("measured again")


def test_measured_choice_is_kept_per_signature_and_share(monkeypatch, tmp_path, fresh_decisions):
    monkeypatch.setattr(CC, "TRY_FROM", (0.1, 0.0))  # the tiny test layer is worth trying
    SE.set_decision_cache(str(tmp_path / "decisions.json"))
    x = torch.randn(2, 5, 6, 6)
    layer = _layer(rgkernels.MaskedConv2d, CONVS[0], dead=(1, 4, 5))
    monkeypatch.setattr(SE, "_cpu_times", _fake_times("plain"))
    layer(x).sum().backward()
    assert layer._exec_record is None  # measured slower: the plain convolution
    [(key, choice)] = [(k, v) for k, v in SE.decisions().items() if k.startswith("cpu_compact_conv|")]
    assert choice == "plain" and "|dead3/8|" in key and "|grad011|" in key and "|w(7, 5, 3, 3)|" in key
    assert key.endswith("|contiguous|rule_plain")
    monkeypatch.setattr(SE, "_cpu_times", _never)
    layer(x).sum().backward()  # the same signature: the kept decision
    assert layer._exec_record is None
    with torch.no_grad():  # no backward follows: another signature, measured on its own
        monkeypatch.setattr(SE, "_cpu_times", _fake_times("compact"))
        layer(x)
        assert int(layer._exec_record["nlive"][0]) == 4
    _prune(layer, dead=(0, 1, 2, 3, 4), hi=0.3 * layer.weight.detach().abs().max().item())  # 5 of 7: 6/8
    layer(x).sum().backward()
    assert int(layer._exec_record["nlive"][0]) == 2
    # kept on disk (with a training run: its kernel-decision file), read back after the memory is cleared
    SE.clear_decisions()
    monkeypatch.setattr(SE, "_cpu_times", _never)
    layer(x).sum().backward()
    assert int(layer._exec_record["nlive"][0]) == 2
    assert sorted(v for k, v in SE.decisions().items() if k.startswith("cpu_compact_conv|")) == \
        ["compact", "compact", "plain"]


def test_a_decision_is_not_reused_across_the_rules_threshold(monkeypatch, fresh_decisions):
    """Dead shares in one bucket of eighths on both sides of the rule's share: measured apart, each against
    its own default (equal timings keep it)."""
    monkeypatch.setattr(CC, "TRY_FROM", (0.1, 0.0))
    monkeypatch.setattr(CC, "COMPACT_FROM", ((0.5, 0.0),))
    monkeypatch.setattr(SE, "_cpu_times", lambda cands: {name: 1.0 for name in cands})
    layer = _layer(rgkernels.MaskedConv2d, CONVS[0], cout=16, dead=range(7))
    hi = 0.3 * layer.weight.detach().abs().max().item()
    x = torch.randn(2, 5, 6, 6)
    layer(x)
    assert layer._exec_record is None  # 7 of 16 (bucket 4): under the rule's half, the plain way
    _prune(layer, dead=range(8), hi=hi)
    layer(x)
    assert int(layer._exec_record["nlive"][0]) == 8  # 8 of 16 (bucket 4 too): the rule's compaction


def test_the_disk_cache_keeps_only_values_a_key_can_take(tmp_path, fresh_decisions):
    path = tmp_path / "decisions.json"
    path.write_text(json.dumps({"version": 1, "decisions": {
        "cpu_gemm|a": "compact", "cpu_compact_conv|b": "fused", "conv|c": "plain",
        "cpu_compact_conv|d": "plain", "cpu_gemm|e": "aten", "conv|f": "fused"}}))
    SE.set_decision_cache(str(path))
    assert SE.decisions() == {"cpu_compact_conv|d": "plain", "cpu_gemm|e": "aten", "conv|f": "fused"}


def test_measurement_runs_on_copies(monkeypatch, fresh_decisions):
    """A real measurement (no timing asserted): the layer's output and gradients are those of a call that
    measures nothing, and the global random generator is untouched (training stays reproducible)."""
    monkeypatch.setattr(CC, "TRY_FROM", (0.1, 0.0))
    x = torch.randn(2, 5, 6, 6)
    layer = _layer(rgkernels.MaskedConv2d, CONVS[0], dead=(1, 4, 5))
    twin = copy.deepcopy(layer)
    state = torch.get_rng_state()
    xa = x.clone().requires_grad_()
    ya = layer(xa)
    assert torch.equal(torch.get_rng_state(), state)
    ya.sum().backward()
    [choice] = [v for k, v in SE.decisions().items() if k.startswith("cpu_compact_conv|")]
    assert choice in ("compact", "plain")
    monkeypatch.setattr(CC, "_FORCED", choice == "compact")  # the same way, without measuring
    xb = x.clone().requires_grad_()
    yb = twin(xb)
    yb.sum().backward()
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    for pa, pb in zip(layer.parameters(), twin.parameters()):
        assert torch.equal(pa.grad, pb.grad)


@pytest.mark.parametrize("rule", ["plain", "compact"])
def test_the_rule_stays_unless_the_other_way_is_10_percent_faster(monkeypatch, fresh_decisions, rule):
    monkeypatch.setattr(CC, "TRY_FROM", (0.1, 0.0))
    if rule == "compact":
        monkeypatch.setattr(CC, "COMPACT_FROM", ((0.1, 0.0),))
    other = "plain" if rule == "compact" else "compact"
    layer = _layer(rgkernels.MaskedConv2d, CONVS[0], dead=(1, 4, 5))
    x = torch.randn(2, 5, 6, 6)
    for other_time, want in ((0.91, rule), (0.89, other)):
        SE.clear_decisions()
        monkeypatch.setattr(SE, "_cpu_times", lambda cands: {rule: 1.0, other: other_time})
        layer(x)
        assert (layer._exec_record is not None) == (want == "compact"), other_time


def test_a_measurement_that_fails_warns_and_takes_the_rule(monkeypatch, fresh_decisions):
    def fail(cands):
        raise RuntimeError("cannot time this\nsecond line")

    monkeypatch.setattr(CC, "TRY_FROM", (0.1, 0.0))
    monkeypatch.setattr(SE, "_cpu_times", fail)
    layer = _layer(rgkernels.MaskedConv2d, CONVS[0], dead=(1, 4, 5))
    x = torch.randn(2, 5, 6, 6)
    with pytest.warns(rgkernels.RGKernelsWarning, match="cannot time the compacted CPU convolution.*cannot time this"):
        y = layer(x)
    assert layer._exec_record is None  # the rule: far too small
    monkeypatch.setattr(SE, "_cpu_times", _never)  # not retried
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("setting", ["anomaly", "profiler", "inference"])
def test_settings_that_distort_or_forbid_a_timing_take_the_rule(monkeypatch, fresh_decisions, setting):
    monkeypatch.setattr(CC, "TRY_FROM", (0.1, 0.0))
    monkeypatch.setattr(CC, "COMPACT_FROM", ((0.1, 0.0),))  # the rule: compact
    monkeypatch.setattr(SE, "_cpu_times", _never)
    layer = _layer(rgkernels.MaskedConv2d, CONVS[0], dead=(1, 4, 5))
    ctx = {"anomaly": lambda: torch.autograd.detect_anomaly(check_nan=False),
           "profiler": lambda: torch.autograd.profiler.profile(),
           "inference": torch.inference_mode}[setting]
    with ctx():
        layer(torch.randn(2, 5, 6, 6))
    assert int(layer._exec_record["nlive"][0]) == 4
    assert not [k for k in SE.decisions() if k.startswith("cpu_compact_conv|")]


def test_deterministic_algorithms_take_the_rule_without_measuring(monkeypatch, fresh_decisions):
    """A timing could make two runs of one seed differ in the last bits: the measured rule instead."""
    monkeypatch.setattr(SE, "_cpu_times", _never)
    layer = _layer(rgkernels.MaskedConv2d, dict(kernel_size=3, padding=1), cin=64, cout=64)
    x = torch.randn(4, 64, 16, 16)  # 38 M multiply-adds, on one thread: the rule from half the rows dead
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        for dead, want in ((range(0, 64, 2), True), (range(0, 64, 4), False)):
            _prune(layer, dead=dead, hi=0.3 * layer.weight.detach().abs().max().item())
            with torch.no_grad():
                layer(x)
            assert (layer._exec_record is not None) == want
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    assert not [k for k in SE.decisions() if k.startswith("cpu_compact_conv|")]


def test_gate():
    """The rule where nothing is measured: half the rows from 30 M multiply-adds per thread, a quarter from
    300 M (module docstring); measured from a quarter and 10 M."""
    assert CC.worth_compacting(4, 8, 3e7, threads=1)
    assert not CC.worth_compacting(3, 8, 3e7, threads=1)
    assert not CC.worth_compacting(4, 8, 3e7, threads=2)
    assert CC.worth_compacting(2, 8, 3e8, threads=1)
    assert not CC.worth_compacting(1, 8, 1e12, threads=1)
    assert not CC.worth_compacting(0, 8, 1e12, threads=1)
    assert CC.worth_trying(2, 8, 1e7, threads=1)
    assert not CC.worth_trying(1, 8, 1e12, threads=1)
    assert not CC.worth_trying(2, 8, 1e7, threads=2)
    assert not CC.worth_trying(0, 8, 1e12, threads=1)
