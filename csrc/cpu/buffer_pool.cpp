// A small caching allocator for the weight-sized tensors the CPU kernels create every step
// (the masked weight W_hat, weight gradients, the weight-gradient GEMM's block buffer).
//
// Why: glibc serves blocks above its mmap threshold (up to 32 MB) with fresh mappings and trims
// the heap top back to the system, so a weight-sized tensor allocated in every step is
// page-faulted in again in every step: ~0.5 us per 4 KB page, about 10 ms for a 37 MB FastGAN
// weight (benchmarks/bench_masked_layers.py, BENCHMARKS.md). A masked layer allocates two such
// tensors more per step than the dense layer (W_hat and dL/dW_hat besides the weight gradient),
// which made it measurably slower than the dense layer on large layers for no computational
// reason. Blocks freed here go back to a per-size free list and are handed out again, mapped.
//
// Exact-size buckets: a training step asks for the same sizes every time. The cache is capped
// (RGKERNELS_CPU_POOL_MB, default 1024; 0 turns the pool off) and can be emptied with
// rgkernels.empty_cpu_cache(). Thread-safe (one mutex; taken twice per weight-sized allocation).
#include "buffer_pool.h"

#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace rgkernels {
namespace cpu {
namespace {

constexpr size_t kPoolMinBytes = size_t(1) << 18;  // 256 KB: smaller blocks stay on glibc's heap
constexpr size_t kMaxPerSize = 8;                  // freed blocks kept per size

size_t limit_from_env() {
  const char* s = std::getenv("RGKERNELS_CPU_POOL_MB");
  if (s == nullptr || *s == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && mb >= 0, "RGKERNELS_CPU_POOL_MB must be a whole number of "
              "megabytes >= 0 (0 turns the CPU buffer pool off), got '", s, "'");
  return static_cast<size_t>(mb) << 20;
}

class BlockPool {
 public:
  BlockPool() : limit_(limit_from_env()) {}

  void* get(size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(nbytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= nbytes;
        ++hits_;
        return p;
      }
      ++misses_;
    }
    return c10::alloc_cpu(nbytes);
  }

  void put(void* p, size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::vector<void*>& list = free_[nbytes];
      if (cached_ + nbytes <= limit_ && list.size() < kMaxPerSize) {
        list.push_back(p);
        cached_ += nbytes;
        return;
      }
    }
    c10::free_cpu(p);
  }

  void release() {
    std::unordered_map<size_t, std::vector<void*>> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& kv : blocks)
      for (void* p : kv.second) c10::free_cpu(p);
  }

  PoolStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t n = 0;
    for (auto& kv : free_) n += static_cast<int64_t>(kv.second.size());
    return {static_cast<int64_t>(cached_), n, static_cast<int64_t>(limit_), hits_, misses_};
  }

  bool enabled() const { return limit_ > 0; }

 private:
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
  const size_t limit_;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors from the pool may be freed during static destruction (Python exit).
BlockPool& pool() {
  static BlockPool* p = new BlockPool();
  return *p;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "pooled_empty: CPU tensors only");
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (nbytes < kPoolMinBytes || !pool().enabled()) return at::empty(sizes, options);
  void* p = pool().get(nbytes);
  return at::from_blob(
      p, sizes, [nbytes](void* q) { pool().put(q, nbytes); }, options);
}

PoolStats pool_stats() { return pool().stats(); }

void pool_release() { pool().release(); }

}  // namespace cpu
}  // namespace rgkernels
