// Backward of a masked linear layer on the CPU, with the masked-weight backward fused into the
// weight-gradient GEMM (DESIGN.md §2, §4).
//
// y = x W_hat^T + b with W_hat = W * M. Unfused, the weight gradient g = dL/dW_hat = dy^T x is
// written to memory by one GEMM (as a transposed [K, O] result) and read back, strided, by the
// masked-weight backward: on layers with little work per weight (linear layers at GAN batch
// sizes) those weight-sized passes cost as much as the GEMMs themselves. Here g is produced a
// block of output rows at a time, written by the GEMM into the weight gradient's rows, and the
// masked-weight backward (threshold gradient and masked weight gradient, the same row kernels as
// masked_weight_bwd) turns each block into the weight gradient in place while it is in cache. Only
// the weight gradient is written to memory, as the dense layer writes it, and by the GEMM, whose
// stores overlap its FMAs. The input gradient is one GEMM with the saved W_hat.
//
// Results: grad_input and grad_bias are computed as autograd computes them for F.linear on
// W_hat; grad_weight / grad_threshold equal masked_weight_bwd applied to dy^T x up to the GEMM's
// rounding (the blocks are separate GEMM calls).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "buffer_pool.h"
#include "masked_linear_cpu.h"
#include "masked_weight_rows.h"
#include "rgkernels/masked_weight.h"
#include "scratch.h"
#include "ukernel_gemm.h"
#include "ukernel_masked_linear.h"

namespace rgkernels {
namespace {

// Elements per block of the weight-gradient GEMM: 64K floats = 256 KB, half of this machine
// class's L2 (1-2 MB per core), leaving room for the W rows streaming through. Measured on a Zen 4
// core (benchmarks/bench_masked_layers.py): 32K-256K elements are within noise of each other;
// fewer and larger blocks fall out of L2, many small ones pay the GEMM call overhead.
constexpr int64_t kBlockElems = 1 << 16;

// ---- the GEMM choice ---------------------------------------------------------------------------
//
// The node's micro-kernel path is ukernel_masked_linear.cpp; masked_linear_bwd (the op the Python
// autograd.Function calls) runs its weight gradient on the micro-kernel too where chosen
// (fused_weight_grad: blocks of output rows of dy^T x, each turned into the weight gradient by the
// masked-weight backward while in L1/L2, every block by one thread).

// Not under a Python dispatch mode (FlopCounterMode, debugging modes): those see ATen ops only, so
// there the node runs ATen's GEMMs and the mode sees (and counts) them.
// `gemm`: the layer's measured choice (rgkernels/ops/cpu_masked_linear.py: 0 ATen, 1 micro-kernel),
// or -1 for the process-wide one; a choice pinned by RGKERNELS_CPU_GEMM / set_cpu_gemm wins.
bool use_ukernel(const at::Tensor& weight, int64_t gemm) {
  if (weight.scalar_type() != at::kFloat || c10::impl::TorchDispatchModeTLS::stack_len() != 0) return false;
  if (gemm < 0 || cpu::gemm_pinned()) return cpu::ukernel_enabled();
  return gemm == 1 && cpu::ukernel_available();
}

// Output rows per block of the forward / weight-gradient GEMMs: a [rows, K] block of about 64 KB.
int64_t ukernel_rows(int64_t K) { return std::max<int64_t>(4, std::min<int64_t>(64, (1 << 14) / std::max<int64_t>(K, 1))); }

std::tuple<at::Tensor, at::Tensor> fused_weight_grad(const at::Tensor& grad_out, const at::Tensor& input,
                                                     const at::Tensor& weight, const at::Tensor& threshold,
                                                     int64_t grad_mode, int64_t gemm);

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
  auto [grad_weight, grad_threshold] = fused_weight_grad(grad_out, input, weight, threshold, grad_mode, -1);
  return {grad_input, grad_weight, grad_threshold, grad_bias};
}

// (dL/dW, dL/dt): the weight-gradient GEMM dy^T x, block by block, each block fed to the
// masked-weight backward while in cache. Inputs checked by the caller.
std::tuple<at::Tensor, at::Tensor> fused_weight_grad(const at::Tensor& grad_out, const at::Tensor& input,
                                                     const at::Tensor& weight, const at::Tensor& threshold,
                                                     int64_t grad_mode, int64_t gemm) {
  const int64_t K = input.size(1), O = weight.size(0);
  at::Tensor grad_weight = cpu::pooled_empty({O, K}, weight.options());
  at::Tensor grad_threshold = at::empty({O}, threshold.options());
  if (O == 0 || K == 0) {
    grad_threshold.zero_();
    return {grad_weight, grad_threshold};
  }
  const bool dst = grad_mode == kGradModeDst;
  if (use_ukernel(weight, gemm)) {
    const int64_t B = input.size(0), R = ukernel_rows(K);
    const at::Tensor dyt = grad_out.t().contiguous();  // [O, B]: the blocks' A operand
    const at::Tensor xc = input.contiguous();
    const float* dyp = dyt.data_ptr<float>();
    const float* xp = xc.data_ptr<float>();
    const float* wp = weight.data_ptr<float>();
    float* gwp = grad_weight.data_ptr<float>();
    at::parallel_for(0, (O + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
      cpu::Scratch<double> scratch;
      scratch.grow(2 * K);  // in place: bwd_rows' products and a copy of g's row
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * R, rb = std::min(R, O - r0);
        float* gblk = gwp + r0 * K;  // dL/dW_hat of the block, then (in place) its weight gradient
        cpu::gemm_f32(rb, K, B, dyp + r0 * B, B, xp, K, gblk, K, false);
        const cpu::BwdLayer L{gblk, wp + r0 * weight.stride(0), threshold.data_ptr<float>() + r0 * threshold.stride(0),
                              gblk, grad_threshold.data_ptr<float>() + r0, rb, K, K, 1,
                              weight.stride(0), weight.stride(1), threshold.stride(0), K, at::kFloat};
        cpu::bwd_rows(L, 0, rb, dst, scratch.data());
      }
      cpu::gemm_release();
    });
    return {grad_weight, grad_threshold};
  }

  const int64_t rows_per_block = std::max<int64_t>(1, std::min<int64_t>(O, kBlockElems / K));
  // Scratch of the row kernel (the products g * W * H'(x) and, in place, a copy of g's row), per thread.
  const int64_t nthreads = at::get_num_threads();
  std::vector<double> scratch(static_cast<size_t>(nthreads * 2 * K));  // in place: 2 K per thread
  const at::Tensor dyt = grad_out.t();  // [O, B]
  const char* w_base = static_cast<const char*>(weight.data_ptr());
  const int64_t esize = weight.element_size();

  for (int64_t r0 = 0; r0 < O; r0 += rows_per_block) {
    const int64_t rb = std::min(rows_per_block, O - r0);
    // dL/dW_hat for rows [r0, r0 + rb), written by the GEMM into grad_weight's rows and turned into
    // the weight gradient there in place (no narrow views when one block holds the layer: on small
    // layers every dispatcher call is a visible share of the step)
    const bool whole = rb == O;
    at::Tensor gb = whole ? grad_weight : grad_weight.narrow(0, r0, rb);
    at::mm_out(gb, whole ? dyt : dyt.narrow(0, r0, rb), input);
    const cpu::BwdLayer L{gb.data_ptr(),
                          w_base + r0 * weight.stride(0) * esize,
                          threshold.data_ptr<float>() + r0 * threshold.stride(0),
                          gb.data_ptr(),  // in place
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
      cpu::bwd_rows(L, b, e, dst, scratch.data() + std::min(tid, nthreads - 1) * 2 * K);
    });
  }
  return {grad_weight, grad_threshold};
}

// ---- the autograd node ----------------------------------------------------------------------
//
// The same node as rgkernels/ops/cpu_masked_linear.py's _MaskedLinearCPU, in C++: on layers with
// little work per weight, a Python autograd.Function's forward and backward calls cost a visible
// share of the step. Backward passes with create_graph=True (gradient penalties) call back into
// Python for a differentiable composition (set_double_backward).

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

cpu::DoubleBackwardFn& double_backward_slot() {
  static cpu::DoubleBackwardFn fn;
  return fn;
}

// W_hat (a whole [O, K] tensor), keep counts and bit-packed mask, with the collapse guard: the
// forward of the path on ATen's GEMMs, which run on the whole masked weight.
at::Tensor full_mask(const at::Tensor& weight, const at::Tensor& threshold, double guard_ratio, at::Tensor& counts,
                     at::Tensor& bits) {
  const int64_t O = weight.size(0), K = weight.size(1);
  at::Tensor w_hat = cpu::pooled_empty({O, K}, weight.options());
  counts = at::empty({O}, weight.options().dtype(at::kInt));
  bits = at::empty({O, (K + 7) / 8}, weight.options().dtype(at::kByte));
  std::vector<cpu::FwdLayer> layers{cpu::FwdLayer{
      weight.data_ptr(), w_hat.data_ptr(), threshold.data_ptr<float>(), counts.data_ptr<int32_t>(), O, K,
      weight.stride(0), weight.stride(1), threshold.stride(0), weight.scalar_type(), bits.data_ptr<uint8_t>(),
      bits.size(1)}};
  cpu::fwd_layers(layers, guard_ratio);
  return w_hat;
}

// Two paths, by the layer's GEMM choice (use_ukernel):
//  - the oneDNN micro-kernel (float32): ukernel_masked_linear.cpp, the mask applied to blocks of
//    weight rows in cache (W_hat never written); the backward computes the blocks' mask again.
//  - ATen's GEMMs (any dtype): W_hat written whole (full_mask) and saved; the GEMMs run on it and
//    the weight gradient is fused with the masked-weight backward (fused_weight_grad). Output rows
//    entirely pruned are left out of its forward and input-gradient GEMMs once they are >= 1/2 of
//    the layer (the gather of the live rows of W_hat costs about one pass over it).
// Both return the mask bit-packed for the layer's statistics, not W_hat.
class MaskedLinearFn : public torch::autograd::Function<MaskedLinearFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& threshold, const std::optional<at::Tensor>& bias,
                               int64_t grad_mode, double guard_ratio, int64_t gemm) {
    const char* op = "masked_linear_cpu";
    check_fwd_inputs(weight, threshold, op);
    check_dtype(weight, op);
    check_cols(weight, op);
    TORCH_CHECK(grad_mode == kGradModeDst || grad_mode == kGradModeMasked, op,
                ": grad_mode must be 0 (dst) or 1 (masked), got ", grad_mode);
    for (const at::Tensor* t : {&x, &weight, &threshold}) {
      TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU, got ", t->device());
    }
    TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": input dtype ", x.scalar_type(),
                " differs from the weight's ", weight.scalar_type());
    TORCH_CHECK(!bias.has_value() || !bias->defined() ||
                    (bias->device().is_cpu() && bias->scalar_type() == weight.scalar_type() &&
                     bias->dim() == 1 && bias->size(0) == weight.size(0)),
                op, ": bias must be a CPU tensor [", weight.size(0), "] of the weight's dtype");
    const bool flat = x.dim() != 2;  // F.linear's leading dims, flattened for the GEMMs
    const at::Tensor x2 = flat ? x.reshape({-1, x.size(-1)}) : x;
    const bool has_bias = bias.has_value() && bias->defined();
    const at::Tensor b = has_bias ? *bias : at::Tensor();
    const int64_t O = weight.size(0);
    const bool uk = use_ukernel(weight, gemm);
    at::Tensor y, counts, bits;
    int64_t ran = O;
    if (uk) {
      y = cpu::ukernel_masked_forward(x2, weight, threshold, b, guard_ratio, counts, bits, ran);
      ctx->save_for_backward({x, weight});
      ctx->saved_data["counts"] = counts;
    } else {
      const at::Tensor w_hat = full_mask(weight, threshold, guard_ratio, counts, bits);  // guard: may reset t
      int64_t dead = 0;
      const int32_t* c = counts.data_ptr<int32_t>();  // a CPU tensor: reading it costs no sync
      for (int64_t i = 0; i < O; ++i) dead += c[i] == 0;
      if (dead > 0 && dead * cpu::kCompactMinDeadInv >= O) {
        const at::Tensor live = at::nonzero(counts).view({-1});
        const at::Tensor w_live = w_hat.index_select(0, live);
        // Dead output channels are the bias (or 0): their W_hat rows are zero.
        y = has_bias ? b.unsqueeze(0).expand({x2.size(0), O}).contiguous() : at::zeros({x2.size(0), O}, x.options());
        if (live.numel() > 0) {
          y.index_copy_(1, live, has_bias ? at::addmm(b.index_select(0, live), x2, w_live.t()) : at::mm(x2, w_live.t()));
        }
        ctx->saved_data["live"] = live;
        ctx->saved_data["w_live"] = w_live;
        ran = O - dead;
      } else {
        y = has_bias ? at::addmm(b, x2, w_hat.t()) : at::mm(x2, w_hat.t());
      }
      ctx->save_for_backward({x, weight, w_hat});
    }
    if (flat) {
      std::vector<int64_t> shape = x.sizes().vec();
      shape.back() = O;
      y = y.view(shape);
    }
    // Not a saved variable: the guard's in-place write bumps its version (see masked_weight.py).
    ctx->saved_data["threshold"] = threshold;
    ctx->saved_data["grad_mode"] = grad_mode;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["ukernel"] = uk;
    // Output rows the forward and input-gradient GEMMs ran (-1: all of them, nothing skipped).
    // (at::empty and a store: at::full's dispatch cost ~20 us, ~1% of a small layer's step)
    at::Tensor n_live = at::empty({1}, counts.options().dtype(at::kLong));
    *n_live.data_ptr<int64_t>() = ran == O ? -1 : ran;
    // bits, counts and n_live are integer tensors, which autograd never differentiates: not marked,
    // since compiled autograd refuses mark_non_differentiable on C++ nodes (an internal assert).
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the mask and the counts
    return {y, bits, counts, n_live};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);  // one per forward argument
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;  // y did not reach the loss
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const at::Tensor threshold = ctx->saved_data["threshold"].toTensor();
    const int64_t grad_mode = ctx->saved_data["grad_mode"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_t = ctx->needs_input_grad(2),
               need_b = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3);
    const bool flat = x.dim() != 2;
    const at::Tensor dy2 = flat ? dy.reshape({-1, dy.size(-1)}) : dy;
    const bool uk = ctx->saved_data["ukernel"].toBool();
    if (need_b && (!uk || at::GradMode::is_enabled())) out[3] = dy2.sum(0);  // else fused below
    if (at::GradMode::is_enabled()) {  // create_graph=True: the gradients must be a graph themselves
      const cpu::DoubleBackwardFn& fn = double_backward_slot();
      TORCH_CHECK(fn, "masked linear: a backward pass with create_graph=True needs the rgkernels Python "
                  "package (it registers the differentiable composition)");
      std::vector<at::Tensor> r = fn(x, weight, threshold, dy, grad_mode, {need_x, need_w, need_t});
      for (int i = 0; i < 3; ++i) out[i] = r[i];
      return out;
    }
    const at::Tensor x2 = flat ? x.reshape({-1, x.size(-1)}) : x;
    at::Tensor gx;
    if (uk) {
      auto [dx, gw, gt, gb] = cpu::ukernel_masked_backward(dy2, x2, weight, threshold,
                                                           ctx->saved_data["counts"].toTensor(), grad_mode, need_x,
                                                           need_w || need_t, need_b);
      gx = dx;
      if (need_w) out[1] = gw;
      if (need_t) out[2] = gt;
      if (need_b) out[3] = gb;
    } else {
      const at::Tensor& w_hat = saved[2];
      if (need_x) {
        if (ctx->saved_data.count("live") == 0) {
          gx = dy2.mm(w_hat);
        } else {
          const at::Tensor live = ctx->saved_data["live"].toTensor();
          gx = live.numel() > 0 ? dy2.index_select(1, live).mm(ctx->saved_data["w_live"].toTensor())
                                : at::zeros({dy2.size(0), x2.size(1)}, dy2.options());
        }
      }
      if (need_w || need_t) {
        auto [gw, gt] = fused_weight_grad(dy2, x2, weight, threshold, grad_mode, 0);
        if (need_w) out[1] = gw;
        if (need_t) out[2] = gt;
      }
    }
    if (need_x) out[0] = flat ? gx.view(x.sizes()) : gx;
    return out;
  }
};

}  // namespace

namespace cpu {

void set_double_backward(DoubleBackwardFn fn) { double_backward_slot() = std::move(fn); }

std::vector<at::Tensor> masked_linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                                               const at::Tensor& threshold, const std::optional<at::Tensor>& bias,
                                               int64_t grad_mode, double guard_ratio, int64_t gemm) {
  TORCH_CHECK(input.dim() >= 1 && weight.dim() == 2 && input.size(-1) == weight.size(1),
              "masked_linear_cpu: input [..., ", weight.dim() == 2 ? weight.size(1) : -1,
              "] and a 2-D weight expected, got ", input.sizes(), " and ", weight.sizes());
  return MaskedLinearFn::apply(input, weight, threshold, bias, grad_mode, guard_ratio, gemm);
}

}  // namespace cpu
}  // namespace rgkernels

TORCH_LIBRARY_IMPL(rgkernels, CPU, m) {
  m.impl("masked_linear_bwd", &rgkernels::masked_linear_bwd_cpu);
}
