"""rgkernels/ops/_autograd.grads_needed: which input gradients a Python node's backward must compute, against
what each backward pass asks for (backward(inputs=...), autograd.grad, a full backward), with None
arguments between the tensors (the engine has edges for tensor arguments only)."""
import pytest
import torch

from rgkernels.ops._autograd import grads_needed


class Node(torch.autograd.Function):
    seen = None

    @staticmethod
    def forward(ctx, a, b, k, c):
        ctx.has_b = b is not None
        return a * c * (1.0 if b is None else b) * k

    @staticmethod
    def backward(ctx, g):
        Node.seen = grads_needed(ctx, (True, ctx.has_b, False, True))
        return g, None, None, g


@pytest.mark.parametrize("b", [None, "tensor"])
def test_each_pass_gets_what_it_uses(b):
    a, c = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    b = None if b is None else torch.randn(3)
    c2 = c * 2  # a non-leaf input: its edge is MulBackward, not AccumulateGrad
    y = Node.apply(a, b, 3.0, c2).sum()
    y.backward(inputs=[c], retain_graph=True)
    assert Node.seen == (False, False, False, True)
    y.backward(inputs=[a], retain_graph=True)
    assert Node.seen == (True, False, False, False)
    torch.autograd.grad(y, [c], retain_graph=True)
    assert Node.seen == (False, False, False, True)
    y.backward()
    assert Node.seen == (True, False, False, True)


def test_outside_a_backward_pass_keeps_the_static_needs():
    class Ctx:
        needs_input_grad = (True, False, True)
        next_functions = ()

    assert grads_needed(Ctx(), (True, False, True)) == (True, False, True)
