"""Shared test set-up.

Without a CUDA device, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be set
before triton is imported, hence here). Tests marked `gpu` are skipped without a device.
"""
import contextlib
import os
import sys

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


def triton_missing(why: str):
    """Triton (with its NVIDIA backend and ptxas, which its Linux wheels ship) is a dependency on Linux
    (pyproject.toml): there a missing part fails the test (a broken install must not pass as skipped
    tests); elsewhere it skips it."""
    if sys.platform.startswith("linux"):
        pytest.fail(f"{why} (Triton is a dependency on Linux: pip install -e .)")
    pytest.skip(why)


@pytest.fixture
def triton_required():
    """For the Triton tests: fails or skips them (triton_missing) when Triton cannot run."""
    from rgkernels.ops import triton_masked_linear as TL

    ok, why = TL.available()
    if not ok:
        triton_missing(f"Triton unavailable: {why}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_decision_cache_left():
    """A TrainingRun points the kernel decisions at its run directory's file (process-wide); a later test
    must not read the decisions of an earlier test's run."""
    yield
    from rgkernels import sparse_exec

    if sparse_exec._CACHE_PATH is not None:
        sparse_exec.set_decision_cache(None)
        sparse_exec.clear_decisions()


@pytest.fixture(autouse=True, scope="session")
def _full_fp32_on_gpu():
    """On a GPU, float32 convolutions in full precision (cuDNN and the Triton conv kernels follow the
    same setting): the tests compare paths at float32 tolerances, which TF32 rounding would exceed."""
    if not torch.cuda.is_available():
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old, conv.fp32_precision = conv.fp32_precision, "ieee"
        yield
        conv.fp32_precision = old
    else:  # older PyTorch
        old, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
        yield
        torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(autouse=True, scope="session")
def _pinned_cpu_gemm():
    """The CPU masked linear's GEMM path pinned to the build's default, so that no result depends on a
    timing; the tests of the per-shape measurement unpin it (cpu_gemm("auto"))."""
    with cpu_gemm(cpu_gemms()[0]):
        yield


@contextlib.contextmanager
def _extension_setting(getter, setter, value):
    """Sets one run-time switch of rgkernels._C (e.g. set_cpu_gemm) inside, restores it after."""
    from rgkernels import _backend

    ext = _backend.extension()
    if ext is None:
        yield
        return
    before = getattr(ext, getter)()
    getattr(ext, setter)(value)
    try:
        yield
    finally:
        getattr(ext, setter)(before)


def cpu_gemm(name):
    """Runs the CPU masked linear's GEMMs on "aten" or "ukernel" inside (pinned), or unpinned ("auto":
    measured per layer shape)."""
    return _extension_setting("cpu_gemm", "set_cpu_gemm", name)


def cpu_isa(name):
    """Runs the CPU row kernels' instruction-set variant `name` inside."""
    return _extension_setting("cpu_isa", "set_cpu_isa", name)


def cpu_gemms():
    """GEMM paths of the CPU masked linear this machine can run."""
    from rgkernels import _backend

    ext = _backend.extension()
    if ext is None:
        return ["aten"]
    return ["ukernel", "aten"] if ext.cpu_gemm_reason() in ("", "RGKERNELS_CPU_GEMM=aten") else ["aten"]


def backward(loss, compiled: bool) -> None:
    """loss.backward(), plainly or under compiled autograd (the backward graph through torch.compile, which
    refuses some node constructs that the plain engine accepts)."""
    if not compiled:
        loss.backward()
        return
    import torch._dynamo.compiled_autograd as ca

    torch._dynamo.reset()
    with ca._enable(torch.compile(backend="eager")):
        loss.backward()
