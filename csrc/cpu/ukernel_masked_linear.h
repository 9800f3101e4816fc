// The CPU masked linear on oneDNN's micro-kernel with the mask applied to blocks of weight rows in
// cache: W_hat is never written to memory (ukernel_masked_linear.cpp). float32 only.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace rgkernels {
namespace cpu {

// Weight rows per block of the forward (and of the rule below).
constexpr int64_t kUkRows = 64;
// A block of kUkRows rows is left out of the forward and input-gradient GEMMs (compacted) when at
// least 1/kCompactMinDeadInv of its rows are entirely pruned (keep count 0: the row of W_hat is
// zero, its outputs are the bias). Also the rule of the whole-weight path (masked_linear_cpu.cpp),
// per layer. Measured on SNGAN G.l1's shape (4096x128, batch 64, one thread, Intel Xeon; node
// forward + backward, BENCHMARKS.md "Session 5"): with 25% of the rows dead compacting saved
// nothing on the micro-kernel and cost ~25% on ATen's GEMMs (the gathers outweigh the shorter
// GEMMs); with 50% it saved 8% / broke even, with 75% 16% / 18%.
constexpr int64_t kCompactMinDeadInv = 2;

// Forward: y [B, O] = x2 [B, K] W_hat^T + bias (bias may be undefined). Writes the keep counts
// (int32 [O]) and the bit-packed mask (uint8 [O, ceil(K / 8)]); applies the collapse guard
// (threshold reset in place and everything recomputed when the layer's keep ratio <= guard_ratio;
// guard_ratio < 0 disables it). Returns y and sets `ran_rows`: the output rows the GEMMs computed
// (O unless blocks were compacted).
at::Tensor ukernel_masked_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& threshold,
                                  const at::Tensor& bias, double guard_ratio, at::Tensor& counts, at::Tensor& bits,
                                  int64_t& ran_rows);

// Backward (DESIGN.md §2): (dx, dW, dt, db), undefined where not asked for (need_wt: dW and dt).
// `counts`: the forward's (they say which rows its GEMMs skipped; the input gradient skips the same
// ones). The mask is computed again from W and t in cache, as in the forward. db = dy's column sums,
// each summed over the batch in order (with need_wt, from the tiles of dy the weight-gradient pass
// reads anyway).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ukernel_masked_backward(
    const at::Tensor& dy2, const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& threshold,
    const at::Tensor& counts, int64_t grad_mode, bool need_x, bool need_wt, bool need_b);

// Rows of the forward's blocks that its GEMMs skip, given the keep counts (the rule above).
int64_t skipped_rows(const int32_t* counts, int64_t O, bool* skip = nullptr);

}  // namespace cpu
}  // namespace rgkernels
