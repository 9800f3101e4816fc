"""grouped_masks (rgkernels/grouped.py): one grouped launch gives the per-layer path's outputs and gradients."""
import copy

import torch
from torch import nn
from torch.nn.utils import parametrizations

import rgkernels


def _model():
    m = nn.Sequential(
        parametrizations.spectral_norm(nn.Conv2d(3, 8, 3, padding=1)), nn.LeakyReLU(0.2),
        nn.utils.spectral_norm(nn.Conv2d(8, 8, 3, padding=1, groups=2)), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1, groups=2), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
    )
    rgkernels.sparsify(m)
    for _, layer in rgkernels.masked_layers(m):
        with torch.no_grad():
            layer.threshold.uniform_(0.0, 0.1)
    m[4].grad_mode = "masked"  # a second group
    return m


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_grouped_equals_per_layer():
    per_layer = _model()
    grouped = copy.deepcopy(per_layer)
    x = torch.randn(2, 3, 4, 4)
    y1 = per_layer(x)
    with rgkernels.grouped_masks(grouped):
        y2 = grouped(x)
    # Same masked weights; on the CPU the per-layer linear runs the fused node, whose GEMMs may skip
    # entirely pruned rows (other GEMM shapes: other rounding), hence a float32-rounding tolerance.
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    g1, g2 = _grads(per_layer), _grads(grouped)
    assert g1.keys() == g2.keys() and any("threshold" in k for k in g1)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-6, msg=k)
    for (_, a), (_, b) in zip(rgkernels.masked_layers(per_layer), rgkernels.masked_layers(grouped)):
        assert torch.equal(a.mask(), b.mask()) and torch.equal(a.last_counts, b.last_counts)
        assert b._pre_masked is None  # cleared on exit


def test_grouped_layer_called_twice_and_dense_layers():
    lin = rgkernels.MaskedLinear(6, 6)
    dense = rgkernels.MaskedLinear(6, 6)
    dense.sparse = False
    model = nn.Sequential(lin, dense)
    with torch.no_grad():
        lin.threshold.fill_(0.2)
    twin = copy.deepcopy(model)
    x = torch.randn(3, 6)
    # per-layer reference: gradients of the two calls accumulate (one backward per call)
    model(x).sum().backward()
    model(2 * x).sum().backward()
    with rgkernels.grouped_masks(twin):
        assert twin[0]._pre_masked is not None and twin[1]._pre_masked is None
        loss = twin(x).sum() + twin(2 * x).sum()
    loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:  # the grouped path sums the calls' dL/dW_hat before the op: rounding only
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_one_power_iteration_per_forward_inside_grouped_masks(monkeypatch):
    """Spectral norm's power iteration (the u / v update) runs once per forward, inside grouped_masks as
    outside and in dense mode: a layer must not read its weight again once the grouped launch computed
    its masked version (with the parametrisation, every read is an iteration: u would advance twice as
    fast in sparse mode). The hook form computes its weight once per forward in any case."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    calls = []
    param_fwd, hook_compute = parametrizations._SpectralNorm.forward, SpectralNorm.compute_weight
    monkeypatch.setattr(parametrizations._SpectralNorm, "forward",
                        lambda self, w: (calls.append("param") if self.training else None) or param_fwd(self, w))
    monkeypatch.setattr(SpectralNorm, "compute_weight",
                        lambda self, module, do_power_iteration: (calls.append("hook") if do_power_iteration else None)
                        or hook_compute(self, module, do_power_iteration))
    m = _model()
    x = torch.randn(2, 3, 4, 4)
    for mode in ("plain", "grouped", "dense"):
        rgkernels.set_sparse(m, mode != "dense")
        calls.clear()
        if mode == "grouped":
            with rgkernels.grouped_masks(m):
                m(x).sum().backward()
        else:
            m(x).sum().backward()
        assert sorted(calls) == ["hook", "param"], mode
