// Row kernels of the CPU masked-weight ops (DESIGN.md §2), shared by the masked-weight ops
// (masked_weight_cpu.cpp) and the fused masked linear (masked_linear_cpu.cpp).
//
// Each kernel is compiled three times, for x86-64 with AVX-512 (F/BW/VL/DQ), with AVX2 and for
// the baseline instruction set, and the best one the CPU supports is chosen at run time
// (RGKERNELS_CPU_ISA=avx512|avx2|baseline, or set_cpu_isa, picks another one, for tests and
// benchmarks). In the AVX-512 variant, float32 rows with unit stride run the hand-written kernels of
// rows_avx512_f32.h instead of the vectorised generic loops. Every variant gives bit-identical
// results: no fused multiply-add is generated (none of the targets enables FMA, and the file is
// built with -ffp-contract=off), and every reduction has one fixed order. On other architectures
// only the baseline exists.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace rgkernels {
namespace cpu {

// One layer viewed as [C, K]: row r of the weight starts at w + r * ws0, element j at + j * ws1.
struct FwdLayer {
  const void* w;
  void* out;       // contiguous [C, K]
  float* thr;      // threshold, stride ts (written by the guard)
  int32_t* counts; // [C]
  int64_t C, K, ws0, ws1, ts;
  at::ScalarType dtype;
  // Optional: the mask bit-packed, row r at bits + r * bs0, entry j in bit j % 8 of byte j / 8
  // (the layout of rgkernels/ops/triton_mask_stats.py); nullptr: not written.
  uint8_t* bits = nullptr;
  int64_t bs0 = 0;
};

struct BwdLayer {
  const void* g;
  const void* w;
  const float* thr;
  void* gw;   // [C, K], row stride gws0, inner stride 1; may be g itself (same strides): in place
  float* gt;  // [C]
  int64_t C, K, gs0, gs1, ws0, ws1, ts, gws0;
  at::ScalarType dtype;
  // Optional: W_hat = W * M written too, row r at w_hat + r * K (contiguous); only where g and W
  // have unit inner strides (the caller checks). nullptr: not written.
  void* w_hat = nullptr;
};

// Forward of rows [r0, r1): W_hat, keep counts (and the bit-packed mask when L.bits is set); t = 0
// when zero_threshold (the guard's recomputation). Returns the number of kept entries in those
// rows. Single-threaded.
int64_t fwd_rows(const FwdLayer& L, int64_t r0, int64_t r1, bool zero_threshold);

// Forward of whole layers (masked_weight_cpu.cpp): every row of every layer, split over the
// threads, then the collapse guard per layer (threshold reset in place and the layer recomputed
// when its keep ratio <= guard_ratio; guard_ratio < 0 disables it).
void fwd_layers(std::vector<FwdLayer>& layers, double guard_ratio);

// Backward of rows [r0, r1): weight gradient and grad_threshold. `scratch` holds at least K
// doubles, 2 K when in place (L.gw == L.g). Single-threaded.
void bwd_rows(const BwdLayer& L, int64_t r0, int64_t r1, bool dst, void* scratch);

// The instruction-set variants: names of those this CPU can run (best first), the one in use,
// and a switch (an unknown name raises; a known one the CPU lacks falls back to the best one it
// has, with a warning). Returns the variant now in use.
std::vector<std::string> supported_isas();
std::string active_isa();
std::string set_isa(const std::string& name);

}  // namespace cpu
}  // namespace rgkernels
