"""count_flops (rgkernels/flops.py) against hand-computed counts (and torch's FlopCounterMode for forwards)."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rgkernels


def _torch_forward_flops(module, x):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(x)
    return fc.get_total_flops()


def _check_dense(report, fwd):
    """No pruning: every figure is the dense one; step = fwd + input grad + weight grad = 3 * fwd."""
    assert report.forward.dense == report.forward.active == report.forward.executed == fwd
    assert report.input_grad.dense == fwd and report.weight_grad.dense == fwd
    assert report.step.dense == report.step.active == report.step.executed == 3 * fwd


CASES = [
    # (layer, input shape, hand-computed forward FLOPs = 2 * uses * weights)
    (lambda: nn.Linear(7, 3), (2, 5, 7), 2 * (2 * 5) * (7 * 3)),
    (lambda: nn.Linear(7, 3), (7,), 2 * 1 * 21),
    # out 7x6: (9 + 0 - 2 - 1) / 1 + 1 = 7, (8 - 3) + 1 = 6
    (lambda: nn.Conv2d(4, 6, 3), (2, 4, 9, 8), 2 * (2 * 7 * 6) * (6 * 4 * 9)),
    # stride 2, padding 1, dilation 2, groups 2: out (9 + 2 - 4 - 1) // 2 + 1 = 4 -> 4x4; weights 6*2*9
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (2, 4, 9, 9), 2 * (2 * 16) * 108),
    # kernel (3, 1), stride (1, 2), padding (1, 0): out 9 x 4
    (lambda: nn.Conv2d(4, 6, (3, 1), stride=(1, 2), padding=(1, 0)), (2, 4, 9, 8), 2 * (2 * 9 * 4) * (6 * 4 * 3)),
    (lambda: nn.Conv2d(3, 5, 3, padding=1), (3, 6, 6), 2 * (1 * 36) * (5 * 3 * 9)),  # unbatched
    # transposed: every input position is scattered by the whole kernel: uses = batch * input positions
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 5, 5),
     2 * (2 * 25) * (4 * 3 * 9)),
    (lambda: nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1, dilation=2), (3, 4, 3, 5), 2 * (3 * 15) * (4 * 2 * 16)),
]


@pytest.mark.parametrize("make,shape,fwd", CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["nn", "masked"])
def test_single_layer_counts(make, shape, fwd, masked):
    layer = make()
    if masked:
        rgkernels.sparsify(layer)  # t = 0: nothing pruned
    x = torch.randn(shape)
    report = rgkernels.count_flops(layer, x)
    _check_dense(report, fwd)
    assert _torch_forward_flops(layer, x) == fwd
    (lf,) = report.layers.values()
    assert lf.calls == 1 and lf.weights == layer.weight.numel() and lf.uses * lf.weights * 2 == fwd


def test_active_at_known_keep_ratio():
    conv = rgkernels.MaskedConv2d(2, 4, 3, padding=1, bias=False)
    conv.guard_ratio = None
    with torch.no_grad():  # every row holds |w| = 1..18 / 18; thresholds keep 18, 9, 3 and 0 of 18
        conv.weight.copy_((torch.arange(18.0) + 1).div(18).view(1, 2, 3, 3).repeat(4, 1, 1, 1))
        conv.threshold.copy_(torch.tensor([0.0, 9.5 / 18, 15.5 / 18, 1.0]))
    x = torch.randn(2, 2, 5, 5)
    report = rgkernels.count_flops(conv, x)
    uses, active, weights = 2 * 25, 18 + 9 + 3 + 0, 72
    fwd = report.forward
    assert (fwd.dense, fwd.active, fwd.executed) == (2 * uses * weights, 2 * uses * active, 2 * uses * weights)
    assert report.input_grad == fwd
    # the weight-gradient GEMM stays dense (the threshold gradient needs every entry)
    assert report.weight_grad.dense == report.weight_grad.active == report.weight_grad.executed == 2 * uses * weights
    assert report.step.active == 2 * (2 * uses * active) + 2 * uses * weights
    assert report.step.dense == report.step.executed == 3 * 2 * uses * weights
    assert report.layers[type(conv).__name__].active_weights == active
    # dense mode: M = 1
    conv.sparse = False
    assert rgkernels.count_flops(conv, x).forward.active == 2 * uses * weights


def test_small_model_totals_and_shared_layer():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),            # 8x8 -> 4x4
        nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1),   # 4x4 -> 8x8
        nn.Flatten(), nn.Linear(4 * 64, 16), shared, nn.ReLU(), shared,
    )
    x = torch.randn(2, 3, 8, 8)
    expected = {
        "0": 2 * (2 * 16) * (8 * 3 * 9),
        "3": 2 * (2 * 16) * (8 * 4 * 16),
        "5": 2 * 2 * (256 * 16),
        "6": 2 * (2 * 2) * (16 * 16),  # called twice
    }
    bn = model[1]
    model.train()
    model[3].eval()
    report = rgkernels.count_flops(model, x)
    # counting leaves the model as it was: training flags restored, no batch-norm statistics update
    assert model.training and bn.training and not model[3].training
    assert bn.num_batches_tracked.item() == 0
    assert {k: v.forward.dense for k, v in report.layers.items()} == expected
    assert report.layers["6"].calls == 2
    _check_dense(report, sum(expected.values()))
    assert _torch_forward_flops(model, x) == sum(expected.values())
    rgkernels.sparsify(model)
    assert rgkernels.count_flops(model, x).forward.dense == sum(expected.values())
    assert "TOTAL" in report.summary()


def test_layer_called_with_a_keyword_input():
    """layer(input=x) counts as layer(x) (a transposed conv's count needs its input)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = rgkernels.MaskedLinear(3, 4)
            self.up = rgkernels.MaskedConvTranspose2d(4, 2, 2)

        def forward(self, x):
            return self.up(input=self.fc(input=x)[:, :, None, None])

    r = rgkernels.count_flops(Net(), torch.randn(5, 3))
    assert r.layers["fc"].forward.dense == 2 * 5 * 3 * 4  # 5 rows, 12 weights
    assert r.layers["up"].forward.dense == 2 * 5 * 4 * 2 * 2 * 2  # 5 input positions x 32 weights


def known_rows(layer, signed=False):
    """Weights |w| = 1..K / K in every mask row (K entries per row; random signs when `signed`), and no
    collapse guard; returns K. keep_thresholds(K, keep) then keeps keep[i] entries of row i."""
    layer.guard_ratio = None
    with torch.no_grad():
        rows = layer._to_rows(layer.weight)
        k = rows[0].numel()
        vals = (torch.arange(k, dtype=torch.float32) + 1).div(k).view(rows[0].shape).expand_as(rows)
        if signed:  # |w| is what counts
            vals = vals * torch.where(torch.rand(rows.shape) < 0.5, -1.0, 1.0)
        layer.weight.copy_(layer._from_rows(vals.contiguous()))
    return k


def keep_thresholds(k, keep):
    """Thresholds between the known magnitudes of known_rows: row i keeps its keep[i] largest."""
    return torch.tensor([(k - n + 0.5) / k for n in keep])


def _set_keep(layer, keep):
    """known_rows with thresholds that keep keep[i] of row i: the active count is known by construction."""
    k = known_rows(layer)
    with torch.no_grad():
        layer.threshold.copy_(keep_thresholds(k, keep))
    return k


@pytest.mark.parametrize("make,shape,fwd", CASES)
def test_active_counts_by_construction(make, shape, fwd):
    """Every layer geometry of CASES with a known number of active weights per output channel: forward
    and input gradient count the active weights, the weight gradient stays dense."""
    layer = rgkernels.sparsify(make())
    rows = layer.mask_rows
    k = layer.weight.numel() // rows
    keep = [[k, k // 2, 1, 0][i % 4] for i in range(rows)]
    _set_keep(layer, keep)
    r = rgkernels.count_flops(layer, torch.randn(shape))
    weights, active = layer.weight.numel(), sum(keep)
    uses = fwd // (2 * weights)
    (lf,) = r.layers.values()
    assert lf.active_weights == active and lf.uses == uses
    assert (r.forward.dense, r.forward.active) == (fwd, 2 * uses * active)
    assert (r.input_grad.dense, r.input_grad.active) == (fwd, 2 * uses * active)
    assert r.weight_grad.dense == r.weight_grad.active == r.weight_grad.executed == fwd
    assert r.step.active == 2 * (2 * uses * active) + fwd and r.step.dense == 3 * fwd
    assert 2 * uses * active <= r.forward.executed <= fwd


def test_shared_masked_layer_called_twice_in_sparse_mode():
    shared = rgkernels.MaskedLinear(6, 4)
    _set_keep(shared, [6, 3, 0, 1])
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 6), shared)
    r = rgkernels.count_flops(model, torch.randn(5, 6))
    lf = r.layers["0"]
    assert lf.calls == 2 and lf.uses == 10 and lf.active_weights == 2 * 10  # summed over the calls
    assert (lf.forward.dense, lf.forward.active) == (2 * 10 * 24, 2 * 10 * 10)
    assert r.forward.dense == 2 * 10 * 24 + 2 * 5 * 24 and r.forward.active == 2 * 10 * 10 + 2 * 5 * 24


def test_weight_normed_layers_are_counted():
    """Layers that masked layers refuse (weight norm stores a direction and a magnitude) are still
    counted, from their geometry, whether they stand alone or sit unconverted beside masked layers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook form is deprecated
        for norm in (nn.utils.weight_norm, nn.utils.parametrizations.weight_norm):
            lin = norm(nn.Linear(16, 8))
            assert rgkernels.count_flops(lin, torch.randn(3, 16)).forward.dense == 2 * 3 * 16 * 8
            model = rgkernels.sparsify(nn.Sequential(nn.Linear(10, 6 * 5 * 5), nn.Unflatten(1, (6, 5, 5))))
            model.append(norm(nn.Conv2d(6, 4, 3, groups=2)))
            r = rgkernels.count_flops(model, torch.randn(2, 10))
            assert r.layers["2"].forward.dense == 2 * (2 * 3 * 3) * (4 * 3 * 3 * 3)  # uses, weights
            assert r.layers["0"].forward.dense == 2 * 2 * 10 * 150


def test_layers_that_get_an_input_gradient():
    """The layers whose input gradient a training step computes: not those on an input that needs none."""
    G = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3 * 2 * 2), nn.Unflatten(1, (3, 2, 2)))
    D = nn.Sequential(nn.Conv2d(3, 5, 1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 2, 1))
    assert rgkernels.flops.layers_with_input_grad(G, torch.zeros(1, 4)) == {"2"}  # not the layer on z
    assert rgkernels.flops.layers_with_input_grad(D, torch.zeros(1, 3, 2, 2)) == {"3"}  # not the conv on the images
    assert G.training and D.training  # modes restored
