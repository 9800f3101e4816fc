"""Benchmarks: `pytest benchmarks/ --benchmark-only` (add --benchmark-json=FILE to keep results).

Without a GPU, Triton runs under the interpreter, far too slowly to benchmark: the Triton cases
are skipped then, as are the CUDA ones. Timings on shared machines are noisy: compare the cases of
one run as ratios (BENCHMARKS.md), never across runs or machines.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchutil, shapes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Some benchmarks pin torch's thread count (the paired CPU ones run on one thread): later files
    get the count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
