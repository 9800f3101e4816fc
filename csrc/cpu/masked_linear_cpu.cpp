// Backward of a masked linear layer on the CPU, with the masked-weight backward fused into the
// weight-gradient GEMM (DESIGN.md §2, §4).
//
// y = x W_hat^T + b with W_hat = W * M. Unfused, the weight gradient g = dL/dW_hat = dy^T x is
// written to memory by one GEMM (as a transposed [K, O] result) and read back, strided, by the
// masked-weight backward: on layers with little work per weight (linear layers at GAN batch
// sizes) those weight-sized passes cost as much as the GEMMs themselves. Here g is produced a
// block of output rows at a time into a buffer that stays in the core's L2 cache, and the
// masked-weight backward (threshold gradient and masked weight gradient, the same row kernels as
// masked_weight_bwd) consumes each block while it is hot. Only the weight gradient is written to
// memory, as the dense layer writes it. The input gradient is one GEMM with the saved W_hat.
//
// Results: grad_input and grad_bias are computed as autograd computes them for F.linear on
// W_hat; grad_weight / grad_threshold equal masked_weight_bwd applied to dy^T x up to the GEMM's
// rounding (the blocks are separate GEMM calls).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "masked_weight_rows.h"
#include "rgkernels/masked_weight.h"

namespace rgkernels {
namespace {

// Elements of g per block: 64K floats = 256 KB, half of this machine class's L2 (1-2 MB per
// core), leaving room for the W and grad-weight rows streaming through. Measured on a Zen 4 core
// (benchmarks/bench_masked_layers.py): 32K-256K elements are within noise of each other; fewer
// and larger blocks fall out of L2, many small ones pay the GEMM call overhead.
constexpr int64_t kBlockElems = 1 << 16;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& w_hat, const at::Tensor& threshold, int64_t grad_mode, bool input_grad,
    bool bias_grad) {
  const char* op = "masked_linear_bwd";
  // weight 2-D, threshold [O] float32; w_hat like the weight (the shared checks call it "grad").
  check_bwd_inputs(w_hat, weight, threshold, grad_mode, op);
  check_dtype(weight, op);
  TORCH_CHECK(grad_out.dim() == 2 && input.dim() == 2, op, ": grad_out and input must be 2-D, got ",
              grad_out.sizes(), " and ", input.sizes());
  const int64_t B = input.size(0), K = input.size(1), O = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && grad_out.size(0) == B && grad_out.size(1) == O, op,
              ": shapes do not match: grad_out ", grad_out.sizes(), ", input ", input.sizes(),
              ", weight ", weight.sizes());
  for (const at::Tensor* t : {&grad_out, &input, &weight, &w_hat, &threshold}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU, got ", t->device());
  }
  for (const at::Tensor* t : {&grad_out, &input, &w_hat}) {
    TORCH_CHECK(t->scalar_type() == weight.scalar_type(), op, ": dtypes differ: ", t->scalar_type(),
                " and the weight's ", weight.scalar_type());
  }

  at::Tensor grad_input = input_grad ? at::mm(grad_out, w_hat) : at::empty({0}, input.options());
  at::Tensor grad_bias = bias_grad ? grad_out.sum(0) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({O, K}, weight.options());
  at::Tensor grad_threshold = at::empty({O}, threshold.options());
  if (O == 0 || K == 0) {
    grad_threshold.zero_();
    return {grad_input, grad_weight, grad_threshold, grad_bias};
  }

  const int64_t rows_per_block = std::max<int64_t>(1, std::min<int64_t>(O, kBlockElems / K));
  at::Tensor g = at::empty({rows_per_block, K}, weight.options());
  // Scratch of the row kernel (the products g * W * H'(x)), one row per thread.
  const int64_t nthreads = at::get_num_threads();
  std::vector<double> scratch(static_cast<size_t>(nthreads * K));
  const at::Tensor dyt = grad_out.t();  // [O, B]
  const bool dst = grad_mode == kGradModeDst;
  char* gw_base = static_cast<char*>(grad_weight.data_ptr());
  const char* w_base = static_cast<const char*>(weight.data_ptr());
  const int64_t esize = weight.element_size();

  for (int64_t r0 = 0; r0 < O; r0 += rows_per_block) {
    const int64_t rb = std::min(rows_per_block, O - r0);
    at::Tensor gb = g.narrow(0, 0, rb);
    at::mm_out(gb, dyt.narrow(0, r0, rb), input);  // dL/dW_hat for rows [r0, r0 + rb)
    const cpu::BwdLayer L{gb.data_ptr(),
                          w_base + r0 * weight.stride(0) * esize,
                          threshold.data_ptr<float>() + r0 * threshold.stride(0),
                          gw_base + r0 * K * esize,
                          grad_threshold.data_ptr<float>() + r0,
                          rb,
                          K,
                          gb.stride(0),
                          gb.stride(1),
                          weight.stride(0),
                          weight.stride(1),
                          threshold.stride(0),
                          K,
                          weight.scalar_type()};
    // Rows split over the threads; each row is done by one thread (results independent of them).
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / K);
    at::parallel_for(0, rb, grain, [&](int64_t b, int64_t e) {
      const int64_t tid = at::get_thread_num();
      cpu::bwd_rows(L, b, e, dst, scratch.data() + std::min(tid, nthreads - 1) * K);
    });
  }
  return {grad_input, grad_weight, grad_threshold, grad_bias};
}

}  // namespace
}  // namespace rgkernels

TORCH_LIBRARY_IMPL(rgkernels, CPU, m) {
  m.impl("masked_linear_bwd", &rgkernels::masked_linear_bwd_cpu);
}
