"""Mask statistics of one layer for sparse execution, in ONE launch (no host sync):

    rgkernels::triton_mask_stats(weight[C, K] or [C, K1, K2], threshold(a!)[C], bias?[C], guard_ratio)
        -> (counts int32[C], bits uint8[C, ceil(K/8)], perm int32[C], zperm int32[C], nlive int32[2])

A 3-D weight is read as its [C, K1 * K2] rows through its own strides: a transposed convolution's
[Ci, Co, KH, KW] weight, transposed to rows [Co, Ci, KH * KW], has no 2-D view, and copying it would
write the weight-sized tensor that sparse execution exists to avoid.

* counts: keep counts per output channel (row) after the collapse guard.
* bits:   the mask M bit-packed (bit b of byte j of row i is M[i, 8j + b]): what the layer keeps
          instead of the masked weight, so statistics, `protect_pruned` and the stored-parameter
          gradient hook see the exact mask of this forward (1/8 byte per weight; the masked weight
          itself is never written).
* perm:   rows with counts > 0 first (ascending), then the entirely pruned rows (ascending);
          nlive[0] = number of rows with counts > 0. The GEMM kernels walk output channels in this
          order and skip every tile at or after nlive[0] (row compaction without a host sync).
* zperm:  the same for "channels whose output is identically zero": pruned rows without bias, or
          with a zero bias entry, go last; nlive[1] = number of the others. A following layer in a
          chain (rgkernels.sparse_exec) skips those input channels.
* Collapse guard (DESIGN.md §1): each program adds its kept count to a workspace total and takes a
  ticket; the program with the last ticket reads the total and, if total / numel <= guard_ratio
  (as the exact integer bound of triton_masked_weight._collapse_limit), zeroes the threshold in
  place and recomputes counts and bits with t = 0. That program then builds perm / zperm (one
  pass to count, one to scatter, with a cumsum per block of rows). The workspace is the cached,
  self-cleaning int64 buffer of triton_masked_weight (each launch leaves its slots at zero).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _triton_util as U
from . import triton_masked_weight as _tmw

triton, tl = U.triton, U.tl

if triton is not None:

    def _stats_rows(W, T, CNT, BITS, r0, C, K, KB, s_wc, s_wk, K2, s_wk2, s_t,
                    ZERO_T: tl.constexpr, SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        """Counts and mask bits of rows [r0, r0 + BLOCK_C); returns their kept total (int64)."""
        rows = r0 + tl.arange(0, BLOCK_C)
        rmask = rows < C
        rows64 = rows.to(tl.int64)
        if ZERO_T:
            t = tl.zeros([BLOCK_C], dtype=tl.float32)
            tl.store(T + rows64 * s_t, t, mask=rmask)
        else:
            t = tl.load(T + rows64 * s_t, mask=rmask, other=0.0)
        shifts = 1 << tl.arange(0, 8)
        cnt = tl.zeros([BLOCK_C], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            inb = rmask[:, None] & (cols < K)[None, :]
            if SPLIT:  # column = k1 * K2 + k2 of a [C, K1, K2] view
                c64 = cols.to(tl.int64)
                coff = (c64 // K2) * s_wk + (c64 % K2) * s_wk2
            else:
                coff = cols.to(tl.int64) * s_wk
            w = tl.load(W + rows64[:, None] * s_wc + coff[None, :], mask=inb, other=0.0)
            keep = (((tl.abs(w.to(tl.float32)) - t[:, None]) > 0) & inb).to(tl.int32)
            cnt += tl.sum(keep, axis=1)
            packed = tl.sum(tl.reshape(keep, [BLOCK_C, BLOCK_K // 8, 8]) * shifts[None, None, :], axis=2)
            bcols = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            tl.store(BITS + rows64[:, None] * KB + bcols[None, :], packed.to(tl.uint8),
                     mask=rmask[:, None] & (bcols < KB)[None, :])
        tl.store(CNT + rows64, cnt, mask=rmask)
        return tl.sum(cnt.to(tl.int64), axis=0)

    def _scatter_order(FLAG_CNT, B, OUT, C, s_b, n_first,
                       USE_BIAS: tl.constexpr, BLOCK_P: tl.constexpr):
        """OUT = rows whose flag is set (ascending), then the others (ascending); flag = count > 0
        (or bias != 0 when USE_BIAS)."""
        n_set = 0
        n_unset = 0
        for r0 in range(0, C, BLOCK_P):
            r = r0 + tl.arange(0, BLOCK_P)
            rm = r < C
            cnt = tl.load(FLAG_CNT + r, mask=rm, other=0, volatile=True)
            flag = cnt > 0
            if USE_BIAS:
                b = tl.load(B + r.to(tl.int64) * s_b, mask=rm, other=0.0).to(tl.float32)
                flag = flag | (b != 0)
            flag = flag & rm
            fi = flag.to(tl.int32)
            csum = tl.cumsum(fi, axis=0)  # inclusive
            ucsum = tl.cumsum((rm & (~flag)).to(tl.int32), axis=0)
            pos = tl.where(flag, n_set + csum - 1, n_first + n_unset + ucsum - 1)
            tl.store(OUT + pos, r, mask=rm)
            n_set += tl.sum(fi, axis=0)
            n_unset += tl.sum((rm & (~flag)).to(tl.int32), axis=0)
        return n_set

    def _count_set(FLAG_CNT, B, C, s_b, USE_BIAS: tl.constexpr, BLOCK_P: tl.constexpr):
        n = 0
        for r0 in range(0, C, BLOCK_P):
            r = r0 + tl.arange(0, BLOCK_P)
            rm = r < C
            cnt = tl.load(FLAG_CNT + r, mask=rm, other=0, volatile=True)
            flag = cnt > 0
            if USE_BIAS:
                b = tl.load(B + r.to(tl.int64) * s_b, mask=rm, other=0.0).to(tl.float32)
                flag = flag | (b != 0)
            n += tl.sum((flag & rm).to(tl.int32), axis=0)
        return n

    def _k_mask_stats(W, T, B, CNT, BITS, PERM, ZPERM, NL, WS, C, K, KB, s_wc, s_wk, K2, s_wk2, s_t, s_b, kmax,
                      HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_P: tl.constexpr):
        kept = _stats_rows(W, T, CNT, BITS, tl.program_id(0) * BLOCK_C, C, K, KB, s_wc, s_wk, K2, s_wk2, s_t,
                           False, SPLIT, BLOCK_C, BLOCK_K)
        tl.atomic_add(WS, kept, sem="relaxed")
        tl.debug_barrier()  # all of this program's stores happen before the ticket's release
        ticket = tl.atomic_add(WS + 1, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            # last program: every other one has added its count and written its rows
            total = tl.atomic_xchg(WS, 0, sem="acq_rel")
            tl.atomic_xchg(WS + 1, 0, sem="relaxed")
            tl.debug_barrier()
            if kmax >= 0:
                if total <= kmax:
                    for r0 in range(0, C, BLOCK_C):
                        _stats_rows(W, T, CNT, BITS, r0, C, K, KB, s_wc, s_wk, K2, s_wk2, s_t, True, SPLIT,
                                    BLOCK_C, BLOCK_K)
                    tl.debug_barrier()
            nlive = _count_set(CNT, B, C, s_b, False, BLOCK_P)
            _scatter_order(CNT, B, PERM, C, s_b, nlive, False, BLOCK_P)
            tl.store(NL, nlive)
            if HAS_BIAS:
                nnz = _count_set(CNT, B, C, s_b, True, BLOCK_P)
                _scatter_order(CNT, B, ZPERM, C, s_b, nnz, True, BLOCK_P)
                tl.store(NL + 1, nnz)
            else:
                _scatter_order(CNT, B, ZPERM, C, s_b, nlive, False, BLOCK_P)
                tl.store(NL + 1, nlive)


_KERNELS = U.LazyKernels(globals(), ("_stats_rows", "_scatter_order", "_count_set", "_k_mask_stats"),
                         {"_k_mask_stats": {"do_not_specialize": ["kmax"]}})


def available() -> Tuple[bool, str]:
    return U.available(_KERNELS)


def _blocks(c: int, k: int, interp: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_K, BLOCK_P, num_warps): tiles of up to 4096 elements walking K, rows split over
    programs; the row block is halved while the grid has fewer than 256 programs (about two waves on
    an H100's 132 SMs), down to one row per program: a layer's mask statistics are one weight read."""
    bk = U.clamp_block(k, 16, 512)
    bc = U.clamp_block(4096 // bk, 1, U.np2(c))
    if interp:  # the interpreter runs programs one after another: few, big programs
        bc = U.clamp_block(c, 1, 256)
    else:
        while bc > 1 and -(-c // bc) < 256:
            bc //= 2
    bp = U.clamp_block(c, 16, 1024)
    return bc, bk, bp, max(1, min(8, bc * bk // 512))


def _impl(weight: Tensor, threshold: Tensor, bias: Optional[Tensor], guard_ratio: float):
    op = "triton_mask_stats"
    if weight.dim() not in (2, 3):
        raise ValueError(f"{op}: weight must be a [C, K] or [C, K1, K2] view, got {weight.dim()} dims")
    if weight.dtype not in U.SUPPORTED_DTYPES:
        raise TypeError(f"{op}: weight dtype {weight.dtype} is not supported (float32, float16, bfloat16)")
    c, k = weight.shape[0], math.prod(weight.shape[1:])
    split = weight.dim() == 3
    k2, s_k2 = (weight.shape[2], weight.stride(2)) if split else (1, 0)
    U.check_float32_vector(threshold, c, "threshold", op)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c):
        raise ValueError(f"{op}: bias must have shape [{c}], got {tuple(bias.shape)}")
    dev = weight.device
    kb = (k + 7) // 8
    counts = torch.empty((c,), dtype=torch.int32, device=dev)
    bits = torch.empty((c, kb), dtype=torch.uint8, device=dev)
    perm = torch.empty((c,), dtype=torch.int32, device=dev)
    zperm = torch.empty((c,), dtype=torch.int32, device=dev)
    nlive = torch.empty((2,), dtype=torch.int32, device=dev)
    if c == 0 or k == 0:  # K == 0: every row is empty (guard off for numel == 0)
        counts.zero_()
        nlive.zero_()
        if bias is not None and c > 0:
            nz = bias != 0
            zperm.copy_(torch.argsort((~nz).to(torch.int8), stable=True).to(torch.int32))
            nlive[1] = nz.sum()
        else:
            zperm.copy_(torch.arange(c, dtype=torch.int32, device=dev))
        perm.copy_(torch.arange(c, dtype=torch.int32, device=dev))
        return counts, bits, perm, zperm, nlive
    interp = U.require(_KERNELS, dev, op)
    kmax = _tmw._collapse_limit(guard_ratio, c * k)
    bc, bk, bp, warps = _blocks(c, k, interp)
    ws, key = _tmw._workspace(dev, 1)
    b = bias if bias is not None else threshold  # dummy pointer when there is no bias
    try:
        with U.device_ctx(dev):
            _k_mask_stats[(triton.cdiv(c, bc),)](
                weight, threshold, b, counts, bits, perm, zperm, nlive, ws, c, k, kb,
                weight.stride(0), weight.stride(1), k2, s_k2, threshold.stride(0), b.stride(0), kmax,
                HAS_BIAS=bias is not None, SPLIT=split, BLOCK_C=bc, BLOCK_K=bk, BLOCK_P=bp, num_warps=warps)
    except BaseException:
        _tmw._drop_workspace(key)
        raise
    return counts, bits, perm, zperm, nlive


@torch.library.custom_op("rgkernels::triton_mask_stats", mutates_args=("threshold",))
def triton_mask_stats(weight: Tensor, threshold: Tensor, bias: Optional[Tensor],
                      guard_ratio: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _impl(weight, threshold, bias, guard_ratio)


@triton_mask_stats.register_fake
def _(weight, threshold, bias, guard_ratio):
    c, k = weight.shape[0], math.prod(weight.shape[1:])
    i32 = dict(dtype=torch.int32)
    return (weight.new_empty((c,), **i32), weight.new_empty((c, (k + 7) // 8), dtype=torch.uint8),
            weight.new_empty((c,), **i32), weight.new_empty((c,), **i32), weight.new_empty((2,), **i32))


# ---- the same in PyTorch: the oracle of the tests and of the unpacking ------------------------

def reference_stats(weight: Tensor, threshold: Tensor, bias: Optional[Tensor], guard_ratio: float):
    """PyTorch version of the op (threshold reset in place by the guard, like the op)."""
    from .reference import masked_weight_fwd

    weight = weight.reshape(weight.shape[0], -1)
    w_hat, counts = masked_weight_fwd(weight, threshold, guard_ratio)
    mask = (weight.float().abs() - threshold.float()[:, None]) > 0
    c, k = weight.shape
    pad = (-k) % 8
    m8 = torch.nn.functional.pad(mask, (0, pad)).view(c, -1, 8).to(torch.int32)
    bits = (m8 << torch.arange(8, device=weight.device)).sum(-1).to(torch.uint8)
    live = counts > 0
    perm = torch.argsort((~live).to(torch.int8), stable=True).to(torch.int32)
    nz = live if bias is None else live | (bias != 0)
    zperm = torch.argsort((~nz).to(torch.int8), stable=True).to(torch.int32)
    nlive = torch.stack([live.sum(), nz.sum()]).to(torch.int32)
    return counts, bits, perm, zperm, nlive


def unpack_bits(bits: Tensor, k: int) -> Tensor:
    """uint8 [C, ceil(K/8)] -> bool [C, K]."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits[:, :, None] >> shifts) & 1).bool().reshape(bits.shape[0], -1)[:, :k]
