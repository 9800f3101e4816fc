// Weight-sized CPU buffers from a cache of freed blocks (see buffer_pool.cpp for why).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rgkernels {
namespace cpu {

// at::empty(sizes, options) for a contiguous CPU tensor; blocks of at least kPoolMinBytes come
// from the pool (their memory is already mapped), smaller ones from the default allocator.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

struct PoolStats {
  int64_t cached_bytes;  // freed blocks held for reuse
  int64_t cached_blocks;
  int64_t limit_bytes;   // cap on cached_bytes (RGKERNELS_CPU_POOL_MB)
  int64_t hits;          // allocations served from the cache
  int64_t misses;        // allocations that went to the system allocator
};

PoolStats pool_stats();
// Returns every cached block to the system allocator (like torch.cuda.empty_cache).
void pool_release();

}  // namespace cpu
}  // namespace rgkernels
