// The CPU masked linear on oneDNN's micro-kernel, W_hat never written to memory (DESIGN.md §2, §4).
//
// Why: at GAN batch sizes a linear layer does little work per weight (64 multiply-adds per weight
// and GEMM at batch 64), so every extra pass over a weight-sized tensor is a visible share of the
// step. Writing W_hat = W * M whole and reading it back in two GEMMs made the masked layer 1.1-1.5x
// the dense one on an Intel Xeon (BENCHMARKS.md, session 4). Splitting ATen's GEMM into per-block
// calls to avoid that costs more than it saves (each call packs its operands again: ~30% slower on
// G.l1's shape, measured), but the micro-kernel is called block by block anyway
// (ukernel_gemm.cpp) and does not pack. So here the mask of a block of weight rows goes into a
// buffer in L1/L2 and the micro-kernel reads it from there:
//
//   forward  y[:, block] = x W_hat[block]^T (the block's W_hat transposed in cache) where the batch is
//            at least half the row length, else y^T[block] = W_hat[block] x^T and that tile transposed
//            into y
//   weight gradient  g[block] = (dy[:, block])^T x (dy's tile transposed in cache), written by the
//            GEMM into grad_weight's rows, then the masked-weight backward of masked_weight_rows.cpp
//            in place on them while they are in cache, and the bias gradient from dy's tile. (With g
//            in a buffer in cache, the row kernel's stores to grad_weight took the cache misses of
//            its 2 MB on SNGAN G.l1 in a phase with nothing else to do; the GEMM's stores overlap its
//            FMAs, as the dense layer's do: G.l1's step 1.18-1.31x -> 1.07-1.23x dense, Intel Xeon.)
//   input gradient  in the same pass where the batch is small next to the layer (the masked-weight
//            backward also writes the block's W_hat in cache, then dx += dy[:, block] W_hat[block]),
//            else its own pass: dx[:, cols] = sum over blocks of rows dy[:, rows] W_hat[rows, cols],
//            the mask of each [rows, cols] tile computed in cache
//
// W is read once in the forward and once in the backward, as the dense layer reads it; the weight
// gradient is the only weight-sized tensor written. The layer's statistics get the mask bit-packed
// (1 bit per weight).
// Every output element is computed by one thread in a fixed order: results do not depend on the
// number of threads.
//
// Entirely pruned rows: a block of kUkRows rows with >= 1/2 of them dead runs its forward GEMM on
// the live rows only (the gather is free: the block buffer is written anyway; dead outputs are the
// bias; such a block always takes the y^T orientation), and the input gradient skips the same rows.
// The weight-gradient GEMM stays dense: the threshold gradient needs g at every entry.
#include "ukernel_masked_linear.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include "rows_avx512_f32.h"  // RGK_AVX512_F32, first_lanes
#define RGK_HAVE_AVX512_TRANSPOSE 1
#else
#define RGK_HAVE_AVX512_TRANSPOSE 0
#endif

#include "buffer_pool.h"
#include "masked_weight_rows.h"
#include "rgkernels/masked_weight.h"
#include "scratch.h"
#include "ukernel_gemm.h"

namespace rgkernels {
namespace cpu {
namespace {

constexpr int64_t kColsChunk = 256;  // columns of x^T (batch rows) per forward GEMM: a [64, 256] tile
constexpr int64_t kBatchChunk = 256;  // batch rows per weight-gradient GEMM (its reduction)
constexpr int64_t kDxCols = 64;       // columns of dx per input-gradient task
constexpr int64_t kDxRows = 256;      // weight rows per input-gradient tile: a [256, 64] tile of W_hat
constexpr int64_t kDxParts = 4;       // partial sums of the input gradient fused into the weight-gradient pass

// ---- transpose ------------------------------------------------------------------------------

void transpose_scalar(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

#if RGK_HAVE_AVX512_TRANSPOSE
// One 16x16 tile: unpack pairs of rows, 4x4 blocks within 128-bit lanes, then the lanes.
RGK_AVX512_F32 void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    const __m512 r0 = _mm512_loadu_ps(src + (4 * g) * lds), r1 = _mm512_loadu_ps(src + (4 * g + 1) * lds);
    const __m512 r2 = _mm512_loadu_ps(src + (4 * g + 2) * lds), r3 = _mm512_loadu_ps(src + (4 * g + 3) * lds);
    const __m512 lo01 = _mm512_unpacklo_ps(r0, r1), hi01 = _mm512_unpackhi_ps(r0, r1);
    const __m512 lo23 = _mm512_unpacklo_ps(r2, r3), hi23 = _mm512_unpackhi_ps(r2, r3);
    // u[4g + c], lane L: rows 4g..4g+3 of column 4L + c
    u[4 * g + 0] = _mm512_shuffle_ps(lo01, lo23, 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(lo01, lo23, 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(hi01, hi23, 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(hi01, hi23, 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), b = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    _mm512_storeu_ps(dst + c * ldd, _mm512_shuffle_f32x4(a, b, 0x88));        // column c
    _mm512_storeu_ps(dst + (8 + c) * ldd, _mm512_shuffle_f32x4(a, b, 0xDD));  // column 8 + c
    const __m512 a2 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD), b2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    _mm512_storeu_ps(dst + (4 + c) * ldd, _mm512_shuffle_f32x4(a2, b2, 0x88));   // column 4 + c
    _mm512_storeu_ps(dst + (12 + c) * ldd, _mm512_shuffle_f32x4(a2, b2, 0xDD));  // column 12 + c
  }
}

// The features RGK_AVX512_F32 compiles for.
bool have_avx512() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("popcnt");
  }();
  return ok;
}
#endif

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols (AVX-512 16x16 tiles where the
// CPU has them, scalar at the edges and elsewhere).
void transpose_f32(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
#if RGK_HAVE_AVX512_TRANSPOSE
  if (have_avx512()) {
    const int64_t r16 = rows - rows % 16, c16 = cols - cols % 16;
    for (int64_t r = 0; r < r16; r += 16)
      for (int64_t c = 0; c < c16; c += 16) transpose16(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    transpose_scalar(src + c16, lds, dst + c16 * ldd, ldd, rows, cols - c16);  // right edge
    transpose_scalar(src + r16 * lds, lds, dst + r16, ldd, rows - r16, c16);    // bottom edge
    return;
  }
#endif
  transpose_scalar(src, lds, dst, ldd, rows, cols);
}

// y[r, :n] += b[:n] for r < rows (row stride ldy): the bias of the direct forward orientation. This
// file is compiled for baseline x86-64 (SSE), hence the AVX-512 version.
void add_bias_rows_scalar(float* y, int64_t ldy, int64_t rows, const float* b, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) y[r * ldy + i] += b[i];
}

#if RGK_HAVE_AVX512_TRANSPOSE
RGK_AVX512_F32 void add_bias_rows_avx512(float* y, int64_t ldy, int64_t rows, const float* b, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * ldy;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 in = avx512_f32::first_lanes(n - i);
      const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(in, yr + i), _mm512_maskz_loadu_ps(in, b + i));
      _mm512_mask_storeu_ps(yr + i, in, sum);
    }
  }
}
#endif

void add_bias_rows(float* y, int64_t ldy, int64_t rows, const float* b, int64_t n) {
#if RGK_HAVE_AVX512_TRANSPOSE
  if (have_avx512()) return add_bias_rows_avx512(y, ldy, rows, b, n);
#endif
  add_bias_rows_scalar(y, ldy, rows, b, n);
}

// acc[i] = a[0][i] + a[1][i] + ... + a[rows - 1][i] (row stride lda), plus acc[i] first when
// accumulate; summed in that order in both versions: the bias gradient, from dy's tiles.
void sum_rows_scalar(const float* a, int64_t lda, int64_t rows, int64_t n, float* acc, bool accumulate) {
  for (int64_t i = 0; i < n; ++i) {
    float s = accumulate ? acc[i] + a[i] : a[i];
    for (int64_t r = 1; r < rows; ++r) s += a[r * lda + i];
    acc[i] = s;
  }
}

// dst[i] += src[i] for i < n: the input gradient's partial sums.
void add_into_scalar(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

#if RGK_HAVE_AVX512_TRANSPOSE
RGK_AVX512_F32 void sum_rows_avx512(const float* a, int64_t lda, int64_t rows, int64_t n, float* acc,
                                    bool accumulate) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = avx512_f32::first_lanes(n - i);
    __m512 s = _mm512_maskz_loadu_ps(in, a + i);
    if (accumulate) s = _mm512_add_ps(_mm512_maskz_loadu_ps(in, acc + i), s);
    for (int64_t r = 1; r < rows; ++r) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(in, a + r * lda + i));
    _mm512_mask_storeu_ps(acc + i, in, s);
  }
}

RGK_AVX512_F32 void add_into_avx512(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(dst + i), _mm512_loadu_ps(src + i)));
  add_into_scalar(dst + i, src + i, n - i);
}
#endif

void sum_rows(const float* a, int64_t lda, int64_t rows, int64_t n, float* acc, bool accumulate) {
#if RGK_HAVE_AVX512_TRANSPOSE
  if (have_avx512()) return sum_rows_avx512(a, lda, rows, n, acc, accumulate);
#endif
  sum_rows_scalar(a, lda, rows, n, acc, accumulate);
}

void add_into(float* dst, const float* src, int64_t n) {
#if RGK_HAVE_AVX512_TRANSPOSE
  if (have_avx512()) return add_into_avx512(dst, src, n);
#endif
  add_into_scalar(dst, src, n);
}

// Dead rows (keep count 0) of a block when the block is compacted, else 0.
int64_t compacted_dead(const int32_t* counts, int64_t rb) {
  int64_t dead = 0;
  for (int64_t i = 0; i < rb; ++i) dead += counts[i] == 0;
  return dead > 0 && dead * kCompactMinDeadInv >= rb ? dead : 0;
}

}  // namespace

int64_t skipped_rows(const int32_t* counts, int64_t O, bool* skip) {
  int64_t total = 0;
  for (int64_t r0 = 0; r0 < O; r0 += kUkRows) {
    const int64_t rb = std::min(kUkRows, O - r0);
    const int64_t dead = compacted_dead(counts + r0, rb);
    const bool compact = dead > 0;
    total += dead;
    if (skip != nullptr)
      for (int64_t i = 0; i < rb; ++i) skip[r0 + i] = compact && counts[r0 + i] == 0;
  }
  return total;
}

namespace {

FwdLayer rows_of(const at::Tensor& weight, const at::Tensor& threshold, int64_t r0, int64_t c0, int64_t k, float* out,
                 int32_t* counts, uint8_t* bits = nullptr, int64_t bits_stride = 0) {
  return FwdLayer{weight.data_ptr<float>() + r0 * weight.stride(0) + c0 * weight.stride(1),
                  out,
                  threshold.data_ptr<float>() + r0 * threshold.stride(0),
                  counts,
                  0,
                  k,
                  weight.stride(0),
                  weight.stride(1),
                  threshold.stride(0),
                  at::kFloat,
                  bits,
                  bits_stride};
}

// One pass of the forward over all blocks (the guard may ask for a second one).
void forward_pass(const at::Tensor& xt, const at::Tensor& xc, const at::Tensor& weight, const at::Tensor& threshold,
                  const at::Tensor& bias, at::Tensor& y, at::Tensor& counts, at::Tensor& bits) {
  const int64_t O = weight.size(0), K = weight.size(1), B = xt.size(1);
  const float* xp = xt.data_ptr<float>();
  const float* xr = xc.data_ptr<float>();
  // Which operand is transposed in cache: the block of W_hat (then the GEMM writes y itself) or the
  // y^T tile (then its transpose writes y). Measured (forward of the node, one thread, Intel Xeon):
  // W_hat's block on SNGAN G.l1 (K = 128 = 2 x batch 64) made the forward 1.20x the dense one instead
  // of 1.30x (the GEMM's own stores into y overlap its FMAs; a transpose's do not); the y^T tile won
  // on StyleGAN2's map.fc (K = 512 = 8 x batch) and FastGAN's G.se (K = 8192, batch 8).
  const bool direct = 2 * B >= K;
  float* yp = y.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t bs = bias.defined() ? bias.stride(0) : 0;
  int32_t* cp = counts.data_ptr<int32_t>();
  uint8_t* bitp = bits.data_ptr<uint8_t>();
  const int64_t nbytes = bits.size(1);
  const int64_t nblocks = (O + kUkRows - 1) / kUkRows;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    // Per-thread buffers, kept between calls (no allocation per forward): the block of W_hat, the y^T
    // tile, the block of W_hat transposed (direct orientation) and the block's bias.
    thread_local Scratch<float> wb, yt, wbt;
    thread_local std::vector<int64_t> live;
    thread_local std::vector<float> bl(kUkRows);
    wb.grow(kUkRows * K);
    yt.grow(kUkRows * kColsChunk);
    if (direct) wbt.grow(kUkRows * K);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kUkRows, rb = std::min(kUkRows, O - r0);
      if (bp != nullptr)
        for (int64_t i = 0; i < rb; ++i) bl[i] = bp[(r0 + i) * bs];
      FwdLayer L = rows_of(weight, threshold, r0, 0, K, wb.data(), cp + r0, bitp + r0 * nbytes, nbytes);
      L.C = rb;
      fwd_rows(L, 0, rb, false);
      const bool compact = compacted_dead(cp + r0, rb) > 0;
      int64_t n = rb;
      if (compact) {  // live rows to the front of the block, in order
        live.clear();
        for (int64_t i = 0; i < rb; ++i) {
          if (cp[r0 + i] == 0) continue;
          const int64_t to = static_cast<int64_t>(live.size());
          if (to != i) std::memmove(wb.data() + to * K, wb.data() + i * K, K * sizeof(float));
          live.push_back(i);
        }
        n = static_cast<int64_t>(live.size());
      }
      if (direct && !compact) {
        // y[:, block] = x W_hat[block]^T written by the GEMM itself (row stride O)
        transpose_f32(wb.data(), K, wbt.data(), rb, rb, K);  // [K, rb]
        for (int64_t m0 = 0; m0 < B; m0 += kColsChunk) {
          const int64_t mb = std::min(kColsChunk, B - m0);
          float* yrows = yp + m0 * O + r0;
          gemm_f32(mb, rb, K, xr + m0 * K, K, wbt.data(), rb, yrows, O, false);
          if (bp != nullptr) add_bias_rows(yrows, O, mb, bl.data(), rb);
        }
        continue;
      }
      for (int64_t m0 = 0; m0 < B; m0 += kColsChunk) {
        const int64_t mb = std::min(kColsChunk, B - m0);
        float* yrows = yp + m0 * O + r0;  // y[m0:m0+mb, r0:r0+rb], row stride O
        if (n > 0) gemm_f32(n, mb, K, wb.data(), K, xp + m0, B, yt.data(), mb, false);
        if (compact) {
          // The n computed rows of y^T back to their places in the block (live[i] >= i: from the
          // last one, so that no row is overwritten before it moved), zeros in the dead ones.
          for (int64_t i = n - 1; i >= 0; --i) {
            if (live[i] != i) std::memcpy(yt.data() + live[i] * mb, yt.data() + i * mb, mb * sizeof(float));
          }
          for (int64_t i = 0; i < rb; ++i) {
            if (cp[r0 + i] == 0) std::fill(yt.data() + i * mb, yt.data() + (i + 1) * mb, 0.0f);
          }
        }
        if (bp != nullptr) {  // on the y^T tile: one bias value per contiguous row
          for (int64_t i = 0; i < rb; ++i) {
            float* row = yt.data() + i * mb;
            for (int64_t b = 0; b < mb; ++b) row[b] += bl[i];
          }
        }
        transpose_f32(yt.data(), mb, yrows, O, rb, mb);
      }
    }
    wb.trim();
    yt.trim();
    wbt.trim();
    gemm_release();
  });
}

}  // namespace

at::Tensor ukernel_masked_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& threshold,
                                  const at::Tensor& bias, double guard_ratio, at::Tensor& counts, at::Tensor& bits,
                                  int64_t& ran_rows) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "ukernel_masked_forward: float32 only");
  const int64_t O = weight.size(0), K = weight.size(1), B = x2.size(0);
  counts = at::empty({O}, weight.options().dtype(at::kInt));
  bits = at::empty({O, (K + 7) / 8}, weight.options().dtype(at::kByte));
  at::Tensor y = at::empty({B, O}, x2.options());
  ran_rows = 0;
  if (O == 0) return y;
  const at::Tensor xc = x2.contiguous();
  // [K, B]: the y^T orientation's B operand (transposed here: ATen's strided copy took ~45 us on
  // G.l1's 64x128 input, ~2% of the layer's step)
  const at::Tensor xt = at::empty({K, B}, x2.options());
  transpose_f32(xc.data_ptr<float>(), K, xt.data_ptr<float>(), B, B, K);
  forward_pass(xt, xc, weight, threshold, bias, y, counts, bits);
  if (guard_ratio >= 0.0) {
    int64_t kept = 0;
    const int32_t* c = counts.data_ptr<int32_t>();
    for (int64_t i = 0; i < O; ++i) kept += c[i];
    if (collapsed(kept, O * K, guard_ratio)) {
      float* t = threshold.data_ptr<float>();
      for (int64_t r = 0; r < O; ++r) t[r * threshold.stride(0)] = 0.0f;  // in place, as masked_weight_fwd
      forward_pass(xt, xc, weight, threshold, bias, y, counts, bits);
    }
  }
  ran_rows = O - skipped_rows(counts.data_ptr<int32_t>(), O);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ukernel_masked_backward(
    const at::Tensor& dy2, const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& threshold,
    const at::Tensor& counts, int64_t grad_mode, bool need_x, bool need_wt, bool need_b) {
  const int64_t O = weight.size(0), K = weight.size(1), B = x2.size(0);
  at::Tensor dx, grad_weight, grad_threshold, grad_bias;
  const at::Tensor dyc = dy2.contiguous();  // [B, O]
  const float* dyp = dyc.data_ptr<float>();
  // The bias gradient from the weight-gradient pass's tiles of dy while in cache (ATen's dy.sum(0)
  // read dy again: ~110 us on G.l1's [64, 4096] gradient, ~4% of the layer's step), else ATen's sum.
  const bool fused_b = need_b && need_wt && O > 0 && K > 0;
  if (need_b) grad_bias = fused_b ? at::empty({O}, dy2.options()) : dyc.sum(0);
  float* gbp = fused_b ? grad_bias.data_ptr<float>() : nullptr;

  // The input gradient inside the weight-gradient pass (W read once in the backward): the masked-weight
  // backward writes the block's W_hat in cache too, and dx += dy[:, block] W_hat[block]. The blocks are
  // split into `parts` fixed ranges, each summed into its own dx by one thread, and the parts added in
  // order: results independent of the thread count, parallel over at most kDxParts threads. Taken
  // where those partial sums are small next to W (parts * B <= O: few batch rows per weight row, the
  // case where weight-sized passes matter, and one tile of dy per block); else the input gradient is
  // its own pass over W.
  const int64_t nblocks = (O + kUkRows - 1) / kUkRows;
  const int64_t parts = std::min<int64_t>(nblocks, kDxParts);
  const bool fused_dx =
      need_x && need_wt && B > 0 && B <= kBatchChunk && K > 0 && weight.stride(1) == 1 && parts * B <= O;
  std::vector<uint8_t> skip_bytes(static_cast<size_t>(need_x ? O : 0));
  bool* skip = reinterpret_cast<bool*>(skip_bytes.data());
  const int64_t nskip = need_x ? skipped_rows(counts.data_ptr<int32_t>(), O, skip) : 0;
  if (need_x) dx = at::empty({B, K}, x2.options());

  if (need_x && !fused_dx) {
    // Rows the forward's GEMMs ran, and dy's matching columns (gathered once when rows are skipped).
    std::vector<int64_t> rows;
    at::Tensor a = dyc;
    if (nskip > 0) {
      rows.reserve(static_cast<size_t>(O - nskip));
      for (int64_t r = 0; r < O; ++r)
        if (!skip[r]) rows.push_back(r);
      const at::Tensor idx =
          at::from_blob(rows.data(), {static_cast<int64_t>(rows.size())}, at::kLong).clone();
      a = dyc.index_select(1, idx).contiguous();
    }
    const int64_t n = nskip > 0 ? static_cast<int64_t>(rows.size()) : O;
    const float* ap = a.data_ptr<float>();
    float* dxp = dx.data_ptr<float>();
    if (n == 0 || B == 0) {
      dx.zero_();
    } else {
      const int64_t ntasks = (K + kDxCols - 1) / kDxCols;
      at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
        thread_local Scratch<float> tile;  // a [kDxRows, kDxCols] tile of W_hat
        thread_local Scratch<int32_t> cnt;  // the tile's keep counts (not used)
        tile.grow(kDxRows * kDxCols);
        cnt.grow(kDxRows);
        for (int64_t task = t0; task < t1; ++task) {
          const int64_t c0 = task * kDxCols, cw = std::min(kDxCols, K - c0);
          for (int64_t o0 = 0; o0 < n; o0 += kDxRows) {
            const int64_t ob = std::min(kDxRows, n - o0);
            if (nskip == 0) {  // rows o0.. of W_hat, columns c0..c0+cw: one call
              FwdLayer L = rows_of(weight, threshold, o0, c0, cw, tile.data(), cnt.data());
              L.C = ob;
              fwd_rows(L, 0, ob, false);
            } else {  // the kept rows, one at a time
              for (int64_t i = 0; i < ob; ++i) {
                FwdLayer L = rows_of(weight, threshold, rows[o0 + i], c0, cw, tile.data() + i * cw, cnt.data());
                L.C = 1;
                fwd_rows(L, 0, 1, false);
              }
            }
            gemm_f32(B, cw, ob, ap + o0, n, tile.data(), cw, dxp + c0, K, o0 > 0);
          }
        }
        gemm_release();
      });
    }
  }

  if (need_wt) {
    grad_weight = pooled_empty({O, K}, weight.options());
    grad_threshold = at::empty({O}, threshold.options());
    if (O > 0 && K > 0) {
      const at::Tensor xc = x2.contiguous();
      const float* xp = xc.data_ptr<float>();
      const bool dst = grad_mode == kGradModeDst;
      // dx of parts 1.. (part 0 sums into dx itself)
      at::Tensor partial = fused_dx && parts > 1 ? at::empty({parts - 1, B, K}, x2.options()) : at::Tensor();
      // One range of blocks; dx_acc: where its input-gradient share goes (nullptr: not fused).
      auto run_blocks = [&](int64_t b0, int64_t b1, float* dx_acc) {
        thread_local Scratch<float> at_, wb, ab;  // dy's tile transposed; W_hat; dy's live columns
        thread_local Scratch<double> scratch;         // bwd_rows' products (and copy of g's row)
        thread_local std::vector<int64_t> live;
        at_.grow(kUkRows * kBatchChunk);
        scratch.grow(2 * K);  // bwd_rows in place: its products and a copy of g's row
        if (dx_acc != nullptr) {
          wb.grow(kUkRows * K);
          ab.grow(kUkRows * B);
        }
        bool started = false;
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * kUkRows, rb = std::min(kUkRows, O - r0);
          float* gblk = grad_weight.data_ptr<float>() + r0 * K;  // dL/dW_hat, then the weight gradient
          if (B == 0) std::fill(gblk, gblk + rb * K, 0.0f);
          if (B == 0 && gbp != nullptr) std::fill(gbp + r0, gbp + r0 + rb, 0.0f);
          for (int64_t m0 = 0; m0 < B; m0 += kBatchChunk) {
            const int64_t mb = std::min(kBatchChunk, B - m0);
            transpose_f32(dyp + m0 * O + r0, O, at_.data(), mb, mb, rb);  // [rb, mb]
            if (gbp != nullptr) sum_rows(dyp + m0 * O + r0, O, mb, rb, gbp + r0, m0 > 0);  // dy's tile in L1
            gemm_f32(rb, K, mb, at_.data(), mb, xp + m0 * K, K, gblk, K, m0 > 0);
          }
          BwdLayer L{gblk, weight.data_ptr<float>() + r0 * weight.stride(0),
                     threshold.data_ptr<float>() + r0 * threshold.stride(0),
                     gblk, grad_threshold.data_ptr<float>() + r0, rb, K, K, 1,
                     weight.stride(0), weight.stride(1), threshold.stride(0), K, at::kFloat};
          if (dx_acc != nullptr) L.w_hat = wb.data();
          bwd_rows(L, 0, rb, dst, scratch.data());
          if (dx_acc == nullptr) continue;
          // dx += dy[:, block] W_hat[block], without the rows the forward skipped
          const float* a = dyp + r0;
          int64_t lda = O, n = rb;
          live.clear();
          for (int64_t i = 0; i < rb; ++i)
            if (!skip[r0 + i]) live.push_back(i);
          if (static_cast<int64_t>(live.size()) < rb) {
            // The live rows of W_hat, and the matching columns of dy: from dy's tile, which the
            // weight-gradient GEMM left transposed in at_ ([rb, B]: B <= kBatchChunk here), its
            // live rows moved up and transposed back.
            n = static_cast<int64_t>(live.size());
            for (int64_t li = 0; li < n; ++li) {
              if (live[li] == li) continue;
              std::memcpy(wb.data() + li * K, wb.data() + live[li] * K, K * sizeof(float));
              std::memcpy(at_.data() + li * B, at_.data() + live[li] * B, B * sizeof(float));
            }
            transpose_f32(at_.data(), B, ab.data(), n, n, B);  // [B, n]
            a = ab.data();
            lda = n;
          }
          if (n == 0) continue;
          gemm_f32(B, K, n, a, lda, wb.data(), K, dx_acc, K, started);
          started = true;
        }
        if (dx_acc != nullptr && !started) std::fill(dx_acc, dx_acc + B * K, 0.0f);
        for (auto* v : {&at_, &wb, &ab}) v->trim();
        scratch.trim();
        gemm_release();
      };
      if (fused_dx) {
        float* dxp = dx.data_ptr<float>();
        at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) {
            float* acc = p == 0 ? dxp : partial.data_ptr<float>() + (p - 1) * B * K;
            run_blocks(p * nblocks / parts, (p + 1) * nblocks / parts, acc);
          }
        });
        for (int64_t p = 1; p < parts; ++p)  // in order (a loop: at::add_ and the views cost ~15 us each)
          add_into(dxp, partial.data_ptr<float>() + (p - 1) * B * K, B * K);
      } else {
        at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) { run_blocks(b0, b1, nullptr); });
      }
    } else {
      grad_threshold.zero_();
      if (need_x) dx.zero_();
    }
  }
  return {dx, grad_weight, grad_threshold, grad_bias};
}

}  // namespace cpu
}  // namespace rgkernels
