"""Shared plumbing of the sparse-execution Triton kernels (triton_mask_stats, triton_masked_linear,
triton_masked_conv): lazy JIT (so TRITON_INTERPRET is read at first use), device checks, the
tl.dot precision rule, block-size helpers, the argument checks and partial-sum reduction both GEMM
modules share, and the small @triton.jit helpers the linear and implicit-GEMM conv kernels use, so
each piece of tile math is written once: the mask prologue and the weight-gradient epilogue of
DESIGN.md §2, the in_perm compaction lookups and the tile swizzle. The kernels keep their own index
math (rows / columns of a linear layer vs im2col addresses).

The helpers are plain functions here; each kernel module copies them into its own globals and
`triton.jit`s them together with its kernels (a kernel finds its helpers through its module's
globals, both compiled and in the interpreter).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

try:  # keep the module importable without Triton
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as _e:  # ImportError, or a broken install
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


class LazyKernels:
    """`triton.jit`s the named plain functions of a module's globals once, on first use."""

    def __init__(self, module_globals: Dict, names: Iterable[str],
                 jit_kwargs: Optional[Dict[str, Dict]] = None) -> None:
        self._g = module_globals
        self._names = tuple(names)
        self._kw = jit_kwargs or {}
        self._lock = threading.Lock()
        self.interpreted: Optional[bool] = None  # None: not built yet

    def build(self) -> bool:
        if self.interpreted is None:
            with self._lock:
                if self.interpreted is None:
                    for name in self._names:
                        self._g[name] = triton.jit(self._g[name], **self._kw.get(name, {}))
                    self.interpreted = type(self._g[self._names[-1]]).__name__ == "InterpretedFunction"
        return self.interpreted

    def interpreting(self) -> bool:
        if torch.compiler.is_compiling():  # no guard on `interpreted`, which the first run sets: a recompile
            return env_interpret()
        return self.interpreted if self.interpreted is not None else env_interpret()


def available(kernels: LazyKernels) -> Tuple[bool, str]:
    if triton is None:
        return False, f"triton cannot be imported ({TRITON_IMPORT_ERROR})"
    if kernels.interpreting():
        return True, "TRITON_INTERPRET=1: the kernels run in the Triton interpreter on CPU tensors"
    if torch.cuda.is_available():
        return True, f"Triton {triton.__version__} on CUDA"
    return False, "no CUDA device, and TRITON_INTERPRET=1 is not set"


def require(kernels: LazyKernels, device: torch.device, op: str) -> bool:
    """Builds the kernels; raises a clear error when they cannot run on `device`; returns the
    interpreter flag."""
    if triton is None:
        raise RuntimeError(f"{op}: triton cannot be imported ({TRITON_IMPORT_ERROR})")
    interp = kernels.build()
    if interp:
        if device.type != "cpu":
            raise RuntimeError(f"{op}: under TRITON_INTERPRET=1 the kernels take CPU tensors, got {device}")
    elif device.type != "cuda":
        raise RuntimeError(f"{op}: tensors on {device} need TRITON_INTERPRET=1 (set before the first call); "
                           "compiled kernels need CUDA tensors")
    return interp


def device_ctx(device: torch.device):
    """Make `device` current for a launch on CUDA; nothing to do for CPU tensors (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _fp32_precision(getters, legacy) -> str:
    for get in getters:
        try:
            v = get()
        except Exception:  # an older torch without the setting
            v = None
        if v in ("tf32", "ieee"):
            return v
    try:
        return "tf32" if legacy() else "ieee"
    except RuntimeError:  # torch refuses the legacy flag after the new API was used
        return "ieee"


def dot_precision(kind: str) -> str:
    """tl.dot `input_precision` for float32 operands, following what the ATen op would do: TF32 for
    F.linear (cuBLAS) only when enabled (torch.backends.cuda.matmul.fp32_precision = "tf32", or the
    legacy allow_tf32; off by default: full "ieee" float32), for F.conv2d (cuDNN) when
    torch.backends.cudnn.conv.fp32_precision is "tf32" (the default; legacy cudnn.allow_tf32).
    The new per-operator setting wins, then its parents, then the legacy flag. fp16 / bf16 operands
    ignore it (tensor cores with float32 accumulation)."""
    b = torch.backends
    top = lambda: getattr(b, "fp32_precision", None)  # noqa: E731
    if kind == "conv":
        return _fp32_precision((lambda: b.cudnn.conv.fp32_precision, lambda: b.cudnn.fp32_precision, top),
                               lambda: b.cudnn.allow_tf32)
    return _fp32_precision((lambda: b.cuda.matmul.fp32_precision, top), lambda: b.cuda.matmul.allow_tf32)


def np2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def clamp_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, np2(max(1, n))))


def check_float32_vector(t, n: int, name: str, op: str) -> None:
    if t.dtype != torch.float32 or t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{op}: {name} must be float32 of shape [{n}], got {t.dtype} {tuple(t.shape)}")


def check_index(t, n: int, name: str, op: str) -> None:
    if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] < n:
        raise ValueError(f"{op}: {name} must be int32 with at least {n} entries, got {t.dtype} {tuple(t.shape)}")


def check_compaction(in_perm, in_nlive, n_in: int, op: str) -> bool:
    """Checks the optional input-channel compaction (`in_perm` over `n_in` input channels, and
    `in_nlive`) of a GEMM op; returns whether it is given (the kernels' K_COMPACT)."""
    if (in_perm is None) != (in_nlive is None):
        raise ValueError(f"{op}: in_perm and in_nlive go together")
    if in_perm is None:
        return False
    check_index(in_perm, n_in, "in_perm", op)
    check_index(in_nlive, 1, "in_nlive", op)
    return True


def sum_partials(gtp, cntp):
    """(grad_threshold, counts) from a weight-gradient kernel's [column tiles, C] partial sums:
    summed in a fixed order afterwards (deterministic, no atomics); one tile is the result itself."""
    if gtp.shape[0] == 1:
        return gtp[0], cntp[0]
    return gtp.sum(0), cntp.sum(0, dtype=torch.int32)


# =============================================================================================
# @triton.jit helpers (plain functions; each kernel module jits its own copies)
# =============================================================================================

# The calls are inlined (same TTIR as the code written out), but with line info, Triton's default,
# each inlined call leaves labels in the PTX that can change ptxas's instruction scheduling. When
# _compact_count / _compact_index replaced their inline copies, the sm_90 SASS of the linear and conv
# GEMM kernels stayed identical (120 launch configurations); a helper for the two-line executed-FLOP
# counter changed the schedule of some, so that counter stays written out in each kernel.

if triton is not None:

    def _mask_prologue(w, t, DOT_DT: tl.constexpr):
        """W * S(|W| - t) of a weight tile (rows = output channels along axis 0), in the dot dtype.

        x = |W| - t is formed in float32, so the mask is exactly the reference's; W * M is a
        multiplication (NaN * 0 = NaN, like the reference), exact in any dtype (M is 0 or 1)."""
        wf = w.to(tl.float32)
        keep = (tl.abs(wf) - t[:, None]) > 0
        return (wf * keep.to(tl.float32)).to(DOT_DT)

    def _wgrad_epilogue(acc, w, t, inb, MODE: tl.constexpr, WDT: tl.constexpr):
        """DESIGN.md §2 on a tile of dL/dW_hat (`acc`, float32, rows = output channels):
        returns (masked weight gradient in float32, the tile's part of -sum_j g W H'(x) per row,
        the tile's keep counts per row). `inb` masks the tile's valid entries (others load w = 0
        and must contribute nothing). g is first rounded to the weight dtype WDT: the ATen
        composition materialises dL/dW_hat in that dtype before the masked-weight backward."""
        g = acc.to(WDT).to(tl.float32)
        wf = w.to(tl.float32)
        x = tl.abs(wf) - t[:, None]
        ax = tl.abs(x)
        h = tl.where(ax <= 0.4, 2.0 - 4.0 * ax, tl.where(ax <= 1.0, 0.4, 0.0))
        gt_part = tl.sum(tl.where(inb, g * wf * h, 0.0), axis=1)
        keep = (x > 0) & inb
        m = keep.to(tl.float32)
        if MODE == 0:
            gw = m * g * (1.0 + tl.abs(wf) * h)
        else:
            gw = m * g
        return gw, -gt_part, tl.sum(keep.to(tl.int32), axis=1)

    def _compact_count(KNL, n, K_COMPACT: tl.constexpr):
        """How many input channels a kernel reduces over / produces: in_nlive[0] with compaction
        (read on the device: no host sync), else all n."""
        if K_COMPACT:
            n = tl.load(KNL)
        return n

    def _compact_index(KPERM, pos, mask, K_COMPACT: tl.constexpr):
        """Input channel (int32) at each position `pos` of the compacted order: in_perm[pos] with
        compaction (lanes off `mask` read channel 0), else pos itself. Callers widen it to int64
        for addressing where they need it (the conv forward does so at each use)."""
        if K_COMPACT:
            ch = tl.load(KPERM + pos, mask=mask, other=0)
        else:
            ch = pos
        return ch

    def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """Program id -> (tile m, tile n), GROUP_M row tiles at a time (L2 reuse of the n operand)."""
        width = GROUP_M * num_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        return pid_m, pid_n

    HELPERS: Dict[str, Callable] = {
        "_mask_prologue": _mask_prologue,
        "_wgrad_epilogue": _wgrad_epilogue,
        "_compact_count": _compact_count,
        "_compact_index": _compact_index,
        "_swizzle": _swizzle,
    }
else:  # pragma: no cover
    HELPERS = {}


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
