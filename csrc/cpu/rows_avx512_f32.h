// float32 row kernels written with AVX-512 intrinsics, for contiguous rows (masked_weight_rows.cpp's
// AVX-512 variant calls them; ukernel_masked_linear.cpp uses the target macro and first_lanes).
//
// Why not gcc's vectorisation of the generic loops: the mask of 16 weights is one compare into a
// mask register, which is already the bit-packed mask, its keep count (popcount) and the select of
// W_hat; the generic code turned it into 0/1 floats, 0/1 bytes and a byte-packing loop. Together
// with the aligned block buffers (scratch.h) this took the masked linear's mask pass on SNGAN G.l1's
// 4096x128 weight from ~240 to ~160 us (perf samples of 20000 node forwards at batch 1, one thread,
// Intel Xeon VM).
//
// Results are bit-identical to the generic kernels (tests compare every instruction set's output):
// the same operations in the same order with one rounding each (no FMA; -ffp-contract=off does not
// matter for intrinsics, which are never contracted), 0/1 masks applied by multiplication (so NaN
// and inf propagate as in the reference), and grad_threshold's sum in block_sum / pairwise_sum's
// order: 16 lanes over the full vectors, the tail summed in order, lanes folded 8-4-2-1, then
// blocks of kBase entries combined pairwise.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
// gcc 12's AVX-512 headers start some intrinsics from a self-initialised (undefined) vector, which
// -Wall reports as (maybe) uninitialised where they are inlined; the values are never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define RGK_AVX512_F32 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,popcnt")))

namespace rgkernels {
namespace cpu {
namespace avx512_f32 {

// Lanes below n set (n <= 16).
RGK_AVX512_F32 inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u);
}

// W_hat = W * M for 16 entries (those of `in`), the mask returned.
RGK_AVX512_F32 inline __mmask16 fwd_vec(const float* w, float* out, __m512 tv, __mmask16 in) {
  const __m512 wv = _mm512_maskz_loadu_ps(in, w);
  const __m512 x = _mm512_sub_ps(_mm512_abs_ps(wv), tv);
  const __mmask16 m = _mm512_mask_cmp_ps_mask(in, x, _mm512_setzero_ps(), _CMP_GT_OQ);  // x > 0; NaN: pruned
  _mm512_mask_storeu_ps(out, in, _mm512_mul_ps(wv, _mm512_maskz_mov_ps(m, _mm512_set1_ps(1.0f))));
  return m;
}

// W_hat = W * M for one row, the mask bit-packed into `bits` when kBits (entry j in bit j % 8 of
// byte j / 8); returns the keep count. Groups of 4 full vectors (64 entries) gather their masks into
// one 64-bit word, stored once and counted with one popcount: storing each mask register as it is
// (2 bytes per vector) made the loop 1.6-2.0x slower (C++ microbenchmark, 1024x128 and 4096x128
// weights). Only the last, partial group uses lane masks.
template <bool kBits>
RGK_AVX512_F32 inline int32_t fwd_row(const float* __restrict__ w, int64_t K, float t, float* __restrict__ out,
                                      uint8_t* __restrict__ bits) {
  const __m512 tv = _mm512_set1_ps(t);
  uint64_t kept = 0;
  int64_t j = 0;
  for (; j + 64 <= K; j += 64) {
    uint64_t word = 0;
    for (int q = 0; q < 4; ++q) {
      const __mmask16 m = fwd_vec(w + j + 16 * q, out + j + 16 * q, tv, 0xFFFF);
      word |= uint64_t(_cvtmask16_u32(m)) << (16 * q);
    }
    kept += _mm_popcnt_u64(word);
    if (kBits) std::memcpy(bits + j / 8, &word, 8);
  }
  if (j < K) {
    uint64_t word = 0;
    for (int64_t q = 0; j + 16 * q < K; ++q) {
      const int64_t at = j + 16 * q;
      word |= uint64_t(_cvtmask16_u32(fwd_vec(w + at, out + at, tv, first_lanes(K - at)))) << (16 * q);
    }
    kept += _mm_popcnt_u64(word);
    if (kBits) std::memcpy(bits + j / 8, &word, static_cast<size_t>((K - j + 7) / 8));
  }
  return static_cast<int32_t>(kept);
}

// Sum of 16 lanes folded 8-4-2-1 (block_sum's order), plus the tail.
RGK_AVX512_F32 inline float fold(__m512 acc, float tail) {
  const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  const __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
  const __m128 a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
  const __m128 a1 = _mm_add_ss(a2, _mm_shuffle_ps(a2, a2, 1));
  return _mm_cvtss_f32(a1) + tail;
}

// Backward of 16 entries (those of `in`): stores gw = M * g * (1 + |W| H'(x)) (kDst) or M * g, and
// W_hat when kWhat; returns g * W * H'(x), the threshold gradient's terms (0 outside `in`).
template <bool kDst, bool kWhat>
RGK_AVX512_F32 inline __m512 bwd_vec(const float* g, const float* w, float* gw, float* what, __m512 tv,
                                     __mmask16 in) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), c04 = _mm512_set1_ps(0.4f);
  const __m512 wv = _mm512_maskz_loadu_ps(in, w);
  const __m512 gv = _mm512_maskz_loadu_ps(in, g);
  const __m512 aw = _mm512_abs_ps(wv);
  const __m512 x = _mm512_sub_ps(aw, tv);
  const __m512 ax = _mm512_abs_ps(x);
  // H'(x): 2 - 4|x| for |x| <= 0.4, 0.4 for |x| <= 1, else 0 (NaN: 0)
  const __m512 outer = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ax, one, _CMP_LE_OQ), c04);
  const __m512 h = _mm512_mask_mov_ps(outer, _mm512_cmp_ps_mask(ax, c04, _CMP_LE_OQ),
                                      _mm512_sub_ps(_mm512_set1_ps(2.0f), _mm512_mul_ps(_mm512_set1_ps(4.0f), ax)));
  const __m512 mf = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), one);
  const __m512 mg = _mm512_mul_ps(mf, gv);
  _mm512_mask_storeu_ps(gw, in, kDst ? _mm512_mul_ps(mg, _mm512_add_ps(one, _mm512_mul_ps(aw, h))) : mg);
  if (kWhat) _mm512_mask_storeu_ps(what, in, _mm512_mul_ps(wv, mf));
  return _mm512_mul_ps(_mm512_mul_ps(gv, wv), h);
}

// Backward of one row (DESIGN.md §2): gw, W_hat into `what` when kWhat, and the return value
// grad_threshold = -sum_j g W H'(x). `partial`: scratch for the block sums of rows longer than kBase
// entries (K / kBase + 1 floats). gw may be g (in place: each vector is loaded before it is stored).
template <bool kDst, bool kWhat, int64_t kBase>
RGK_AVX512_F32 inline float bwd_row(const float* g, const float* __restrict__ w, int64_t K, float t,
                                    float* gw, float* __restrict__ what, float* __restrict__ partial) {
  static_assert(kBase % 16 == 0, "blocks of whole vectors");
  const __m512 tv = _mm512_set1_ps(t);
  int64_t nb = 0;
  for (int64_t b0 = 0; b0 < K; b0 += kBase) {
    const int64_t b1 = b0 + kBase < K ? b0 + kBase : K;
    __m512 acc = _mm512_setzero_ps();
    float tail = 0.0f;
    int64_t j = b0;
    for (; j + 16 <= b1; j += 16)
      acc = _mm512_add_ps(acc, bwd_vec<kDst, kWhat>(g + j, w + j, gw + j, what + j, tv, 0xFFFF));
    if (j < b1) {  // the tail, summed in order
      alignas(64) float p[16];
      _mm512_store_ps(p, bwd_vec<kDst, kWhat>(g + j, w + j, gw + j, what + j, tv, first_lanes(b1 - j)));
      for (int64_t l = 0; l < b1 - j; ++l) tail += p[l];
    }
    partial[nb++] = fold(acc, tail);
  }
  if (nb == 0) return -0.0f;  // K == 0: -(empty sum)
  while (nb > 1) {  // pairwise_sum's combination: adjacent pairs, level by level
    const int64_t half = nb / 2;
    for (int64_t i = 0; i < half; ++i) partial[i] = partial[2 * i] + partial[2 * i + 1];
    if (nb & 1) partial[half] = partial[nb - 1];
    nb = half + (nb & 1);
  }
  return -partial[0];
}

}  // namespace avx512_f32
}  // namespace cpu
}  // namespace rgkernels
