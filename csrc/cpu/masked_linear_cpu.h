// The fused CPU masked linear as a C++ autograd node (masked_linear_cpu.cpp), for the Python
// extension's `rgkernels._C.masked_linear_cpu` (rgkernels/ops/cpu_masked_linear.py).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <vector>

namespace rgkernels {
namespace cpu {

// (y, W_hat, keep counts, live rows) of F.linear(input, W * M, bias) with the gradients of DESIGN.md
// §2; live rows: int64 [1], the output channels the GEMMs ran when entirely pruned rows were left
// out of them, else -1.
// weight [out, in], threshold float32 [out] (reset in place by the collapse guard; guard_ratio < 0
// disables it), grad_mode 0 = "dst", 1 = "masked"; gemm 0 = ATen's GEMMs, 1 = the micro-kernel's,
// -1 = the process-wide choice (a choice pinned by RGKERNELS_CPU_GEMM / set_cpu_gemm always wins).
std::vector<at::Tensor> masked_linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                                               const at::Tensor& threshold, const std::optional<at::Tensor>& bias,
                                               int64_t grad_mode, double guard_ratio, int64_t gemm);

// Gradients (dx, dW, dt; undefined where not needed) of the node as a differentiable graph, for
// backward passes with create_graph=True: given (input, weight, threshold, grad_output, grad_mode,
// which of the three are needed). Registered by the Python package.
using DoubleBackwardFn = std::function<std::vector<at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, std::vector<bool>)>;
void set_double_backward(DoubleBackwardFn fn);

}  // namespace cpu
}  // namespace rgkernels
