// Operator schemas of the `rgkernels` namespace and the Python module `rgkernels._C`.
//
// The CPU implementations are registered in csrc/cpu/, the CUDA ones in csrc/cuda/ (each file
// registers its own with TORCH_LIBRARY_IMPL). Fake (meta) implementations live in Python
// (rgkernels/ops/compiled.py) so that the ops trace under torch.compile.
//
// Tensors passed in are 2-D views [C, K] of a layer's weight (any strides); outputs are
// contiguous [C, K]. keep_counts are int32 [C]; grad_threshold has the threshold's dtype (float32).
// The grouped forward takes weights of ONE dtype and returns one flat buffer holding every masked
// weight (layer after layer, each a contiguous [C_i*K_i] block) and one flat int32 buffer of keep
// counts ([sum C_i]): a mutating op may not return Tensor[] (torch.compile cannot functionalize it).
//
// Define RGKERNELS_NO_PYTHON (the standalone CMake build does) to compile this file against
// libtorch alone: the schemas and checks stay, the Python module part is left out.
#ifndef RGKERNELS_NO_PYTHON
#include <torch/extension.h>
#endif
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "rgkernels/masked_weight.h"
#include "rgkernels/masked_weight_node.h"
#include "cpu/buffer_pool.h"
#include "cpu/masked_linear_cpu.h"
#include "cpu/masked_weight_rows.h"
#include "cpu/ukernel_gemm.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rgkernels {

static void check_weight_threshold(const at::Tensor& weight, const at::Tensor& threshold,
                                   const char* op) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be a 2-D [C, K] view, got ", weight.dim(),
              " dims");
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op,
              ": weight must be floating point, got ", weight.scalar_type());
  TORCH_CHECK(threshold.dim() == 1, op, ": threshold must be 1-D, got shape ", threshold.sizes());
  TORCH_CHECK(threshold.scalar_type() == at::kFloat, op, ": threshold must be float32, got ",
              threshold.scalar_type());
  TORCH_CHECK(threshold.size(0) == weight.size(0), op, ": threshold has ", threshold.size(0),
              " entries but weight has ", weight.size(0), " output channels");
  TORCH_CHECK(threshold.device() == weight.device(), op, ": threshold is on ", threshold.device(),
              " but weight is on ", weight.device());
}

void check_fwd_inputs(const at::Tensor& weight, const at::Tensor& threshold, const char* op) {
  check_weight_threshold(weight, threshold, op);
  TORCH_CHECK(threshold.is_contiguous(), op, ": threshold must be contiguous (it is reset in place)");
}

void check_bwd_inputs(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& threshold,
                      int64_t grad_mode, const char* op) {
  check_weight_threshold(weight, threshold, op);
  TORCH_CHECK(grad.sizes() == weight.sizes(), op, ": grad has shape ", grad.sizes(),
              " but weight has shape ", weight.sizes());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
              " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK(grad.device() == weight.device(), op, ": grad is on ", grad.device(),
              " but weight is on ", weight.device());
  TORCH_CHECK(grad_mode == kGradModeDst || grad_mode == kGradModeMasked, op,
              ": grad_mode must be 0 (dst) or 1 (masked), got ", grad_mode);
}

void check_dtype(const at::Tensor& weight, const char* op) {
  const auto st = weight.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": weight dtype ", st, " is not supported (float32, float64, float16, bfloat16)");
}

void check_cols(const at::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.size(1) <= std::numeric_limits<int32_t>::max(), op, ": rows of ",
              weight.size(1), " entries do not fit the int32 keep counts");
}

std::string layer_op(const char* op, size_t i) {
  return std::string(op) + " (layer " + std::to_string(i) + ")";
}

GroupedSize check_grouped_fwd_inputs(at::TensorList weights, at::TensorList thresholds,
                                     const char* op, const LayerCheck& device_check) {
  TORCH_CHECK(weights.size() == thresholds.size(), op, ": got ", weights.size(), " weights but ",
              thresholds.size(), " thresholds");
  TORCH_CHECK(!weights.empty(), op, ": needs at least one layer");
  GroupedSize size;
  for (size_t i = 0; i < weights.size(); ++i) {
    const std::string name = layer_op(op, i);
    check_fwd_inputs(weights[i], thresholds[i], name.c_str());
    device_check(weights[i], name.c_str());
    TORCH_CHECK(weights[i].scalar_type() == weights[0].scalar_type(), name,
                ": all weights of a grouped call must share one dtype, got ",
                weights[i].scalar_type(), " and ", weights[0].scalar_type(), " (layer 0)");
    size.numel += weights[i].numel();
    size.rows += weights[i].size(0);
  }
  return size;
}

void check_grouped_bwd_inputs(at::TensorList grads, at::TensorList weights, at::TensorList thresholds,
                              int64_t grad_mode, const char* op, const LayerCheck& device_check) {
  TORCH_CHECK(grads.size() == weights.size() && weights.size() == thresholds.size(), op, ": got ",
              grads.size(), " grads, ", weights.size(), " weights and ", thresholds.size(),
              " thresholds");
  for (size_t i = 0; i < weights.size(); ++i) {
    const std::string name = layer_op(op, i);
    check_bwd_inputs(grads[i], weights[i], thresholds[i], grad_mode, name.c_str());
    device_check(weights[i], name.c_str());
  }
}

}  // namespace rgkernels

TORCH_LIBRARY(rgkernels, m) {
  m.def("masked_weight_fwd(Tensor weight, Tensor(a!) threshold, float guard_ratio) -> (Tensor, Tensor)");
  m.def("masked_weight_bwd(Tensor grad, Tensor weight, Tensor threshold, int grad_mode) -> (Tensor, Tensor)");
  m.def("masked_weight_grouped_fwd(Tensor[] weights, Tensor(a!)[] thresholds, float guard_ratio) -> (Tensor, Tensor)");
  m.def("masked_weight_grouped_bwd(Tensor[] grads, Tensor[] weights, Tensor[] thresholds, int grad_mode) -> (Tensor[], Tensor[])");
  // Backward of y = x W_hat^T + b with the masked-weight backward fused into the weight-gradient
  // GEMM (CPU only: csrc/cpu/masked_linear_cpu.cpp). grad_input / grad_bias are empty when not
  // asked for.
  m.def("masked_linear_bwd(Tensor grad_out, Tensor input, Tensor weight, Tensor w_hat, Tensor threshold, "
        "int grad_mode, bool input_grad, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

#ifndef RGKERNELS_NO_PYTHON
// What was compiled into this build, for `python -m rgkernels.info`.
static pybind11::dict build_info() {
  pybind11::dict d;
#ifdef RGKERNELS_WITH_CUDA
  d["cuda"] = true;
#ifdef CUDART_VERSION
  d["cuda_runtime_version"] = CUDART_VERSION;
#endif
#else
  d["cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = _OPENMP;
  d["omp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = 0;
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  d["torch_version"] = std::string(TORCH_VERSION);
  d["cpu_isa"] = rgkernels::cpu::active_isa();
  d["cpu_isas"] = rgkernels::cpu::supported_isas();
  d["cpu_gemm"] = rgkernels::cpu::gemm_backend();
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rgkernels compiled kernels; the ops are registered under torch.ops.rgkernels";
  m.def("build_info", &build_info, "what this build of the extension contains");
  m.def("cpu_isa", &rgkernels::cpu::active_isa,
        "instruction set of the CPU row kernels in use (avx512, avx2 or baseline)");
  m.def("cpu_isas", &rgkernels::cpu::supported_isas, "instruction sets this CPU can run, best first");
  m.def("masked_weight_autograd", &rgkernels::masked_weight_autograd, pybind11::arg("weight"),
        pybind11::arg("threshold"), pybind11::arg("grad_mode"), pybind11::arg("guard_ratio"),
        "(W * M, keep counts) through the compiled ops of the weight's device, with the autograd node in C++ "
        "(csrc/masked_weight_node.cpp)");
  m.def(
      "masked_linear_cpu",
      [](const at::Tensor& input, const at::Tensor& weight, const at::Tensor& threshold,
         const std::optional<at::Tensor>& bias, int64_t grad_mode, double guard_ratio, int64_t gemm) {
        std::vector<at::Tensor> r =
            rgkernels::cpu::masked_linear_autograd(input, weight, threshold, bias, grad_mode, guard_ratio, gemm);
        // Live rows as None when nothing was skipped: read here (a CPU scalar) so that Python does
        // not pay a tensor read in every forward.
        const bool compacted = r[3].data_ptr<int64_t>()[0] >= 0;
        return pybind11::make_tuple(r[0], r[1], r[2], compacted ? pybind11::cast(r[3]) : pybind11::none());
      },
      pybind11::arg("input"),
        pybind11::arg("weight"), pybind11::arg("threshold"), pybind11::arg("bias"), pybind11::arg("grad_mode"),
        pybind11::arg("guard_ratio"), pybind11::arg("gemm") = -1,
        "(y, W_hat, keep counts, live rows [1] or None) of F.linear(input, W * M, bias) as one C++ autograd node "
        "(CPU); gemm: 0 ATen's GEMMs, 1 the micro-kernel, -1 the process-wide choice (a pinned one always wins)");
  m.def(
      "_set_double_backward",
      [](pybind11::function fn) {
        // Held for the life of the process and never destroyed: a Python object must not be
        // released at static destruction time, without the GIL.
        auto* held = new pybind11::function(std::move(fn));
        rgkernels::cpu::set_double_backward(
            [held](const at::Tensor& x, const at::Tensor& w, const at::Tensor& t, const at::Tensor& dy,
                   int64_t grad_mode, std::vector<bool> needs) {
              pybind11::gil_scoped_acquire gil;
              auto r = (*held)(x, w, t, dy, grad_mode, needs).cast<std::vector<std::optional<at::Tensor>>>();
              std::vector<at::Tensor> out;
              for (auto& g : r) out.push_back(g.has_value() ? *g : at::Tensor());
              return out;
            });
      },
      "registers the differentiable composition used by masked_linear_cpu under create_graph=True");
  m.def(
      "cpu_pool_stats",
      [] {
        const rgkernels::cpu::PoolStats s = rgkernels::cpu::pool_stats();
        pybind11::dict d;
        d["cached_bytes"] = s.cached_bytes;
        d["cached_blocks"] = s.cached_blocks;
        d["limit_bytes"] = s.limit_bytes;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        return d;
      },
      "the CPU buffer pool of weight-sized kernel outputs (csrc/cpu/buffer_pool.cpp)");
  m.def("cpu_pool_release", &rgkernels::cpu::pool_release,
        "returns the CPU buffer pool's cached blocks to the system allocator");
  m.def("cpu_gemm", &rgkernels::cpu::gemm_backend,
        "GEMMs of the CPU masked linear: 'ukernel' (oneDNN micro-kernel blocks) or 'aten'");
  m.def("cpu_gemm_reason", &rgkernels::cpu::gemm_backend_reason, "why cpu_gemm() is 'aten' ('' when not)");
  m.def("set_cpu_gemm", &rgkernels::cpu::set_gemm_backend, pybind11::arg("name"),
        "pins the CPU masked linear's GEMMs to 'aten' or 'ukernel' for every layer (tests, benchmarks), or 'auto' "
        "(unpinned: each layer shape measured); returns the process-wide one");
  m.def("cpu_gemm_pinned", &rgkernels::cpu::gemm_pinned,
        "whether RGKERNELS_CPU_GEMM or set_cpu_gemm pinned the GEMM choice (else measured per layer shape)");
  m.def("cpu_ukernel_available", &rgkernels::cpu::ukernel_available,
        "whether oneDNN's micro-kernel runs on this CPU and build");
  m.def("set_cpu_isa", &rgkernels::cpu::set_isa, pybind11::arg("name"),
        "switches the CPU row kernels to another instruction set (tests, benchmarks); returns the "
        "one in use");
}
#endif  // RGKERNELS_NO_PYTHON
