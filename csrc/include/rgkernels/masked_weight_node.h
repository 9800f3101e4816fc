// The masked-weight op with its autograd node in C++ (csrc/masked_weight_node.cpp), for the Python
// extension's `rgkernels._C.masked_weight_autograd` (rgkernels/ops/masked_weight.py).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace rgkernels {

// (W * M, keep counts) of weight [C, ...] and threshold [C] through the compiled ops of the weight's
// device, differentiable in weight and threshold (DESIGN.md §2); the counts are not differentiable.
// grad_mode 0 = "dst", 1 = "masked"; guard_ratio < 0 disables the collapse guard (which resets the
// threshold in place). The inputs are checked by the ops.
std::tuple<at::Tensor, at::Tensor> masked_weight_autograd(const at::Tensor& weight, const at::Tensor& threshold,
                                                          int64_t grad_mode, double guard_ratio);

}  // namespace rgkernels
