"""The RG controller: augmented regeneration on scripted FID sequences (DESIGN.md §1)."""
import pytest
import torch

import rgkernels
from rggan_fast.training.controller import DENSE, SPARSE, NoRegrowth, RGController, weighted_average

W = (0.1, 0.1, 0.2, 0.2, 0.4)


def avg(f):
    return 0.1 * f[-5] + 0.1 * f[-4] + 0.2 * f[-3] + 0.2 * f[-2] + 0.4 * f[-1]


def run(seq, **kw):
    c = RGController(W, **kw)
    return c, [c.update(f) for f in seq]


def test_starts_sparse_and_waits_for_five_fids():
    c = RGController(W)
    assert c.mode == SPARSE
    # rising FIDs would mean dense, but with fewer than 5 entries nothing changes
    assert [c.update(f) for f in (10, 20, 30, 40)] == [SPARSE] * 4
    assert c.update(50) == DENSE  # 5th entry: avg = 38 < 50


def test_weighted_average_formula():
    f = [7.0, 3.0, 11.0, 5.0, 2.0, 13.0]
    assert weighted_average(f, W) == pytest.approx(avg(f))
    assert weighted_average(f[:4], W) is None


@pytest.mark.parametrize("seq", [
    [100, 90, 80, 70, 60, 50, 40],                 # steadily improving: always sparse
    [50, 50, 50, 50, 50],                          # flat: avg == f[-1] -> sparse (>=)
])
def test_improving_or_flat_stays_sparse(seq):
    _, modes = run(seq)
    assert modes == [SPARSE] * len(seq)


def test_worse_fid_switches_dense_then_back_to_sparse():
    seq = [100, 90, 80, 70, 60, 75, 74, 50, 49]
    c, modes = run(seq)
    expected = []
    for i in range(len(seq)):
        f = seq[:i + 1]
        expected.append(SPARSE if len(f) < 5 or avg(f) >= f[-1] else DENSE)
    assert modes == expected
    assert DENSE in modes and modes[-1] == SPARSE  # dense phases end when FID improves again
    assert modes[5] == DENSE  # 75 > 0.1*90 + 0.1*80 + 0.2*70 + 0.2*60 + 0.4*75 = 73


def test_boundary_is_inclusive():
    f = [10.0, 10.0, 10.0, 10.0]
    c, _ = run(f)
    assert c.update(10.0) == SPARSE           # avg == f[-1]
    assert c.update(10.000001) == DENSE       # just above the average


def test_disabled_ar_stays_sparse():
    _, modes = run([1, 2, 3, 4, 5, 6, 7], enabled=False)
    assert modes == [SPARSE] * 7


def test_state_dict_roundtrip():
    c, _ = run([100, 90, 80, 70, 95])
    d = RGController(W)
    d.load_state_dict(c.state_dict())
    assert d.mode == c.mode == DENSE and d.history == c.history
    assert d.update(10) == c.update(10)


def test_apply_respects_pruned_and_ar_nets():
    g = rgkernels.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    d = rgkernels.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    c, _ = run([1, 2, 3, 4, 5])
    assert c.mode == DENSE
    c.apply({"G": g, "D": d}, pruned=("G", "D"), ar_nets=("D",))
    assert g[0].sparse is True and d[0].sparse is False   # AR only on D: G stays sparse
    c.apply({"G": [g], "D": d}, pruned=("G", "D"), ar_nets=("G", "D"))
    assert g[0].sparse is False


def test_no_regrowth_thresholds_never_fall():
    net = rgkernels.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    NoRegrowth(net, opt)
    t = net[0].threshold
    with torch.no_grad():
        t.fill_(0.1)
    t.grad = torch.ones_like(t)   # SGD would lower every threshold by 1
    t.grad[0] = -1.0              # ... and raise this one
    net[0].weight.grad = torch.zeros_like(net[0].weight)
    opt.step()
    assert torch.all(t.detach()[1:] == 0.1) and float(t.detach()[0]) == pytest.approx(1.1)


@pytest.mark.parametrize("prune, aug_regen, enabled", [("GD", "GD", True), ("G", "GD", True), ("G", "D", False),
                                                        ("GD", "", False), ("D", "D", True)])
def test_ar_is_on_only_for_a_net_that_is_pruned(prune, aug_regen, enabled):
    """With no net both pruned and under AR, the controller would log (and count) switches to a mode
    that no network trains in: it is off, and the logged mode stays the one the pruned nets train in."""
    from rggan_fast.build import build_controller
    from rggan_fast.config import TrainConfig

    c = build_controller(TrainConfig(prune=prune, aug_regen=aug_regen))
    assert c.enabled == enabled
    assert [c.update(f) for f in (1, 1, 1, 1, 2)][-1] == (DENSE if enabled else SPARSE)
