"""Triton GEMMs of a masked linear layer (sparse execution, DESIGN.md §2, §4).

    rgkernels::triton_masked_linear_fwd(x[M,K], weight[C,K], threshold[C], bias?, perm, nlive,
                                        in_perm?, in_nlive?, flops(a!)) -> y[M,C]
    rgkernels::triton_masked_linear_dgrad(dy[M,C], weight, threshold, perm, nlive,
                                          in_perm?, in_nlive?, flops(a!)) -> dx[M,K]
    rgkernels::triton_masked_linear_wgrad(dy[M,C], x[M,K], weight, threshold, in_perm?, in_nlive?,
                                          grad_mode, flops(a!)) -> (grad_weight[C,K], grad_threshold[C], counts[C])

`perm` / `nlive` come from rgkernels::triton_mask_stats (live output channels first, nlive[0] of
them); `in_perm` / `in_nlive` (optional) from the previous layer of a chain: its zperm / nlive[1],
the input channels that are not identically zero.

* Forward and input gradient: the mask is applied in the weight-load prologue (each W tile is
  loaded, masked with S(|W| - t) and fed to tl.dot), so W * M is never written to memory. Output
  channels are visited in `perm` order: a tile entirely at or after nlive[0] does no GEMM (the
  forward writes the bias, or zeros, into those columns); the input gradient reduces over the
  nlive[0] live channels only. With `in_perm`, the forward reduces over the in_nlive[0] non-zero
  input channels only, and the input gradient writes zeros for the others (the caller passes it
  to the input gradient only where the activation in between has zero derivative at 0).
* Weight gradient: the GEMM dY^T X stays dense over all output channels (the threshold gradient
  needs dL/dW_hat everywhere, §4); its epilogue computes the masked weight gradient ("dst" or
  "masked", §2), the threshold-gradient partial sums and the keep counts of the tile. Partial sums
  over K tiles go to a [n_k_tiles, C] buffer summed afterwards (deterministic; a single K tile
  stores directly). With `in_perm`, the columns of zero input channels skip the GEMM (their
  dL/dW_hat is exactly 0) but still run the epilogue.
* Executed FLOPs: program 0 of each kernel adds what the launch multiplies (2 * M * rows * cols
  actually reduced, read from nlive / in_nlive on the device) into `flops` = int64
  [forward, input_grad, weight_grad]: no host sync.

Precision: operands go to tl.dot in their own dtype with float32 accumulation. float32 operands use
input_precision "ieee" (full fp32) unless TF32 is enabled for cuBLAS matmuls
(torch.backends.cuda.matmul.fp32_precision = "tf32", or the legacy allow_tf32), then "tf32": the rule
cuBLAS follows for F.linear (_triton_util.dot_precision). In the interpreter bfloat16 operands are upcast to
float32 first (the interpreter cannot multiply raw bfloat16); products of bfloat16 values are exact
in float32, so only the accumulation order differs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _triton_util as U

triton, tl = U.triton, U.tl

if triton is not None:
    globals().update(U.HELPERS)

    def _k_lin_fwd(X, W, T, B, Y, PERM, NL, KPERM, KNL, FLOPS,
                   M, C, K, s_xm, s_xk, s_wc, s_wk, s_t, s_b, s_ym, s_yc,
                   HAS_BIAS: tl.constexpr, K_COMPACT: tl.constexpr, DOT_DT: tl.constexpr,
                   PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        pid_m, pid_n = _swizzle(pid, tl.cdiv(M, BM), tl.cdiv(C, BN), GROUP_M)
        nlive = tl.load(NL)
        klen = _compact_count(KNL, K, K_COMPACT)
        if pid == 0:
            tl.atomic_add(FLOPS, 2 * tl.cast(M, tl.int64) * tl.cast(nlive, tl.int64) * tl.cast(klen, tl.int64),
                          sem="relaxed")
        offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        mm = offs_m < M
        j = pid_n * BN + tl.arange(0, BN)
        jm = j < C
        rows = tl.load(PERM + j, mask=jm, other=0).to(tl.int64)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if pid_n * BN < nlive:
            live = j < nlive
            t = tl.load(T + rows * s_t, mask=live, other=0.0)
            for k0 in range(0, klen, BK):
                kk = k0 + tl.arange(0, BK)
                km = kk < klen
                cols = _compact_index(KPERM, kk, km, K_COMPACT).to(tl.int64)
                x = tl.load(X + offs_m[:, None] * s_xm + cols[None, :] * s_xk,
                            mask=mm[:, None] & km[None, :], other=0.0)
                w = tl.load(W + rows[:, None] * s_wc + cols[None, :] * s_wk,
                            mask=live[:, None] & km[None, :], other=0.0)
                acc += tl.dot(x.to(DOT_DT), tl.trans(_mask_prologue(w, t, DOT_DT)), input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(B + rows * s_b, mask=jm, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * s_ym + rows[None, :] * s_yc, acc.to(Y.dtype.element_ty),
                 mask=mm[:, None] & jm[None, :])

    def _k_lin_dgrad(DY, W, T, PERM, NL, KPERM, KNL, DX, FLOPS,
                     M, C, K, s_gm, s_gc, s_wc, s_wk, s_t, s_dm, s_dk,
                     K_COMPACT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        """dX[M, K] = dY[:, live] @ W_hat[live, :]; N-dim = input features (BN), reduction = live rows (BK)."""
        pid = tl.program_id(0)
        pid_m, pid_n = _swizzle(pid, tl.cdiv(M, BM), tl.cdiv(K, BN), GROUP_M)
        nlive = tl.load(NL)
        kl = _compact_count(KNL, K, K_COMPACT)
        if pid == 0:
            tl.atomic_add(FLOPS + 1, 2 * tl.cast(M, tl.int64) * tl.cast(nlive, tl.int64) * tl.cast(kl, tl.int64),
                          sem="relaxed")
        offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        mm = offs_m < M
        p = pid_n * BN + tl.arange(0, BN)
        pm = p < K
        cols = _compact_index(KPERM, p, pm, K_COMPACT).to(tl.int64)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if pid_n * BN < kl:
            cm = p < kl
            for c0 in range(0, nlive, BK):
                jj = c0 + tl.arange(0, BK)
                jin = jj < nlive
                rows = tl.load(PERM + jj, mask=jin, other=0).to(tl.int64)
                t = tl.load(T + rows * s_t, mask=jin, other=0.0)
                g = tl.load(DY + offs_m[:, None] * s_gm + rows[None, :] * s_gc,
                            mask=mm[:, None] & jin[None, :], other=0.0)
                w = tl.load(W + rows[:, None] * s_wc + cols[None, :] * s_wk,
                            mask=jin[:, None] & cm[None, :], other=0.0)
                acc += tl.dot(g.to(DOT_DT), _mask_prologue(w, t, DOT_DT), input_precision=PREC)
        tl.store(DX + offs_m[:, None] * s_dm + cols[None, :] * s_dk, acc.to(DX.dtype.element_ty),
                 mask=mm[:, None] & pm[None, :])

    def _k_lin_wgrad(DY, X, W, T, KPERM, KNL, GW, GTP, CNTP, FLOPS,
                     M, C, K, s_gm, s_gc, s_xm, s_xk, s_wc, s_wk, s_t,
                     K_COMPACT: tl.constexpr, MODE: tl.constexpr, DOT_DT: tl.constexpr,
                     PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Tile (rows = output channels, BM) x (cols = input features, BN), reduction over the
        batch (BK); then the §2 epilogue. Grid: row tiles x column tiles, flat (a grid's second axis stops
        at 65535 tiles); row tiles vary fastest, as they would on the first axis of a 2-D grid."""
        nct = tl.cdiv(C, BM)
        pid_c = tl.program_id(0) % nct
        pid_k = tl.program_id(0) // nct
        kl = _compact_count(KNL, K, K_COMPACT)
        if (pid_c == 0) & (pid_k == 0):
            tl.atomic_add(FLOPS + 2, 2 * tl.cast(M, tl.int64) * tl.cast(C, tl.int64) * tl.cast(kl, tl.int64),
                          sem="relaxed")
        rows = (pid_c * BM + tl.arange(0, BM)).to(tl.int64)
        rm = rows < C
        p = pid_k * BN + tl.arange(0, BN)
        pm = p < K
        cols = _compact_index(KPERM, p, pm, K_COMPACT).to(tl.int64)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if pid_k * BN < kl:
            cm = p < kl
            for m0 in range(0, M, BK):
                ii = (m0 + tl.arange(0, BK)).to(tl.int64)
                im = ii < M
                g = tl.load(DY + ii[None, :] * s_gm + rows[:, None] * s_gc, mask=rm[:, None] & im[None, :],
                            other=0.0)
                x = tl.load(X + ii[:, None] * s_xm + cols[None, :] * s_xk, mask=im[:, None] & cm[None, :],
                            other=0.0)
                acc += tl.dot(g.to(DOT_DT), x.to(DOT_DT), input_precision=PREC)
        inb = rm[:, None] & pm[None, :]
        t = tl.load(T + rows * s_t, mask=rm, other=0.0)
        w = tl.load(W + rows[:, None] * s_wc + cols[None, :] * s_wk, mask=inb, other=0.0)
        gw, gt, cnt = _wgrad_epilogue(acc, w, t, inb, MODE, W.dtype.element_ty)
        tl.store(GW + rows[:, None] * K + cols[None, :], gw.to(GW.dtype.element_ty), mask=inb)
        tl.store(GTP + pid_k * C + rows, gt, mask=rm)
        tl.store(CNTP + pid_k * C + rows, cnt, mask=rm)


_KERNELS = U.LazyKernels(globals(), tuple(U.HELPERS) + ("_k_lin_fwd", "_k_lin_dgrad", "_k_lin_wgrad"))

# Block sizes: fixed-size tensor-core tiles, shrunk (powers of two, >= 16 as tl.dot needs) to the
# problem so tiny layers do not waste most lanes. Under the interpreter the whole (tiny) problem
# goes in few programs. `_BLOCK_OVERRIDE` (tests) forces (BM, BN, BK) for every kernel.
_BLOCK_OVERRIDE: Optional[Tuple[int, int, int]] = None


def _gemm_blocks(m: int, n: int, k: int, dtype: torch.dtype, interp: bool) -> Tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_warps, num_stages) for an [m, k] x [k, n] GEMM."""
    if _BLOCK_OVERRIDE is not None:
        bm, bn, bk = _BLOCK_OVERRIDE
        return bm, bn, bk, 4, 2
    if interp:
        return U.clamp_block(m, 16, 64), U.clamp_block(n, 16, 64), U.clamp_block(k, 16, 64), 4, 1
    big = 128 if dtype != torch.float32 else 64
    bm = U.clamp_block(m, 16, 128)
    bn = U.clamp_block(n, 16, big)
    bk = U.clamp_block(k, 16, 64 if dtype != torch.float32 else 32)
    warps = 8 if bm * bn >= 128 * 128 else 4
    return bm, bn, bk, warps, 3


def available() -> Tuple[bool, str]:
    return U.available(_KERNELS)


def _dot_dt(dtype: torch.dtype, interp: bool):
    """tl.dot operand dtype: the tensors' own, except bfloat16 in the interpreter (float32)."""
    return tl.float32 if (interp and dtype == torch.bfloat16) else U.tl_dtype(dtype)


def _check_common(weight: Tensor, threshold: Tensor, op: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [C, K], got {weight.dim()} dims")
    if weight.dtype not in U.SUPPORTED_DTYPES:
        raise TypeError(f"{op}: weight dtype {weight.dtype} is not supported (float32, float16, bfloat16)")
    U.check_float32_vector(threshold, weight.shape[0], "threshold", op)


def _check_act(a: Tensor, rows: Optional[int], cols: int, dtype: torch.dtype, name: str, op: str) -> None:
    if a.dim() != 2 or a.shape[1] != cols or (rows is not None and a.shape[0] != rows):
        raise ValueError(f"{op}: {name} must be [M, {cols}], got {tuple(a.shape)}")
    if a.dtype != dtype:
        raise TypeError(f"{op}: {name} dtype {a.dtype} differs from the weight dtype {dtype}")


def _fwd_impl(x, weight, threshold, bias, perm, nlive, in_perm, in_nlive, flops):
    op = "triton_masked_linear_fwd"
    _check_common(weight, threshold, op)
    c, k = weight.shape
    _check_act(x, None, k, weight.dtype, "x", op)
    U.check_index(perm, c, "perm", op)
    U.check_index(nlive, 1, "nlive", op)
    kc = U.check_compaction(in_perm, in_nlive, k, op)
    m = x.shape[0]
    y = torch.empty((m, c), dtype=x.dtype, device=x.device)
    if m == 0 or c == 0:
        return y
    interp = U.require(_KERNELS, x.device, op)
    bm, bn, bk, warps, stages = _gemm_blocks(m, c, k, x.dtype, interp)
    b = bias if bias is not None else threshold
    kp = in_perm if kc else perm
    kn = in_nlive if kc else nlive
    grid = (triton.cdiv(m, bm) * triton.cdiv(c, bn),)
    with U.device_ctx(x.device):
        _k_lin_fwd[grid](x, weight, threshold, b, y, perm, nlive, kp, kn, flops,
                         m, c, k, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                         threshold.stride(0), b.stride(0), y.stride(0), y.stride(1),
                         HAS_BIAS=bias is not None, K_COMPACT=kc,
                         DOT_DT=_dot_dt(x.dtype, interp), PREC=U.dot_precision("linear"),
                         BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    return y


def _dgrad_impl(dy, weight, threshold, perm, nlive, in_perm, in_nlive, flops):
    op = "triton_masked_linear_dgrad"
    _check_common(weight, threshold, op)
    c, k = weight.shape
    _check_act(dy, None, c, weight.dtype, "dy", op)
    U.check_index(perm, c, "perm", op)
    U.check_index(nlive, 1, "nlive", op)
    kc = U.check_compaction(in_perm, in_nlive, k, op)
    m = dy.shape[0]
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    if m == 0 or k == 0:
        return dx
    interp = U.require(_KERNELS, dy.device, op)
    bm, bn, bk, warps, stages = _gemm_blocks(m, k, c, dy.dtype, interp)
    kp = in_perm if kc else perm
    kn = in_nlive if kc else nlive
    grid = (triton.cdiv(m, bm) * triton.cdiv(k, bn),)
    with U.device_ctx(dy.device):
        _k_lin_dgrad[grid](dy, weight, threshold, perm, nlive, kp, kn, dx, flops,
                           m, c, k, dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
                           threshold.stride(0), dx.stride(0), dx.stride(1),
                           K_COMPACT=kc, DOT_DT=_dot_dt(dy.dtype, interp),
                           PREC=U.dot_precision("linear"), BM=bm, BN=bn, BK=bk, GROUP_M=8,
                           num_warps=warps, num_stages=stages)
    return dx


def _wgrad_impl(dy, x, weight, threshold, in_perm, in_nlive, grad_mode, flops):
    op = "triton_masked_linear_wgrad"
    _check_common(weight, threshold, op)
    if grad_mode not in (0, 1):
        raise ValueError(f"{op}: grad_mode must be 0 (dst) or 1 (masked), got {grad_mode}")
    c, k = weight.shape
    _check_act(dy, None, c, weight.dtype, "dy", op)
    _check_act(x, dy.shape[0], k, weight.dtype, "x", op)
    kc = U.check_compaction(in_perm, in_nlive, k, op)
    m = dy.shape[0]
    dev = weight.device
    gw = torch.empty((c, k), dtype=weight.dtype, device=dev)
    if c == 0 or k == 0:
        return (gw, torch.zeros((c,), dtype=torch.float32, device=dev),
                torch.zeros((c,), dtype=torch.int32, device=dev))
    interp = U.require(_KERNELS, dev, op)
    bm, bn, bk, warps, stages = _gemm_blocks(c, k, max(m, 1), weight.dtype, interp)
    nkt = triton.cdiv(k, bn)
    gtp = torch.empty((nkt, c), dtype=torch.float32, device=dev)
    cntp = torch.empty((nkt, c), dtype=torch.int32, device=dev)
    kp = in_perm if kc else gtp  # dummy pointer when not compacting
    kn = in_nlive if kc else gtp
    with U.device_ctx(dev):
        _k_lin_wgrad[(triton.cdiv(c, bm) * nkt,)](
            dy, x, weight, threshold, kp, kn, gw, gtp, cntp, flops,
            m, c, k, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            weight.stride(0), weight.stride(1), threshold.stride(0),
            K_COMPACT=kc, MODE=int(grad_mode), DOT_DT=_dot_dt(dy.dtype, interp),
            PREC=U.dot_precision("linear"), BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    gt, cnt = U.sum_partials(gtp, cntp)
    return gw, gt, cnt


# =============================================================================================
# torch.library registration
# =============================================================================================

@torch.library.custom_op("rgkernels::triton_masked_linear_fwd", mutates_args=("flops",))
def triton_masked_linear_fwd(x: Tensor, weight: Tensor, threshold: Tensor, bias: Optional[Tensor],
                             perm: Tensor, nlive: Tensor, in_perm: Optional[Tensor],
                             in_nlive: Optional[Tensor], flops: Tensor) -> Tensor:
    return _fwd_impl(x, weight, threshold, bias, perm, nlive, in_perm, in_nlive, flops)


@torch.library.custom_op("rgkernels::triton_masked_linear_dgrad", mutates_args=("flops",))
def triton_masked_linear_dgrad(dy: Tensor, weight: Tensor, threshold: Tensor, perm: Tensor, nlive: Tensor,
                               in_perm: Optional[Tensor], in_nlive: Optional[Tensor], flops: Tensor) -> Tensor:
    return _dgrad_impl(dy, weight, threshold, perm, nlive, in_perm, in_nlive, flops)


@torch.library.custom_op("rgkernels::triton_masked_linear_wgrad", mutates_args=("flops",))
def triton_masked_linear_wgrad(dy: Tensor, x: Tensor, weight: Tensor, threshold: Tensor,
                               in_perm: Optional[Tensor], in_nlive: Optional[Tensor], grad_mode: int,
                               flops: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return _wgrad_impl(dy, x, weight, threshold, in_perm, in_nlive, grad_mode, flops)


@triton_masked_linear_fwd.register_fake
def _(x, weight, threshold, bias, perm, nlive, in_perm, in_nlive, flops):
    return x.new_empty((x.shape[0], weight.shape[0]))


@triton_masked_linear_dgrad.register_fake
def _(dy, weight, threshold, perm, nlive, in_perm, in_nlive, flops):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


@triton_masked_linear_wgrad.register_fake
def _(dy, x, weight, threshold, in_perm, in_nlive, grad_mode, flops):
    c, k = weight.shape
    return (weight.new_empty((c, k)), threshold.new_empty((c,)), weight.new_empty((c,), dtype=torch.int32))
