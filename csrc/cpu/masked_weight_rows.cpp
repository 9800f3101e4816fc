// Row kernels of the CPU masked-weight ops, compiled once per instruction set (see
// masked_weight_rows.h).
//
// Every row is computed by one thread from start to end. Each row has a contiguous fast path
// (both inputs with unit inner stride), written as plain loops that gcc vectorises at -O3, and
// a strided path for any other layout (transposed views, expanded gradients, ...); nothing is
// copied. Arithmetic follows the reference operation by operation (one rounding each, same
// association), so the forward output, the counts and the weight gradient are bit-identical to
// it; only grad_threshold's sum is ordered differently (a pairwise sum in the compute dtype,
// about as accurate as PyTorch's cascade sum).
//
// Multiversioning: the kernels are templates forced inline into one entry function per
// instruction set; each entry carries a `target` attribute, so the inlined loops are vectorised
// for that set (gcc inlines a default-target function into a caller whose instruction set is a
// superset). The default-target copies of the templates are never called directly.
//
// GCC: -ftrapping-math (its default) forbids if-converting the loops' float compares and selects,
// so none of them would vectorise. FP exception flags are never read here, and the option
// changes no result (no reassociation, no contraction), so it is switched off for this file.
// It is set before any include so that every function of this translation unit (ATen's inline
// helpers included) has the same options and still inlines. Clang defaults to it already.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "masked_weight_rows.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <type_traits>

#include "rgkernels/masked_weight.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include "rows_avx512_f32.h"
#define RGK_X86_MULTIVERSION 1
#define RGK_ALWAYS_INLINE __attribute__((always_inline)) inline
// No "fma" in either list: contraction would change results (see the header).
#define RGK_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi,bmi2,popcnt,prefer-vector-width=512")))
#define RGK_TARGET_AVX2 __attribute__((target("avx2,bmi,bmi2,popcnt")))
#else
#define RGK_X86_MULTIVERSION 0
#define RGK_ALWAYS_INLINE inline
#endif

namespace rgkernels {
namespace cpu {
namespace {

// float32 arithmetic for float/half/bfloat16 weights, float64 for double ones.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// Element load/store in acc_t. at::Half and at::BFloat16 go through their bits: gcc finds no
// vector type for the structs themselves, but does for the uint16_t inside (the conversion
// functions are c10's own, so the values are those of static_cast).
template <typename scalar_t>
RGK_ALWAYS_INLINE acc_type<scalar_t> elem_load(const scalar_t* p) {
  return static_cast<acc_type<scalar_t>>(*p);
}
template <>
RGK_ALWAYS_INLINE float elem_load<at::Half>(const at::Half* p) {
  return c10::detail::fp16_ieee_to_fp32_value(p->x);
}
template <>
RGK_ALWAYS_INLINE float elem_load<at::BFloat16>(const at::BFloat16* p) {
  return c10::detail::f32_from_bits(p->x);
}
template <typename scalar_t>
RGK_ALWAYS_INLINE void elem_store(scalar_t* p, acc_type<scalar_t> v) {
  *p = static_cast<scalar_t>(v);
}
template <>
RGK_ALWAYS_INLINE void elem_store<at::Half>(at::Half* p, float v) {
  p->x = c10::detail::fp16_ieee_from_fp32_value(v);
}
template <>
RGK_ALWAYS_INLINE void elem_store<at::BFloat16>(at::BFloat16* p, float v) {
  p->x = c10::detail::round_to_nearest_even(v);
}

// Forward for one row: out = W * M (a multiplication, so NaN/inf propagate as in the reference),
// returns the number of kept entries.
template <typename scalar_t, bool kContig>
RGK_ALWAYS_INLINE int32_t fwd_row(const scalar_t* __restrict__ w, int64_t ws, int64_t K,
                                  acc_type<scalar_t> t, scalar_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  // Counter as wide as acc_t so that gcc vectorises the count with the data (K < 2^31, checked).
  using cnt_t = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;
  cnt_t kept = 0;
  for (int64_t j = 0; j < K; ++j) {
    const acc_t wv = elem_load(w + (kContig ? j : j * ws));
    const acc_t x = std::abs(wv) - t;
    // 0/1 through an int conversion rather than a select: branch-free even where gcc leaves the
    // loop scalar (float64 with SSE2), where a select became a mispredicted branch.
    const cnt_t m = x > acc_t(0);
    elem_store(out + j, wv * static_cast<acc_t>(m));
    kept += m;
  }
  return static_cast<int32_t>(kept);
}

// Sum of p[0..n) for n <= kBase, with kLanes independent accumulators (vectorisable).
constexpr int64_t kLanes = 16;
constexpr int64_t kBase = 512;

template <typename acc_t>
RGK_ALWAYS_INLINE acc_t block_sum(const acc_t* __restrict__ p, int64_t n) {
  acc_t lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = acc_t(0);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += p[j + l];
  }
  acc_t tail = acc_t(0);
  for (; j < n; ++j) tail += p[j];
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lane[l] += lane[l + width];
  }
  return lane[0] + tail;
}

// Sum of p[0..n): block sums of kBase entries, then combined pairwise (adjacent pairs, level by
// level). Deterministic; the error grows like log(n), as in a cascade sum. Overwrites p.
template <typename acc_t>
RGK_ALWAYS_INLINE acc_t pairwise_sum(acc_t* __restrict__ p, int64_t n) {
  if (n <= kBase) return block_sum(p, n);
  int64_t nb = 0;
  // Block b starts at b * kBase >= b, so p[b] is written only after its own entries were read.
  for (int64_t start = 0; start < n; start += kBase, ++nb) {
    p[nb] = block_sum(p + start, std::min(kBase, n - start));
  }
  while (nb > 1) {
    const int64_t half = nb / 2;
    for (int64_t i = 0; i < half; ++i) p[i] = p[2 * i] + p[2 * i + 1];
    if (nb & 1) p[half] = p[nb - 1];
    nb = half + (nb & 1);
  }
  return p[0];
}

// Backward for one row: writes the weight gradient (and, when kWhat, W_hat = W * M into `what`, for
// a GEMM that needs the masked weight too), returns grad_threshold (before the cast to float32).
// `prod` is scratch of K entries for the products g * W * H'(x). g and gw must not overlap (the
// loops are vectorised on that promise; bwd_rows_t copies g's row first when they would).
template <typename scalar_t, bool kContig, bool kDst, bool kWhat = false>
RGK_ALWAYS_INLINE acc_type<scalar_t> bwd_row(const scalar_t* __restrict__ g, int64_t gs,
                                             const scalar_t* __restrict__ w, int64_t ws, int64_t K,
                                             acc_type<scalar_t> t, scalar_t* __restrict__ gw,
                                             acc_type<scalar_t>* __restrict__ prod,
                                             scalar_t* __restrict__ what = nullptr) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t j = 0; j < K; ++j) {
    const acc_t wv = elem_load(w + (kContig ? j : j * ws));
    const acc_t gv = elem_load(g + (kContig ? j : j * gs));
    const acc_t aw = std::abs(wv);
    const acc_t x = aw - t;
    const acc_t h = surrogate_grad<acc_t>(x);
    const acc_t m = static_cast<acc_t>(static_cast<int>(x > acc_t(0)));
    prod[j] = (gv * wv) * h;
    if (kWhat) elem_store(what + j, wv * m);
    if (kDst) {
      elem_store(gw + j, (m * gv) * (acc_t(1) + aw * h));
    } else {
      elem_store(gw + j, m * gv);
    }
  }
  return -pairwise_sum(prod, K);
}

// The same row forward, also writing the mask bit-packed (entry j in bit j % 8 of byte j / 8), a
// chunk at a time: fwd_row on the chunk, the mask again as one byte per entry (a compare loop that
// vectorises on its own; folded into fwd_row's loop it did not, and cost ~3 ns per entry), then
// packed 8 entries at a time with one multiply: for bytes b_0..b_7 in {0, 1} of a little-endian
// uint64 v, bit 56 + i of v * 0x0102040810204080 is b_i (each b_i is shifted by 56 - 7i; the other
// partial products land on distinct bits outside 56..63, so nothing carries into them).
constexpr int64_t kBitsChunk = 256;  // a multiple of 8: chunks start on byte boundaries

template <typename scalar_t, bool kContig>
RGK_ALWAYS_INLINE int32_t fwd_row_bits(const scalar_t* __restrict__ w, int64_t ws, int64_t K,
                                       acc_type<scalar_t> t, scalar_t* __restrict__ out,
                                       uint8_t* __restrict__ bits) {
  using acc_t = acc_type<scalar_t>;
  uint8_t m8[kBitsChunk];
  int32_t kept = 0;
  for (int64_t c0 = 0; c0 < K; c0 += kBitsChunk) {
    const int64_t n = std::min(kBitsChunk, K - c0);
    const scalar_t* wc = w + (kContig ? c0 : c0 * ws);
    kept += fwd_row<scalar_t, kContig>(wc, ws, n, t, out + c0);
    for (int64_t j = 0; j < n; ++j) {
      m8[j] = static_cast<uint8_t>(std::abs(elem_load(wc + (kContig ? j : j * ws))) - t > acc_t(0));
    }
    uint8_t* b = bits + c0 / 8;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      uint64_t v;
      std::memcpy(&v, m8 + j, 8);
      b[j / 8] = static_cast<uint8_t>((v * 0x0102040810204080ULL) >> 56);
    }
    if (j < n) {
      uint8_t last = 0;
      for (int64_t i = 0; j + i < n; ++i) last |= static_cast<uint8_t>(m8[j + i] << i);
      b[j / 8] = last;
    }
  }
  return kept;
}

// kIntrinsics: the AVX-512 variant, whose float32 contiguous rows run rows_avx512_f32.h's kernels.
template <typename scalar_t, bool kIntrinsics>
RGK_ALWAYS_INLINE int64_t fwd_rows_t(const FwdLayer& L, int64_t r0, int64_t r1, bool zero_threshold) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* w = static_cast<const scalar_t*>(L.w);
  scalar_t* out = static_cast<scalar_t*>(L.out);
  const bool contig = L.ws1 == 1;
  int64_t kept = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t t = zero_threshold ? acc_t(0) : static_cast<acc_t>(L.thr[r * L.ts]);
    const scalar_t* wr = w + r * L.ws0;
    scalar_t* outr = out + r * L.K;
    int32_t c;
#if RGK_X86_MULTIVERSION
    if constexpr (kIntrinsics && std::is_same<scalar_t, float>::value) {
      if (contig) {
        c = L.bits != nullptr ? avx512_f32::fwd_row<true>(wr, L.K, t, outr, L.bits + r * L.bs0)
                              : avx512_f32::fwd_row<false>(wr, L.K, t, outr, nullptr);
        L.counts[r] = c;
        kept += c;
        continue;
      }
    }
#endif
    if (L.bits != nullptr) {
      uint8_t* br = L.bits + r * L.bs0;
      c = contig ? fwd_row_bits<scalar_t, true>(wr, 1, L.K, t, outr, br)
                 : fwd_row_bits<scalar_t, false>(wr, L.ws1, L.K, t, outr, br);
    } else {
      c = contig ? fwd_row<scalar_t, true>(wr, 1, L.K, t, outr) : fwd_row<scalar_t, false>(wr, L.ws1, L.K, t, outr);
    }
    L.counts[r] = c;
    kept += c;
  }
  return kept;
}

template <typename scalar_t, bool kIntrinsics>
RGK_ALWAYS_INLINE void bwd_rows_t(const BwdLayer& L, int64_t r0, int64_t r1, bool dst, void* scratch) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* g = static_cast<const scalar_t*>(L.g);
  const scalar_t* w = static_cast<const scalar_t*>(L.w);
  scalar_t* gw = static_cast<scalar_t*>(L.gw);
  const bool contig = L.gs1 == 1 && L.ws1 == 1;
  acc_t* prod = static_cast<acc_t*>(scratch);
  // In place (the fused linear's weight-gradient GEMM writes g into gw): the intrinsics read each
  // vector before they store it; the generic loops get a copy of g's row (in L1), because with
  // aliased rows gcc's run-time overlap check sends them to their scalar versions (FastGAN's
  // transposed first layer, a strided weight: its backward rows took 3x as long).
  // (K = 0: both pointers may be null, equal without aliasing anything; memcpy from null is UB even for
  // 0 bytes, which UBSan reported for an empty [C, 0] weight)
  const bool in_place = L.g == L.gw && L.K > 0;
  scalar_t* g_copy = reinterpret_cast<scalar_t*>(static_cast<double*>(scratch) + L.K);
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t t = static_cast<acc_t>(L.thr[r * L.ts]);
    const scalar_t* gr = g + r * L.gs0;
    const scalar_t* wr = w + r * L.ws0;
    scalar_t* gwr = gw + r * L.gws0;
    acc_t s;
#if RGK_X86_MULTIVERSION
    if constexpr (kIntrinsics && std::is_same<scalar_t, float>::value) {
      if (contig) {  // L.w_hat is only set for contiguous rows (the caller checks)
        if (L.w_hat != nullptr) {
          float* whr = static_cast<float*>(L.w_hat) + r * L.K;
          s = dst ? avx512_f32::bwd_row<true, true, kBase>(gr, wr, L.K, t, gwr, whr, prod)
                  : avx512_f32::bwd_row<false, true, kBase>(gr, wr, L.K, t, gwr, whr, prod);
        } else {
          s = dst ? avx512_f32::bwd_row<true, false, kBase>(gr, wr, L.K, t, gwr, nullptr, prod)
                  : avx512_f32::bwd_row<false, false, kBase>(gr, wr, L.K, t, gwr, nullptr, prod);
        }
        L.gt[r] = s;
        continue;
      }
    }
#endif
    if (in_place) {  // g's rows have gw's layout: unit inner stride
      std::memcpy(g_copy, gr, static_cast<size_t>(L.K) * sizeof(scalar_t));
      gr = g_copy;
    }
    if (L.w_hat != nullptr) {  // contiguous rows only (checked by the caller)
      scalar_t* whr = static_cast<scalar_t*>(L.w_hat) + r * L.K;
      s = dst ? bwd_row<scalar_t, true, true, true>(gr, 1, wr, 1, L.K, t, gwr, prod, whr)
              : bwd_row<scalar_t, true, false, true>(gr, 1, wr, 1, L.K, t, gwr, prod, whr);
    } else if (contig) {
      s = dst ? bwd_row<scalar_t, true, true>(gr, 1, wr, 1, L.K, t, gwr, prod)
              : bwd_row<scalar_t, true, false>(gr, 1, wr, 1, L.K, t, gwr, prod);
    } else {
      s = dst ? bwd_row<scalar_t, false, true>(gr, L.gs1, wr, L.ws1, L.K, t, gwr, prod)
              : bwd_row<scalar_t, false, false>(gr, L.gs1, wr, L.ws1, L.K, t, gwr, prod);
    }
    L.gt[r] = static_cast<float>(s);
  }
}

// The entry points of one instruction set: a dtype switch over the inlined templates.
#define RGK_DEFINE_ENTRIES(SUFFIX, TARGET, INTR)                                                    \
  TARGET int64_t fwd_rows_##SUFFIX(const FwdLayer& L, int64_t r0, int64_t r1, bool z) {             \
    switch (L.dtype) {                                                                              \
      case at::kFloat: return fwd_rows_t<float, INTR>(L, r0, r1, z);                                \
      case at::kDouble: return fwd_rows_t<double, INTR>(L, r0, r1, z);                              \
      case at::kHalf: return fwd_rows_t<at::Half, INTR>(L, r0, r1, z);                              \
      case at::kBFloat16: return fwd_rows_t<at::BFloat16, INTR>(L, r0, r1, z);                      \
      default: return 0; /* rejected by check_dtype before any task runs */                        \
    }                                                                                               \
  }                                                                                                 \
  TARGET void bwd_rows_##SUFFIX(const BwdLayer& L, int64_t r0, int64_t r1, bool dst, void* s) {     \
    switch (L.dtype) {                                                                              \
      case at::kFloat: bwd_rows_t<float, INTR>(L, r0, r1, dst, s); break;                           \
      case at::kDouble: bwd_rows_t<double, INTR>(L, r0, r1, dst, s); break;                         \
      case at::kHalf: bwd_rows_t<at::Half, INTR>(L, r0, r1, dst, s); break;                         \
      case at::kBFloat16: bwd_rows_t<at::BFloat16, INTR>(L, r0, r1, dst, s); break;                 \
      default: break; /* rejected by check_dtype before any task runs */                           \
    }                                                                                               \
  }

RGK_DEFINE_ENTRIES(baseline, , false)
#if RGK_X86_MULTIVERSION
RGK_DEFINE_ENTRIES(avx2, RGK_TARGET_AVX2, false)
RGK_DEFINE_ENTRIES(avx512, RGK_TARGET_AVX512, true)
#endif

// ---- choosing the variant -------------------------------------------------------------------

enum Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

bool cpu_has(Isa isa) {
#if RGK_X86_MULTIVERSION
  __builtin_cpu_init();
  switch (isa) {
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2");
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2");
    default:
      return true;
  }
#else
  return isa == kBaseline;
#endif
}

Isa best_isa() {
  for (int i = kAvx512; i > kBaseline; --i) {
    if (cpu_has(static_cast<Isa>(i))) return static_cast<Isa>(i);
  }
  return kBaseline;
}

int parse_isa(const std::string& name) {
  for (int i = 0; i <= kAvx512; ++i) {
    if (name == kIsaNames[i]) return i;
  }
  return -1;
}

// The requested variant if the CPU has it, else the best one it has (with a warning).
Isa usable(Isa want) {
  if (cpu_has(want)) return want;
  const Isa got = best_isa();
  std::fprintf(stderr, "rgkernels: this CPU cannot run the %s kernels; using %s\n", kIsaNames[want],
               kIsaNames[got]);
  return got;
}

Isa initial_isa() {
  const char* env = std::getenv("RGKERNELS_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    const int want = parse_isa(env);
    if (want >= 0) return usable(static_cast<Isa>(want));
    std::fprintf(stderr, "rgkernels: RGKERNELS_CPU_ISA=%s is not one of avx512, avx2, baseline; ignored\n",
                 env);
  }
  return best_isa();
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{initial_isa()};
  return slot;
}

}  // namespace

int64_t fwd_rows(const FwdLayer& L, int64_t r0, int64_t r1, bool zero_threshold) {
  switch (isa_slot().load(std::memory_order_relaxed)) {
#if RGK_X86_MULTIVERSION
    case kAvx512: return fwd_rows_avx512(L, r0, r1, zero_threshold);
    case kAvx2: return fwd_rows_avx2(L, r0, r1, zero_threshold);
#endif
    default: return fwd_rows_baseline(L, r0, r1, zero_threshold);
  }
}

void bwd_rows(const BwdLayer& L, int64_t r0, int64_t r1, bool dst, void* scratch) {
  switch (isa_slot().load(std::memory_order_relaxed)) {
#if RGK_X86_MULTIVERSION
    case kAvx512: bwd_rows_avx512(L, r0, r1, dst, scratch); break;
    case kAvx2: bwd_rows_avx2(L, r0, r1, dst, scratch); break;
#endif
    default: bwd_rows_baseline(L, r0, r1, dst, scratch); break;
  }
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = kAvx512; i >= kBaseline; --i) {
    if (cpu_has(static_cast<Isa>(i))) out.emplace_back(kIsaNames[i]);
  }
  return out;
}

std::string active_isa() { return kIsaNames[isa_slot().load()]; }

std::string set_isa(const std::string& name) {
  const int want = parse_isa(name);
  TORCH_CHECK(want >= 0, "set_cpu_isa: unknown instruction set '", name,
              "' (choose avx512, avx2 or baseline)");
  isa_slot().store(usable(static_cast<Isa>(want)));
  return active_isa();
}

}  // namespace cpu
}  // namespace rgkernels
