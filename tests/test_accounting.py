"""The trainer's FLOPs per iteration (rggan_fast/training/accounting.py) against a hand count."""
import torch
from torch import nn

import rgkernels
from rggan_fast.training.accounting import per_iteration_flops


def _nets():
    G = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3 * 2 * 2), nn.Unflatten(1, (3, 2, 2)))
    D = nn.Sequential(nn.Conv2d(3, 5, 1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 2, 1))
    return G, D


def test_per_iteration_flops_by_hand():
    """Per sample: G's linears 2*4*8 = 64 and 2*8*12 = 192; D's 1x1 conv on 2x2 2*4*3*5 = 120 and its
    linear 2*20 = 40. A D step on reals / detached fakes: forward + weight gradient + the linear's input
    gradient only; a G step: forward + weight gradient + its second layer's input gradient, then D's
    forward and every input gradient of D (down to G's output)."""
    G, D = _nets()
    b, n = 3, 2
    g_fwd, d_fwd = 64 + 192, 120 + 40
    d_step = d_fwd + 40 + d_fwd
    g_step = g_fwd + 192 + g_fwd
    want = n * (b * g_fwd + 2 * b * d_step) + b * g_step + b * (d_fwd + d_fwd)
    assert want == 8928
    got = per_iteration_flops(G, D, 4, 2, b, n, torch.device("cpu"))
    assert got == {"dense": want, "active": want, "executed": want}
    # sparse, row 0 of each of D's layers all zero (pruned: |0| - 0 is not > 0): active follows the counts
    rgkernels.sparsify(G)
    rgkernels.sparsify(D)
    with torch.no_grad():
        for _, layer in rgkernels.masked_layers(D):
            layer.weight.fill_(1.0)
            layer.weight[0].fill_(0.0)  # row 0 pruned (|0| - 0 is not > 0)
    got = per_iteration_flops(G, D, 4, 2, b, n, torch.device("cpu"))
    assert got["dense"] == want
    d_fwd_a = 120 * 4 // 5 + 0  # the conv keeps 4 of 5 rows; the linear's only row is pruned
    d_in_a = d_fwd_a  # active input gradients follow the forward's
    d_step_a = d_fwd_a + 0 + d_fwd  # linear's input gradient (active: 0) + the weight gradient, dense
    assert got["active"] == n * (b * g_fwd + 2 * b * d_step_a) + b * g_step + b * (d_fwd_a + d_in_a)
