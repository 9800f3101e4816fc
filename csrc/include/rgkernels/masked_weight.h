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
#include <functional>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#define RGK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RGK_HOST_DEVICE inline
#endif

namespace rgkernels {

constexpr int64_t kGradModeDst = 0;
constexpr int64_t kGradModeMasked = 1;

// Arithmetic with one rounding per operation. nvcc contracts a * b + c into an FMA by default,
// which would round differently from the reference (one PyTorch kernel per operation); the
// _rn intrinsics are never contracted. Host code is compiled without contraction
// (-ffp-contract=off / ISO C++ mode), so plain operators suffice there.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float rg_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float rg_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rg_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double rg_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double rg_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double rg_sub(double a, double b) { return __dsub_rn(a, b); }
#else
template <typename acc_t> RGK_HOST_DEVICE acc_t rg_mul(acc_t a, acc_t b) { return a * b; }
template <typename acc_t> RGK_HOST_DEVICE acc_t rg_add(acc_t a, acc_t b) { return a + b; }
template <typename acc_t> RGK_HOST_DEVICE acc_t rg_sub(acc_t a, acc_t b) { return a - b; }
#endif

// Long-tailed straight-through surrogate for the step function's derivative. Written with
// selects rather than early returns so that compilers vectorise it. NaN gives 0 (as in the
// reference: every comparison with NaN is false). Constants are taken in acc_t (0.4f for float:
// PyTorch compares a float32 tensor with a Python scalar in float32).
template <typename acc_t>
RGK_HOST_DEVICE acc_t surrogate_grad(acc_t x) {
  const acc_t ax = x < acc_t(0) ? -x : x;
  const acc_t inner = rg_sub(acc_t(2), rg_mul(acc_t(4), ax));
  const acc_t outer = ax <= acc_t(1) ? acc_t(0.4) : acc_t(0);
  return ax <= acc_t(0.4) ? inner : outer;
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
// The weight dtypes the compiled kernels take (float32, float64, float16, bfloat16).
void check_dtype(const at::Tensor& weight, const char* op);
// Rows must fit the int32 keep counts.
void check_cols(const at::Tensor& weight, const char* op);
// "op (layer i)": names the layer of a grouped call in error messages.
std::string layer_op(const char* op, size_t i);

// The checks of a backend's own (device) that come on top of the shared ones, per layer.
using LayerCheck = std::function<void(const at::Tensor& weight, const char* op)>;
struct GroupedSize {
  int64_t numel = 0;  // sum of the layers' numel: the flat output buffer
  int64_t rows = 0;   // sum of the layers' rows: the flat counts buffer
};
// Grouped forward: equal list lengths, at least one layer, every layer valid (shared checks plus
// `device_check`), one dtype for all. Returns the sizes of the flat outputs.
GroupedSize check_grouped_fwd_inputs(at::TensorList weights, at::TensorList thresholds,
                                     const char* op, const LayerCheck& device_check);
// Grouped backward: equal list lengths, every layer valid (shared checks plus `device_check`).
void check_grouped_bwd_inputs(at::TensorList grads, at::TensorList weights, at::TensorList thresholds,
                              int64_t grad_mode, const char* op, const LayerCheck& device_check);

}  // namespace rgkernels
