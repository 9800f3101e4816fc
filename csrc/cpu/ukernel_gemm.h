// float32 GEMM blocks on oneDNN's BRGeMM micro-kernel (at::native::cpublas::brgemm), for the
// CPU masked linear (masked_linear_cpu.cpp): a kernel the caller invokes block by block, so that
// the masked-weight work runs on blocks still in cache (see ukernel_gemm.cpp).
#pragma once

#include <cstdint>
#include <string>

namespace rgkernels {
namespace cpu {

// Whether the micro-kernel path is in use: this CPU and build have it (probed once with a small
// product checked against a plain loop) and RGKERNELS_CPU_GEMM does not say "aten".
bool ukernel_enabled();
// "ukernel" or "aten" (what ukernel_enabled() says), and why when "aten".
std::string gemm_backend();
std::string gemm_backend_reason();
// Whether the micro-kernel can run here (this CPU and build), whatever the choice.
bool ukernel_available();
// Whether RGKERNELS_CPU_GEMM or set_gemm_backend pinned the choice: then every layer uses it, else
// the layers pick per shape by measurement (rgkernels/ops/cpu_masked_linear.py).
bool gemm_pinned();
// Tests and benchmarks: pin "aten" or "ukernel" (raises when unavailable), or "auto": unpinned, the
// build's default; returns the one in use.
std::string set_gemm_backend(const std::string& name);

// C[M, N] (row stride ldc) = A[M, K] (row stride lda) * B[K, N] (row stride ldb), plus C when
// accumulate. Single-threaded; blocked over M, N and K for the cache. Row-major, unit inner strides.
void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
              float* C, int64_t ldc, bool accumulate);

// Releases the micro-kernel's per-thread hardware state; call after a thread's last gemm_f32 of a
// parallel region.
void gemm_release();

}  // namespace cpu
}  // namespace rgkernels
