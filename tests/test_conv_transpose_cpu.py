"""MaskedConvTranspose2d on the CPU (rgkernels/layers.py): the mask computed on the stored layout's rows
[C_in * C_out/g, kh * kw] with the threshold repeated per input channel, and a transposed conv of a 1x1 map
(FastGAN's first layer) run as one GEMM on W_hat.

Reference: DESIGN.md §2 in float64 (test_masked_weight.ref64) on the layer's mask rows [C_out, C_in/g * kh * kw],
then F.conv_transpose2d in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rgkernels
from rgkernels import layers as layers_mod

from test_cpu_masked_linear import thresholds
from test_masked_weight import ref64, rel_err


def _pruned(*args, keep=0.5, seed=0, **kw):
    torch.manual_seed(seed)
    layer = rgkernels.MaskedConvTranspose2d(*args, **kw)
    with torch.no_grad():
        layer.threshold.copy_(thresholds(layer._to_rows(layer.weight), keep))
    return layer


def _ref64(layer, x, dy, output_size=None):
    """y, dx, dW (weight layout), dt, db, keep counts, mask (weight layout), threshold after the guard."""
    w, t = layer.weight.detach(), layer.threshold.detach()
    rows = layer._to_rows(w.double()).contiguous()
    w_hat_rows, counts, t_after, _, _ = ref64(rows, t, torch.zeros_like(rows), layer.grad_mode, layer.guard_ratio)
    w_hat = layer._from_rows(w_hat_rows).detach().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    op = layer._output_padding(x, output_size, layer.stride, layer.padding, layer.kernel_size, 2, layer.dilation)
    y = F.conv_transpose2d(xd, w_hat, b, layer.stride, layer.padding, op, layer.groups, layer.dilation)
    y.backward(dy.double())
    g_rows = layer._to_rows(w_hat.grad).contiguous()
    _, _, _, gw_rows, gt = ref64(rows, t, g_rows, layer.grad_mode, layer.guard_ratio)
    mask = layer._from_rows((layer._to_rows(w.double()).abs() > t_after.double().view(-1, 1, 1, 1)))
    return (y.detach(), xd.grad, layer._from_rows(gw_rows), gt, None if b is None else b.grad, counts,
            mask, t_after)


def _run(layer, x, dy, output_size=None):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = layer(x, output_size=output_size)
    y.backward(dy)
    return (y.detach(), x.grad, layer.weight.grad, layer.threshold.grad,
            None if layer.bias is None else layer.bias.grad)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def mask_calls(monkeypatch):
    """The (rows shape, thresholds shape) of every masked_weight call the layers make."""
    calls = []
    real = layers_mod.masked_weight

    def spy(rows, thresholds, *a, **kw):
        calls.append((tuple(rows.shape), tuple(thresholds.shape)))
        return real(rows, thresholds, *a, **kw)

    monkeypatch.setattr(layers_mod, "masked_weight", spy)
    return calls


CASES = {  # name: (layer kwargs, input shape)
    "1x1_map": (dict(in_channels=12, out_channels=20, kernel_size=4), (3, 12, 1, 1)),  # the GEMM
    "1x1_map_no_bias": (dict(in_channels=12, out_channels=20, kernel_size=4, bias=False), (3, 12, 1, 1)),
    "stride2": (dict(in_channels=6, out_channels=10, kernel_size=4, stride=2, padding=1), (2, 6, 5, 4)),
    "groups2": (dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, groups=2), (2, 6, 3, 3)),
    "rect_dilated": (dict(in_channels=5, out_channels=7, kernel_size=(2, 3), dilation=2, output_padding=1,
                          stride=2), (2, 5, 3, 4)),
    # a model moved to channels_last: the stored weight is not a stack of rows (reshape copies it)
    "channels_last_weight": (dict(in_channels=6, out_channels=10, kernel_size=4, stride=2, padding=1,
                                  channels_last=True), (2, 6, 5, 4)),
    "channels_last_1x1_map": (dict(in_channels=12, out_channels=20, kernel_size=4, channels_last=True),
                              (3, 12, 1, 1)),
}


@pytest.mark.parametrize("mode", ["dst", "masked"])
@pytest.mark.parametrize("case", list(CASES))
def test_stacked_rows_match_float64_reference(case, mode, mask_calls):
    kw, shape = dict(CASES[case][0]), CASES[case][1]
    channels_last = kw.pop("channels_last", False)
    layer = _pruned(keep=0.45, **kw)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        assert not layer.weight.is_contiguous()
    layer.grad_mode = mode
    x = torch.randn(shape)
    y0 = layer(x)
    dy = torch.randn(y0.shape)
    arriving = []  # the weight gradient as the backward delivers it, before AccumulateGrad
    hook = layer.weight.register_hook(lambda g: arriving.append(g.stride()))
    got = _run(layer, x, dy)
    hook.remove()
    want = _ref64(layer, x, dy)
    for name, a, b in zip(("y", "dx", "dW", "dt", "db"), got, want):
        if b is None:
            assert a is None, name
        else:
            assert a.shape == b.shape and rel_err(a, b) <= 1e-5, name
    assert torch.equal(layer.last_counts, want[5]) and layer.last_counts.dtype == torch.int32
    assert torch.equal(layer.mask(), want[6]) and layer.mask().shape == layer.weight.shape
    # the rows masked_weight ran on: the stored layout's [C_in * C_out/g, kh * kw], one threshold each
    cin, coutg, kh, kw_ = layer.weight.shape
    assert mask_calls and set(mask_calls) == {((cin * coutg, kh * kw_), (cin * coutg,))}
    # the weight gradient arrives in the parameter's own layout (AccumulateGrad keeps it without a copy;
    # the mask rows' gradient arrived transposed, and its copy cost as much as the dense layer's backward)
    if not channels_last:
        assert arriving == [layer.weight.stride()]


def test_one_position_is_one_gemm():
    layer = _pruned(8, 6, 4)
    x = torch.randn(2, 8, 1, 1)
    with _OpLog() as log:
        layer(x).sum().backward()
    assert "addmm" in log.ops and not [op for op in log.ops if "conv" in op]
    # not a 1x1 map, or not stride 1 / no padding / groups 1: the transposed convolution
    for kw, hw in ((dict(stride=2), 1), (dict(padding=1), 1), ({}, 2), (dict(dilation=2), 1), (dict(groups=2), 1)):
        other = _pruned(4, 6, 3, **kw)
        with _OpLog() as log:
            other(torch.randn(2, 4, hw, hw)).sum().backward()
        assert "convolution" in log.ops, kw


def test_reference_backend_stays_the_plain_composition(mask_calls):
    layer = _pruned(8, 6, 4)
    with rgkernels.use_backend("reference"), _OpLog() as log:
        layer(torch.randn(2, 8, 1, 1)).sum().backward()
    assert "convolution" in log.ops and mask_calls == [((6, 8, 4, 4), (6,))]  # the mask rows


def test_collapse_guard_writes_the_threshold_back_and_output_size():
    layer = _pruned(6, 8, 4, keep=0.5)
    with torch.no_grad():
        layer.threshold += 10.0  # everything pruned: keep ratio 0 <= 1%
    x = torch.randn(2, 6, 1, 1)
    want = _ref64(layer, x, torch.ones(2, 8, 4, 4))
    assert torch.equal(want[7], torch.zeros(8))
    y = layer(x, output_size=[4, 4])
    assert torch.equal(layer.threshold, torch.zeros(8))
    assert int(layer.last_counts.sum()) == layer.weight.numel()
    torch.testing.assert_close(y, F.conv_transpose2d(x, layer.weight, layer.bias))
    with pytest.raises(ValueError):
        layer(x, output_size=[5, 5])
    # a stride-2 layer (the transposed convolution), grouped: the same reset
    layer = _pruned(6, 8, 3, stride=2, groups=2)
    with torch.no_grad():
        layer.threshold += 10.0
    layer(torch.randn(2, 6, 3, 3)).sum().backward()
    assert torch.equal(layer.threshold, torch.zeros(8)) and layer.threshold.grad is not None
    # not fired: the threshold is not written (its version, autograd's in-place check, stays)
    layer = _pruned(6, 8, 4)
    before = layer.threshold._version
    layer(x)
    assert layer.threshold._version == before


def test_dead_channels_in_count_flops():
    """The 1x1-map GEMM computes every output channel (a pruned one's columns of W_hat are zero): executed
    FLOPs are the dense ones, active FLOPs the kept weights'."""
    layer = _pruned(16, 32, 4, bias=False)
    with torch.no_grad():
        layer.threshold[:16] = 100.0  # half the output channels entirely pruned
    rep = rgkernels.count_flops(layer, torch.randn(5, 16, 1, 1))
    (lf,) = rep.layers.values()
    assert lf.forward.dense == lf.forward.executed == 2 * 5 * 16 * 32 * 16
    assert lf.input_grad.executed == lf.input_grad.dense and lf.weight_grad.executed == lf.weight_grad.dense
    kept = int(layer.last_counts.sum())
    assert 0 < kept < layer.weight.numel() // 2 and lf.forward.active == 2 * 5 * kept


@pytest.mark.parametrize("k", [4, 1])
def test_spectral_norm_masks_the_stored_gradient(k):
    torch.manual_seed(1)
    sn = rgkernels.sparsify(nn.utils.parametrizations.spectral_norm(nn.ConvTranspose2d(8, 10, k)))
    with torch.no_grad():
        sn.threshold.fill_(0.05)
    sn(torch.randn(3, 8, 1, 1)).square().sum().backward()
    stored, m = sn.parametrizations.weight.original, sn.mask()
    assert m.shape == stored.shape and (~m).any() and m.any()
    assert (stored.grad[~m] == 0).all() and (stored.grad[m] != 0).any()


def test_grouped_masks_equal_per_layer():
    """The trainer's grouped launch runs the same stacked rows: outputs, gradients, counts, and the guard's
    write-back."""
    torch.manual_seed(3)
    model = nn.Sequential(rgkernels.MaskedConvTranspose2d(6, 8, 4), nn.LeakyReLU(0.2),
                          rgkernels.MaskedConvTranspose2d(8, 4, 4, stride=2, padding=1, groups=2))
    for m in model:
        if isinstance(m, rgkernels.MaskedConvTranspose2d):
            with torch.no_grad():
                m.threshold.copy_(m._to_rows(m.weight).flatten(1).abs().median(1).values)
    with torch.no_grad():
        model[2].threshold += 10.0  # its guard fires
    twin = copy.deepcopy(model)
    x = torch.randn(2, 6, 1, 1)
    with rgkernels.grouped_masks(model):
        y = model(x)
    y.sum().backward()
    y2 = twin(x)
    y2.sum().backward()
    torch.testing.assert_close(y, y2)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a.grad, b.grad)
    assert torch.equal(model[2].threshold, torch.zeros(4))
    for a, b in ((model[0], twin[0]), (model[2], twin[2])):
        assert torch.equal(a.last_counts, b.last_counts) and torch.equal(a.mask(), b.mask())


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_one_position(dtype, tol):
    """The GEMM in half precision against float64 on the same (rounded) values, within the dtype's rounding."""
    layer = _pruned(8, 6, 4).to(dtype)
    x = torch.randn(2, 8, 1, 1, dtype=dtype)
    y = layer(x)
    w_hat = rgkernels.masked_weight(layer.weight.detach().double().transpose(0, 1), layer.threshold.detach(),
                                    backend="reference").transpose(0, 1)
    want = F.conv_transpose2d(x.double(), w_hat, layer.bias.detach().double())
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # nn's init of the empty weight
def test_invalid_configurations_raise_as_nn_does():
    """Where nn.ConvTranspose2d refuses a configuration, the GEMM does not run it: an output_padding that
    stride 1 and dilation 1 do not allow, an empty weight (from a review: both used to return a result)."""
    x = torch.randn(2, 8, 1, 1)
    for make, inp in ((lambda c: c(8, 6, 4, output_padding=1), x), (lambda c: c(0, 6, 4), torch.randn(2, 0, 1, 1))):
        with pytest.raises(RuntimeError) as want:
            make(nn.ConvTranspose2d)(inp)
        with pytest.raises(RuntimeError) as got:
            make(rgkernels.MaskedConvTranspose2d)(inp)
        assert str(got.value).split("\n")[0] == str(want.value).split("\n")[0]
