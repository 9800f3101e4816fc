"""Triton implicit-GEMM convolutions of a masked Conv2d / ConvTranspose2d layer (sparse execution,
DESIGN.md §2, §4).

    rgkernels::triton_masked_conv_fwd(x[N,Ci,H,W], weight[Co,Ci,KH,KW], threshold[Co], bias?, perm, nlive,
                                      in_perm?, in_nlive?, flops(a!), stride, padding, dilation,
                                      transposed, output_padding) -> y
    rgkernels::triton_masked_conv_dgrad(dy, weight, threshold, perm, nlive, in_perm?, in_nlive?, flops(a!),
                                        input_hw, stride, padding, dilation, transposed) -> dx
    rgkernels::triton_masked_conv_wgrad(dy, x, weight, threshold, in_perm?, in_nlive?, grad_mode, flops(a!),
                                        stride, padding, dilation, transposed)
        -> (grad_weight[Co,Ci,KH,KW], grad_threshold, counts)

`weight` is always in the mask's row layout [Co, Ci, KH, KW], one row per output channel. For a
transposed convolution (`transposed=True`) that is its [Ci, Co, KH, KW] parameter transposed (a view:
the kernels take any strides), and the weight gradient comes back in the same row layout.
groups = 1 and zero padding only (other convolutions run the masked-weight path). Any strides of
x / dy / weight (NCHW, channels-last, slices); outputs are contiguous NCHW.

The same structure as triton_masked_linear, with the im2col done in the address computation
(never materialised):
  forward:   rows = output positions (n, oh, ow), columns = output channels in `perm` order (tiles
             at or after nlive[0] do no GEMM and get the bias), reduction over (input channel,
             kh, kw) with the input channels in `in_perm` order when given (in_nlive[0] of them);
             the weight tile is masked in its load prologue.
  input grad: rows = input positions (n, ih, iw), columns = input channels (zeros without GEMM
             for the zero channels of `in_perm`), reduction over (live output channel, kh, kw):
             dy[n, co, oh, ow] with oh = (ih + pad - kh * dil) / stride where that is an integer in
             range (the other lanes are masked: with stride s, about 1 - 1/s^2 of the reduction
             lanes are idle, a known cost of this formulation).
  weight grad: rows = all output channels (dense, §4), columns = (input channel, kh, kw), reduction
             over output positions; the §2 epilogue (masked weight gradient, threshold-gradient
             partials, keep counts) as in triton_masked_linear; columns of zero input channels skip
             the GEMM.
A transposed convolution swaps the two index maps: its forward and weight gradient gather the input
at ih = (oh + pad - kh * dil) / stride (`_tap_gather`, idle lanes as above), its input gradient is a
direct convolution of dy (oh = ih * stride - pad + kh * dil). Masking, compaction and epilogue are
the same code.
Executed FLOPs (program 0 of each launch, on the device): 2 * N * (positions) * (output channels) *
(input channels) * KH * KW, with the channel counts the kernel really reduced over or produced;
positions are the output positions of a conv and the input positions of a transposed conv (as
rgkernels.count_flops counts "uses"), not the idle lanes.
Precision: as triton_masked_linear, but float32 operands follow cuDNN's convolution setting
(torch.backends.cudnn.conv.fp32_precision, legacy cudnn.allow_tf32): TF32 by default, like cuDNN.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _triton_util as U
from .triton_masked_linear import _dot_dt, _gemm_blocks

triton, tl = U.triton, U.tl

if triton is not None:
    globals().update(U.HELPERS)

    def _tap_gather(oh, ow, kh, kw, SH, SW, PH, PW, DH, DW, H, WI):
        """Input position (ih, iw) feeding output position (oh, ow) through kernel tap (kh, kw) of a
        transposed convolution (oh = ih * SH - PH + kh * DH, so ih = (oh + PH - kh * DH) / SH), and
        whether both are integers inside the [H, WI] input. The lanes where they are not (about
        1 - 1 / (SH * SW) of them) load nothing."""
        hn = oh + PH - kh * DH
        wn = ow + PW - kw * DW
        hn0 = tl.maximum(hn, 0)
        wn0 = tl.maximum(wn, 0)
        ih = hn0 // SH
        iw = wn0 // SW
        ok = (hn >= 0) & (wn >= 0) & (hn0 - ih * SH == 0) & (wn0 - iw * SW == 0) & (ih < H) & (iw < WI)
        return ih, iw, ok

    def _k_conv_fwd(X, W, T, B, Y, PERM, NL, KPERM, KNL, FLOPS,
                    NB, CI, H, WI, CO, OH, OW,
                    s_xn, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww, s_t, s_b,
                    SH, SW, PH, PW, DH, DW,
                    KH: tl.constexpr, KW: tl.constexpr, TRANSPOSED: tl.constexpr,
                    HAS_BIAS: tl.constexpr, K_COMPACT: tl.constexpr, DOT_DT: tl.constexpr,
                    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        M = NB * OH * OW
        pid_m, pid_n = _swizzle(pid, tl.cdiv(M, BM), tl.cdiv(CO, BN), GROUP_M)
        nlive = tl.load(NL)
        klen = _compact_count(KNL, CI, K_COMPACT) * (KH * KW)
        if pid == 0:
            # FLOPs per input position (transposed) or output position (conv): see flops.py "uses"
            if TRANSPOSED:
                npos = NB * H * WI
            else:
                npos = M
            tl.atomic_add(FLOPS, 2 * tl.cast(npos, tl.int64) * tl.cast(nlive, tl.int64) * tl.cast(klen, tl.int64),
                          sem="relaxed")
        offs_m = pid_m * BM + tl.arange(0, BM)
        mm = offs_m < M
        n = offs_m // (OH * OW)
        r = offs_m % (OH * OW)
        oh = r // OW
        ow = r % OW
        x_row = X + n.to(tl.int64) * s_xn
        j = pid_n * BN + tl.arange(0, BN)
        jm = j < CO
        rows = tl.load(PERM + j, mask=jm, other=0).to(tl.int64)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if pid_n * BN < nlive:
            live = j < nlive
            t = tl.load(T + rows * s_t, mask=live, other=0.0)
            for k0 in range(0, klen, BK):
                kk = k0 + tl.arange(0, BK)
                km = kk < klen
                cpos = kk // (KH * KW)
                rr = kk % (KH * KW)
                kh = rr // KW
                kw = rr % KW
                ci = _compact_index(KPERM, cpos, km, K_COMPACT)
                if TRANSPOSED:
                    ih, iw, ok = _tap_gather(oh[:, None], ow[:, None], kh[None, :], kw[None, :],
                                             SH, SW, PH, PW, DH, DW, H, WI)
                    ok = ok & mm[:, None] & km[None, :]
                else:  # written out here and in the weight gradient: a helper changes their sm_90 SASS
                    ih = oh[:, None] * SH - PH + kh[None, :] * DH
                    iw = ow[:, None] * SW - PW + kw[None, :] * DW
                    ok = mm[:, None] & km[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < WI)
                x = tl.load(x_row[:, None] + ci.to(tl.int64)[None, :] * s_xc + ih.to(tl.int64) * s_xh
                            + iw.to(tl.int64) * s_xw, mask=ok, other=0.0)
                w = tl.load(W + rows[:, None] * s_wo + (ci.to(tl.int64) * s_wi + kh * s_wh + kw * s_ww)[None, :],
                            mask=live[:, None] & km[None, :], other=0.0)
                acc += tl.dot(x.to(DOT_DT), tl.trans(_mask_prologue(w, t, DOT_DT)), input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(B + rows * s_b, mask=jm, other=0.0).to(tl.float32)[None, :]
        # Y contiguous [NB, CO, OH, OW]
        y_off = (n.to(tl.int64) * CO * OH * OW + oh * OW + ow)[:, None] + rows[None, :] * (OH * OW)
        tl.store(Y + y_off, acc.to(Y.dtype.element_ty), mask=mm[:, None] & jm[None, :])

    def _k_conv_dgrad(DY, W, T, PERM, NL, KPERM, KNL, DX, FLOPS,
                      NB, CI, H, WI, CO, OH, OW,
                      s_gn, s_gc, s_gh, s_gw, s_wo, s_wi, s_wh, s_ww, s_t,
                      SH, SW, PH, PW, DH, DW,
                      KH: tl.constexpr, KW: tl.constexpr, TRANSPOSED: tl.constexpr,
                      K_COMPACT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        M = NB * H * WI
        pid_m, pid_n = _swizzle(pid, tl.cdiv(M, BM), tl.cdiv(CI, BN), GROUP_M)
        nlive = tl.load(NL)
        ncols = _compact_count(KNL, CI, K_COMPACT)
        if pid == 0:
            if TRANSPOSED:
                npos = M
            else:
                npos = NB * OH * OW
            tl.atomic_add(FLOPS + 1, 2 * tl.cast(npos, tl.int64) * tl.cast(nlive, tl.int64)
                          * tl.cast(ncols * (KH * KW), tl.int64), sem="relaxed")
        offs_m = pid_m * BM + tl.arange(0, BM)
        mm = offs_m < M
        n = offs_m // (H * WI)
        r = offs_m % (H * WI)
        ih = r // WI
        iw = r % WI
        g_row = DY + n.to(tl.int64) * s_gn
        p = pid_n * BN + tl.arange(0, BN)
        pm = p < CI
        ci = _compact_index(KPERM, p, pm, K_COMPACT).to(tl.int64)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if pid_n * BN < ncols:
            cm = p < ncols
            klen = nlive * (KH * KW)
            for k0 in range(0, klen, BK):
                kk = k0 + tl.arange(0, BK)
                km = kk < klen
                cpos = kk // (KH * KW)
                rr = kk % (KH * KW)
                kh = rr // KW
                kw = rr % KW
                co = tl.load(PERM + cpos, mask=km, other=0).to(tl.int64)
                t = tl.load(T + co * s_t, mask=km, other=0.0)
                if TRANSPOSED:  # the transposed conv's input gradient is a direct convolution of dy
                    oh = ih[:, None] * SH - PH + kh[None, :] * DH
                    ow = iw[:, None] * SW - PW + kw[None, :] * DW
                    ok = mm[:, None] & km[None, :] & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
                else:  # _tap_gather written out: calling it changes this kernel's sm_90 SASS (not yet timed)
                    hn = ih[:, None] + PH - kh[None, :] * DH
                    wn = iw[:, None] + PW - kw[None, :] * DW
                    hn0 = tl.maximum(hn, 0)
                    wn0 = tl.maximum(wn, 0)
                    oh = hn0 // SH
                    ow = wn0 // SW
                    ok = (mm[:, None] & km[None, :] & (hn >= 0) & (wn >= 0) & (hn0 - oh * SH == 0)
                          & (wn0 - ow * SW == 0) & (oh < OH) & (ow < OW))
                g = tl.load(g_row[:, None] + co[None, :] * s_gc + oh.to(tl.int64) * s_gh + ow.to(tl.int64) * s_gw,
                            mask=ok, other=0.0)
                w = tl.load(W + (co * s_wo + kh * s_wh + kw * s_ww)[:, None] + ci[None, :] * s_wi,
                            mask=km[:, None] & cm[None, :], other=0.0)
                acc += tl.dot(g.to(DOT_DT), _mask_prologue(w, t, DOT_DT), input_precision=PREC)
        # DX contiguous [NB, CI, H, WI]
        d_off = (n.to(tl.int64) * CI * H * WI + ih * WI + iw)[:, None] + ci[None, :] * (H * WI)
        tl.store(DX + d_off, acc.to(DX.dtype.element_ty), mask=mm[:, None] & pm[None, :])

    def _k_conv_wgrad(DY, X, W, T, KPERM, KNL, GW, GTP, CNTP, FLOPS,
                      NB, CI, H, WI, CO, OH, OW,
                      s_gn, s_gc, s_gh, s_gw, s_xn, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww, s_t,
                      SH, SW, PH, PW, DH, DW,
                      KH: tl.constexpr, KW: tl.constexpr, TRANSPOSED: tl.constexpr,
                      K_COMPACT: tl.constexpr, MODE: tl.constexpr, DOT_DT: tl.constexpr,
                      PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # Grid: output-channel tiles x column tiles, flat (a grid's second axis stops at 65535 tiles);
        # channel tiles vary fastest, as on the first axis of a 2-D grid.
        nct = tl.cdiv(CO, BM)
        pid_c = tl.program_id(0) % nct
        pid_k = tl.program_id(0) // nct
        M = NB * OH * OW
        KTOT = CI * (KH * KW)
        kl = _compact_count(KNL, CI, K_COMPACT) * (KH * KW)
        if (pid_c == 0) & (pid_k == 0):
            if TRANSPOSED:
                npos = NB * H * WI
            else:
                npos = M
            tl.atomic_add(FLOPS + 2, 2 * tl.cast(npos, tl.int64) * tl.cast(CO, tl.int64) * tl.cast(kl, tl.int64),
                          sem="relaxed")
        rows = (pid_c * BM + tl.arange(0, BM)).to(tl.int64)
        rm = rows < CO
        p = pid_k * BN + tl.arange(0, BN)
        pm = p < KTOT
        cpos = p // (KH * KW)
        rr = p % (KH * KW)
        kh = rr // KW
        kw = rr % KW
        ci = _compact_index(KPERM, cpos, pm, K_COMPACT).to(tl.int64)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if pid_k * BN < kl:
            cm = p < kl
            for m0 in range(0, M, BK):
                ii = m0 + tl.arange(0, BK)
                im = ii < M
                n = ii // (OH * OW)
                r = ii % (OH * OW)
                oh = r // OW
                ow = r % OW
                g = tl.load(DY + rows[:, None] * s_gc + (n.to(tl.int64) * s_gn + oh * s_gh + ow * s_gw)[None, :],
                            mask=rm[:, None] & im[None, :], other=0.0)
                if TRANSPOSED:
                    ih, iw, ok = _tap_gather(oh[:, None], ow[:, None], kh[None, :], kw[None, :],
                                             SH, SW, PH, PW, DH, DW, H, WI)
                    ok = ok & im[:, None] & cm[None, :]
                else:
                    ih = oh[:, None] * SH - PH + kh[None, :] * DH
                    iw = ow[:, None] * SW - PW + kw[None, :] * DW
                    ok = im[:, None] & cm[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < WI)
                x = tl.load(X + n.to(tl.int64)[:, None] * s_xn + ci[None, :] * s_xc + ih.to(tl.int64) * s_xh
                            + iw.to(tl.int64) * s_xw, mask=ok, other=0.0)
                acc += tl.dot(g.to(DOT_DT), x.to(DOT_DT), input_precision=PREC)
        inb = rm[:, None] & pm[None, :]
        t = tl.load(T + rows * s_t, mask=rm, other=0.0)
        w = tl.load(W + rows[:, None] * s_wo + (ci * s_wi + kh * s_wh + kw * s_ww)[None, :], mask=inb, other=0.0)
        gw, gt, cnt = _wgrad_epilogue(acc, w, t, inb, MODE, W.dtype.element_ty)
        # GW contiguous [CO, CI, KH, KW]
        tl.store(GW + rows[:, None] * KTOT + (ci * (KH * KW) + rr)[None, :], gw.to(GW.dtype.element_ty), mask=inb)
        tl.store(GTP + pid_k * CO + rows, gt, mask=rm)
        tl.store(CNTP + pid_k * CO + rows, cnt, mask=rm)


_KERNELS = U.LazyKernels(globals(), tuple(U.HELPERS) + ("_tap_gather", "_k_conv_fwd", "_k_conv_dgrad",
                                                         "_k_conv_wgrad"))


def available() -> Tuple[bool, str]:
    return U.available(_KERNELS)


def out_size(h: int, k: int, s: int, p: int, d: int, transposed: bool = False, output_padding: int = 0) -> int:
    if transposed:
        return (h - 1) * s - 2 * p + d * (k - 1) + output_padding + 1
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


def _check(weight: Tensor, threshold: Tensor, op: str) -> None:
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be [Co, Ci, KH, KW], got {weight.dim()} dims")
    if weight.dtype not in U.SUPPORTED_DTYPES:
        raise TypeError(f"{op}: weight dtype {weight.dtype} is not supported (float32, float16, bfloat16)")
    U.check_float32_vector(threshold, weight.shape[0], "threshold", op)


def _check_4d(a: Tensor, ch: int, dtype: torch.dtype, name: str, op: str) -> None:
    if a.dim() != 4 or a.shape[1] != ch:
        raise ValueError(f"{op}: {name} must be [N, {ch}, H, W], got {tuple(a.shape)}")
    if a.dtype != dtype:
        raise TypeError(f"{op}: {name} dtype {a.dtype} differs from the weight dtype {dtype}")


def _geom(stride, padding, dilation):
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    return dict(SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw)


def _fwd_impl(x, weight, threshold, bias, perm, nlive, in_perm, in_nlive, flops, stride, padding, dilation,
              transposed, output_padding):
    op = "triton_masked_conv_fwd"
    _check(weight, threshold, op)
    co, ci, kh, kw = weight.shape
    _check_4d(x, ci, weight.dtype, "x", op)
    U.check_index(perm, co, "perm", op)
    kc = U.check_compaction(in_perm, in_nlive, ci, op)
    nb, _, h, wi = x.shape
    oh = out_size(h, kh, stride[0], padding[0], dilation[0], transposed, output_padding[0])
    ow = out_size(wi, kw, stride[1], padding[1], dilation[1], transposed, output_padding[1])
    y = torch.empty((nb, co, max(oh, 0), max(ow, 0)), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    interp = U.require(_KERNELS, x.device, op)
    m = nb * oh * ow
    bm, bn, bk, warps, stages = _gemm_blocks(m, co, ci * kh * kw, x.dtype, interp)
    b = bias if bias is not None else threshold
    kp, kn = (in_perm, in_nlive) if kc else (perm, nlive)
    grid = (triton.cdiv(m, bm) * triton.cdiv(co, bn),)
    with U.device_ctx(x.device):
        _k_conv_fwd[grid](x, weight, threshold, b, y, perm, nlive, kp, kn, flops,
                          nb, ci, h, wi, co, oh, ow, *x.stride(), *weight.stride(), threshold.stride(0),
                          b.stride(0), **_geom(stride, padding, dilation), KH=kh, KW=kw, TRANSPOSED=transposed,
                          HAS_BIAS=bias is not None, K_COMPACT=kc, DOT_DT=_dot_dt(x.dtype, interp),
                          PREC=U.dot_precision("conv"), BM=bm, BN=bn, BK=bk, GROUP_M=8,
                          num_warps=warps, num_stages=stages)
    return y


def _dgrad_impl(dy, weight, threshold, perm, nlive, in_perm, in_nlive, flops, input_hw, stride, padding, dilation,
                transposed):
    op = "triton_masked_conv_dgrad"
    _check(weight, threshold, op)
    co, ci, kh, kw = weight.shape
    _check_4d(dy, co, weight.dtype, "dy", op)
    kc = U.check_compaction(in_perm, in_nlive, ci, op)
    nb, _, oh, ow = dy.shape
    h, wi = input_hw
    dx = torch.empty((nb, ci, h, wi), dtype=dy.dtype, device=dy.device)
    if dx.numel() == 0:
        return dx
    interp = U.require(_KERNELS, dy.device, op)
    m = nb * h * wi
    bm, bn, bk, warps, stages = _gemm_blocks(m, ci, co * kh * kw, dy.dtype, interp)
    kp, kn = (in_perm, in_nlive) if kc else (perm, nlive)
    grid = (triton.cdiv(m, bm) * triton.cdiv(ci, bn),)
    with U.device_ctx(dy.device):
        _k_conv_dgrad[grid](dy, weight, threshold, perm, nlive, kp, kn, dx, flops,
                            nb, ci, h, wi, co, oh, ow, *dy.stride(), *weight.stride(), threshold.stride(0),
                            **_geom(stride, padding, dilation), KH=kh, KW=kw, TRANSPOSED=transposed,
                            K_COMPACT=kc, DOT_DT=_dot_dt(dy.dtype, interp), PREC=U.dot_precision("conv"),
                            BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    return dx


def _wgrad_impl(dy, x, weight, threshold, in_perm, in_nlive, grad_mode, flops, stride, padding, dilation,
                transposed):
    op = "triton_masked_conv_wgrad"
    _check(weight, threshold, op)
    if grad_mode not in (0, 1):
        raise ValueError(f"{op}: grad_mode must be 0 (dst) or 1 (masked), got {grad_mode}")
    co, ci, kh, kw = weight.shape
    _check_4d(dy, co, weight.dtype, "dy", op)
    _check_4d(x, ci, weight.dtype, "x", op)
    kc = U.check_compaction(in_perm, in_nlive, ci, op)
    nb, _, h, wi = x.shape
    oh, ow = dy.shape[2], dy.shape[3]
    dev = weight.device
    gw = torch.empty((co, ci, kh, kw), dtype=weight.dtype, device=dev)
    ktot = ci * kh * kw
    if co == 0 or ktot == 0:
        return (gw, torch.zeros((co,), dtype=torch.float32, device=dev),
                torch.zeros((co,), dtype=torch.int32, device=dev))
    interp = U.require(_KERNELS, dev, op)
    m = nb * oh * ow
    bm, bn, bk, warps, stages = _gemm_blocks(co, ktot, max(m, 1), weight.dtype, interp)
    nkt = triton.cdiv(ktot, bn)
    gtp = torch.empty((nkt, co), dtype=torch.float32, device=dev)
    cntp = torch.empty((nkt, co), dtype=torch.int32, device=dev)
    kp, kn = (in_perm, in_nlive) if kc else (gtp, gtp)
    with U.device_ctx(dev):
        _k_conv_wgrad[(triton.cdiv(co, bm) * nkt,)](
            dy, x, weight, threshold, kp, kn, gw, gtp, cntp, flops,
            nb, ci, h, wi, co, oh, ow, *dy.stride(), *x.stride(), *weight.stride(), threshold.stride(0),
            **_geom(stride, padding, dilation), KH=kh, KW=kw, TRANSPOSED=transposed, K_COMPACT=kc,
            MODE=int(grad_mode),
            DOT_DT=_dot_dt(dy.dtype, interp), PREC=U.dot_precision("conv"), BM=bm, BN=bn, BK=bk,
            num_warps=warps, num_stages=stages)
    gt, cnt = U.sum_partials(gtp, cntp)
    return gw, gt, cnt


# =============================================================================================
# torch.library registration
# =============================================================================================

@torch.library.custom_op("rgkernels::triton_masked_conv_fwd", mutates_args=("flops",))
def triton_masked_conv_fwd(x: Tensor, weight: Tensor, threshold: Tensor, bias: Optional[Tensor], perm: Tensor,
                           nlive: Tensor, in_perm: Optional[Tensor], in_nlive: Optional[Tensor], flops: Tensor,
                           stride: List[int], padding: List[int], dilation: List[int], transposed: bool,
                           output_padding: List[int]) -> Tensor:
    return _fwd_impl(x, weight, threshold, bias, perm, nlive, in_perm, in_nlive, flops, stride, padding, dilation,
                     transposed, output_padding)


@torch.library.custom_op("rgkernels::triton_masked_conv_dgrad", mutates_args=("flops",))
def triton_masked_conv_dgrad(dy: Tensor, weight: Tensor, threshold: Tensor, perm: Tensor, nlive: Tensor,
                             in_perm: Optional[Tensor], in_nlive: Optional[Tensor], flops: Tensor,
                             input_hw: List[int], stride: List[int], padding: List[int],
                             dilation: List[int], transposed: bool) -> Tensor:
    return _dgrad_impl(dy, weight, threshold, perm, nlive, in_perm, in_nlive, flops, input_hw, stride, padding,
                       dilation, transposed)


@torch.library.custom_op("rgkernels::triton_masked_conv_wgrad", mutates_args=("flops",))
def triton_masked_conv_wgrad(dy: Tensor, x: Tensor, weight: Tensor, threshold: Tensor, in_perm: Optional[Tensor],
                             in_nlive: Optional[Tensor], grad_mode: int, flops: Tensor, stride: List[int],
                             padding: List[int], dilation: List[int],
                             transposed: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _wgrad_impl(dy, x, weight, threshold, in_perm, in_nlive, grad_mode, flops, stride, padding, dilation,
                       transposed)


@triton_masked_conv_fwd.register_fake
def _(x, weight, threshold, bias, perm, nlive, in_perm, in_nlive, flops, stride, padding, dilation, transposed,
      output_padding):
    co, _, kh, kw = weight.shape
    oh = out_size(x.shape[2], kh, stride[0], padding[0], dilation[0], transposed, output_padding[0])
    ow = out_size(x.shape[3], kw, stride[1], padding[1], dilation[1], transposed, output_padding[1])
    return x.new_empty((x.shape[0], co, oh, ow))


@triton_masked_conv_dgrad.register_fake
def _(dy, weight, threshold, perm, nlive, in_perm, in_nlive, flops, input_hw, stride, padding, dilation, transposed):
    return dy.new_empty((dy.shape[0], weight.shape[1], input_hw[0], input_hw[1]))


@triton_masked_conv_wgrad.register_fake
def _(dy, x, weight, threshold, in_perm, in_nlive, grad_mode, flops, stride, padding, dilation, transposed):
    co = weight.shape[0]
    return weight.new_empty(weight.shape), threshold.new_empty((co,)), weight.new_empty((co,), dtype=torch.int32)
