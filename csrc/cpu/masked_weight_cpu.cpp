// CPU kernels of the masked-weight ops (DESIGN.md §2; scalar semantics in masked_weight.h).
//
// Work is split into tasks of whole rows (about kTaskElems elements each, across all layers for
// the grouped ops) and the tasks run in one OpenMP parallel loop. Every row is computed by one
// thread from start to end, so the results do not depend on the number of threads.
//
// Each row has a contiguous fast path (both inputs with unit inner stride), written as plain
// loops that gcc vectorises at -O3, and a strided path for any other layout (transposed views,
// expanded gradients, ...); nothing is copied. Arithmetic follows the reference operation by
// operation (one rounding each, same association), so the forward output, the counts and the
// weight gradient are bit-identical to it; only grad_threshold's sum is ordered differently
// (a pairwise sum in the compute dtype, about as accurate as PyTorch's cascade sum).
//
// GCC: -ftrapping-math (its default) forbids if-converting the loops' float compares and selects,
// so none of them would vectorise. FP exception flags are never read here, and the option
// changes no result (no reassociation, no contraction), so it is switched off for this file.
// It is set before any include so that every function of this translation unit (ATen's inline
// helpers included) has the same options and still inlines. Clang defaults to it already.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "rgkernels/masked_weight.h"

namespace rgkernels {
namespace {

// float32 arithmetic for float/half/bfloat16 weights, float64 for double ones.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

constexpr int64_t kTaskElems = 1 << 15;     // elements per task (rows are never split)
constexpr int64_t kParallelElems = 1 << 16;  // below this, run on the calling thread

// ---- task list and the parallel loop --------------------------------------------------------

struct Task {
  int64_t layer;
  int64_t row_begin;
  int64_t row_end;
};

void append_tasks(std::vector<Task>& tasks, int64_t layer, int64_t rows, int64_t cols) {
  const int64_t per_task = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(cols, 1));
  for (int64_t r = 0; r < rows; r += per_task) {
    tasks.push_back({layer, r, std::min(rows, r + per_task)});
  }
}

// Number of threads run_tasks will use (1 = the calling thread alone).
int64_t task_threads(int64_t ntasks, int64_t total_elems) {
  const int64_t nthreads = at::get_num_threads();
  if (ntasks <= 1 || nthreads <= 1 || total_elems < kParallelElems || at::in_parallel_region()) {
    return 1;
  }
  return std::min(nthreads, ntasks);
}

// Runs f(i, thread) for every task index i, thread in [0, nthreads). f must not throw (an
// exception cannot leave an OpenMP region): allocate before, check before.
template <typename F>
void run_tasks(int64_t ntasks, int64_t nthreads, const F& f) {
  if (nthreads <= 1) {
    for (int64_t i = 0; i < ntasks; ++i) f(i, 0);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(static_cast<int>(nthreads))
  for (int64_t i = 0; i < ntasks; ++i) {
#ifdef _OPENMP
    f(i, omp_get_thread_num());
#else
    f(i, 0);
#endif
  }
}

// Element load/store in acc_t. at::Half and at::BFloat16 go through their bits: gcc finds no
// vector type for the structs themselves, but does for the uint16_t inside (the conversion
// functions are c10's own, so the values are those of static_cast).
template <typename scalar_t>
inline acc_type<scalar_t> elem_load(const scalar_t* p) {
  return static_cast<acc_type<scalar_t>>(*p);
}
template <>
inline float elem_load<at::Half>(const at::Half* p) {
  return c10::detail::fp16_ieee_to_fp32_value(p->x);
}
template <>
inline float elem_load<at::BFloat16>(const at::BFloat16* p) {
  return c10::detail::f32_from_bits(p->x);
}
template <typename scalar_t>
inline void elem_store(scalar_t* p, acc_type<scalar_t> v) {
  *p = static_cast<scalar_t>(v);
}
template <>
inline void elem_store<at::Half>(at::Half* p, float v) {
  p->x = c10::detail::fp16_ieee_from_fp32_value(v);
}
template <>
inline void elem_store<at::BFloat16>(at::BFloat16* p, float v) {
  p->x = c10::detail::round_to_nearest_even(v);
}

// ---- row kernels ----------------------------------------------------------------------------

// Forward for one row: out = W * M (a multiplication, so NaN/inf propagate as in the reference),
// returns the number of kept entries.
template <typename scalar_t, bool kContig>
int32_t fwd_row(const scalar_t* __restrict__ w, int64_t ws, int64_t K, acc_type<scalar_t> t,
                scalar_t* __restrict__ out) {
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

// Sum of p[0..n) pairwise over blocks of kBase, with kLanes independent accumulators inside a
// block (vectorisable). Deterministic; the error grows like log(n), as in a cascade sum.
template <typename acc_t>
acc_t pairwise_sum(const acc_t* __restrict__ p, int64_t n) {
  constexpr int64_t kLanes = 16;
  constexpr int64_t kBase = 512;
  if (n <= kBase) {
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
  const int64_t half = ((n / 2 + kLanes - 1) / kLanes) * kLanes;
  return pairwise_sum(p, half) + pairwise_sum(p + half, n - half);
}

// Backward for one row: writes the weight gradient, returns grad_threshold (before the cast to
// float32). `prod` is scratch of K entries for the products g * W * H'(x).
template <typename scalar_t, bool kContig, bool kDst>
acc_type<scalar_t> bwd_row(const scalar_t* __restrict__ g, int64_t gs, const scalar_t* __restrict__ w,
                           int64_t ws, int64_t K, acc_type<scalar_t> t, scalar_t* __restrict__ gw,
                           acc_type<scalar_t>* __restrict__ prod) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t j = 0; j < K; ++j) {
    const acc_t wv = elem_load(w + (kContig ? j : j * ws));
    const acc_t gv = elem_load(g + (kContig ? j : j * gs));
    const acc_t aw = std::abs(wv);
    const acc_t x = aw - t;
    const acc_t h = surrogate_grad<acc_t>(x);
    const acc_t m = static_cast<acc_t>(static_cast<int>(x > acc_t(0)));
    prod[j] = (gv * wv) * h;
    if (kDst) {
      elem_store(gw + j, (m * gv) * (acc_t(1) + aw * h));
    } else {
      elem_store(gw + j, m * gv);
    }
  }
  return -pairwise_sum(prod, K);
}

// ---- per-layer descriptors (type-erased so that one task list can mix dtypes) ---------------

struct FwdLayer {
  const void* w;
  void* out;
  float* thr;
  int32_t* counts;
  int64_t C, K, ws0, ws1, ts;
  at::ScalarType dtype;
};

// Rows [r0, r1) of one layer; t = 0 when zero_threshold (the guard's recomputation).
// Returns the number of kept entries in those rows.
template <typename scalar_t>
int64_t fwd_rows(const FwdLayer& L, int64_t r0, int64_t r1, bool zero_threshold) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* w = static_cast<const scalar_t*>(L.w);
  scalar_t* out = static_cast<scalar_t*>(L.out);
  const bool contig = L.ws1 == 1;
  int64_t kept = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t t = zero_threshold ? acc_t(0) : static_cast<acc_t>(L.thr[r * L.ts]);
    const scalar_t* wr = w + r * L.ws0;
    scalar_t* outr = out + r * L.K;
    const int32_t c = contig ? fwd_row<scalar_t, true>(wr, 1, L.K, t, outr)
                             : fwd_row<scalar_t, false>(wr, L.ws1, L.K, t, outr);
    L.counts[r] = c;
    kept += c;
  }
  return kept;
}

int64_t fwd_rows_any(const FwdLayer& L, int64_t r0, int64_t r1, bool zero_threshold) {
  switch (L.dtype) {
    case at::kFloat: return fwd_rows<float>(L, r0, r1, zero_threshold);
    case at::kDouble: return fwd_rows<double>(L, r0, r1, zero_threshold);
    case at::kHalf: return fwd_rows<at::Half>(L, r0, r1, zero_threshold);
    case at::kBFloat16: return fwd_rows<at::BFloat16>(L, r0, r1, zero_threshold);
    default: return 0;  // rejected by check_dtype before any task runs
  }
}

struct BwdLayer {
  const void* g;
  const void* w;
  const float* thr;
  void* gw;
  float* gt;
  int64_t C, K, gs0, gs1, ws0, ws1, ts;
  at::ScalarType dtype;
};

// `scratch`: at least K entries of acc_t for this thread.
template <typename scalar_t>
void bwd_rows(const BwdLayer& L, int64_t r0, int64_t r1, bool dst, void* scratch) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* g = static_cast<const scalar_t*>(L.g);
  const scalar_t* w = static_cast<const scalar_t*>(L.w);
  scalar_t* gw = static_cast<scalar_t*>(L.gw);
  const bool contig = L.gs1 == 1 && L.ws1 == 1;
  acc_t* prod = static_cast<acc_t*>(scratch);
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t t = static_cast<acc_t>(L.thr[r * L.ts]);
    const scalar_t* gr = g + r * L.gs0;
    const scalar_t* wr = w + r * L.ws0;
    scalar_t* gwr = gw + r * L.K;
    acc_t s;
    if (contig) {
      s = dst ? bwd_row<scalar_t, true, true>(gr, 1, wr, 1, L.K, t, gwr, prod)
              : bwd_row<scalar_t, true, false>(gr, 1, wr, 1, L.K, t, gwr, prod);
    } else {
      s = dst ? bwd_row<scalar_t, false, true>(gr, L.gs1, wr, L.ws1, L.K, t, gwr, prod)
              : bwd_row<scalar_t, false, false>(gr, L.gs1, wr, L.ws1, L.K, t, gwr, prod);
    }
    L.gt[r] = static_cast<float>(s);
  }
}

void bwd_rows_any(const BwdLayer& L, int64_t r0, int64_t r1, bool dst, void* scratch) {
  switch (L.dtype) {
    case at::kFloat: bwd_rows<float>(L, r0, r1, dst, scratch); break;
    case at::kDouble: bwd_rows<double>(L, r0, r1, dst, scratch); break;
    case at::kHalf: bwd_rows<at::Half>(L, r0, r1, dst, scratch); break;
    case at::kBFloat16: bwd_rows<at::BFloat16>(L, r0, r1, dst, scratch); break;
    default: break;  // rejected by check_dtype before any task runs
  }
}

// ---- checks ---------------------------------------------------------------------------------

void check_cpu(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
}

// ---- forward --------------------------------------------------------------------------------

// Runs the forward of all layers in one parallel loop, then applies the per-layer guard.
void fwd_layers(std::vector<FwdLayer>& layers, double guard_ratio) {
  std::vector<Task> tasks;
  int64_t total = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    append_tasks(tasks, static_cast<int64_t>(l), layers[l].C, layers[l].K);
    total += layers[l].C * layers[l].K;
  }
  std::vector<int64_t> task_kept(tasks.size(), 0);
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  run_tasks(ntasks, task_threads(ntasks, total), [&](int64_t i, int64_t) {
    const Task& tk = tasks[i];
    task_kept[i] = fwd_rows_any(layers[tk.layer], tk.row_begin, tk.row_end, false);
  });
  if (guard_ratio < 0.0) return;

  std::vector<int64_t> kept(layers.size(), 0);
  for (size_t i = 0; i < tasks.size(); ++i) kept[tasks[i].layer] += task_kept[i];
  std::vector<Task> redo;
  int64_t redo_total = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const FwdLayer& L = layers[l];
    if (!collapsed(kept[l], L.C * L.K, guard_ratio)) continue;
    for (int64_t r = 0; r < L.C; ++r) L.thr[r * L.ts] = 0.0f;  // in place
    append_tasks(redo, static_cast<int64_t>(l), L.C, L.K);
    redo_total += L.C * L.K;
  }
  const int64_t nredo = static_cast<int64_t>(redo.size());
  run_tasks(nredo, task_threads(nredo, redo_total), [&](int64_t i, int64_t) {
    const Task& tk = redo[i];
    fwd_rows_any(layers[tk.layer], tk.row_begin, tk.row_end, true);
  });
}

FwdLayer make_fwd_layer(const at::Tensor& weight, const at::Tensor& threshold, void* out,
                        int32_t* counts) {
  return FwdLayer{weight.data_ptr(), out,    threshold.data_ptr<float>(), counts,
                  weight.size(0),    weight.size(1),  weight.stride(0),     weight.stride(1),
                  threshold.stride(0), weight.scalar_type()};
}

std::tuple<at::Tensor, at::Tensor> masked_weight_fwd_cpu(const at::Tensor& weight,
                                                         const at::Tensor& threshold,
                                                         double guard_ratio) {
  const char* op = "masked_weight_fwd";
  check_fwd_inputs(weight, threshold, op);
  check_cpu(weight, "weight", op);
  check_dtype(weight, op);
  check_cols(weight, op);
  at::Tensor out = at::empty({weight.size(0), weight.size(1)}, weight.options());
  at::Tensor counts = at::empty({weight.size(0)}, weight.options().dtype(at::kInt));
  std::vector<FwdLayer> layers{
      make_fwd_layer(weight, threshold, out.data_ptr(), counts.data_ptr<int32_t>())};
  fwd_layers(layers, guard_ratio);
  return {out, counts};
}

// All layers share one dtype; the result is one flat buffer of masked weights (layer after
// layer, each a contiguous [C_i * K_i] block) and one flat int32 buffer of counts ([sum C_i]).
std::tuple<at::Tensor, at::Tensor> masked_weight_grouped_fwd_cpu(at::TensorList weights,
                                                                 at::TensorList thresholds,
                                                                 double guard_ratio) {
  const GroupedSize size = check_grouped_fwd_inputs(
      weights, thresholds, "masked_weight_grouped_fwd", [](const at::Tensor& w, const char* name) {
        check_cpu(w, "weight", name);
        check_dtype(w, name);
        check_cols(w, name);
      });
  const size_t n = weights.size();
  at::Tensor out = at::empty({size.numel}, weights[0].options());
  at::Tensor counts = at::empty({size.rows}, weights[0].options().dtype(at::kInt));
  const int64_t esize = static_cast<int64_t>(out.element_size());
  char* out_base = static_cast<char*>(out.data_ptr());
  int32_t* counts_base = counts.data_ptr<int32_t>();
  std::vector<FwdLayer> layers;
  layers.reserve(n);
  int64_t off = 0, row_off = 0;
  for (size_t i = 0; i < n; ++i) {
    layers.push_back(make_fwd_layer(weights[i], thresholds[i], out_base + off * esize,
                                    counts_base + row_off));
    off += weights[i].numel();
    row_off += weights[i].size(0);
  }
  fwd_layers(layers, guard_ratio);
  return {out, counts};
}

// ---- backward -------------------------------------------------------------------------------

void bwd_layers(const std::vector<BwdLayer>& layers, int64_t grad_mode) {
  std::vector<Task> tasks;
  int64_t total = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    append_tasks(tasks, static_cast<int64_t>(l), layers[l].C, layers[l].K);
    total += layers[l].C * layers[l].K;
  }
  const bool dst = grad_mode == kGradModeDst;
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  const int64_t nthreads = task_threads(ntasks, total);
  // Scratch for the products of one row, per thread (double-sized entries fit either acc type).
  int64_t max_k = 0;
  for (const BwdLayer& L : layers) max_k = std::max(max_k, L.K);
  std::vector<double> scratch(static_cast<size_t>(nthreads * std::max<int64_t>(max_k, 1)));
  run_tasks(ntasks, nthreads, [&](int64_t i, int64_t thread) {
    const Task& tk = tasks[i];
    bwd_rows_any(layers[tk.layer], tk.row_begin, tk.row_end, dst,
                 scratch.data() + thread * std::max<int64_t>(max_k, 1));
  });
}

BwdLayer make_bwd_layer(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& threshold,
                        at::Tensor& gw, at::Tensor& gt) {
  const int64_t C = weight.size(0), K = weight.size(1);
  gw = at::empty({C, K}, weight.options());
  gt = at::empty({C}, threshold.options());
  return BwdLayer{grad.data_ptr(),  weight.data_ptr(), threshold.data_ptr<float>(),
                  gw.data_ptr(),    gt.data_ptr<float>(), C,
                  K,                grad.stride(0),    grad.stride(1),
                  weight.stride(0), weight.stride(1),  threshold.stride(0),
                  weight.scalar_type()};
}

std::tuple<at::Tensor, at::Tensor> masked_weight_bwd_cpu(const at::Tensor& grad,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& threshold,
                                                         int64_t grad_mode) {
  const char* op = "masked_weight_bwd";
  check_bwd_inputs(grad, weight, threshold, grad_mode, op);
  check_cpu(weight, "weight", op);
  check_dtype(weight, op);
  at::Tensor gw, gt;
  std::vector<BwdLayer> layers{make_bwd_layer(grad, weight, threshold, gw, gt)};
  bwd_layers(layers, grad_mode);
  return {gw, gt};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> masked_weight_grouped_bwd_cpu(
    at::TensorList grads, at::TensorList weights, at::TensorList thresholds, int64_t grad_mode) {
  check_grouped_bwd_inputs(grads, weights, thresholds, grad_mode, "masked_weight_grouped_bwd",
                           [](const at::Tensor& w, const char* name) {
                             check_cpu(w, "weight", name);
                             check_dtype(w, name);
                           });
  const size_t n = weights.size();
  std::vector<at::Tensor> gws(n), gts(n);
  std::vector<BwdLayer> layers;
  layers.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    layers.push_back(make_bwd_layer(grads[i], weights[i], thresholds[i], gws[i], gts[i]));
  }
  bwd_layers(layers, grad_mode);
  return {gws, gts};
}

}  // namespace
}  // namespace rgkernels

TORCH_LIBRARY_IMPL(rgkernels, CPU, m) {
  m.impl("masked_weight_fwd", &rgkernels::masked_weight_fwd_cpu);
  m.impl("masked_weight_bwd", &rgkernels::masked_weight_bwd_cpu);
  m.impl("masked_weight_grouped_fwd", &rgkernels::masked_weight_grouped_fwd_cpu);
  m.impl("masked_weight_grouped_bwd", &rgkernels::masked_weight_grouped_bwd_cpu);
}
