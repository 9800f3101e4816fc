"""protect_pruned (rgkernels/optim.py): pruned weights get no update from Adam, AdamW or SGD+momentum,
even with nonzero optimiser state; they come back unchanged in dense mode."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import rgkernels
from rgkernels.layers import stored_weight

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


def _setup(opt_name):
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.LeakyReLU(0.2),
        nn.utils.spectral_norm(nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
        nn.Flatten(), parametrizations.spectral_norm(nn.Linear(4 * 8 * 8, 5)),
    )
    rgkernels.sparsify(model)
    layers = [l for _, l in rgkernels.masked_layers(model)]
    # thresholds stay fixed (not optimised) so that masks are stable enough to follow
    opt = OPTIMIZERS[opt_name]([p for n, p in model.named_parameters() if not n.endswith("threshold")])
    x = torch.randn(4, 3, 4, 4)
    rgkernels.set_sparse(model, False)
    for _ in range(3):  # dense warm-up: nonzero moments / momentum on every weight
        _step(model, opt, x)
    rgkernels.set_sparse(model, True)
    with torch.no_grad():  # t = 0: the masked weight is the effective weight
        eff = {id(l): rgkernels.masked_weight(l._to_rows(l.weight), l.threshold).detach() for l in layers}
    for l in layers:
        rows = eff[id(l)].reshape(l.mask_rows, -1).abs()
        with torch.no_grad():
            l.threshold.copy_(rows.median(dim=1).values)  # about half of each row pruned
    return model, opt, layers, x


def _step(model, opt, x):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _sparse_steps(model, opt, layers, x, steps):
    """Runs sparse steps; returns (entries pruned at every step, their values before the first step,
    whether any pruned entry moved during a step in which it was pruned)."""
    weights = [stored_weight(l) for l in layers]
    start = [w.detach().clone() for w in weights]
    always_pruned = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    moved = False
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        masks = [l.mask() for l in layers]
        before = [w.detach().clone() for w in weights]
        opt.step()
        for w, m, b, ap in zip(weights, masks, before, always_pruned):
            moved |= not torch.equal(w.detach()[~m], b[~m])
            ap &= ~m
    return always_pruned, start, moved


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_pruned_weights_frozen_and_restored_in_dense_mode(opt_name):
    model, opt, layers, x = _setup(opt_name)
    rgkernels.protect_pruned(model, opt)
    state = [opt.state[stored_weight(l)] for l in layers]
    assert all(any(v.abs().sum() > 0 for k, v in s.items() if k in ("exp_avg", "momentum_buffer")) for s in state)
    always_pruned, start, moved = _sparse_steps(model, opt, layers, x, steps=20)
    assert not moved
    assert all(ap.float().mean() > 0.2 for ap in always_pruned)
    for l, ap, s in zip(layers, always_pruned, start):
        assert torch.equal(stored_weight(l).detach()[ap], s[ap])  # bit-identical after 20 steps
    # dense mode: the pruned weights come back with their old value, and nothing is protected any more
    rgkernels.set_sparse(model, False)
    before = [stored_weight(l).detach().clone() for l in layers]
    _step(model, opt, x)
    for l, ap, b in zip(layers, always_pruned, before):
        assert (stored_weight(l).detach()[ap] != b[ap]).all()


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_unprotected_optimizer_moves_pruned_weights(opt_name):
    """The check above can fail: without protect_pruned the optimiser state moves pruned weights."""
    model, opt, layers, x = _setup(opt_name)
    _, _, moved = _sparse_steps(model, opt, layers, x, steps=2)
    assert moved


def test_handle_remove_stops_protection():
    model, opt, layers, x = _setup("adam")
    handle = rgkernels.protect_pruned(model, opt)
    assert not _sparse_steps(model, opt, layers, x, steps=2)[2]
    handle.remove()
    assert _sparse_steps(model, opt, layers, x, steps=2)[2]


def test_only_parameters_of_the_optimizer_are_touched():
    model, opt, layers, x = _setup("adam")
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    rgkernels.protect_pruned(model, other)  # protects nothing of `model`
    assert _sparse_steps(model, opt, layers, x, steps=2)[2]


def test_bad_arguments_are_named():
    model = rgkernels.sparsify(nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="protect_pruned: expected an nn.Module"):
        rgkernels.protect_pruned(None, opt)
    with pytest.raises(TypeError, match="protect_pruned: expected a torch.optim.Optimizer"):
        rgkernels.protect_pruned(model, [p for p in model.parameters()])


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_pruned_weights_frozen_while_thresholds_train(opt_name):
    """RG-GAN's case: the thresholds are trained by the same optimiser, so masks change from step to
    step and weights are pruned and regrow; in every step the entries pruned by that step's forward
    stay bit-identical, and a regrown weight resumes from the value it was pruned with."""
    model, _, layers, x = _setup(opt_name)
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    rgkernels.protect_pruned(model, opt)
    weights = [stored_weight(l) for l in layers]
    pruned_at = [None] * len(layers)  # value of each entry when it was last pruned
    changed = regrew = 0
    prev = None
    for _ in range(15):
        opt.zero_grad()
        (model(x).square().mean() + rgkernels.threshold_regularizer(model, 1e-3)).backward()
        masks = [l.mask().clone() for l in layers]
        before = [w.detach().clone() for w in weights]
        opt.step()
        for i, (w, m, b) in enumerate(zip(weights, masks, before)):
            assert torch.equal(w.detach()[~m], b[~m]), f"layer {i}: a pruned weight moved"
            if prev is not None:
                back = m & ~prev[i]  # active again since the previous step
                changed += int((m != prev[i]).sum())
                regrew += int(back.sum())
                assert torch.equal(b[back], pruned_at[i][back]), "a regrown weight did not resume its value"
            pruned_at[i] = torch.where(~m, b, b if pruned_at[i] is None else pruned_at[i])
        prev = masks
    assert changed > 0  # the masks did move: the checks above had something to check
    if opt_name != "sgd_momentum":  # (plain SGD's threshold steps are too small to regrow weights in 15 steps)
        assert regrew > 0
