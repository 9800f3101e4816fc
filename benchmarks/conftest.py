"""Benchmarks: `pytest benchmarks/ --benchmark-only` (add --benchmark-json=FILE to keep results).

Without a GPU, Triton runs under the interpreter, far too slowly to benchmark: the Triton cases
are skipped then, as are the CUDA ones. Timings on shared machines are noisy: compare the cases of
one run as ratios (BENCHMARKS.md), never across runs or machines.
"""
import torch
import pytest


def devices():
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _no_grad_leak():
    torch.manual_seed(0)
    yield
