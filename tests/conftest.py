"""Shared test set-up.

Without a CUDA device, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be set
before triton is imported, hence here). Tests marked `gpu` are skipped without a device.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def cpu_gemm(name):
    """Runs the CPU masked linear's GEMMs on "aten" or "ukernel" (rgkernels._C.set_cpu_gemm) inside."""
    from rgkernels import _backend

    ext = _backend.extension()
    if ext is None:
        yield
        return
    before = ext.cpu_gemm()
    ext.set_cpu_gemm(name)
    try:
        yield
    finally:
        ext.set_cpu_gemm(before)


def cpu_gemms():
    """GEMM paths of the CPU masked linear this machine can run."""
    from rgkernels import _backend

    ext = _backend.extension()
    if ext is None:
        return ["aten"]
    return ["ukernel", "aten"] if ext.cpu_gemm_reason() in ("", "RGKERNELS_CPU_GEMM=aten") else ["aten"]
