"""Which implementation runs each op: loading the compiled extension, the fallback order, overrides.

Backends, in order of preference per device:
  CUDA tensors: "cuda" (compiled, csrc/cuda) -> "triton" -> "reference"
  CPU tensors:  "cpu"  (compiled, csrc/cpu)  -> "reference"
("triton" also runs CPU tensors under TRITON_INTERPRET=1, when asked for explicitly; that is how
its kernels are tested without a GPU.)

Overrides, strongest first: the `backend=` argument of an op, `rgkernels.use_backend(name)`
(a context manager), the environment variable RGKERNELS_BACKEND. Falling back from the preferred
backend always prints a one-line warning, once per reason.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (see README)"

_state = threading.local()
_warned: set = set()


class RGKernelsWarning(UserWarning):
    """A fast path is unavailable and a slower one is used instead."""


def warn_once(key: str, message: str) -> None:
    if torch.compiler.is_compiling():
        # Dynamo cannot put warnings.warn in a graph (fullgraph=True fails on it): issued while tracing,
        # when the choice it reports is made for the graph, by a callback that dynamo runs then.
        from torch._dynamo.comptime import comptime

        comptime(_warn_while_tracing)
        return
    _warn(key, message, stacklevel=4)


def _warn(key: str, message: str, stacklevel: int) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RGKernelsWarning, stacklevel=stacklevel)


def _warn_while_tracing(ctx) -> None:  # (no free variables: dynamo reads warn_once's locals)
    _warn(ctx.get_local("key").as_python_constant(), ctx.get_local("message").as_python_constant(), stacklevel=2)


# ---- the compiled extension ------------------------------------------------------------------

_ext = None
_ext_error: Optional[str] = None


def _load_extension() -> None:
    global _ext, _ext_error
    if os.environ.get("RGKERNELS_DISABLE_EXTENSION", "0") == "1":
        _ext_error = "disabled by RGKERNELS_DISABLE_EXTENSION=1"
        return
    try:  # registers torch.ops.rgkernels.masked_weight_* (CPU, and CUDA where built)
        # torch first: _C links against libc10 / libtorch, which only importing torch loads. Without
        # this, `import rgkernels` before `import torch` (as `python -m rgkernels.info` does) failed
        # with "libc10.so: cannot open shared object file" and every op fell back to the reference.
        import torch  # noqa: F401

        _ext = importlib.import_module(f"{__package__}._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        _ext_error = f"{type(exc).__name__}: {exc}".splitlines()[0]


def extension():
    """The loaded `rgkernels._C` module, or None."""
    return _ext


def extension_error() -> Optional[str]:
    return _ext_error


def build_info() -> Dict:
    return dict(_ext.build_info()) if _ext is not None else {}


# ---- availability ----------------------------------------------------------------------------

def _cuda_kernels_built() -> bool:
    return _ext is not None and bool(build_info().get("cuda"))


def availability(backend: str, device_type: str) -> Tuple[bool, str]:
    """Can `backend` run tensors on `device_type`? Returns (ok, reason when not)."""
    import torch

    if backend == "reference":
        return True, ""
    if backend == "cpu":
        if device_type != "cpu":
            return False, "the compiled CPU kernels take CPU tensors"
        return (_ext is not None, "" if _ext is not None else f"compiled extension unavailable ({_ext_error})")
    if backend == "cuda":
        if device_type != "cuda":
            return False, "the compiled CUDA kernels take CUDA tensors"
        if _ext is None:
            return False, f"compiled extension unavailable ({_ext_error})"
        if not _cuda_kernels_built():
            return False, "the extension was built without CUDA kernels"
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, ""
    if backend == "triton":
        try:
            from .ops import _triton_util, triton_masked_weight
        except Exception as exc:  # triton missing or broken: report, never crash
            return False, f"Triton backend failed to import ({type(exc).__name__}: {exc})".splitlines()[0]
        ok, why = triton_masked_weight.available()
        if ok and device_type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device"
        if ok and device_type == "cpu" and not _triton_util.env_interpret():
            return False, "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if ok and device_type not in ("cpu", "cuda"):
            return False, f"Triton does not run {device_type} tensors"
        return ok, why
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


# ---- selection -------------------------------------------------------------------------------

@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend ("cuda", "triton", "cpu", "reference") inside a `with` block (None = auto)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    old = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = old


def _requested(explicit: Optional[str]) -> Optional[str]:
    name = explicit or getattr(_state, "forced", None) or env("RGKERNELS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (from backend=, use_backend() or "
                         f"RGKERNELS_BACKEND); choose one of {BACKENDS}")
    return name


# The automatic choice per device type, with the extension it was made with: it cannot change while
# that stays loaded (CUDA's availability is fixed per process), and choose() runs in every masked
# forward, where the availability checks (build_info, torch.cuda.is_available) cost microseconds.
_auto_choice: Dict[str, Tuple[object, str]] = {}


def choose(device_type: str, explicit: Optional[str] = None) -> str:
    """The backend that will run tensors of `device_type`."""
    requested = _requested(explicit)
    if requested is not None:
        ok, why = availability(requested, device_type)
        if not ok:
            raise RuntimeError(f"rgkernels: backend {requested!r} cannot run {device_type} tensors: {why}")
        return requested
    if torch.compiler.is_compiling():  # the cache filled while tracing would recompile the graph once
        return _choose_auto(device_type)
    hit = _auto_choice.get(device_type)
    if hit is not None and hit[0] is _ext:
        return hit[1]
    name = _choose_auto(device_type)
    _auto_choice[device_type] = (_ext, name)
    return name


def _choose_auto(device_type: str) -> str:
    order = PREFERENCE.get(device_type, ("reference",))
    skipped: List[str] = []
    for name in order:
        ok, why = availability(name, device_type)
        if ok:
            if skipped:
                warn_once(f"{device_type}:{name}",
                          f"rgkernels: {'; '.join(skipped)}; using the {name} backend for "
                          f"{device_type} tensors. To get the compiled kernels, {BUILD_HINT}.")
            return name
        skipped.append(f"{name} backend unavailable ({why})")
    return "reference"  # unreachable: the reference is always available


# Per-forward reads of the RGKERNELS_* variables go straight to os.environ's own dict of encoded
# entries where CPython has one (os.environ.get encodes the key and decodes the value: ~1 us, and
# the masked layers ask in every forward). Changes through os.environ / monkeypatch are seen.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env(name: str) -> Optional[str]:
    """os.environ.get(name), cheaply."""
    if _ENV_DATA is None:
        return os.environ.get(name)
    v = _ENV_DATA.get(name.encode())
    return None if v is None else os.fsdecode(v)


def reference_forced() -> bool:
    """Whether the reference backend is asked for (use_backend("reference") or RGKERNELS_BACKEND): the
    masked layers then also run the plain composition instead of their other CPU shortcuts."""
    return _requested(None) == "reference"


def cpu_kernels_chosen() -> bool:
    """`choose("cpu") == "cpu"`, cheaply in the common case (extension loaded, nothing forced): the
    masked layers ask once per forward."""
    if _ext is not None and getattr(_state, "forced", None) is None and not env("RGKERNELS_BACKEND"):
        return True
    return choose("cpu") == "cpu"


def report() -> List[Dict]:
    """One row per device type: which backends are available and which one is used."""
    rows = []
    for device_type in ("cpu", "cuda"):
        avail = {name: availability(name, device_type) for name in BACKENDS}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                chosen = choose(device_type)
            except Exception as exc:  # an invalid RGKERNELS_BACKEND, say
                chosen = f"error: {exc}"
        rows.append({"device": device_type, "available": avail, "chosen": chosen})
    return rows


_load_extension()
