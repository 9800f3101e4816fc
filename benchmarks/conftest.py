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


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions and the GPU in every --benchmark-json file (benchmarks/report.py prints them): a result is
    only worth keeping with the device, torch / Triton versions and the kernels' build it was measured on."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure: record why
        triton_version = f"unavailable ({type(exc).__name__})"
    from rgkernels import _backend

    ext = _backend.extension()
    machine_info["rgkernels"] = {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": ("not built (reference / Triton paths only)" if ext is None else
                      "compiled, with CUDA kernels" if _backend.build_info().get("cuda") else "compiled, CPU kernels only"),
    }
