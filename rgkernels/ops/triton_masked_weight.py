"""Triton backend of the masked-weight op (DESIGN.md §2).

Four ops in the `rgkernels` namespace, with the signatures and semantics of the reference ops
in `rgkernels/ops/reference.py` (and the schemas of `csrc/ops.cpp`):

    rgkernels::triton_masked_weight_fwd(weight, threshold(a!), guard_ratio) -> (out, keep_counts)
    rgkernels::triton_masked_weight_bwd(grad, weight, threshold, grad_mode) -> (grad_weight, grad_threshold)
    rgkernels::triton_masked_weight_grouped_fwd(weights, thresholds(a!), guard_ratio) -> (flat_out, flat_counts)
    rgkernels::triton_masked_weight_grouped_bwd(grads, weights, thresholds, grad_mode) -> (gws, gts)

The grouped forward takes layers of ONE dtype and returns one flat buffer with every masked weight
(layer after layer, each a contiguous [C_i*K_i] block) and one flat int32 buffer of keep counts
([sum C_i]), like the reference (a mutating op may not return lists under torch.compile). The
grouped backward returns lists and accepts mixed dtypes (one launch per dtype).

Every op is ONE kernel launch, with no host synchronisation:

* Weights and grads are 2-D [C, K] views with arbitrary strides; the strides go to the kernel,
  nothing is copied. Outputs are contiguous. x = |W| - t is computed in float32 (float64 for
  float64 weights), so the mask is exact; all arithmetic is done in that compute dtype and only
  the stored result is cast to the weight dtype (this also keeps bfloat16 correct in the
  Triton interpreter, which stores bf16 as raw uint16 and cannot do arithmetic on it).

* Collapse guard, in the same launch. Each program handles BLOCK_C rows of one layer and
  loops over K. When the guard is on, it atomically adds its kept count to the layer's
  workspace total and then takes a ticket (atomic add, acq_rel, after a CTA barrier so that all
  of the program's stores are ordered before it). The program that draws the last ticket reads
  (and resets) the total, and if (double)total / numel <= guard_ratio it zeroes the layer's
  threshold and rewrites the whole layer's out / counts with t = 0. The floating-point test is
  turned on the host into an exact integer bound `kmax` (the largest kept count that collapses,
  see `_collapse_limit`), so the kernel compares int64s and needs no float64 arguments.

* Workspace: a cached int64 buffer per (device, stream) holding (total, ticket) per layer,
  zero-initialised once; the last program of each layer resets its two slots to zero, so the
  buffer is clean after every launch and no per-call memset launch is needed (a fresh zeroed
  tensor per call would cost one extra launch per op, which is what this backend avoids on small,
  launch-bound layers). Launches on one stream are ordered, so reuse is safe; different streams
  get different buffers. If a launch raises, the cached buffer is dropped. While a CUDA graph is
  being captured, a fresh zero-filled workspace is allocated instead (the fill is captured too,
  so each replay starts from zero), and the pinned host metadata of captured grouped launches is
  kept alive for the replays. (Graph capture is untested: no GPU was available when this was
  written; the kernels were compiled for sm_90 offline and run in the interpreter.)

* Grouped ops: per-layer metadata (data pointers as int64, C, K, strides, first program,
  number of programs, collapse bound) goes in one small int64 tensor (pinned + non-blocking
  copy on CUDA, so no host sync). Program `pid` finds its layer with one vector load of the
  layers' first-program indices and a count of those <= pid (the prefix sum of row blocks is
  computed on the host from the shapes), then casts the layer's pointers with
  `.to(tl.pointer_type(...))`. The same kernel runs under TRITON_INTERPRET=1: the interpreter
  treats int-to-pointer casts as bit casts and dereferences raw host addresses, which are
  valid for CPU tensors (CUDA tensors under the interpreter are refused for the grouped ops,
  since their addresses are device addresses).

Interpreter caveat: the Triton interpreter converts float32 to bfloat16 by truncation (compiled
kernels round to nearest even), so under TRITON_INTERPRET=1 bfloat16 gradients can differ from
the reference by one bf16 ulp; bfloat16 forward outputs are exact either way (W * {0, 1}).

Kernels are `triton.jit`-ed on first use (not at import), so TRITON_INTERPRET is read when an op
first runs, and this module imports without Triton (`available()` says why it cannot run).
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference as _ref
from ._triton_util import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR
from ._triton_util import LazyKernels, device_ctx, env_interpret
from ._triton_util import np2 as _np2
from ._triton_util import tl, triton  # None without Triton: the module stays importable

__all__ = [
    "available",
    "triton_masked_weight_fwd",
    "triton_masked_weight_bwd",
    "triton_masked_weight_grouped_fwd",
    "triton_masked_weight_grouped_bwd",
]

GRAD_MODES = _ref.GRAD_MODES

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ---- metadata layout of the grouped kernels (one int64 row of _NF fields per layer) -----------
_F_START = 0  # first program id of the layer
_F_NBLK = 1  # number of programs (row blocks) of the layer
_F_C = 2
_F_K = 3
_F_W = 4  # weight pointer
_F_SWC = 5
_F_SWK = 6
_F_T = 7  # threshold pointer
_F_ST = 8
_F_O = 9  # fwd: out pointer          bwd: grad_weight pointer
_F_O2 = 10  # fwd: keep-counts pointer  bwd: grad_threshold pointer
_F_KMAX = 11  # fwd: collapse bound
_F_G = 12  # bwd: grad pointer
_F_SGC = 13
_F_SGK = 14
_NF = 16  # padded


# =============================================================================================
# Triton kernels. Defined as plain functions here and wrapped with triton.jit by
# `_build_kernels()` on first use (the wrapped objects replace these globals, which is how the
# kernels find their helpers both when compiled and in the interpreter).
# =============================================================================================

if triton is not None:
    _F_START_C = tl.constexpr(_F_START)
    _F_NBLK_C = tl.constexpr(_F_NBLK)
    _F_C_C = tl.constexpr(_F_C)
    _F_K_C = tl.constexpr(_F_K)
    _F_W_C = tl.constexpr(_F_W)
    _F_SWC_C = tl.constexpr(_F_SWC)
    _F_SWK_C = tl.constexpr(_F_SWK)
    _F_T_C = tl.constexpr(_F_T)
    _F_ST_C = tl.constexpr(_F_ST)
    _F_O_C = tl.constexpr(_F_O)
    _F_O2_C = tl.constexpr(_F_O2)
    _F_KMAX_C = tl.constexpr(_F_KMAX)
    _F_G_C = tl.constexpr(_F_G)
    _F_SGC_C = tl.constexpr(_F_SGC)
    _F_SGK_C = tl.constexpr(_F_SGK)
    _NF_C = tl.constexpr(_NF)

    def _fwd_rows(W, T, OUT, CNT, r0, C, K, s_wc, s_wk, s_t,
                  ZERO_T: tl.constexpr, UNIT_K: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, CDT: tl.constexpr):
        """Mask rows [r0, r0 + BLOCK_C): writes out and counts, returns the rows' kept total.

        ZERO_T: use t = 0 and store 0 into the threshold (the collapse-guard rewrite).
        """
        rows = r0 + tl.arange(0, BLOCK_C)
        rmask = rows < C
        rows64 = rows.to(tl.int64)
        if ZERO_T:
            t = tl.zeros([BLOCK_C], dtype=CDT)
            tl.store(T + rows64 * s_t, tl.zeros([BLOCK_C], dtype=tl.float32), mask=rmask)
        else:
            t = tl.load(T + rows64 * s_t, mask=rmask, other=0.0).to(CDT)
        w_rows = W + rows64[:, None] * s_wc
        o_rows = OUT + rows64[:, None] * K
        cnt = tl.zeros([BLOCK_C], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            inb = rmask[:, None] & (cols < K)[None, :]
            if UNIT_K:
                w_off = cols[None, :]
            else:
                w_off = cols[None, :] * s_wk
            wf = tl.load(w_rows + w_off, mask=inb, other=0.0).to(CDT)
            keep = ((tl.abs(wf) - t[:, None]) > 0) & inb
            # W * M as a multiplication (NaN * 0 = NaN, like the reference), in the compute dtype
            tl.store(o_rows + cols[None, :], (wf * keep.to(CDT)).to(OUT.dtype.element_ty), mask=inb)
            cnt += tl.sum(keep.to(tl.int32), axis=1)
        tl.store(CNT + rows64, cnt, mask=rmask)
        return tl.sum(cnt.to(tl.int64), axis=0)

    def _fwd_block(W, T, OUT, CNT, WS, blk, nblk, C, K, s_wc, s_wk, s_t, kmax,
                   UNIT_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                   CDT: tl.constexpr):
        """Row block `blk` of a layer split into `nblk` blocks, plus the collapse guard.

        WS points to the layer's two int64 workspace slots: (kept total, ticket).
        kmax < 0: guard off. Otherwise the layer collapses iff its kept total <= kmax.
        """
        kept = _fwd_rows(W, T, OUT, CNT, blk * BLOCK_C, C, K, s_wc, s_wk, s_t,
                         False, UNIT_K, BLOCK_C, BLOCK_K, CDT)
        if kmax >= 0:
            tl.atomic_add(WS, kept, sem="relaxed")
            # every thread's stores of this program happen before the ticket's release
            tl.debug_barrier()
            ticket = tl.atomic_add(WS + 1, 1, sem="acq_rel")
            if ticket == nblk - 1:
                # last program of the layer: all others have added their counts and finished
                # writing; read the total and leave the workspace zeroed for the next launch
                total = tl.atomic_xchg(WS, 0, sem="acq_rel")
                tl.atomic_xchg(WS + 1, 0, sem="relaxed")
                tl.debug_barrier()
                if total <= kmax:
                    for r0 in range(0, C, BLOCK_C):
                        _fwd_rows(W, T, OUT, CNT, r0, C, K, s_wc, s_wk, s_t,
                                  True, UNIT_K, BLOCK_C, BLOCK_K, CDT)

    def _bwd_rows(G, W, T, GW, GT, r0, C, K, s_gc, s_gk, s_wc, s_wk, s_t,
                  MODE: tl.constexpr, UNIT_K: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, CDT: tl.constexpr):
        rows = r0 + tl.arange(0, BLOCK_C)
        rmask = rows < C
        rows64 = rows.to(tl.int64)
        t = tl.load(T + rows64 * s_t, mask=rmask, other=0.0).to(CDT)
        g_rows = G + rows64[:, None] * s_gc
        w_rows = W + rows64[:, None] * s_wc
        o_rows = GW + rows64[:, None] * K
        acc = tl.zeros([BLOCK_C], dtype=CDT)
        for k0 in range(0, K, BLOCK_K):
            cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            inb = rmask[:, None] & (cols < K)[None, :]
            if UNIT_K:
                w_off = cols[None, :]
                g_off = cols[None, :]
            else:
                w_off = cols[None, :] * s_wk
                g_off = cols[None, :] * s_gk
            w = tl.load(w_rows + w_off, mask=inb, other=0.0).to(CDT)
            g = tl.load(g_rows + g_off, mask=inb, other=0.0).to(CDT)
            x = tl.abs(w) - t[:, None]
            ax = tl.abs(x)
            # H'(x) in CDT
            # (the 0.4 plateau as a CDT constant: a bare 0.4 in tl.where would be a float32 one)
            h = tl.where(ax <= 0.4, 2.0 - 4.0 * ax,
                         tl.where(ax <= 1.0, tl.full([BLOCK_C, BLOCK_K], 0.4, CDT), 0.0))
            acc += tl.sum(g * w * h, axis=1)  # out-of-bounds lanes load g = w = 0
            m = (x > 0).to(CDT)
            if MODE == 0:
                gw = m * g * (1.0 + tl.abs(w) * h)
            else:
                gw = m * g
            tl.store(o_rows + cols[None, :], gw.to(GW.dtype.element_ty), mask=inb)
        tl.store(GT + rows64, (-acc).to(tl.float32), mask=rmask)

    # ---- entry points ------------------------------------------------------------------------

    def _k_fwd(W, T, OUT, CNT, WS, C, K, s_wc, s_wk, s_t, kmax,
               BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, CDT: tl.constexpr):
        # a unit stride is specialised by the JIT on its own (integer arguments equal to 1)
        _fwd_block(W, T, OUT, CNT, WS, tl.program_id(0), tl.num_programs(0), C, K,
                   s_wc, s_wk, s_t, kmax, False, BLOCK_C, BLOCK_K, CDT)

    def _k_bwd(G, W, T, GW, GT, C, K, s_gc, s_gk, s_wc, s_wk, s_t,
               MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
               CDT: tl.constexpr):
        _bwd_rows(G, W, T, GW, GT, tl.program_id(0) * BLOCK_C, C, K, s_gc, s_gk, s_wc, s_wk, s_t,
                  MODE, False, BLOCK_C, BLOCK_K, CDT)

    def _layer_of_program(META, n_layers, LP: tl.constexpr):
        """(metadata row pointer, layer index, program index within the layer) of this program.

        The layers' first-program ids are strictly increasing (layers without rows are left
        out on the host), so the layer is the number of them <= pid, minus one.
        """
        pid = tl.program_id(0)
        li = tl.arange(0, LP)
        starts = tl.load(META + li * _NF_C + _F_START_C, mask=li < n_layers, other=2**62)
        layer = tl.sum((starts <= pid).to(tl.int32), axis=0) - 1
        row = META + layer.to(tl.int64) * _NF_C
        return row, layer, pid - tl.load(row + _F_START_C)

    def _k_grouped_fwd(META, WS, n_layers, DT: tl.constexpr, LP: tl.constexpr,
                       UNIT_K: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, CDT: tl.constexpr):
        row, layer, blk = _layer_of_program(META, n_layers, LP)
        nblk = tl.load(row + _F_NBLK_C)
        C = tl.load(row + _F_C_C)
        K = tl.load(row + _F_K_C)
        s_wc = tl.load(row + _F_SWC_C)
        s_wk = tl.load(row + _F_SWK_C)
        s_t = tl.load(row + _F_ST_C)
        kmax = tl.load(row + _F_KMAX_C)
        W = tl.load(row + _F_W_C).to(tl.pointer_type(DT))
        T = tl.load(row + _F_T_C).to(tl.pointer_type(tl.float32))
        OUT = tl.load(row + _F_O_C).to(tl.pointer_type(DT))
        CNT = tl.load(row + _F_O2_C).to(tl.pointer_type(tl.int32))
        # ALIGNED: the host checked that the pointers are 16-byte aligned and the row strides are
        # multiples of 16 bytes (VEC elements), which lets contiguous rows use vector accesses
        if ALIGNED:
            W = tl.multiple_of(W, 16)
            OUT = tl.multiple_of(OUT, 16)
            K = tl.multiple_of(K, VEC)
            s_wc = tl.multiple_of(s_wc, VEC)
        _fwd_block(W, T, OUT, CNT, WS + 2 * layer.to(tl.int64), blk, nblk, C, K,
                   s_wc, s_wk, s_t, kmax, UNIT_K, BLOCK_C, BLOCK_K, CDT)

    def _k_grouped_bwd(META, n_layers, DT: tl.constexpr, LP: tl.constexpr,
                       UNIT_K: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
                       MODE: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, CDT: tl.constexpr):
        row, layer, blk = _layer_of_program(META, n_layers, LP)
        C = tl.load(row + _F_C_C)
        K = tl.load(row + _F_K_C)
        s_wc = tl.load(row + _F_SWC_C)
        s_wk = tl.load(row + _F_SWK_C)
        s_gc = tl.load(row + _F_SGC_C)
        s_gk = tl.load(row + _F_SGK_C)
        s_t = tl.load(row + _F_ST_C)
        G = tl.load(row + _F_G_C).to(tl.pointer_type(DT))
        W = tl.load(row + _F_W_C).to(tl.pointer_type(DT))
        T = tl.load(row + _F_T_C).to(tl.pointer_type(tl.float32))
        GW = tl.load(row + _F_O_C).to(tl.pointer_type(DT))
        GT = tl.load(row + _F_O2_C).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            G = tl.multiple_of(G, 16)
            W = tl.multiple_of(W, 16)
            GW = tl.multiple_of(GW, 16)
            K = tl.multiple_of(K, VEC)
            s_wc = tl.multiple_of(s_wc, VEC)
            s_gc = tl.multiple_of(s_gc, VEC)
        _bwd_rows(G, W, T, GW, GT, blk * BLOCK_C, C, K, s_gc, s_gk, s_wc, s_wk, s_t,
                  MODE, UNIT_K, BLOCK_C, BLOCK_K, CDT)


_JIT_NAMES = ("_fwd_rows", "_fwd_block", "_bwd_rows", "_layer_of_program",
              "_k_fwd", "_k_bwd", "_k_grouped_fwd", "_k_grouped_bwd")
_KERNELS = LazyKernels(globals(), _JIT_NAMES, {"_k_fwd": {"do_not_specialize": ["kmax"]}})


def _build_kernels() -> bool:
    """triton.jit every kernel once (reading TRITON_INTERPRET now); returns the interpreter flag."""
    return _KERNELS.build()


def _interpreting() -> bool:
    return _KERNELS.interpreting()


def available() -> Tuple[bool, str]:
    """Whether the Triton ops can run in this process, and why (not)."""
    if triton is None:
        return False, f"triton cannot be imported ({_TRITON_IMPORT_ERROR})"
    if _interpreting():
        return True, ("TRITON_INTERPRET=1: the kernels run in the Triton interpreter on CPU "
                      "tensors (slow; meant for tests)")
    if torch.cuda.is_available():
        return True, f"Triton {triton.__version__} on CUDA device {torch.cuda.get_device_name()}"
    if _KERNELS.interpreted is False and env_interpret():
        return False, ("the kernels were built for a GPU (TRITON_INTERPRET was set after their "
                       "first use) and there is no CUDA device")
    return False, ("no CUDA device, and TRITON_INTERPRET=1 is not set (set it before the first "
                   "call to run the kernels in the Triton interpreter on CPU)")


def _require(device: torch.device, grouped: bool) -> bool:
    """Raise a clear error when the kernels cannot run on `device`; returns the interpreter flag."""
    if triton is None:
        raise RuntimeError(f"rgkernels Triton ops: triton cannot be imported ({_TRITON_IMPORT_ERROR})")
    interp = _build_kernels()
    if interp:
        if device.type == "cuda" and grouped:
            raise RuntimeError(
                "rgkernels Triton grouped ops: under TRITON_INTERPRET=1 the grouped kernels "
                "dereference raw data pointers on the host, so they need CPU tensors")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"rgkernels Triton ops: unsupported device {device} in the interpreter")
    elif device.type != "cuda":
        raise RuntimeError(
            f"rgkernels Triton ops: tensors on {device} need TRITON_INTERPRET=1 (set before the "
            "first call) to run in the Triton interpreter; compiled kernels need CUDA tensors")
    return interp


# =============================================================================================
# Host side: validation, block sizes, workspace, launches.
# =============================================================================================

def _check_weight_threshold(weight: Tensor, threshold: Tensor, op: str) -> None:
    if not isinstance(weight, Tensor) or not isinstance(threshold, Tensor):
        raise TypeError(f"{op}: weight and threshold must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be a 2-D [C, K] view, got {weight.dim()} dims")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{op}: weight must be floating point, got {weight.dtype}")
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: weight dtype {weight.dtype} is not supported "
                        f"(float32, float16, bfloat16, float64)")
    if threshold.dtype != torch.float32:
        raise TypeError(f"{op}: threshold must be float32, got {threshold.dtype}")
    if threshold.dim() != 1:
        raise ValueError(f"{op}: threshold must be 1-D, got shape {tuple(threshold.shape)}")
    if threshold.shape[0] != weight.shape[0]:
        raise ValueError(f"{op}: threshold has {threshold.shape[0]} entries but weight has "
                         f"{weight.shape[0]} output channels")
    if threshold.device != weight.device:
        raise ValueError(f"{op}: threshold is on {threshold.device} but weight is on {weight.device}")


def _check_grad(grad: Tensor, weight: Tensor, op: str) -> None:
    if not isinstance(grad, Tensor):
        raise TypeError(f"{op}: grad must be a tensor")
    if grad.shape != weight.shape:
        raise ValueError(f"{op}: grad has shape {tuple(grad.shape)} but weight has shape "
                         f"{tuple(weight.shape)}")
    if grad.dtype != weight.dtype:
        raise TypeError(f"{op}: grad dtype {grad.dtype} differs from weight dtype {weight.dtype}")
    if grad.device != weight.device:
        raise ValueError(f"{op}: grad is on {grad.device} but weight is on {weight.device}")


def _check_grad_mode(grad_mode: int, op: str) -> None:
    if grad_mode not in (0, 1):
        raise ValueError(f"{op}: grad_mode must be 0 (dst) or 1 (masked), got {grad_mode}")


def _collapse_limit(guard_ratio: float, numel: int) -> int:
    """Largest kept count k with (double)k / (double)numel <= guard_ratio; -1 if none / guard off.

    Correctly rounded division is monotone in k, so {k : k/numel <= r} = {0..kmax}; the bound
    reproduces the reference's float64 test exactly (Python's int / int is correctly rounded,
    like the float64 tensor division in the reference).
    """
    r = float(guard_ratio)
    if not (r >= 0.0) or numel <= 0:
        return -1
    if r >= 1.0:
        return numel
    k = min(numel, max(0, math.floor(r * numel)))
    while k < numel and (k + 1) / numel <= r:
        k += 1
    while k >= 0 and k / numel > r:
        k -= 1
    return k


# Block sizes. A program handles BLOCK_C rows of one layer and walks K in BLOCK_K steps over a
# BLOCK_C x BLOCK_K tile of _TILE elements (16 KiB of fp32 per operand: 16 elements per thread
# at 8 warps, enough bytes in flight). Rows, not K, are split across programs, so the
# threshold-gradient reduction needs no atomics and stays deterministic; K (1 to ~1e5) is looped.
#  * BLOCK_K: a power of two in [min(64, K_max), 2048] (row segments of >= 256 B for
#    coalescing when K allows; whole rows in one step up to 2048), chosen to minimise
#    (tile iterations x tile cost) + a per-program overhead summed over the layers, so that in a
#    group a few layers with long rows do not make the many-row / short-row layers (a linear
#    layer 4096 x 128, say) waste most lanes; ties go to the larger BLOCK_K (fewer iterations).
#    A tile below 1024 elements is costed as 1024 (the warps run anyway).
#  * BLOCK_C = _TILE // BLOCK_K (at most the row count), then halved while the grid has fewer
#    programs than the GPU has SMs (done per BLOCK_K candidate, before costing it): small layers
#    are launch-bound and gain nothing from fewer, bigger programs, while every SM left idle
#    lengthens a big layer's critical path.
_TILE = 4096
_MAX_BK = 2048
_MIN_BK = 16
_MIN_TILE_COST = 1024
_PROGRAM_COST = 2048  # per-program overhead, in element-lanes
_BLOCK_OVERRIDE: Optional[Tuple[int, int]] = None


@contextmanager
def _block_override(block_c: int, block_k: int):
    """Force (BLOCK_C, BLOCK_K), powers of two (tests use it to exercise multi-program paths)."""
    global _BLOCK_OVERRIDE
    old = _BLOCK_OVERRIDE
    _BLOCK_OVERRIDE = (int(block_c), int(block_k))
    try:
        yield
    finally:
        _BLOCK_OVERRIDE = old


@lru_cache(maxsize=1024)
def _pick_blocks(shapes: Tuple[Tuple[int, int], ...], n_sm: int) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_K, num_warps) for layers of the given non-empty [C, K] shapes."""
    c_max = max(c for c, _ in shapes)
    k_top = max(_MIN_BK, min(_np2(max(k for _, k in shapes)), _MAX_BK))
    bk = max(_MIN_BK, min(64, k_top))
    best = None
    while bk <= k_top:
        bc = max(1, min(_TILE // bk, _np2(c_max)))
        while bc > 1 and sum(-(-c // bc) for c, _ in shapes) < n_sm:
            bc //= 2
        progs = sum(-(-c // bc) for c, _ in shapes)
        iters = sum(-(-c // bc) * -(-k // bk) for c, k in shapes)
        cost = iters * max(bc * bk, _MIN_TILE_COST) + _PROGRAM_COST * progs
        if best is None or cost <= best[0]:
            best = (cost, bc, bk)
        bk *= 2
    _, bc, bk = best
    warps = max(1, min(8, (bc * bk) // 512))
    return bc, bk, warps


_SM_COUNT: Dict[int, int] = {}


def _blocks(shapes: Sequence[Tuple[int, int]], device: torch.device) -> Tuple[int, int, int]:
    if _BLOCK_OVERRIDE is not None:
        bc, bk = _BLOCK_OVERRIDE
        return bc, bk, max(1, min(8, (bc * bk) // 512))
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        n_sm = _SM_COUNT.get(idx)
        if n_sm is None:
            n_sm = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    else:
        n_sm = 1  # interpreter: programs run one after another, fewer is faster
    return _pick_blocks(tuple(shapes), n_sm)


_WS_LOCK = threading.Lock()
_WORKSPACES: Dict[Tuple[str, int, int], Tensor] = {}


def _ws_key(device: torch.device) -> Tuple[str, int, int]:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return ("cuda", idx, torch.cuda.current_stream(idx).cuda_stream)
    return (device.type, device.index or 0, 0)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _workspace(device: torch.device, n_layers: int) -> Tuple[Tensor, Optional[Tuple[str, int, int]]]:
    """Zeroed int64 (total, ticket) slots for n_layers layers; kernels leave them zeroed."""
    if _capturing(device):
        # CUDA graph capture: a captured zero-fill + launch, so every replay starts from zero
        # whatever happens to the cached buffers between replays
        return torch.zeros(2 * n_layers, dtype=torch.int64, device=device), None
    key = _ws_key(device)
    with _WS_LOCK:
        ws = _WORKSPACES.get(key)
        if ws is None or ws.numel() < 2 * n_layers:
            ws = torch.zeros(2 * max(n_layers, 8), dtype=torch.int64, device=device)
            _WORKSPACES[key] = ws
    return ws, key


def _drop_workspace(key) -> None:
    if key is None:
        return
    with _WS_LOCK:
        _WORKSPACES.pop(key, None)


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}[dtype]


def _cdt(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---- single layer ----------------------------------------------------------------------------

def _fwd_impl(weight: Tensor, threshold: Tensor, guard_ratio: float) -> Tuple[Tensor, Tensor]:
    op = "triton_masked_weight_fwd"
    _check_weight_threshold(weight, threshold, op)
    c, k = weight.shape
    out = torch.empty((c, k), dtype=weight.dtype, device=weight.device)
    if c == 0 or k == 0:  # nothing to launch; the guard is skipped for numel == 0
        return out, torch.zeros((c,), dtype=torch.int32, device=weight.device)
    counts = torch.empty((c,), dtype=torch.int32, device=weight.device)
    _require(weight.device, grouped=False)
    kmax = _collapse_limit(guard_ratio, c * k)
    bc, bk, warps = _blocks([(c, k)], weight.device)
    ws, key = _workspace(weight.device, 1)
    grid = (triton.cdiv(c, bc),)
    try:
        with device_ctx(weight.device):
            _k_fwd[grid](weight, threshold, out, counts, ws, c, k,
                         weight.stride(0), weight.stride(1), threshold.stride(0), kmax,
                         BLOCK_C=bc, BLOCK_K=bk, CDT=_cdt(weight.dtype), num_warps=warps)
    except BaseException:
        _drop_workspace(key)
        raise
    return out, counts


def _bwd_impl(grad: Tensor, weight: Tensor, threshold: Tensor, grad_mode: int) -> Tuple[Tensor, Tensor]:
    op = "triton_masked_weight_bwd"
    _check_weight_threshold(weight, threshold, op)
    _check_grad(grad, weight, op)
    _check_grad_mode(grad_mode, op)
    c, k = weight.shape
    gw = torch.empty((c, k), dtype=weight.dtype, device=weight.device)
    if c == 0 or k == 0:
        return gw, torch.zeros((c,), dtype=threshold.dtype, device=weight.device)
    gt = torch.empty((c,), dtype=threshold.dtype, device=weight.device)
    _require(weight.device, grouped=False)
    bc, bk, warps = _blocks([(c, k)], weight.device)
    grid = (triton.cdiv(c, bc),)
    with device_ctx(weight.device):
        _k_bwd[grid](grad, weight, threshold, gw, gt, c, k,
                     grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1),
                     threshold.stride(0), MODE=int(grad_mode), BLOCK_C=bc, BLOCK_K=bk,
                     CDT=_cdt(weight.dtype), num_warps=warps)
    return gw, gt


# ---- grouped ---------------------------------------------------------------------------------

def _check_group(lists: Sequence[Sequence[Tensor]], names: Sequence[str], op: str) -> torch.device:
    n = len(lists[0])
    for lst, name in zip(lists, names):
        if len(lst) != n:
            raise ValueError(f"{op}: {names[0]} has {n} entries but {name} has {len(lst)}")
    device = None
    for i in range(n):
        d = lists[0][i].device
        if device is None:
            device = d
        elif d != device:
            raise ValueError(f"{op}: all tensors must be on one device; layer 0 is on {device}, "
                             f"layer {i} on {d}")
    return device


_CAPTURED_METADATA: List[Tensor] = []  # host metadata of launches captured in CUDA graphs


def _metadata(rows: List[List[int]], device: torch.device) -> Tensor:
    flat = [v for r in rows for v in r]
    if device.type == "cuda":
        # pinned + non_blocking: an async copy on the current stream, no host sync
        host = torch.tensor(flat, dtype=torch.int64, pin_memory=True)
        if _capturing(device):  # a captured copy reads `host` again at every replay: keep it
            _CAPTURED_METADATA.append(host)
        return host.to(device, non_blocking=True)
    return torch.tensor(flat, dtype=torch.int64, device=device)


def _aligned(ptrs: Sequence[int], strides: Sequence[int], elem: int) -> bool:
    return all(p % 16 == 0 for p in ptrs) and all((s * elem) % 16 == 0 for s in strides)


def _grouped_fwd_impl(weights: List[Tensor], thresholds: List[Tensor],
                      guard_ratio: float) -> Tuple[Tensor, Tensor]:
    op = "triton_masked_weight_grouped_fwd"
    if len(weights) == 0:
        raise ValueError(f"{op}: needs at least one layer (the outputs' dtype and device come from it)")
    device = _check_group([weights, thresholds], ["weights", "thresholds"], op)
    dtype = weights[0].dtype
    for i, (w, t) in enumerate(zip(weights, thresholds)):
        _check_weight_threshold(w, t, f"{op} (layer {i})")
        if w.dtype != dtype:
            raise TypeError(f"{op}: all weights of a grouped call must share one dtype, got {dtype} "
                            f"(layer 0) and {w.dtype} (layer {i}); group layers by dtype")
    shapes = [tuple(w.shape) for w in weights]
    numel = sum(c * k for c, k in shapes)
    n_rows = sum(c for c, _ in shapes)
    # One flat buffer of masked weights (layer after layer, each a contiguous [C_i*K_i] block)
    # and one of keep counts ([sum C_i]), as in the reference and the compiled op.
    out = torch.empty((numel,), dtype=dtype, device=device)
    if numel == 0:  # nothing to launch; the guard is skipped for numel == 0
        return out, torch.zeros((n_rows,), dtype=torch.int32, device=device)
    counts = torch.empty((n_rows,), dtype=torch.int32, device=device)
    _require(device, grouped=True)
    # Layers with C == 0 have no programs and are left out; layers with K == 0 (and C > 0) stay
    # in so that their programs write zero counts (their guard is off: numel == 0).
    live = [i for i, (c, _) in enumerate(shapes) if c > 0]
    bc, bk, warps = _blocks([shapes[i] for i in live if shapes[i][1] > 0], device)
    esize = weights[0].element_size()
    rows: List[List[int]] = []
    start = 0
    unit_k = True
    ptrs: List[int] = []
    strides: List[int] = []
    out_off = [0] * len(shapes)
    cnt_off = [0] * len(shapes)
    o = r0 = 0
    for i, (c, k) in enumerate(shapes):
        out_off[i], cnt_off[i] = o, r0
        o += c * k
        r0 += c
    for i in live:
        c, k = shapes[i]
        w, t = weights[i], thresholds[i]
        nblk = -(-c // bc)
        r = [0] * _NF
        r[_F_START], r[_F_NBLK], r[_F_C], r[_F_K] = start, nblk, c, k
        r[_F_W], r[_F_SWC], r[_F_SWK] = w.data_ptr(), w.stride(0), w.stride(1)
        r[_F_T], r[_F_ST] = t.data_ptr(), t.stride(0)
        r[_F_O] = out.data_ptr() + out_off[i] * esize
        r[_F_O2] = counts.data_ptr() + cnt_off[i] * 4
        r[_F_KMAX] = _collapse_limit(guard_ratio, c * k)
        rows.append(r)
        start += nblk
        if k > 1:
            unit_k &= w.stride(1) == 1
        ptrs += [r[_F_W], r[_F_O]]
        strides += [w.stride(0), k]
    aligned = unit_k and _aligned(ptrs, strides, esize)
    meta = _metadata(rows, device)
    ws, key = _workspace(device, len(rows))
    try:
        with device_ctx(device):
            _k_grouped_fwd[(start,)](
                meta, ws, len(rows), DT=_tl_dtype(dtype), LP=_np2(len(rows)),
                UNIT_K=unit_k, ALIGNED=aligned, VEC=16 // esize, BLOCK_C=bc, BLOCK_K=bk,
                CDT=_cdt(dtype), num_warps=warps)
    except BaseException:
        _drop_workspace(key)
        raise
    return out, counts


def _grouped_bwd_impl(grads: List[Tensor], weights: List[Tensor], thresholds: List[Tensor],
                      grad_mode: int) -> Tuple[List[Tensor], List[Tensor]]:
    op = "triton_masked_weight_grouped_bwd"
    _check_grad_mode(grad_mode, op)
    if len(weights) == 0 and len(grads) == 0 and len(thresholds) == 0:
        return [], []
    device = _check_group([weights, thresholds, grads], ["weights", "thresholds", "grads"], op)
    gws: List[Tensor] = []
    gts: List[Tensor] = []
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, (g, w, t) in enumerate(zip(grads, weights, thresholds)):
        _check_weight_threshold(w, t, f"{op} (layer {i})")
        _check_grad(g, w, f"{op} (layer {i})")
        c, k = w.shape
        gws.append(torch.empty((c, k), dtype=w.dtype, device=w.device))
        gts.append(torch.empty((c,), dtype=t.dtype, device=w.device))
        if c > 0:
            by_dtype.setdefault(w.dtype, []).append(i)
    # a dtype group without any element: zero threshold gradients, no launch
    for dtype in list(by_dtype):
        if all(weights[i].shape[1] == 0 for i in by_dtype[dtype]):
            for i in by_dtype.pop(dtype):
                gts[i].zero_()
    if not by_dtype:
        return gws, gts
    _require(device, grouped=True)
    # one launch per weight dtype (usually one); K == 0 layers stay in and write zero gradients
    for dtype, idx in by_dtype.items():
        shapes = [tuple(weights[i].shape) for i in idx]
        bc, bk, warps = _blocks([s for s in shapes if s[1] > 0], device)
        esize = weights[idx[0]].element_size()
        rows: List[List[int]] = []
        start = 0
        unit_k = True
        ptrs: List[int] = []
        strides: List[int] = []
        for i, (c, k) in zip(idx, shapes):
            g, w, t = grads[i], weights[i], thresholds[i]
            nblk = -(-c // bc)
            r = [0] * _NF
            r[_F_START], r[_F_NBLK], r[_F_C], r[_F_K] = start, nblk, c, k
            r[_F_W], r[_F_SWC], r[_F_SWK] = w.data_ptr(), w.stride(0), w.stride(1)
            r[_F_G], r[_F_SGC], r[_F_SGK] = g.data_ptr(), g.stride(0), g.stride(1)
            r[_F_T], r[_F_ST] = t.data_ptr(), t.stride(0)
            r[_F_O], r[_F_O2] = gws[i].data_ptr(), gts[i].data_ptr()
            rows.append(r)
            start += nblk
            if k > 1:
                unit_k &= w.stride(1) == 1 and g.stride(1) == 1
            ptrs += [w.data_ptr(), g.data_ptr(), gws[i].data_ptr()]
            strides += [w.stride(0), g.stride(0), k]
        aligned = unit_k and _aligned(ptrs, strides, esize)
        meta = _metadata(rows, device)
        with device_ctx(device):
            _k_grouped_bwd[(start,)](
                meta, len(rows), DT=_tl_dtype(dtype), LP=_np2(len(rows)),
                UNIT_K=unit_k, ALIGNED=aligned, VEC=16 // esize, MODE=int(grad_mode),
                BLOCK_C=bc, BLOCK_K=bk, CDT=_cdt(dtype), num_warps=warps)
    return gws, gts


# =============================================================================================
# torch.library registration
# =============================================================================================

@torch.library.custom_op("rgkernels::triton_masked_weight_fwd", mutates_args=("threshold",))
def triton_masked_weight_fwd(weight: Tensor, threshold: Tensor, guard_ratio: float) -> Tuple[Tensor, Tensor]:
    return _fwd_impl(weight, threshold, guard_ratio)


@torch.library.custom_op("rgkernels::triton_masked_weight_bwd", mutates_args=())
def triton_masked_weight_bwd(
    grad: Tensor, weight: Tensor, threshold: Tensor, grad_mode: int
) -> Tuple[Tensor, Tensor]:
    return _bwd_impl(grad, weight, threshold, grad_mode)


@torch.library.custom_op("rgkernels::triton_masked_weight_grouped_fwd", mutates_args=("thresholds",))
def triton_masked_weight_grouped_fwd(
    weights: List[Tensor], thresholds: List[Tensor], guard_ratio: float
) -> Tuple[Tensor, Tensor]:
    return _grouped_fwd_impl(list(weights), list(thresholds), guard_ratio)


@torch.library.custom_op("rgkernels::triton_masked_weight_grouped_bwd", mutates_args=())
def triton_masked_weight_grouped_bwd(
    grads: List[Tensor], weights: List[Tensor], thresholds: List[Tensor], grad_mode: int
) -> Tuple[List[Tensor], List[Tensor]]:
    return _grouped_bwd_impl(list(grads), list(weights), list(thresholds), grad_mode)


triton_masked_weight_fwd.register_fake(_ref.fake_fwd)
triton_masked_weight_bwd.register_fake(_ref.fake_bwd)
triton_masked_weight_grouped_fwd.register_fake(_ref.fake_grouped_fwd)
triton_masked_weight_grouped_bwd.register_fake(_ref.fake_grouped_bwd)
