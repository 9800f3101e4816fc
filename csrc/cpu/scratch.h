// Scratch buffers of the CPU kernels that start on a 64-byte boundary.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace rgkernels {
namespace cpu {

// Per-thread buffers are kept between calls (no allocation per step) up to this size; larger ones
// (layers with very long rows: 64 rows of 16K+ floats) are freed after the call that needed them.
constexpr size_t kKeepBufferBytes = size_t(4) << 20;

// A growable scratch buffer whose data starts on a 64-byte boundary (one cache line, one AVX-512
// vector). With malloc's 16-byte alignment most vector loads and stores of the block buffers were
// split across two cache lines (the masked linear's forward at batch 1, mostly its mask pass, took
// 1.4x as long; measured on SNGAN G.l1's 4096x128 weight).
template <typename T>
class Scratch {
 public:
  // Room for n elements; the contents are not kept.
  T* grow(int64_t n) {
    const size_t need = static_cast<size_t>(n) + kPad;
    if (v_.size() < need) v_.resize(need);
    const auto addr = reinterpret_cast<uintptr_t>(v_.data());
    p_ = reinterpret_cast<T*>((addr + 63) & ~uintptr_t(63));
    return p_;
  }
  T* data() const { return p_; }
  void trim() {
    if (v_.capacity() * sizeof(T) > kKeepBufferBytes) {
      std::vector<T>().swap(v_);
      p_ = nullptr;
    }
  }

 private:
  static constexpr size_t kPad = 64 / sizeof(T) + 1;
  std::vector<T> v_;
  T* p_ = nullptr;
};

}  // namespace cpu
}  // namespace rgkernels
