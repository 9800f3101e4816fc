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
