// CUDA kernels of the masked-weight ops (DESIGN.md §2; scalar semantics in masked_weight.h).
//
// One launch per call (per dtype group for the grouped backward, and per kMaxLayers layers):
// single-layer calls are grouped calls with one layer.
//
// Launch configuration. Blocks of kThreads = 256 threads. Every layer gets a contiguous range of
// blocks (block_start[] in the kernel arguments; a block finds its layer by binary search). A
// layer's rows are processed by groups of `tpr` threads (threads per row: a power of two in
// [1, 256], about K / 8, so each thread handles ~8 entries of a row), hence 256 / tpr rows per
// block: rows of a 3x3x3 conv (K = 27) take 4 threads each and 64 share a block, rows of a wide
// layer (K >= 2048) take a whole block. Thread `lane` of a group handles entries lane,
// lane + tpr, ... so that neighbouring threads touch neighbouring entries (coalesced for
// contiguous rows). A group's partial results are combined with warp shuffles (tpr <= 32) or
// shuffles plus shared memory (tpr > 32); the order depends only on K, so results are
// deterministic (no float atomics).
//
// Collapse guard without a host sync. Each block adds its kept count to a per-layer counter in a
// small workspace and then takes a ticket (atomicAdd after __threadfence()). The block that draws
// the last ticket of its layer reads the total, resets both counters to zero, evaluates the guard
// and, when the layer collapsed (rare), zeroes the layer's threshold in place and rewrites all of
// the layer's outputs and counts with t = 0 by itself.
//
// Workspace choice: a self-resetting workspace. It is zero when the kernel starts and the last
// block of each layer puts its counters back to zero, so nothing is launched besides the kernel.
// One workspace per (device, stream), created (and zeroed once, on that stream) at first use and
// kept for the life of the process: launches on one stream are ordered, so they can share it,
// while launches on different streams never do. Under CUDA graph capture a private workspace is
// allocated and zeroed with a memset captured into the graph instead, so that the graph owns its
// counters and replays never share them with eager launches.
//
// Arithmetic uses the _rn intrinsics (no FMA contraction), in the same order as the reference,
// so out, counts and grad_weight match it to the bit; grad_threshold's sum order differs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "rgkernels/masked_weight.h"

namespace rgkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kLog2Threads = 8;
constexpr int kWarps = kThreads / 32;
constexpr int kElemsPerThread = 8;
// Layers per launch. The per-layer descriptors travel in the kernel arguments, which must stay
// within the classic 4 KiB limit (static_asserts below); more layers are split over launches.
constexpr int kMaxLayers = 32;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

__device__ __forceinline__ float rg_abs(float v) { return fabsf(v); }
__device__ __forceinline__ double rg_abs(double v) { return fabs(v); }

// ---- kernel arguments -----------------------------------------------------------------------

template <typename scalar_t>
struct FwdLayer {
  const scalar_t* w;  // [C, K] with strides (ws0, ws1)
  scalar_t* out;      // [C, K] contiguous
  float* thr;         // [C] with stride ts; zeroed in place by the guard
  int32_t* counts;    // [C]
  int64_t C, K, ws0, ws1, ts;
  int log2_tpr;       // threads per row = 1 << log2_tpr
};

template <typename scalar_t>
struct FwdArgs {
  FwdLayer<scalar_t> layer[kMaxLayers];
  int block_start[kMaxLayers + 1];  // layer i owns blocks [block_start[i], block_start[i+1])
  int n;
  double guard_ratio;  // < 0: no guard
};

template <typename scalar_t>
struct BwdLayer {
  const scalar_t* g;  // [C, K] with strides (gs0, gs1)
  const scalar_t* w;  // [C, K] with strides (ws0, ws1)
  const float* thr;   // [C] with stride ts
  scalar_t* gw;       // [C, K] contiguous
  float* gt;          // [C]
  int64_t C, K, gs0, gs1, ws0, ws1, ts;
  int log2_tpr;
};

template <typename scalar_t>
struct BwdArgs {
  BwdLayer<scalar_t> layer[kMaxLayers];
  int block_start[kMaxLayers + 1];
  int n;
};

static_assert(sizeof(FwdArgs<double>) + sizeof(void*) <= 4000, "kernel arguments exceed 4 KiB");
static_assert(sizeof(BwdArgs<double>) <= 4000, "kernel arguments exceed 4 KiB");

// ---- device helpers -------------------------------------------------------------------------

// The layer owning block b: the last i with block_start[i] <= b (every layer has >= 1 block).
__device__ __forceinline__ int find_layer(const int* block_start, int n, int b) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (block_start[mid] <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Sum of v over each aligned group of 2^log2_tpr threads; every thread of a group gets its
// group's sum. Must be called by all threads of the block with the same log2_tpr (it may
// __syncthreads). `smem` has kWarps entries.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int log2_tpr, T* smem) {
  if (log2_tpr <= 5) {
    for (int off = (1 << log2_tpr) >> 1; off > 0; off >>= 1) {
      v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
  }
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers are done with smem
  if ((threadIdx.x & 31) == 0) smem[warp] = v;
  __syncthreads();
  const int warps_per_group = 1 << (log2_tpr - 5);
  const int first = warp & ~(warps_per_group - 1);
  T s = smem[first];
  for (int i = 1; i < warps_per_group; ++i) s += smem[first + i];
  return s;
}

// Forward of one row by a group of threads: writes out and (lane 0) the row's count, returns the
// count to every thread of the group (0 for rows past the end).
template <typename scalar_t, bool kContig>
__device__ __forceinline__ int fwd_row_loop(const scalar_t* __restrict__ w, int64_t ws1, int64_t K,
                                            acc_type<scalar_t> t, scalar_t* __restrict__ out,
                                            int lane, int tpr) {
  using acc_t = acc_type<scalar_t>;
  int kept = 0;
#pragma unroll 4
  for (int64_t j = lane; j < K; j += tpr) {
    const acc_t wv = static_cast<acc_t>(w[kContig ? j : j * ws1]);
    const acc_t x = rg_sub(rg_abs(wv), t);
    const bool m = x > acc_t(0);
    out[j] = static_cast<scalar_t>(rg_mul(wv, m ? acc_t(1) : acc_t(0)));
    kept += m ? 1 : 0;
  }
  return kept;
}

template <typename scalar_t>
__device__ __forceinline__ int fwd_row(const FwdLayer<scalar_t>& L, int64_t row, int lane,
                                       int log2_tpr, bool zero_threshold, int* smem) {
  using acc_t = acc_type<scalar_t>;
  int kept = 0;
  if (row < L.C) {
    const acc_t t = zero_threshold ? acc_t(0) : static_cast<acc_t>(L.thr[row * L.ts]);
    const scalar_t* w = L.w + row * L.ws0;
    scalar_t* out = L.out + row * L.K;
    kept = L.ws1 == 1 ? fwd_row_loop<scalar_t, true>(w, 1, L.K, t, out, lane, 1 << log2_tpr)
                      : fwd_row_loop<scalar_t, false>(w, L.ws1, L.K, t, out, lane, 1 << log2_tpr);
  }
  kept = group_sum(kept, log2_tpr, smem);
  if (lane == 0 && row < L.C) L.counts[row] = kept;
  return kept;
}

// ---- forward kernel -------------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    masked_weight_fwd_kernel(const __grid_constant__ FwdArgs<scalar_t> args,
                             unsigned long long* __restrict__ workspace) {
  __shared__ int s_red[kWarps];
  __shared__ unsigned long long s_kept;
  __shared__ int s_last;
  __shared__ int s_collapse;

  const int b = static_cast<int>(blockIdx.x);
  const int l = find_layer(args.block_start, args.n, b);
  const FwdLayer<scalar_t>& L = args.layer[l];
  const int log2_tpr = L.log2_tpr;
  const int rows_per_block = kThreads >> log2_tpr;
  const int sub = static_cast<int>(threadIdx.x) >> log2_tpr;       // row within the block
  const int lane = static_cast<int>(threadIdx.x) & ((1 << log2_tpr) - 1);  // thread within the row
  const int local_block = b - args.block_start[l];
  const int nblocks = args.block_start[l + 1] - args.block_start[l];
  const int64_t row = static_cast<int64_t>(local_block) * rows_per_block + sub;

  const int kept = fwd_row(L, row, lane, log2_tpr, false, s_red);

  if (!(args.guard_ratio >= 0.0)) return;  // uniform over the grid (NaN disables, as on the host)

  // Block total -> layer counter, then a ticket; the last block of the layer checks the guard.
  if (threadIdx.x == 0) s_kept = 0ull;
  __syncthreads();
  if (lane == 0 && row < L.C && kept > 0) {
    atomicAdd(&s_kept, static_cast<unsigned long long>(kept));
  }
  __threadfence();  // this thread's out/counts writes are visible device-wide before the ticket
  __syncthreads();
  unsigned long long* layer_kept = workspace + 2 * l;
  unsigned long long* layer_ticket = workspace + 2 * l + 1;
  if (threadIdx.x == 0) {
    atomicAdd(layer_kept, s_kept);
    __threadfence();
    const unsigned long long ticket = atomicAdd(layer_ticket, 1ull);
    s_last = ticket == static_cast<unsigned long long>(nblocks - 1) ? 1 : 0;
  }
  __syncthreads();
  if (!s_last) return;  // uniform over the block

  __threadfence();  // pairs with the other blocks' fences: their writes precede ours
  if (threadIdx.x == 0) {
    const unsigned long long total = atomicExch(layer_kept, 0ull);  // read and reset
    atomicExch(layer_ticket, 0ull);
    s_collapse = collapsed(static_cast<long long>(total), L.C * L.K, args.guard_ratio) ? 1 : 0;
  }
  __syncthreads();
  if (!s_collapse) return;  // uniform over the block

  // Rare path: the layer collapsed. Reset its threshold and redo the whole layer with t = 0.
  for (int64_t i = threadIdx.x; i < L.C; i += kThreads) L.thr[i * L.ts] = 0.0f;
  for (int64_t r0 = 0; r0 < L.C; r0 += rows_per_block) {
    fwd_row(L, r0 + sub, lane, log2_tpr, true, s_red);  // loop bounds uniform: syncs are safe
  }
}

// ---- backward kernel ------------------------------------------------------------------------

template <typename scalar_t, bool kContig, bool kDst>
__device__ __forceinline__ acc_type<scalar_t> bwd_row_loop(
    const scalar_t* __restrict__ g, int64_t gs1, const scalar_t* __restrict__ w, int64_t ws1,
    int64_t K, acc_type<scalar_t> t, scalar_t* __restrict__ gw, int lane, int tpr) {
  using acc_t = acc_type<scalar_t>;
  acc_t part = acc_t(0);
#pragma unroll 4
  for (int64_t j = lane; j < K; j += tpr) {
    const acc_t wv = static_cast<acc_t>(w[kContig ? j : j * ws1]);
    const acc_t gv = static_cast<acc_t>(g[kContig ? j : j * gs1]);
    const acc_t aw = rg_abs(wv);
    const acc_t x = rg_sub(aw, t);
    const acc_t h = surrogate_grad<acc_t>(x);
    const acc_t m = x > acc_t(0) ? acc_t(1) : acc_t(0);
    part = rg_add(part, rg_mul(rg_mul(gv, wv), h));  // g * W * H'(x), as (g * W) * H'
    const acc_t r = kDst ? rg_mul(rg_mul(m, gv), rg_add(acc_t(1), rg_mul(aw, h)))  // (M g)(1 + |W| H')
                         : rg_mul(m, gv);
    gw[j] = static_cast<scalar_t>(r);
  }
  return part;
}

template <typename scalar_t, bool kDst>
__global__ void __launch_bounds__(kThreads)
    masked_weight_bwd_kernel(const __grid_constant__ BwdArgs<scalar_t> args) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t s_red[kWarps];

  const int b = static_cast<int>(blockIdx.x);
  const int l = find_layer(args.block_start, args.n, b);
  const BwdLayer<scalar_t>& L = args.layer[l];
  const int log2_tpr = L.log2_tpr;
  const int rows_per_block = kThreads >> log2_tpr;
  const int sub = static_cast<int>(threadIdx.x) >> log2_tpr;
  const int lane = static_cast<int>(threadIdx.x) & ((1 << log2_tpr) - 1);
  const int64_t row = static_cast<int64_t>(b - args.block_start[l]) * rows_per_block + sub;

  acc_t part = acc_t(0);
  if (row < L.C) {
    const acc_t t = static_cast<acc_t>(L.thr[row * L.ts]);
    const scalar_t* g = L.g + row * L.gs0;
    const scalar_t* w = L.w + row * L.ws0;
    scalar_t* gw = L.gw + row * L.K;
    const int tpr = 1 << log2_tpr;
    part = (L.gs1 == 1 && L.ws1 == 1)
               ? bwd_row_loop<scalar_t, true, kDst>(g, 1, w, 1, L.K, t, gw, lane, tpr)
               : bwd_row_loop<scalar_t, false, kDst>(g, L.gs1, w, L.ws1, L.K, t, gw, lane, tpr);
  }
  part = group_sum(part, log2_tpr, s_red);
  if (lane == 0 && row < L.C) L.gt[row] = static_cast<float>(-part);
}

// ---- host side ------------------------------------------------------------------------------

int choose_log2_tpr(int64_t K) {
  const int64_t want = (K + kElemsPerThread - 1) / kElemsPerThread;
  int l = 0;
  while (l < kLog2Threads && (int64_t(1) << l) < want) ++l;
  return l;
}

int64_t blocks_for(int64_t C, int log2_tpr) {
  const int64_t rows_per_block = kThreads >> log2_tpr;
  return (C + rows_per_block - 1) / rows_per_block;
}

// The guard's counters for launches on `stream` (2 * kMaxLayers zeros; see the header comment).
// `keep_alive` receives the tensor when it is private to this call.
unsigned long long* guard_workspace(const at::Device& device, cudaStream_t stream,
                                    at::Tensor& keep_alive) {
  const int64_t n = 2 * kMaxLayers;
  const size_t bytes = static_cast<size_t>(n) * sizeof(unsigned long long);
  const auto opts = at::TensorOptions().device(device).dtype(at::kLong);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    keep_alive = at::empty({n}, opts);
    C10_CUDA_CHECK(cudaMemsetAsync(keep_alive.data_ptr(), 0, bytes, stream));
    return reinterpret_cast<unsigned long long*>(keep_alive.data_ptr());
  }
  static std::mutex mutex;
  // Intentionally leaked: freeing CUDA memory from a static destructor at exit is unsafe.
  static auto* workspaces = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(static_cast<int>(device.index()), stream);
  auto it = workspaces->find(key);
  if (it == workspaces->end()) {
    at::Tensor ws = at::empty({n}, opts);
    C10_CUDA_CHECK(cudaMemsetAsync(ws.data_ptr(), 0, bytes, stream));  // ordered before any use
    it = workspaces->emplace(key, ws).first;
  }
  return reinterpret_cast<unsigned long long*>(it->second.data_ptr());
}

template <typename scalar_t>
void launch_fwd(const std::vector<FwdLayer<scalar_t>>& layers, double guard_ratio,
                const at::Device& device, cudaStream_t stream) {
  if (layers.empty()) return;
  at::Tensor private_ws;
  unsigned long long* ws = guard_ratio >= 0.0 ? guard_workspace(device, stream, private_ws) : nullptr;
  for (size_t first = 0; first < layers.size(); first += kMaxLayers) {
    const size_t count = std::min(layers.size() - first, static_cast<size_t>(kMaxLayers));
    FwdArgs<scalar_t> args{};
    args.n = static_cast<int>(count);
    args.guard_ratio = guard_ratio;
    int64_t blocks = 0;
    for (size_t i = 0; i < count; ++i) {
      args.layer[i] = layers[first + i];
      args.block_start[i] = static_cast<int>(blocks);
      blocks += blocks_for(args.layer[i].C, args.layer[i].log2_tpr);
      TORCH_CHECK(blocks <= INT_MAX, "masked_weight_fwd: too many rows for one launch");
    }
    args.block_start[count] = static_cast<int>(blocks);
    masked_weight_fwd_kernel<scalar_t>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(args, ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void launch_bwd(const std::vector<BwdLayer<scalar_t>>& layers, int64_t grad_mode,
                cudaStream_t stream) {
  for (size_t first = 0; first < layers.size(); first += kMaxLayers) {
    const size_t count = std::min(layers.size() - first, static_cast<size_t>(kMaxLayers));
    BwdArgs<scalar_t> args{};
    args.n = static_cast<int>(count);
    int64_t blocks = 0;
    for (size_t i = 0; i < count; ++i) {
      args.layer[i] = layers[first + i];
      args.block_start[i] = static_cast<int>(blocks);
      blocks += blocks_for(args.layer[i].C, args.layer[i].log2_tpr);
      TORCH_CHECK(blocks <= INT_MAX, "masked_weight_bwd: too many rows for one launch");
    }
    args.block_start[count] = static_cast<int>(blocks);
    if (grad_mode == kGradModeDst) {
      masked_weight_bwd_kernel<scalar_t, true>
          <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(args);
    } else {
      masked_weight_bwd_kernel<scalar_t, false>
          <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---- checks ---------------------------------------------------------------------------------

void check_cuda_weight(const at::Tensor& weight, const at::Device& device, const char* op) {
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor for the CUDA kernel, got ",
              weight.device());
  TORCH_CHECK(weight.device() == device, op, ": weight is on ", weight.device(),
              " but the first layer is on ", device);
  check_dtype(weight, op);
  check_cols(weight, op);
}

template <typename scalar_t>
FwdLayer<scalar_t> make_fwd_layer(const at::Tensor& weight, const at::Tensor& threshold,
                                  scalar_t* out, int32_t* counts) {
  FwdLayer<scalar_t> L;
  L.w = static_cast<const scalar_t*>(weight.data_ptr());
  L.out = out;
  L.thr = threshold.data_ptr<float>();
  L.counts = counts;
  L.C = weight.size(0);
  L.K = weight.size(1);
  L.ws0 = weight.stride(0);
  L.ws1 = weight.stride(1);
  L.ts = threshold.stride(0);
  L.log2_tpr = choose_log2_tpr(L.K);
  return L;
}

// ---- forward ops ----------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> masked_weight_fwd_cuda(const at::Tensor& weight,
                                                          const at::Tensor& threshold,
                                                          double guard_ratio) {
  const char* op = "masked_weight_fwd";
  check_fwd_inputs(weight, threshold, op);
  check_cuda_weight(weight, weight.device(), op);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t C = weight.size(0), K = weight.size(1);
  at::Tensor out = at::empty({C, K}, weight.options());
  at::Tensor counts = at::empty({C}, weight.options().dtype(at::kInt));
  if (C == 0) return {out, counts};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "masked_weight_cuda", [&] {
    std::vector<FwdLayer<scalar_t>> layers{make_fwd_layer<scalar_t>(
        weight, threshold, out.data_ptr<scalar_t>(), counts.data_ptr<int32_t>())};
    launch_fwd<scalar_t>(layers, guard_ratio, weight.device(), stream);
  });
  return {out, counts};
}

// All layers share one dtype and one device; one flat buffer of masked weights (layer after
// layer, each a contiguous [C_i * K_i] block) and one flat int32 buffer of counts ([sum C_i]).
std::tuple<at::Tensor, at::Tensor> masked_weight_grouped_fwd_cuda(at::TensorList weights,
                                                                  at::TensorList thresholds,
                                                                  double guard_ratio) {
  // (an empty list is rejected by the check below; the device is only read for a non-empty one)
  const at::Device device = weights.empty() ? at::Device(at::kCUDA) : weights[0].device();
  const GroupedSize size = check_grouped_fwd_inputs(
      weights, thresholds, "masked_weight_grouped_fwd",
      [&](const at::Tensor& w, const char* name) { check_cuda_weight(w, device, name); });
  const size_t n = weights.size();
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({size.numel}, weights[0].options());
  at::Tensor counts = at::empty({size.rows}, weights[0].options().dtype(at::kInt));
  if (size.rows == 0) return {out, counts};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "masked_weight_cuda", [&] {
    std::vector<FwdLayer<scalar_t>> layers;
    layers.reserve(n);
    scalar_t* out_base = out.data_ptr<scalar_t>();
    int32_t* counts_base = counts.data_ptr<int32_t>();
    int64_t off = 0, row_off = 0;
    for (size_t i = 0; i < n; ++i) {
      if (weights[i].size(0) > 0) {  // layers without rows get no blocks
        layers.push_back(make_fwd_layer<scalar_t>(weights[i], thresholds[i], out_base + off,
                                                  counts_base + row_off));
      }
      off += weights[i].numel();
      row_off += weights[i].size(0);
    }
    launch_fwd<scalar_t>(layers, guard_ratio, device, stream);
  });
  return {out, counts};
}

// ---- backward ops ---------------------------------------------------------------------------

template <typename scalar_t>
BwdLayer<scalar_t> make_bwd_layer(const at::Tensor& grad, const at::Tensor& weight,
                                  const at::Tensor& threshold, at::Tensor& gw, at::Tensor& gt) {
  BwdLayer<scalar_t> L;
  L.g = static_cast<const scalar_t*>(grad.data_ptr());
  L.w = static_cast<const scalar_t*>(weight.data_ptr());
  L.thr = threshold.data_ptr<float>();
  L.gw = gw.data_ptr<scalar_t>();
  L.gt = gt.data_ptr<float>();
  L.C = weight.size(0);
  L.K = weight.size(1);
  L.gs0 = grad.stride(0);
  L.gs1 = grad.stride(1);
  L.ws0 = weight.stride(0);
  L.ws1 = weight.stride(1);
  L.ts = threshold.stride(0);
  L.log2_tpr = choose_log2_tpr(L.K);
  return L;
}

std::tuple<at::Tensor, at::Tensor> masked_weight_bwd_cuda(const at::Tensor& grad,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& threshold,
                                                          int64_t grad_mode) {
  const char* op = "masked_weight_bwd";
  check_bwd_inputs(grad, weight, threshold, grad_mode, op);
  check_cuda_weight(weight, weight.device(), op);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t C = weight.size(0), K = weight.size(1);
  at::Tensor gw = at::empty({C, K}, weight.options());
  at::Tensor gt = at::empty({C}, threshold.options());
  if (C == 0) return {gw, gt};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "masked_weight_cuda", [&] {
    std::vector<BwdLayer<scalar_t>> layers{
        make_bwd_layer<scalar_t>(grad, weight, threshold, gw, gt)};
    launch_bwd<scalar_t>(layers, grad_mode, stream);
  });
  return {gw, gt};
}

// Layers may differ in dtype: one launch per dtype present (usually one).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> masked_weight_grouped_bwd_cuda(
    at::TensorList grads, at::TensorList weights, at::TensorList thresholds, int64_t grad_mode) {
  const size_t n = weights.size();
  std::vector<at::Tensor> gws(n), gts(n);
  if (n == 0) return {gws, gts};
  const at::Device device = weights[0].device();
  check_grouped_bwd_inputs(
      grads, weights, thresholds, grad_mode, "masked_weight_grouped_bwd",
      [&](const at::Tensor& w, const char* name) { check_cuda_weight(w, device, name); });
  const c10::cuda::CUDAGuard guard(device);
  for (size_t i = 0; i < n; ++i) {
    gws[i] = at::empty({weights[i].size(0), weights[i].size(1)}, weights[i].options());
    gts[i] = at::empty({weights[i].size(0)}, thresholds[i].options());
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const at::ScalarType st : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
    std::vector<size_t> idx;
    for (size_t i = 0; i < n; ++i) {
      if (weights[i].scalar_type() == st && weights[i].size(0) > 0) idx.push_back(i);
    }
    if (idx.empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "masked_weight_cuda", [&] {
      std::vector<BwdLayer<scalar_t>> layers;
      layers.reserve(idx.size());
      for (const size_t i : idx) {
        layers.push_back(make_bwd_layer<scalar_t>(grads[i], weights[i], thresholds[i], gws[i], gts[i]));
      }
      launch_bwd<scalar_t>(layers, grad_mode, stream);
    });
  }
  return {gws, gts};
}

}  // namespace
}  // namespace rgkernels

TORCH_LIBRARY_IMPL(rgkernels, CUDA, m) {
  m.impl("masked_weight_fwd", &rgkernels::masked_weight_fwd_cuda);
  m.impl("masked_weight_bwd", &rgkernels::masked_weight_bwd_cuda);
  m.impl("masked_weight_grouped_fwd", &rgkernels::masked_weight_grouped_fwd_cuda);
  m.impl("masked_weight_grouped_bwd", &rgkernels::masked_weight_grouped_bwd_cuda);
}
