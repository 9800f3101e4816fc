// Shared declarations and the scalar semantics of the masked weight (DESIGN.md §2).
//
// For one layer, W is viewed as [C, K] (one row per output channel) and t has C entries.
//   x_ij = |W_ij| - t_i          (computed in float32; float64 for float64 weights)
//   M_ij = x_ij > 0              (strict)
//   H'(x) = 2 - 4|x| if |x| <= 0.4;  0.4 if 0.4 < |x| <= 1;  0 otherwise
//   forward:  W_hat = W * M, keep_counts_i = sum_j M_ij
//   backward: grad_t_i = - sum_j g_ij * W_ij * H'(x_ij)
//             grad_W   = M * g * (1 + |W| H'(x))   (grad_mode 0, "dst")
//                      = M * g                     (grad_mode 1, "masked")
// Collapse guard (guard_ratio >= 0 enables it): if (double)sum(M) / (double)numel <= guard_ratio
// (numel > 0), t is set to 0 in place and M, W_hat and the counts are recomputed with t = 0.
#pragma once

#include <ATen/ATen.h>
#include <vector>

#if defined(__CUDACC__)
#define RGK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RGK_HOST_DEVICE inline
#endif

namespace rgkernels {

constexpr int64_t kGradModeDst = 0;
constexpr int64_t kGradModeMasked = 1;

// Long-tailed straight-through surrogate for the step function's derivative.
template <typename acc_t>
RGK_HOST_DEVICE acc_t surrogate_grad(acc_t x) {
  const acc_t ax = x < acc_t(0) ? -x : x;
  if (ax <= acc_t(0.4)) return acc_t(2) - acc_t(4) * ax;
  if (ax <= acc_t(1)) return acc_t(0.4);
  return acc_t(0);
}

// The guard's decision, identical on every backend.
RGK_HOST_DEVICE bool collapsed(long long kept, long long numel, double guard_ratio) {
  return guard_ratio >= 0.0 && numel > 0 &&
         static_cast<double>(kept) / static_cast<double>(numel) <= guard_ratio;
}

// Validation shared by the CPU and CUDA entry points (raises c10::Error with a clear message).
void check_fwd_inputs(const at::Tensor& weight, const at::Tensor& threshold, const char* op);
void check_bwd_inputs(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& threshold,
                      int64_t grad_mode, const char* op);

}  // namespace rgkernels
