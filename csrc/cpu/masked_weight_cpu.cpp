// CPU kernels of the masked-weight ops (DESIGN.md §2; scalar semantics in masked_weight.h).
//
// Work is split into tasks of whole rows (about kTaskElems elements each, across all layers for
// the grouped ops) and the tasks run in one OpenMP parallel loop. Every row is computed by one
// thread from start to end, so the results do not depend on the number of threads. The row
// kernels themselves (one copy per instruction set, chosen at run time) are in
// masked_weight_rows.cpp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "buffer_pool.h"
#include "masked_weight_rows.h"
#include "rgkernels/masked_weight.h"

namespace rgkernels {
namespace {

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

// ---- checks ---------------------------------------------------------------------------------

void check_cpu(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
}

}  // namespace

// ---- forward --------------------------------------------------------------------------------

// Runs the forward of all layers in one parallel loop, then applies the per-layer guard.
void cpu::fwd_layers(std::vector<cpu::FwdLayer>& layers, double guard_ratio) {
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
    task_kept[i] = cpu::fwd_rows(layers[tk.layer], tk.row_begin, tk.row_end, false);
  });
  if (guard_ratio < 0.0) return;

  std::vector<int64_t> kept(layers.size(), 0);
  for (size_t i = 0; i < tasks.size(); ++i) kept[tasks[i].layer] += task_kept[i];
  std::vector<Task> redo;
  int64_t redo_total = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const cpu::FwdLayer& L = layers[l];
    if (!collapsed(kept[l], L.C * L.K, guard_ratio)) continue;
    for (int64_t r = 0; r < L.C; ++r) L.thr[r * L.ts] = 0.0f;  // in place
    append_tasks(redo, static_cast<int64_t>(l), L.C, L.K);
    redo_total += L.C * L.K;
  }
  const int64_t nredo = static_cast<int64_t>(redo.size());
  run_tasks(nredo, task_threads(nredo, redo_total), [&](int64_t i, int64_t) {
    const Task& tk = redo[i];
    cpu::fwd_rows(layers[tk.layer], tk.row_begin, tk.row_end, true);
  });
}

namespace {

cpu::FwdLayer make_fwd_layer(const at::Tensor& weight, const at::Tensor& threshold, void* out,
                        int32_t* counts) {
  return cpu::FwdLayer{weight.data_ptr(), out,    threshold.data_ptr<float>(), counts,
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
  at::Tensor out = cpu::pooled_empty({weight.size(0), weight.size(1)}, weight.options());
  at::Tensor counts = at::empty({weight.size(0)}, weight.options().dtype(at::kInt));
  std::vector<cpu::FwdLayer> layers{
      make_fwd_layer(weight, threshold, out.data_ptr(), counts.data_ptr<int32_t>())};
  cpu::fwd_layers(layers, guard_ratio);
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
  at::Tensor out = cpu::pooled_empty({size.numel}, weights[0].options());
  at::Tensor counts = at::empty({size.rows}, weights[0].options().dtype(at::kInt));
  const int64_t esize = static_cast<int64_t>(out.element_size());
  char* out_base = static_cast<char*>(out.data_ptr());
  int32_t* counts_base = counts.data_ptr<int32_t>();
  std::vector<cpu::FwdLayer> layers;
  layers.reserve(n);
  int64_t off = 0, row_off = 0;
  for (size_t i = 0; i < n; ++i) {
    layers.push_back(make_fwd_layer(weights[i], thresholds[i], out_base + off * esize,
                                    counts_base + row_off));
    off += weights[i].numel();
    row_off += weights[i].size(0);
  }
  cpu::fwd_layers(layers, guard_ratio);
  return {out, counts};
}

// ---- backward -------------------------------------------------------------------------------

void bwd_layers(const std::vector<cpu::BwdLayer>& layers, int64_t grad_mode) {
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
  for (const cpu::BwdLayer& L : layers) max_k = std::max(max_k, L.K);
  std::vector<double> scratch(static_cast<size_t>(nthreads * std::max<int64_t>(max_k, 1)));
  run_tasks(ntasks, nthreads, [&](int64_t i, int64_t thread) {
    const Task& tk = tasks[i];
    cpu::bwd_rows(layers[tk.layer], tk.row_begin, tk.row_end, dst,
                 scratch.data() + thread * std::max<int64_t>(max_k, 1));
  });
}

cpu::BwdLayer make_bwd_layer(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& threshold,
                        at::Tensor& gw, at::Tensor& gt) {
  const int64_t C = weight.size(0), K = weight.size(1);
  gw = cpu::pooled_empty({C, K}, weight.options());
  gt = at::empty({C}, threshold.options());
  return cpu::BwdLayer{grad.data_ptr(),  weight.data_ptr(), threshold.data_ptr<float>(),
                  gw.data_ptr(),    gt.data_ptr<float>(), C,
                  K,                grad.stride(0),    grad.stride(1),
                  weight.stride(0), weight.stride(1),  threshold.stride(0),
                  K,                weight.scalar_type()};
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
  std::vector<cpu::BwdLayer> layers{make_bwd_layer(grad, weight, threshold, gw, gt)};
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
  std::vector<cpu::BwdLayer> layers;
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
