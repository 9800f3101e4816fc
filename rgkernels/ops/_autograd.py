"""Autograd helpers of the Python nodes: which input gradients a backward must compute in this pass, and
the saved-tensor hooks of the timing runs made inside a forward."""
from __future__ import annotations

import contextlib
from typing import Sequence, Tuple

import torch


def grads_needed(ctx, tensors: Sequence[bool]) -> Tuple[bool, ...]:
    """`ctx.needs_input_grad` of the forward's first `len(tensors)` arguments, narrowed to the inputs whose
    gradient this backward pass uses. `tensors[i]`: whether argument i was a tensor (not None): the
    engine's edges (`ctx.next_functions`) exist for tensor arguments only, so the i-th argument's edge is
    found by counting the tensors before it.

    `needs_input_grad` is fixed at the forward (which inputs require grad). `loss.backward(inputs=...)` and
    `torch.autograd.grad(outputs, inputs)` prune the graph, and ATen's own backward formulas skip what is
    pruned (convolution's output_mask, addmm's); a custom node that computed it anyway would run GEMMs the
    plain layer does not: in RG-GAN's G step (`loss_G.backward(inputs=G's parameters)`), the weight
    gradients of every layer of D. (C++ custom functions ask the engine already: their
    `ctx->needs_input_grad` is `task_should_compute_output`.)"""
    needs = tuple(ctx.needs_input_grad[:len(tensors)])
    if not any(needs) or torch.compiler.is_compiling():  # a traced backward (compiled autograd, dynamo):
        return needs                                     # no engine to ask while tracing
    out = []
    for i, need in enumerate(needs):
        if need:
            try:
                node = ctx.next_functions[sum(map(bool, tensors[:i]))][0]
                need = node is None or bool(torch._C._will_engine_execute_node(node))
            except (AttributeError, RuntimeError, IndexError):  # another PyTorch, or not inside an engine's
                need = True                                     # pass: keep it
        out.append(need)
    return tuple(out)


def own_saved_tensors_hooks():
    """Identity saved-tensor hooks, for timing runs made inside the user's forward (the CPU paths' per-shape
    measurements): activation checkpointing's hooks (torch.utils.checkpoint, use_reentrant=False) would
    otherwise count the timing runs' saved tensors as the forward's and refuse the recomputation."""
    if torch._C._autograd._saved_tensors_hooks_is_enabled():
        return torch.autograd.graph.saved_tensors_hooks(lambda a: a, lambda a: a)
    return contextlib.nullcontext()
