"""Fake (meta) implementations of the compiled ops, so that they trace under torch.compile.

The schemas and the CPU/CUDA kernels come from the C++ extension (csrc/); this module is imported
only once `rgkernels._C` has loaded.
"""
import torch

from . import reference

for _name, _fake in (
    ("masked_weight_fwd", reference.fake_fwd),
    ("masked_weight_bwd", reference.fake_bwd),
    ("masked_weight_grouped_fwd", reference.fake_grouped_fwd),
    ("masked_weight_grouped_bwd", reference.fake_grouped_bwd),
    ("masked_linear_bwd", reference.fake_linear_bwd),
):
    torch.library.register_fake(f"rgkernels::{_name}")(_fake)
