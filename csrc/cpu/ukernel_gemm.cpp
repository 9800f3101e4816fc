// float32 GEMM blocks on oneDNN's BRGeMM micro-kernel, through PyTorch's at::native::cpublas.
//
// Why: the masked linear's masked-weight work (the mask, the threshold gradient) has to run on
// blocks of the weight while they are in cache, so its GEMMs are called block by block. A BLAS
// call per block pays its set-up (and its own packing of the operands) every time; the
// micro-kernel does not, and on AVX-512 CPUs it is also faster than MKL's sgemm on the small GEMMs
// of GAN layers (BENCHMARKS.md). Where it is missing (no oneDNN micro-kernels in the build, a CPU
// without the instruction sets it needs) the callers use ATen's GEMMs instead: same results up to
// float32 rounding.
#include "ukernel_gemm.h"

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace rgkernels {
namespace cpu {
namespace {

// Block sizes: an [kMb, kKb] block of A and a [kKb, kNb] block of B are 64 KB each (L2-resident
// next to the C block); the micro-kernel keeps its own register tiling inside a block.
constexpr int64_t kMb = 64, kNb = 64, kKb = 256;

// PyTorch releases that declare a float32 BRGeMM define this macro; with older ones the file
// builds without the micro-kernel path (gemm_backend() then says why).
#if defined(CPUBLAS_BRGEMM_F32F32F32)
constexpr bool kHaveBrgemmF32 = true;
void brgemm_block(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                  float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}
void release_block() { at::native::cpublas::brgemm_release(false); }
#else
constexpr bool kHaveBrgemmF32 = false;
void brgemm_block(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool) {
  TORCH_CHECK(false, "this PyTorch has no float32 BRGeMM (at::native::cpublas::brgemm)");
}
void release_block() {}
#endif

struct Probe {
  bool ok = false;
  std::string why;
};

// One small product (odd sizes, every blocking path) against a plain loop in double.
Probe probe() {
  Probe p;
  if (!kHaveBrgemmF32) {
    p.why = "this PyTorch has no float32 BRGeMM (at::native::cpublas::brgemm)";
    return p;
  }
#if defined(__x86_64__) || defined(_M_X64)
  try {
    const int64_t M = 67, N = 70, K = 300;
    std::vector<float> A(M * K), B(K * N), C(M * N, 1.0f);
    for (int64_t i = 0; i < M * K; ++i) A[i] = static_cast<float>((i * 7919) % 97) / 97.0f - 0.5f;
    for (int64_t i = 0; i < K * N; ++i) B[i] = static_cast<float>((i * 104729) % 89) / 89.0f - 0.5f;
    for (int pass = 0; pass < 2; ++pass) {  // accumulate = false, then true
      int64_t m0 = 0;
      for (; m0 < M; m0 += kMb) {
        for (int64_t n0 = 0; n0 < N; n0 += kNb) {
          for (int64_t k0 = 0; k0 < K; k0 += kKb) {
            brgemm_block(std::min(kMb, M - m0), std::min(kNb, N - n0), std::min(kKb, K - k0), &A[m0 * K + k0], K,
                         &B[k0 * N + n0], N, &C[m0 * N + n0], N, pass == 1 || k0 > 0);
          }
        }
      }
    }
    release_block();
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        double ref = 0;
        for (int64_t k = 0; k < K; ++k) ref += double(A[i * K + k]) * double(B[k * N + j]);
        ref *= 2;  // computed twice, the second time accumulated onto the first
        if (std::abs(ref - C[i * N + j]) > 1e-3 * (1 + std::abs(ref))) {
          p.why = "the micro-kernel's result differs from a plain loop";
          return p;
        }
      }
    }
    p.ok = true;
  } catch (const std::exception& e) {
    p.why = e.what();
    const size_t nl = p.why.find('\n');
    if (nl != std::string::npos) p.why.resize(nl);
  }
#else
  p.why = "not an x86-64 build";
#endif
  return p;
}

const Probe& probed() {
  static const Probe p = probe();
  return p;
}

// -1: not decided yet (environment), 0: aten, 1: ukernel.
std::atomic<int> g_choice{-1};
std::atomic<bool> g_pinned{false};

int decide() {
  int c = g_choice.load();
  if (c >= 0) return c;
  const char* env = std::getenv("RGKERNELS_CPU_GEMM");
  const std::string want = env ? env : "";
  TORCH_CHECK(want.empty() || want == "aten" || want == "ukernel",
              "RGKERNELS_CPU_GEMM must be 'aten' or 'ukernel', got '", want, "'");
  c = want == "aten" ? 0 : (probed().ok ? 1 : 0);
  TORCH_CHECK(!(want == "ukernel" && c == 0), "RGKERNELS_CPU_GEMM=ukernel, but the micro-kernel is not usable: ",
              probed().why);
  g_pinned.store(!want.empty());
  g_choice.store(c);
  return c;
}

}  // namespace

bool ukernel_enabled() { return decide() == 1; }

std::string gemm_backend() { return ukernel_enabled() ? "ukernel" : "aten"; }

std::string gemm_backend_reason() {
  if (ukernel_enabled()) return "";
  return probed().ok ? "RGKERNELS_CPU_GEMM=aten" : probed().why;
}

bool ukernel_available() { return probed().ok; }

bool gemm_pinned() {
  decide();
  return g_pinned.load();
}

std::string set_gemm_backend(const std::string& name) {
  TORCH_CHECK(name == "aten" || name == "ukernel" || name == "auto",
              "set_cpu_gemm: 'aten', 'ukernel' or 'auto', got '", name, "'");
  if (name == "ukernel") {
    TORCH_CHECK(probed().ok, "set_cpu_gemm: the micro-kernel is not usable here: ", probed().why);
  }
  decide();  // the environment is read first, so that it cannot override this call later
  g_choice.store(name == "aten" ? 0 : (probed().ok ? 1 : 0));
  g_pinned.store(name != "auto");
  return gemm_backend();
}

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
              float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return;
  }
  // K outermost: each [kKb, kNb] block of B is used for every block of rows while in cache.
  for (int64_t k0 = 0; k0 < K; k0 += kKb) {
    const int64_t kb = std::min(kKb, K - k0);
    for (int64_t n0 = 0; n0 < N; n0 += kNb) {
      const int64_t nb = std::min(kNb, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kMb) {
        brgemm_block(std::min(kMb, M - m0), nb, kb, A + m0 * lda + k0, lda, B + k0 * ldb + n0, ldb,
                     C + m0 * ldc + n0, ldc, accumulate || k0 > 0);
      }
    }
  }
}

void gemm_release() { release_block(); }

}  // namespace cpu
}  // namespace rgkernels
