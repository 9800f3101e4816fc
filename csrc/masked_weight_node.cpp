// The masked-weight op's autograd node in C++ (any device the compiled ops run on: CPU, CUDA).
//
// rgkernels/ops/masked_weight.py's _MaskedWeightFn does the same in Python. On small layers a step
// is bound by the host's time per call (on a GPU the kernels take microseconds), and a Python
// autograd.Function costs it twice: the forward's apply, and above all the backward, where the
// engine takes the GIL and calls into Python. This node calls the same dispatcher ops
// (rgkernels::masked_weight_fwd / _bwd, so dispatch modes and the collapse guard behave as they do
// from Python) with the same saved state. The Python Function stays for
// torch.compile (which traces it), the Triton and reference backends, and builds without this file.
#include "rgkernels/masked_weight_node.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <tuple>

namespace rgkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// [C, ...] as [C, K]: a view where the trailing dims merge (as _as_rows in masked_weight.py).
at::Tensor as_rows(const at::Tensor& t) {
  int64_t k = 1;
  for (int64_t d = 1; d < t.dim(); ++d) k *= t.size(d);
  return t.reshape({t.size(0), k});
}

class MaskedWeightFn : public torch::autograd::Function<MaskedWeightFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& threshold,
                               int64_t grad_mode, double guard_ratio) {
    static auto fwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("rgkernels::masked_weight_fwd", "")
                          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double)>();
    // (the schema marks the threshold mutable, Tensor(a!): the collapse guard resets it in place; the
    // kernels were registered taking it as const at::Tensor&, so that is the call's signature too)
    auto [out, counts] = fwd.call(as_rows(weight), threshold, guard_ratio);
    ctx->save_for_backward({weight});
    // Not a saved variable, as in _MaskedWeightFn (which also runs the reference and Triton ops, whose
    // declared mutation bumps the version in every call; these compiled ops do not bump it).
    ctx->saved_data["threshold"] = threshold;
    ctx->saved_data["grad_mode"] = grad_mode;
    // The counts are int32, which autograd never differentiates: no mark_non_differentiable, which
    // compiled autograd refuses for C++ nodes (an internal assert in CppNode::compiled_args).
    ctx->set_materialize_grads(false);  // no zero-filled gradient for the counts in every backward
    return {weight.dim() == 2 ? out : out.view(weight.sizes()), counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("rgkernels::masked_weight_bwd", "")
                          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, int64_t)>();
    variable_list out(4);  // one per forward argument
    const at::Tensor& grad = grads[0];
    const bool need_w = ctx->needs_input_grad(0), need_t = ctx->needs_input_grad(1);
    if (!grad.defined() || !(need_w || need_t)) return out;
    const at::Tensor weight = ctx->get_saved_variables()[0];
    auto [gw, gt] = bwd.call(as_rows(grad), as_rows(weight), ctx->saved_data["threshold"].toTensor(),
                             ctx->saved_data["grad_mode"].toInt());
    if (need_w) out[0] = weight.dim() == 2 ? gw : gw.view(weight.sizes());
    if (need_t) out[1] = gt;
    return out;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_weight_autograd(const at::Tensor& weight, const at::Tensor& threshold,
                                                          int64_t grad_mode, double guard_ratio) {
  TORCH_CHECK(weight.dim() >= 1, "masked_weight: weight must have at least 1 dimension");
  variable_list r = MaskedWeightFn::apply(weight, threshold, grad_mode, guard_ratio);
  return {r[0], r[1]};
}

}  // namespace rgkernels
