// Quest's CUDA kernels. Each has a torch twin in quest_core that is its test oracle:
//   append_kv   <-> quest_core.paged_cache.PagedLayer.append (the torch path)
//   score_topk     <-> quest_core.selection.page_scores + select_pages (group rules sum, max, mass)
//   sparse_decode  <-> dense attention over the selected pages (quest_core.backend_torch: gather + SDPA)
//
// Layouts (quest_core/paged_cache.py): keys, values [capacity, Hkv, P, D]; page_bounds [Hkv, capacity, 2D]
// (the page's key max, then its key min), in the KV dtype on the GPU.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>

#include <mutex>
#include <unordered_map>
#include <unordered_set>

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float(float x) { return x; }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }

// Calls launch(T{}) with T the CUDA type of a float32, float16 or bfloat16 tensor.
template <typename Launch>
void dispatch_kv_type(at::ScalarType type, Launch launch) {
  switch (type) {
    case at::kFloat: launch(float{}); break;
    case at::kHalf: launch(__half{}); break;
    case at::kBFloat16: launch(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "Quest kernels take float32, float16 or bfloat16, got ", type);
  }
}

// ---- per-GPU facts and settings, for a model spread over several GPUs and threads launching at once ----
struct DeviceLimits {
  int max_shared;  // opt-in shared memory per block, bytes
  int num_sms;
  int major;       // compute capability
};

std::mutex& device_mutex() {
  static std::mutex mutex;
  return mutex;
}

// The device's limits, read from the driver once per device index.
DeviceLimits device_limits(int device) {
  static std::unordered_map<int, DeviceLimits> limits;
  std::lock_guard<std::mutex> lock(device_mutex());
  auto found = limits.find(device);
  if (found != limits.end()) return found->second;
  DeviceLimits read;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&read.max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&read.num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&read.major, cudaDevAttrComputeCapabilityMajor, device));
  limits.emplace(device, read);
  return read;
}

// Allows `kernel` dynamic shared memory up to the device's limit, once per (device, kernel): the attribute is the
// current device's, so the caller holds a CUDAGuard on `device`.
template <typename Kernel>
void allow_max_shared(Kernel kernel, int device, int max_shared) {
  static std::unordered_map<int, std::unordered_set<const void*>> configured;  // device -> kernels
  std::lock_guard<std::mutex> lock(device_mutex());
  auto& kernels = configured[device];
  const void* key = reinterpret_cast<const void*>(kernel);
  if (kernels.count(key)) return;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      max_shared - (int)attributes.sharedSizeBytes));
  kernels.insert(key);
}

// ---- programmatic dependent launch (Hopper and later) ----
// Each kernel here is launched so that it may start while the kernel before it in the stream is finishing (its
// blocks scheduled, the launch latency hidden): it waits for that kernel's writes in `wait_for_previous_kernel`,
// before it reads or writes anything. `let_next_kernel_launch` lets the next kernel start the same way before this
// one ends (else it may once this one's blocks have exited). Both are no-ops on older GPUs and for a kernel launched
// without the attribute; a CUDA graph keeps them as programmatic edges.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void let_next_kernel_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Launches `kernel` on the current stream, free to start early (above; Hopper and later), its blocks in
// thread-block clusters of `cluster_blocks` along x where that is given (> 0: Hopper and later).
template <typename... Parameters, typename... Arguments>
void launch_in_clusters(void (*kernel)(Parameters...), dim3 grid, int cluster_blocks, int threads, int shared_bytes,
                        const DeviceLimits& limits, Arguments... arguments) {
  cudaLaunchAttribute attributes[2];
  int count = 0;
  if (cluster_blocks > 0) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count].val.clusterDim.x = cluster_blocks;
    attributes[count].val.clusterDim.y = 1;
    attributes[count++].val.clusterDim.z = 1;
  }
  if (limits.major >= 9) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = shared_bytes;
  config.stream = c10::cuda::getCurrentCUDAStream();
  config.attrs = attributes;
  config.numAttrs = count;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Parameters>(arguments)...));
}

template <typename... Parameters, typename... Arguments>
void launch_kernel(void (*kernel)(Parameters...), dim3 grid, int threads, int shared_bytes,
                   const DeviceLimits& limits, Arguments... arguments) {
  launch_in_clusters(kernel, grid, 0, threads, shared_bytes, limits, arguments...);
}

// For the decode kernels: calls launch(T{}, kDim, kGroup) with T the CUDA type of a float16 or bfloat16 `type`,
// kDim the head dim (64 or 128) and kGroup the query heads per KV head rounded up to 1, 2, 4 or 8 (at most 8), the
// last two as std::integral_constant.
template <typename Launch>
void dispatch_decode(at::ScalarType type, int head_dim, int group, Launch launch) {
  auto by_group = [&](auto type_tag, auto dim_tag) {
    if (group == 1) launch(type_tag, dim_tag, std::integral_constant<int, 1>{});
    else if (group == 2) launch(type_tag, dim_tag, std::integral_constant<int, 2>{});
    else if (group <= 4) launch(type_tag, dim_tag, std::integral_constant<int, 4>{});
    else launch(type_tag, dim_tag, std::integral_constant<int, 8>{});
  };
  auto by_dim = [&](auto type_tag) {
    if (head_dim == 64) by_group(type_tag, std::integral_constant<int, 64>{});
    else by_group(type_tag, std::integral_constant<int, 128>{});
  };
  if (type == at::kHalf) by_dim(__half{});
  else by_dim(__nv_bfloat16{});
}

// ---- (a) KV append fused with the page min/max update ----
// Block (h, j) owns the j-th page that the new tokens touch, for KV head h; thread d owns element d. The block
// walks its tokens in order, so no two blocks touch one page's bounds: no atomics. Bounds are exact values of T
// (or +-inf), so the float round trip is exact. The new tokens start at `start`, or, when `device_length` is
// given (a captured CUDA graph), at device_length[0] - num_new: the cache length after the append, on the GPU.
// A batch of R requests whose pages share a pool (a bounds table as score_topk's, and each request's first pool row
// `row_offsets[r]`, run start * Hkv) appends each request's tokens in one grid of R * Hkv head rows, each reading
// its request's length in device_length[r].
template <typename T>
__global__ void append_kv_kernel(const T* __restrict__ new_keys, const T* __restrict__ new_values,
                                 T* __restrict__ keys, T* __restrict__ values, T* __restrict__ bounds,
                                 int64_t start, const int64_t* __restrict__ device_length, int num_new,
                                 int num_kv_heads, int page_size, int head_dim, int64_t capacity,
                                 const int64_t* __restrict__ bounds_table, const int* __restrict__ row_offsets) {
  wait_for_previous_kernel();
  let_next_kernel_launch();
  const int request = blockIdx.x / num_kv_heads, h = blockIdx.x % num_kv_heads, d = threadIdx.x;
  if (device_length != nullptr) start = device_length[request] - num_new;
  const int64_t page = start / page_size + blockIdx.y;
  const int64_t first = max(start, page * page_size), last = min(start + num_new, (page + 1) * page_size);
  if (first >= last || d >= head_dim) return;
  T* page_max = bounds_table == nullptr
      ? bounds + ((int64_t)h * capacity + page) * 2 * head_dim
      : reinterpret_cast<T*>(bounds_table[2 * request]) + (h * bounds_table[2 * request + 1] + page) * 2 * head_dim;
  T* page_min = page_max + head_dim;
  const int64_t first_row = row_offsets == nullptr ? 0 : row_offsets[request];
  float kmax = to_float(page_max[d]), kmin = to_float(page_min[d]);
  for (int64_t t = first; t < last; ++t) {
    const int64_t src = ((int64_t)blockIdx.x * num_new + (t - start)) * head_dim + d;
    const int64_t dst = ((first_row + page * num_kv_heads + h) * page_size + (t - page * page_size)) * head_dim + d;
    const T k = new_keys[src];
    keys[dst] = k;
    values[dst] = new_values[src];
    kmax = fmaxf(kmax, to_float(k));
    kmin = fminf(kmin, to_float(k));
  }
  page_max[d] = from_float<T>(kmax);
  page_min[d] = from_float<T>(kmin);
}

// new_keys, new_values [Hkv, T, D] (a batch: [R * Hkv, T, D], with bounds_table [R, 2], row_offsets int32 [R] and
// device_length [R]; keys, values are then the pool's whole layer).
void append_kv(torch::Tensor new_keys, torch::Tensor new_values, torch::Tensor keys, torch::Tensor values,
               torch::Tensor bounds, int64_t start, std::optional<torch::Tensor> device_length,
               std::optional<torch::Tensor> bounds_table, std::optional<torch::Tensor> row_offsets) {
  TORCH_CHECK(keys.is_cuda() && keys.is_contiguous() && values.is_contiguous() && bounds.is_contiguous());
  TORCH_CHECK(new_keys.scalar_type() == keys.scalar_type() && bounds.scalar_type() == keys.scalar_type());
  TORCH_CHECK(!device_length || device_length->scalar_type() == at::kLong);
  new_keys = new_keys.contiguous();
  new_values = new_values.contiguous();
  const int num_kv_heads = keys.size(1), page_size = keys.size(2), head_dim = keys.size(3);
  const int num_new = new_keys.size(1), requests = bounds_table ? bounds_table->size(0) : 1;
  TORCH_CHECK(new_keys.size(0) == requests * num_kv_heads && new_values.sizes() == new_keys.sizes());
  TORCH_CHECK(!bounds_table || (bounds_table->scalar_type() == at::kLong && bounds_table->is_contiguous() &&
                                row_offsets && row_offsets->scalar_type() == at::kInt &&
                                row_offsets->numel() == requests && device_length &&
                                device_length->numel() == requests),
              "a batch's append takes bounds_table [R, 2], row_offsets [R] and device_length [R]");
  TORCH_CHECK(head_dim <= 1024 && (device_length || (start + num_new + page_size - 1) / page_size <= keys.size(0)));
  const c10::cuda::CUDAGuard guard(keys.device());
  const dim3 grid(requests * num_kv_heads, (num_new + page_size - 2) / page_size + 1);  // pages a run can touch
  const int threads = (head_dim + 31) / 32 * 32;
  dispatch_kv_type(keys.scalar_type(), [&](auto type_tag) {
    using T = decltype(type_tag);
    launch_kernel(append_kv_kernel<T>, grid, threads, 0, device_limits(keys.device().index()),
        reinterpret_cast<const T*>(new_keys.data_ptr()), reinterpret_cast<const T*>(new_values.data_ptr()),
        reinterpret_cast<T*>(keys.data_ptr()), reinterpret_cast<T*>(values.data_ptr()),
        reinterpret_cast<T*>(bounds.data_ptr()), start,
        device_length ? device_length->data_ptr<int64_t>() : nullptr, num_new, num_kv_heads, page_size, head_dim,
        bounds.size(1), bounds_table ? bounds_table->data_ptr<int64_t>() : nullptr,
        row_offsets ? row_offsets->data_ptr<int>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- (b) page scoring fused with top-k selection ----
// Grid (Hkv, blocks per head: at most one block per SM in all), 1024 threads. Scoring: a team of lanes (up to a
// warp) per page reads the page's bounds in 16-byte vectors against split queries in shared memory, four pages
// in flight per team. Group rule sum: one split query, the group's sum; the page's score goes to `scores`. Rule
// max: one split query per head, the largest of the G bounds goes to `scores`. For these two each block folds its
// scores' order keys into the head's key range (`key_ranges`, [Hkv, 2]: min, max). Rule mass: each head's bound
// goes to `group_scores` [Hkv, G, capacity], the current page's too (it is in each head's softmax), then each
// block's softmax state per query head over its pages (scaled by `mass_scale`) to the block states after them
// ([Hkv, G, blocks, 2]: m, l); once the head's blocks have all written theirs, each merges the states and turns its
// pages' bounds into their mass (each head's softmax weight of the page, summed over the group) into `scores`, and
// folds the key range. The last block of a head to finish (a counter per head) selects: a radix select on the key
// minus the head's smallest key, whose first digit (11 bits) starts at the range's top bit, so the first histogram
// spreads the head's actual scores over its bins whatever their scale.
// One sweep then takes the pages above the threshold bin and lists the bin's pages in shared memory; the list's
// keys, ranked against each other (or, for a long list, 8-bit digits: the key of the (k-1)-th largest score and
// how many equal to it to take), give the rest. It writes FlashInfer's one-head page rows p * Hkv + h, the current
// page last, and leaves the counter and key range reset for the next call. The first `sink_pages` pages (attention
// sinks, QuestConfig.sink_pages) are always selected: they take the slots before the current page and stay out of
// the top-k, which picks the other k - 1 - sink_pages.
// A batch of R requests (a bounds table: each request's bounds address and capacity, and a length per request on
// the GPU) runs as R * Hkv heads in one grid: head row r * Hkv + h scores request r's KV head h, so the selection's
// latency (one block per head) is paid once for the batch, not once per request.
constexpr int kThreads = 1024;  // the selection runs in one block per head: as many threads as fit
constexpr int kUnroll = 4;        // pages in flight per team
constexpr int kMaxChunks = 4;     // 16-byte vectors per lane and page: 2D <= 4 * 32 * (16 / sizeof(T))
constexpr int kFirstBits = 11;    // the first radix digit; the others have 8 bits (fewer for the last)
constexpr int kFirstBins = 1 << kFirstBits;
constexpr int kSweepBatch = 8;    // scores each thread loads at once in the top-k sweeps
constexpr int kHeldKeys = 10;     // keys a thread of the selection holds from the histogram to the sweep
constexpr int kMaxMassGroup = 32; // query heads per KV head that rule mass takes
enum GroupRule { kSum = 0, kMax = 1, kMass = 2 };  // quest_core.selection.page_scores' group_rule

__device__ __forceinline__ unsigned int order_key(float score) {  // larger float -> larger unsigned key
  const unsigned int bits = __float_as_uint(score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The bin holding the remaining-th largest key (counting from the top bin down) of a block-wide histogram of
// nbins (a power of two <= 16 * kBlockThreads), and how many keys of that bin are still to take, for a block of
// kBlockThreads threads. Thread t owns bins nbins-1-t*per ... nbins-(t+1)*per (none when t*per >= nbins).
template <int kBlockThreads = kThreads>
__device__ void find_bin(const unsigned int* histogram, int nbins, unsigned int* warp_totals,
                         unsigned int* found_bin, unsigned int* remaining) {
  static_assert(kBlockThreads % 32 == 0 && kBlockThreads <= 1024, "whole warps, at most 32");
  const int per = max(1, nbins / kBlockThreads), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int top = nbins - 1 - threadIdx.x * per;
  unsigned int own = 0;
  for (int i = 0; i < per && top >= 0; ++i) own += histogram[top - i];
  unsigned int above = own;  // inclusive scan over threads, from the top bins down
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned int other = __shfl_up_sync(0xffffffffu, above, offset);
    if (lane >= offset) above += other;
  }
  if (lane == 31) warp_totals[warp] = above;
  __syncthreads();
  const unsigned int want = *remaining;
  // every warp scans the warps' totals itself (no loop of up to 31 loads, one after another, over the warps above)
  unsigned int warps_above = lane < kBlockThreads / 32 ? warp_totals[lane] : 0u;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned int other = __shfl_up_sync(0xffffffffu, warps_above, offset);
    if (lane >= offset) warps_above += other;
  }
  warps_above = __shfl_sync(0xffffffffu, warps_above, (warp + 31) % 32);
  above += (warp == 0 ? 0u : warps_above) - own;  // keys in the bins above this thread's
  __syncthreads();  // every thread has read `remaining` before one rewrites it
  if (above < want && above + own >= want) {
    int i = 0;
    for (; above + histogram[top - i] < want; ++i) above += histogram[top - i];
    *found_bin = top - i;
    *remaining = want - above;
  }
  __syncthreads();
}

__device__ __forceinline__ unsigned int warp_min(unsigned int x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}
__device__ __forceinline__ unsigned int warp_max(unsigned int x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; 0 for -inf
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Merges the softmax state (m, l) = (largest logit, sum of exp(logit - m)) of two sets of logits; kBase2: of logits
// in base 2 (l sums 2^(logit - m)).
template <bool kBase2 = false>
__device__ __forceinline__ void merge_softmax(float& m, float& l, float other_m, float other_l) {
  const float merged = fmaxf(m, other_m);
  if (merged == -INFINITY) return;  // both empty
  const auto exp = [](float x) { return kBase2 ? fast_exp2(x) : __expf(x); };
  l = l * exp(m - merged) + other_l * exp(other_m - merged);
  m = merged;
}

// Merges the softmax states (m, l) of a warp's lanes; every lane gets the merged state.
__device__ __forceinline__ void warp_merge_softmax(float& m, float& l) {
  for (int offset = 16; offset > 0; offset >>= 1)
    merge_softmax(m, l, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, l, offset));
}

// Rule mass, in each scoring block: the softmax state of each query head r over the block's `count` logits
// (row r of `logits`, `row_stride` apart: shared memory, or the block's pages of group_scores, read from L2),
// scaled by mass_scale, to states[r * blocks * 2]. Warp r takes head r; each lane keeps its own state over batches
// of kSweepBatch logits loaded together, then the warp merges them.
template <bool kShared>
__device__ __forceinline__ void block_softmax_states(const float* logits, int64_t row_stride, int count, int group,
                                                     float mass_scale, float* states, int blocks) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < group; r += kThreads / 32) {
    float m = -INFINITY, l = 0.f;
    for (int i0 = lane; i0 < count; i0 += 32 * kSweepBatch) {
      float logit[kSweepBatch], batch_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kSweepBatch; ++j) {
        const int i = i0 + 32 * j;
        const float* at = logits + r * row_stride + i;
        logit[j] = i < count ? (kShared ? *at : __ldcg(at)) * mass_scale : -INFINITY;
        batch_max = fmaxf(batch_max, logit[j]);
      }
      const float merged = fmaxf(m, batch_max);  // finite: logit i0 is in the block
      l *= __expf(m - merged);
#pragma unroll
      for (int j = 0; j < kSweepBatch; ++j) l += __expf(logit[j] - merged);
      m = merged;
    }
    warp_merge_softmax(m, l);
    if (lane == 0) {
      states[(int64_t)r * blocks * 2] = m;
      states[(int64_t)r * blocks * 2 + 1] = l;
    }
  }
}

// Rule mass, in every block of head h once the head's blocks have all written their states: each query head's
// softmax state over the pages in use (the current page too), merged from `block_states` [G, blocks, 2], then the
// mass of each of this block's `count` full pages (the sum over the group of its softmax weights, from its logits:
// row g of `logits`, `row_stride` apart, in shared memory or read from L2) into head_scores, and the range of their
// order keys into low, high.
template <bool kShared>
__device__ __forceinline__ void block_mass(const float* logits, int64_t row_stride, int first, int count,
                                           const float* block_states, int blocks, int group, float mass_scale,
                                           float* head_max_logit, float* head_inverse_sum, float* head_scores,
                                           unsigned int& low, unsigned int& high) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < group; r += kThreads / 32) {  // warp r merges head r's states
    float m = -INFINITY, l = 0.f;
    for (int b = lane; b < blocks; b += 32) {
      const float* state = block_states + ((int64_t)r * blocks + b) * 2;
      merge_softmax(m, l, __ldcg(state), __ldcg(state + 1));
    }
    warp_merge_softmax(m, l);
    if (lane == 0) {
      head_max_logit[r] = m;
      head_inverse_sum[r] = 1.f / l;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < count; i += kThreads) {
    float mass = 0.f;
    for (int g = 0; g < group; ++g) {
      const float* at = logits + g * row_stride + i;
      mass += __expf((kShared ? *at : __ldcg(at)) * mass_scale - head_max_logit[g]) * head_inverse_sum[g];
    }
    head_scores[first + i] = mass;
    const unsigned int key = order_key(mass);
    low = min(low, key);
    high = max(high, key);
  }
}

// The split query rows of KV head row h's group (query [heads, G, D]) into split_query [rows, 2D]: row r is relu(q),
// then min(q, 0), of query head r (rules max, mass: G rows) or summed over the group (rule sum: one row). The
// block's kBlockThreads threads share the work; the caller syncs the block before reading them.
template <int kBlockThreads, typename T>
__device__ __forceinline__ void split_query_rows(const T* __restrict__ query, int h, int rule, int group, int head_dim,
                                                 float* split_query) {
  const int rows = rule == kSum ? 1 : group;
  for (int i = threadIdx.x; i < rows * head_dim; i += kBlockThreads) {
    const int r = i / head_dim, d = i % head_dim;
    const int first = rule == kSum ? 0 : r, last = rule == kSum ? group : r + 1;
    float positive = 0.f, negative = 0.f;
    for (int g = first; g < last; ++g) {
      const float q = to_float(query[((int64_t)h * group + g) * head_dim + d]);
      positive += fmaxf(q, 0.f);
      negative += fminf(q, 0.f);
    }
    split_query[r * 2 * head_dim + d] = positive;
    split_query[r * 2 * head_dim + head_dim + d] = negative;
  }
}

// kChunks: 16-byte vectors per lane and page (1, 2 or 4); kRule: a GroupRule, a template argument so that each
// rule's kernel holds only its own code (one kernel for all three spilled registers at 1024 threads: nvcc -Xptxas -v)
template <typename T, int kChunks, int kRule>
__global__ void __launch_bounds__(kThreads) score_topk_kernel(
    const T* __restrict__ query, const T* __restrict__ bounds, int64_t bounds_capacity,
    const int64_t* __restrict__ bounds_table, float* __restrict__ scores, float* __restrict__ group_scores,
    unsigned int* __restrict__ key_ranges, unsigned int* __restrict__ counters, int32_t* __restrict__ out, int group,
    int head_dim, int64_t capacity, int num_pages,
    const int64_t* __restrict__ device_length, int page_size, int k, int num_kv_heads, int pages_per_block,
    int list_capacity, float mass_scale, int sink_pages) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int rule = kRule;
  // Shared: the split queries [rows, 2D] (float; one row for rule sum, G for the others), a histogram [2048],
  // the threshold bin's keys and pages [list_capacity]. While the block scores, rule mass keeps the block's logits
  // [G, pages_per_block] where the histogram and the list will be, when they fit.
  extern __shared__ float shared[];
  const int query_rows = rule == kSum ? 1 : group;
  float* split_query = shared;
  unsigned int* histogram = reinterpret_cast<unsigned int*>(shared + 2 * head_dim * query_rows);
  unsigned int* list_keys = histogram + kFirstBins;
  int* list_pages = reinterpret_cast<int*>(list_keys + list_capacity);
  __shared__ unsigned int warp_totals[kThreads / 32], warp_high[kThreads / 32];
  __shared__ unsigned int found_bin, remaining, taken_greater, taken_equal, list_length, smallest_key, largest_key;
  __shared__ bool is_last;
  __shared__ float head_max_logit[kMaxMassGroup], head_inverse_sum[kMaxMassGroup];
  wait_for_previous_kernel();  // and no early launch of the sparse decode: its blocks would crowd the few SMs free
                               // while this grid scores (measured: 1.8 us slower than at this grid's exit). Asking
                               // L2 for the block's bounds before this wait (cp.async.bulk.prefetch.L2, a warp's
                               // lanes over the block's range) made no pair of calls faster (H200, 2026-12-02: this
                               // kernel 0.4-1.2 us slower alone, with sparse_decode within 0.5 us); without it the
                               // kernel reads the bounds' bytes from DRAM once (Nsight Compute, the paper's shape)
                               // (also measured and dropped, 2026-12-02, Quest graph us: the early launch once
                               // the scores are written, before the last block selects: up to 0.6 faster on 8B
                               // heads and SmolLM2's, 0.3-0.6 slower at the paper's shape; the last block loading
                               // the scores alongside the key range instead of after it: score + top-k 0.2-0.4
                               // slower at all three)
  const int h = blockIdx.x;  // the head row (request * Hkv + KV head); rows of scratch and output are indexed by it
  const int request = h / num_kv_heads, kv_head = h % num_kv_heads;  // request 0 without a bounds table
  const T* head_bounds = bounds_table == nullptr
      ? bounds + (int64_t)h * bounds_capacity * 2 * head_dim
      : reinterpret_cast<const T*>(bounds_table[2 * request]) + kv_head * bounds_table[2 * request + 1] * 2 * head_dim;
  if (device_length != nullptr) num_pages = (int)((device_length[request] + page_size - 1) / page_size);
  const int candidates = num_pages - 1;  // the full pages; the current page is always selected

  split_query_rows<kThreads>(query, h, rule, group, head_dim, split_query);
  __syncthreads();

  // Scoring. A team of `team` lanes (a power of two, within one warp) scores one page; lane j of a team holds
  // vectors j, j + team, ... of the page's bounds and reads the same ones of each split query.
  const int num_vectors = 2 * head_dim / kVec;
  const int team = num_vectors >= 32 ? 32 : 1 << (32 - __clz(num_vectors - 1));
  const int member = threadIdx.x % team, team_index = threadIdx.x / team, teams = kThreads / team;
  float* head_scores = scores + (int64_t)h * capacity;
  float* head_group_scores = group_scores + (int64_t)h * group * capacity;  // rule mass only
  float* block_logits = reinterpret_cast<float*>(histogram);
  const bool keep_logits = group * pages_per_block <= kFirstBins + 2 * list_capacity;
  unsigned int* key_range = key_ranges + 2 * h;
  unsigned int low = 0xffffffffu, high = 0u;  // this thread's smallest and largest order key
  const int block_first = blockIdx.y * pages_per_block;
  const int block_end = min(rule == kMass ? num_pages : candidates, block_first + pages_per_block);
  float q[kChunks][kVec];  // this lane's vectors of split query r
  auto load_query = [&](int r) {  // 16-byte reads of shared memory: 4-byte ones met 4-way bank conflicts
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int v = member + c * team;
      const float4* vector = reinterpret_cast<const float4*>(split_query + r * 2 * head_dim + v * kVec);
#pragma unroll
      for (int i = 0; i < kVec / 4; ++i) {
        const float4 x = v < num_vectors ? vector[i] : make_float4(0.f, 0.f, 0.f, 0.f);
        q[c][4 * i] = x.x;
        q[c][4 * i + 1] = x.y;
        q[c][4 * i + 2] = x.z;
        q[c][4 * i + 3] = x.w;
      }
    }
  };
  if (query_rows == 1) load_query(0);  // rule sum: held in registers for every page
  // (Measured and dropped, H200, 2026-12-02: score + top-k us at the paper's shape / Llama-3.1-8B heads at 128K,
  // budget 2048, against this loop's 17.5-17.7 / 18.5-18.7 in the same runs. More bytes in flight: 8 pages a team a
  // round 18.2 / 19.2; a cp.async pipeline into shared memory, 3 stages of 4 pages 18.5 / 19.7, 4 stages of 2 pages
  // 17.7 / 18.9, its first rounds issued before the split query 17.8 / 18.9; the next round's bounds asked of L2 (bulk
  // prefetch) 19.2 / 20.3. Fewer shuffles: teams of 8 lanes 18.5 / 19.6 (no team sum at all, wrong scores, 16.9 /
  // 17.7). Each block's rounds in a rotated order 17.9 / 18.4. Whichever, the scoring reads 33.5 MB in about 11 us:
  // bench/kernel_phases.py.)
  // (Measured and dropped, H200, 2026-12-03, graph us, CUDA graphs over layer copies. The page bounds as int8, steps
  // of a scale per KV head and dimension folded into the split query, rounded outward by the append kernel, half the
  // bytes, the same pages as their torch twin and 98.5-99.3% of the exact bounds' (rule sum, budget 2048): 18.67 ->
  // 16.95 at Llama-3.1-8B heads 128K and 18.18 -> 16.39 at the paper's shape, but 10.28 -> 11.51 at 32K and 8.47 ->
  // 10.77 at 8K; end to end, Llama-3.1-8B shapes at 128K, alternating in one process: 179.7 / 176.3 tok/s without,
  // 174.7 / 171.0 with. Each block asking L2 for the next matrix product's weights once it has scored (the o
  // projection's 33.5 MB, bulk prefetch), while the last blocks select and the sparse decode runs: score + sparse
  // decode + the product (cuBLAS) 42.45 us without, 44.76 with, 46.35 with an evict_last hint; the product alone
  // takes 13.05 from DRAM and 10.43 from L2, so little was there to win.)
  // (Measured and dropped, H200, 2026-12-03, graph us, the call as a decode step captures it: the grid sized by the
  // capacity, the length on the GPU, random bounds. Rule sum, one vector a lane: a block's last round of one page a
  // team (8,200 pages over 16 blocks of 544 pages: 4 rounds of 128 and 32 more) loaded with its first round, five
  // pages a team. Where it applies, Llama-3.1-8B heads 128K + 128 tokens 29.63 -> 29.09, 32K + 128 16.32 -> 15.59,
  // the paper's shape 32K + 128 25.13 -> 24.73; where it does not, the other code still cost: 128K exactly 27.66 ->
  // 28.29, 8K + 128 10.27 -> 10.50, the paper's shape at 32K exactly 23.75 -> 24.42.)
  for (int base = block_first; base < block_first + pages_per_block; base += kUnroll * teams) {
    uint4 loaded[kUnroll][kChunks];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = base + u * teams + team_index;
      const uint4* page = reinterpret_cast<const uint4*>(head_bounds + (int64_t)p * 2 * head_dim);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int v = member + c * team;
        loaded[u][c] = (p < block_end && v < num_vectors) ? __ldg(page + v) : make_uint4(0, 0, 0, 0);
      }
    }
    float best[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) best[u] = -INFINITY;
    for (int r = 0; r < query_rows; ++r) {
      if (query_rows > 1) load_query(r);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float score = 0.f;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const T* values = reinterpret_cast<const T*>(&loaded[u][c]);
#pragma unroll
          for (int i = 0; i < kVec; ++i) score += q[c][i] * to_float(values[i]);
        }
        for (int offset = team / 2; offset > 0; offset >>= 1) score += __shfl_xor_sync(0xffffffffu, score, offset);
        const int p = base + u * teams + team_index;
        if (rule == kMass && p < block_end && member == 0) {
          head_group_scores[(int64_t)r * capacity + p] = score;
          if (keep_logits) block_logits[r * pages_per_block + p - block_first] = score;
        }
        best[u] = fmaxf(best[u], score);
      }
    }
    if (rule == kMass) continue;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = base + u * teams + team_index;
      if (p < block_end && member == 0) {
        head_scores[p] = best[u];
        low = min(low, order_key(best[u]));
        high = max(high, order_key(best[u]));
      }
    }
  }
  // Rule mass: the block's softmax states to the block states [heads, G, blocks, 2], after the group scores
  float* head_block_states = rule == kMass
      ? group_scores + ((int64_t)gridDim.x * capacity + (int64_t)h * gridDim.y * 2) * group : nullptr;
  if (rule == kMass) {
    __syncthreads();  // the block's logits are written (shared or global)
    const int count = block_end - block_first;  // <= 0 where the length on the GPU ends before this block
    if (keep_logits)
      block_softmax_states<true>(block_logits, pages_per_block, count, group, mass_scale,
                                 head_block_states + 2 * blockIdx.y, gridDim.y);
    else
      block_softmax_states<false>(head_group_scores + block_first, capacity, count, group, mass_scale,
                                  head_block_states + 2 * blockIdx.y, gridDim.y);
    // The head's blocks wait for each other's states (the head's counter counts them, then the blocks done): the
    // grid holds at most one block per SM, so they all run at once. Each then turns its own pages' logits into
    // their mass, from shared memory where they fit (the last block read every page's from L2: 2.9 us of 14.7).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      atomicAdd(&counters[h], 1u);
      while (atomicAdd(&counters[h], 0u) < gridDim.y) {}
      __threadfence();
    }
    __syncthreads();
    const int full = min(block_end, candidates) - block_first;  // this block's full pages
    if (keep_logits)
      block_mass<true>(block_logits, pages_per_block, block_first, full, head_block_states, gridDim.y, group,
                       mass_scale, head_max_logit, head_inverse_sum, head_scores, low, high);
    else
      block_mass<false>(head_group_scores + block_first, capacity, block_first, full, head_block_states, gridDim.y,
                        group, mass_scale, head_max_logit, head_inverse_sum, head_scores, low, high);
  }
  // the block's key range, folded into the head's with one atomic each (one per warp queued 4096 atomics on 16
  // words at 128 blocks: 5 us)
  low = warp_min(low);
  high = warp_max(high);
  if (threadIdx.x % 32 == 0) {
    warp_totals[threadIdx.x / 32] = low;
    warp_high[threadIdx.x / 32] = high;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    low = warp_min(warp_totals[threadIdx.x]);
    high = warp_max(warp_high[threadIdx.x]);
    if (threadIdx.x == 0 && low <= high) {
      atomicMin(&key_range[0], low);
      atomicMax(&key_range[1], high);
    }
  }
  // (Measured and dropped, H200, 2026-12-03: the fence in thread 0 only, after the barrier, as cooperative groups'
  // grid sync does, here, in rule mass's wait and in sparse_decode's counter: score + top-k then sparse decode
  // 28.44 -> 28.29 us at Llama-3.1-8B heads 128K, 32.06 -> 31.98 at the paper's shape, 20.59 -> 20.55 at SmolLM2's;
  // within the runs' spread.)
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&counters[h], 1u) == (rule == kMass ? 2 : 1) * gridDim.y - 1;
  __syncthreads();
  if (!is_last) return;

  // The last block of head h: every score and the head's key range are in global memory now.
  if (threadIdx.x == 0) {
    smallest_key = __ldcg(key_range);
    largest_key = __ldcg(key_range + 1);
    key_range[0] = 0xffffffffu;  // ready for the next call
    key_range[1] = 0u;
    counters[h] = 0;
    remaining = k - 1 - sink_pages;
    taken_greater = taken_equal = list_length = 0;
  }
  for (int b = threadIdx.x; b < kFirstBins; b += kThreads) histogram[b] = 0;
  __syncthreads();
  // This thread's keys of pages p0 + j * kThreads + t, relative to the head's smallest key. With one round of
  // candidates (at most kThreads * kHeldKeys: 10,240, a context of 160K at pages of 16) they stay in registers from
  // the histogram to the end of sweep 2; with more, each of those passes loads its round's from L2. (H200, 2026-12-03,
  // Llama-3.1-8B heads, budget 2048, graph us: with 8 keys a thread, 8,192 candidates, a 128K context decoding past
  // its prompt took two rounds: 8,200 pages 23.77, against 18.75 at 8,192; with 10, 20.54 and 19.08, and 11.66 ->
  // 11.79 at 32K, 8.37 -> 8.63 at 8K: the registers cost a little everywhere. 16 keys, with the spread below: 21.56
  // at 8,200 pages, 20.17 at 8,192, 12.78 at 32K. A captured call's pages spread over the grid by the length read on
  // the GPU, not the capacity that sized it: 0.7-0.9 slower at 8,200 pages and at 32K, 0.6 faster at 8,192.)
  unsigned int keys[kHeldKeys];
  // Radix digits of r = key - smallest_key, from bit `shift` up: r >> shift < 2048 for every candidate.
  const unsigned int span = largest_key - smallest_key;
  int shift = max(0, 32 - __clz(span) - kFirstBits);
  auto relative_key = [&](int p) { return order_key(__ldcg(head_scores + p)) - smallest_key; };
  auto load_keys = [&](int p0) {  // loads first, all in flight together
#pragma unroll
    for (int j = 0; j < kHeldKeys; ++j) {
      const int p = p0 + j * kThreads + threadIdx.x;
      keys[j] = p < candidates ? relative_key(p) : 0u;
    }
  };
  const bool one_round = candidates <= kThreads * kHeldKeys;
  if (one_round) load_keys(0);
  for (int p0 = 0; p0 < candidates; p0 += kThreads * kHeldKeys) {  // the first digit's histogram
    if (!one_round) load_keys(p0);
#pragma unroll
    for (int j = 0; j < kHeldKeys; ++j) {
      const int p = p0 + j * kThreads + threadIdx.x;
      if (p >= sink_pages && p < candidates) atomicAdd(&histogram[keys[j] >> shift], 1u);
    }
  }
  __syncthreads();
  find_bin(histogram, kFirstBins, warp_totals, &found_bin, &remaining);
  const unsigned int first_digit = found_bin;
  // One sweep: pages above the threshold bin are selected now; those in it (few, as a rule) go to a list in
  // shared memory, which the later digits and the final pick read. If they do not fit, those steps sweep all
  // scores again.
  const bool use_list = histogram[first_digit] <= (unsigned int)list_capacity;
  int32_t* head_out = out + (int64_t)h * k;
  for (int p0 = 0; p0 < candidates; p0 += kThreads * kHeldKeys) {
    if (!one_round) load_keys(p0);
#pragma unroll
    for (int j = 0; j < kHeldKeys; ++j) {
      const int p = p0 + j * kThreads + threadIdx.x;
      if (p >= candidates) break;
      if (p < sink_pages) continue;
      const unsigned int digit = keys[j] >> shift;
      if (digit > first_digit) {
        head_out[atomicAdd(&taken_greater, 1u)] = p * num_kv_heads + kv_head;
      } else if (use_list && digit == first_digit) {
        const unsigned int slot = atomicAdd(&list_length, 1u);
        list_keys[slot] = keys[j];
        list_pages[slot] = p;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) head_out[k - 1] = (num_pages - 1) * num_kv_heads + kv_head;
  for (int i = threadIdx.x; i < sink_pages; i += kThreads)
    head_out[k - 1 - sink_pages + i] = i * num_kv_heads + kv_head;
  const int length = use_list ? (int)list_length : candidates;
  if (use_list && length <= kThreads) {  // a short list (the rule): rank its keys against each other in one pass
    if (threadIdx.x < length) {
      const unsigned int key = list_keys[threadIdx.x];
      const int page = list_pages[threadIdx.x];
      unsigned int rank = 0;  // the list's keys above this one, ties to the lower page (the list's order is not fixed)
      for (int j = 0; j < length; ++j) rank += list_keys[j] > key || (list_keys[j] == key && list_pages[j] < page);
      if (rank < remaining) head_out[atomicAdd(&taken_greater, 1u)] = page * num_kv_heads + kv_head;
    }
    return;
  }
  // without the list, i runs over every full page; a sink page's key is never counted nor taken
  auto key_at = [&](int i) { return use_list ? list_keys[i] : relative_key(i); };
  auto is_sink = [&](int i) { return !use_list && i < sink_pages; };
  auto page_at = [&](int i) { return use_list ? list_pages[i] : i; };
  const unsigned int first_prefix = first_digit << shift, first_mask = 0xffffffffu << shift;  // shift <= 21
  unsigned int prefix = first_prefix, mask = first_mask;
  while (shift > 0) {  // a long list, or none: 8-bit digits down to bit 0, over the threshold bin's keys
    const int bits = min(8, shift), nbins = 1 << bits;
    shift -= bits;
    for (int b = threadIdx.x; b < nbins; b += kThreads) histogram[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < length; i += kThreads) {
      const unsigned int key = key_at(i);
      if ((key & mask) == prefix && !is_sink(i)) atomicAdd(&histogram[(key >> shift) & (nbins - 1)], 1u);
    }
    __syncthreads();
    find_bin(histogram, nbins, warp_totals, &found_bin, &remaining);
    prefix |= found_bin << shift;
    mask |= (unsigned int)(nbins - 1) << shift;
  }
  // `prefix` is now the relative key of the (k-1)-th largest score; take the keys above it and `remaining` equal
  // to it (which of several equal ones: the order of the atomics; the short list above breaks ties by page).
  const unsigned int equal_quota = remaining, greater = (k - 1 - sink_pages) - equal_quota;
  for (int i = threadIdx.x; i < length; i += kThreads) {
    const unsigned int key = key_at(i);
    if ((key & first_mask) != first_prefix || is_sink(i)) continue;  // (without the list) taken in the sweep, or below
    if (key > prefix) {
      head_out[atomicAdd(&taken_greater, 1u)] = page_at(i) * num_kv_heads + kv_head;
    } else if (key == prefix) {
      const unsigned int slot = atomicAdd(&taken_equal, 1u);
      if (slot < equal_quota) head_out[greater + slot] = page_at(i) * num_kv_heads + kv_head;
    }
  }
}

// num_pages: the pages in use (the last one is the current page), or, with `device_length`, an upper bound on
// them that sizes the grid (the kernel reads the length from the GPU: a captured CUDA graph).
// bounds_table: a batch of R requests, int64 [R, 2]: each one's page bounds address and capacity (`bounds` then
// only gives the type); query [R * Hkv, G, D], device_length [R] (required), scratch and out rows R * Hkv, the
// scratch's rows `scores.size(1)` long; the rows written are each request's own one-head rows p * Hkv + h.
// key_ranges: int32 [Hkv, 2], (-1, 0) before the first call; each call leaves it so.
// rule: 0 sum, 1 max, 2 mass; group_scores: float32 [Hkv, G, capacity + 2 * SMs] for rule mass (else unused);
// mass_scale: the softmax scale of rule mass (1/sqrt(D), as the twin).
// sink_pages: the first pages, always selected (before the current page) and left out of the top-k.
void score_topk(torch::Tensor query, torch::Tensor bounds, int64_t num_pages, int64_t k, torch::Tensor scores,
                torch::Tensor key_ranges, torch::Tensor counters, torch::Tensor out,
                std::optional<torch::Tensor> device_length, int64_t page_size, int64_t rule,
                std::optional<torch::Tensor> group_scores, double mass_scale, int64_t sink_pages,
                std::optional<torch::Tensor> bounds_table) {
  TORCH_CHECK(query.is_cuda() && bounds.is_contiguous() && scores.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(query.scalar_type() == bounds.scalar_type() && scores.scalar_type() == at::kFloat);
  TORCH_CHECK(out.scalar_type() == at::kInt && counters.scalar_type() == at::kInt);
  TORCH_CHECK(key_ranges.scalar_type() == at::kInt && key_ranges.numel() >= 2 * query.size(0));
  TORCH_CHECK(counters.numel() >= query.size(0) && out.numel() == query.size(0) * k);
  const int requests = bounds_table ? bounds_table->size(0) : 1;
  TORCH_CHECK(!bounds_table || (bounds_table->scalar_type() == at::kLong && bounds_table->is_contiguous() &&
                                bounds_table->size(1) == 2 && device_length && device_length->numel() == requests &&
                                query.size(0) % requests == 0),
              "a bounds table [R, 2] int64 takes query [R * Hkv, G, D] and device_length [R]");
  const int64_t capacity = bounds_table ? scores.size(1) : bounds.size(1);  // the scratch's row length
  TORCH_CHECK(k >= 2 && k < num_pages && num_pages <= capacity && scores.size(1) >= capacity);
  TORCH_CHECK(sink_pages >= 0 && sink_pages <= k - 2, "sink_pages leaves room for a chosen page: 0..k-2, got ",
              sink_pages);
  TORCH_CHECK(!device_length || device_length->scalar_type() == at::kLong);
  TORCH_CHECK(rule == kSum || rule == kMax || rule == kMass, "rule: 0 sum, 1 max, 2 mass, got ", rule);
  query = query.contiguous();
  const int heads = query.size(0), num_kv_heads = heads / requests, group = query.size(1), head_dim = query.size(2);
  TORCH_CHECK(rule != kMass || (group <= kMaxMassGroup && group_scores && group_scores->is_contiguous() &&
                                group_scores->scalar_type() == at::kFloat),
              "rule mass takes up to ", kMaxMassGroup, " query heads per KV head and a float32 group_scores");
  const int vector = 16 / query.element_size();
  TORCH_CHECK((2 * head_dim) % vector == 0 && 2 * head_dim <= kMaxChunks * 32 * vector,
              "score_topk takes an even head_dim (a multiple of 4 in 16-bit types) up to ", kMaxChunks * 16 * vector);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(bounds.data_ptr()) % 16 == 0);
  const int num_vectors = 2 * head_dim / vector;
  int team = 1;
  while (team < std::min(num_vectors, 32)) team *= 2;
  const int chunks = (num_vectors + team - 1) / team;
  const int device = query.device().index();
  const DeviceLimits limits = device_limits(device);
  const int max_shared = limits.max_shared, num_sms = limits.num_sms;
  // At most one block per SM over all heads (a block of 1024 threads fills an SM's registers: one more block would
  // wait for a second wave), each scoring a whole number of pages per team (a block's teams take kUnroll pages
  // each per round); the current page too (rule mass scores it)
  const int teams = kThreads / team;
  const int spread = std::max(1, std::min<int>(num_sms / heads, (num_pages + teams - 1) / teams));
  const int pages_per_block = (int)(((num_pages + spread - 1) / spread + teams - 1) / teams * teams);
  const int blocks_per_head = std::max<int>(1, (num_pages + pages_per_block - 1) / pages_per_block);
  TORCH_CHECK(rule != kMass || group_scores->numel() >= (int64_t)heads * group * (capacity + 2 * blocks_per_head),
              "rule mass's group_scores holds [Hkv, G, capacity] and the blocks' states [Hkv, G, blocks, 2]");
  const int fixed = (2 * head_dim * (rule == kSum ? 1 : group) + kFirstBins) * 4;
  TORCH_CHECK((max_shared - fixed - 1024) / 8 >= 64, "score_topk: too many query heads per KV head");
  const int list_capacity = std::min<int>({2048, (int)(num_pages - 1), (max_shared - fixed - 1024) / 8});
  const int shared_bytes = fixed + 8 * list_capacity;
  const c10::cuda::CUDAGuard guard(query.device());
  TORCH_CHECK(query.scalar_type() != at::kFloat, "score_topk takes float16 and bfloat16 (FlashInfer's types)");
  dispatch_kv_type(query.scalar_type(), [&](auto type_tag) {
    using T = decltype(type_tag);
    if constexpr (!std::is_same_v<T, float>) {
      using Kernel = decltype(&score_topk_kernel<T, 1, kSum>);
      constexpr Kernel kernels[3][3] = {  // [rule][1, 2 or 4 chunks]
        {score_topk_kernel<T, 1, kSum>, score_topk_kernel<T, 2, kSum>, score_topk_kernel<T, 4, kSum>},
        {score_topk_kernel<T, 1, kMax>, score_topk_kernel<T, 2, kMax>, score_topk_kernel<T, 4, kMax>},
        {score_topk_kernel<T, 1, kMass>, score_topk_kernel<T, 2, kMass>, score_topk_kernel<T, 4, kMass>}};
      const Kernel kernel = kernels[rule][chunks == 1 ? 0 : chunks == 2 ? 1 : 2];
      allow_max_shared(kernel, device, max_shared);  // each kernel over 48 KB of shared memory, on this GPU
      launch_kernel(kernel, dim3(heads, blocks_per_head), kThreads, shared_bytes, limits,
          reinterpret_cast<const T*>(query.data_ptr()), reinterpret_cast<const T*>(bounds.data_ptr()), bounds.size(1),
          bounds_table ? bounds_table->data_ptr<int64_t>() : nullptr, scores.data_ptr<float>(),
          rule == kMass ? group_scores->data_ptr<float>() : nullptr,
          reinterpret_cast<unsigned int*>(key_ranges.data_ptr<int>()),
          reinterpret_cast<unsigned int*>(counters.data_ptr<int>()), out.data_ptr<int>(), group, head_dim,
          capacity, num_pages, device_length ? device_length->data_ptr<int64_t>() : nullptr, page_size, k,
          num_kv_heads, pages_per_block, list_capacity, (float)mass_scale, (int)sink_pages);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- (c) sparse decode attention over the selected pages ----
// Grid (Hkv, splits), attention_threads() threads. Block (h, s) reads the s-th stretch of `tokens_per_split` tokens
// (whole pages) of KV head h's selected pages, in the order of `rows` (one-head rows p * Hkv + h, the current page
// last, as score_topk writes them), for all G query heads of the group at once: each K and V row is read once per KV
// head.
// A team of D / (16 / sizeof(T)) lanes owns one token at a time, each lane a 16-byte vector of its key and value
// row; the team's lanes sum the G dot products by shuffles and keep the G heads' softmax states (running max m,
// sum l, unnormalized output) for their vectors, a tile of tokens at a time. The teams' states merge in shared
// memory; with one split that is the output, else each block writes its state ([Hkv, splits, G]: m, l, output)
// and the last block of the head to finish (a counter per head, left reset) merges them, weighting each split by
// exp(m_s - max m) / sum l. Logits are in base 2 (the query is scaled by scale * log2(e)).
// (Measured and dropped, H200, 2026-12-02, graph us against this merge's in the same run: the splits of a head in a
// thread-block cluster, merged into its first block through distributed shared memory, no partials in global memory
// and no counter: paper's shape 19.1-19.3 against 14.7-14.9, Llama-3.1-8B heads at 32K / 128K 11.1 / 10.9 against
// 9.4 / 9.0, SmolLM2's 4.7 against 5.1; with 128 tokens in flight 18.1-18.4, 15.4, 15.1, 4.5. The cluster's
// co-scheduling costs more than the global merge wherever a head has many splits.)
// A team has 8 tokens in flight, 4 for groups of more than 2 query heads (their logits and outputs take the
// registers); a block has enough teams for 64 tokens in flight, and at least 128 threads. (On an H200, score + top-k
// then this kernel, Llama-3.1-8B heads (d 128, G 4): 0.7-1.5 us faster at 256 threads than at 128 with 32 tokens in
// flight; the paper's (G 1) and SmolLM2's (d 64) 0.3-2 us slower at 256 than at 128.)
__host__ __device__ constexpr int attention_tile(int group) { return group <= 2 ? 8 : 4; }
__host__ __device__ constexpr int attention_threads(int team, int group) {
  const int threads = 64 / attention_tile(group) * team;  // 64 tokens in flight
  return threads > 128 ? threads : 128;
}

// A block's attention over tokens [begin, end) of a KV head's selected pages: token j is offset j % P of the page in
// slot j / P, whose one-head row `row_of(slot)` gives (the page-major cache read as rows [pages * Hkv, P, D]), for
// the G query heads of head_query [G, D] at once. A team of kTeam lanes owns one token at a time, each lane a 16-byte
// vector of its key and value row; the team's lanes sum the G dot products by shuffles and keep the G heads' softmax
// states (running max m, sum l, unnormalized output; logits in base 2: the query is scaled by scale_log2) for their
// vectors, a tile of tokens at a time. Each team's states go to team_states [teams, G, 2 + D]; the caller syncs the
// block before reading them (merge_states).
template <typename T, int kTeam, int kGroup, int kThreads, typename RowOf>
__device__ __forceinline__ void attend_teams(const T* __restrict__ head_query, const T* __restrict__ keys,
                                             const T* __restrict__ values, RowOf row_of, int group, int page_size,
                                             int begin, int end, float scale_log2, float* team_states) {
  constexpr int kTile = attention_tile(kGroup);
  constexpr int kVec = 16 / sizeof(T), kDim = kTeam * kVec, kTeams = kThreads / kTeam;
  const int lane = threadIdx.x % kTeam, team = threadIdx.x / kTeam;
  float q[kGroup][kVec], acc[kGroup][kVec], m[kGroup], l[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    uint4 loaded = make_uint4(0, 0, 0, 0);
    if (g < group) loaded = *reinterpret_cast<const uint4*>(head_query + g * kDim + lane * kVec);
    const T* elements = reinterpret_cast<const T*>(&loaded);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      q[g][i] = to_float(elements[i]) * scale_log2;
      acc[g][i] = 0.f;
    }
  }

  // Every thread runs the same rounds (the shuffles need whole warps); tokens past `end` are masked.
  for (int first = begin; first < end; first += kTeams * kTile) {
    const int base = first + team * kTile;
    uint4 key_vectors[kTile], value_vectors[kTile];
#pragma unroll
    for (int u = 0; u < kTile; ++u) {
      const int j = base + u;
      key_vectors[u] = value_vectors[u] = make_uint4(0, 0, 0, 0);
      if (j < end) {
        const int slot = j / page_size;
        const int64_t row = row_of(slot);
        const int64_t at = (row * page_size + (j - slot * page_size)) * kDim + lane * kVec;
        key_vectors[u] = __ldg(reinterpret_cast<const uint4*>(keys + at));
        value_vectors[u] = __ldg(reinterpret_cast<const uint4*>(values + at));
      }
    }
    float logits[kGroup][kTile];
#pragma unroll
    for (int g = 0; g < kGroup; ++g)
#pragma unroll
      for (int u = 0; u < kTile; ++u) {
        const T* key = reinterpret_cast<const T*>(&key_vectors[u]);
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) dot += q[g][i] * to_float(key[i]);
        logits[g][u] = dot;
      }
#pragma unroll
    for (int offset = kTeam / 2; offset > 0; offset >>= 1)
#pragma unroll
      for (int g = 0; g < kGroup; ++g)
#pragma unroll
        for (int u = 0; u < kTile; ++u) logits[g][u] += __shfl_xor_sync(0xffffffffu, logits[g][u], offset);
    if (base >= end) continue;  // this team has no token in this round (no shuffles below)
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (g >= group) continue;
      float tile_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < kTile; ++u)
        if (base + u < end) tile_max = fmaxf(tile_max, logits[g][u]);
      const float running = fmaxf(m[g], tile_max), correction = fast_exp2(m[g] - running);
      l[g] *= correction;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[g][i] *= correction;
#pragma unroll
      for (int u = 0; u < kTile; ++u) {
        const float weight = base + u < end ? fast_exp2(logits[g][u] - running) : 0.f;
        const T* value = reinterpret_cast<const T*>(&value_vectors[u]);
        l[g] += weight;
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[g][i] += weight * to_float(value[i]);
      }
      m[g] = running;
    }
  }

  float* own = team_states + team * group * (2 + kDim);
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g >= group) continue;
    if (lane == 0) {
      own[g * (2 + kDim)] = m[g];
      own[g * (2 + kDim) + 1] = l[g];
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) own[g * (2 + kDim) + 2 + lane * kVec + i] = acc[g][i];
  }
}

// `count` softmax states [count, G, 2 + D] (a block's teams' from attend_teams, or a cluster's blocks') merged for
// query head g and output element d: the largest logit, the sum and the unnormalized output. A state without tokens
// has m = -inf, l = 0 and weighs 0; if none has tokens, (-inf, 0, 0).
template <int kDim>
__device__ __forceinline__ void merge_states(const float* states, int count, int group, int g, int d, float& largest,
                                             float& sum, float& output) {
  largest = -INFINITY;
  for (int t = 0; t < count; ++t) largest = fmaxf(largest, states[(t * group + g) * (2 + kDim)]);
  sum = output = 0.f;
  if (largest == -INFINITY) return;
  for (int t = 0; t < count; ++t) {
    const float* state = states + (t * group + g) * (2 + kDim);
    const float weight = fast_exp2(state[0] - largest);
    sum += state[1] * weight;
    output += state[2 + d] * weight;
  }
}

template <typename T, int kTeam, int kGroup>  // kTeam: lanes per token (D / vector); kGroup: G rounded up
__global__ void __launch_bounds__(attention_threads(kTeam, kGroup)) sparse_decode_kernel(
    const T* __restrict__ query, const T* __restrict__ keys, const T* __restrict__ values,
    const int32_t* __restrict__ rows, T* __restrict__ out, float* __restrict__ partial_out,
    float* __restrict__ partial_state, unsigned int* __restrict__ counters, int group, int page_size, int k,
    int tokens_per_split, float scale_log2, int last_len, const int64_t* __restrict__ device_length,
    int heads_per_length) {
  constexpr int kThreads = attention_threads(kTeam, kGroup);
  constexpr int kVec = 16 / sizeof(T), kDim = kTeam * kVec, kTeams = kThreads / kTeam;
  extern __shared__ float team_states[];      // [kTeams, group, 2 + kDim]: m, l, output
  __shared__ bool is_last;
  wait_for_previous_kernel();  // (asking L2 for the block's pages first, a bulk prefetch per page's keys and values,
                               // measured 2.6 us slower at the paper's shape: H200, 2026-12-02; for the next round's
                               // pages only, in each round, 0.8 us slower)
  let_next_kernel_launch();
  const int h = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  if (device_length != nullptr) last_len = (int)((device_length[h / heads_per_length] - 1) % page_size) + 1;
  const int total = (k - 1) * page_size + last_len;
  const int begin = split * tokens_per_split, end = min(total, begin + tokens_per_split);
  const int32_t* head_rows = rows + (int64_t)h * k;

  const auto row_of = [&](int slot) { return (int64_t)__ldg(head_rows + slot); };
  attend_teams<T, kTeam, kGroup, kThreads>(query + (int64_t)h * group * kDim, keys, values, row_of, group, page_size,
                                          begin, end, scale_log2, team_states);
  __syncthreads();
  // the block's teams merge (the block has a token: each split starts before `total`)
  for (int index = threadIdx.x; index < group * kDim; index += kThreads) {
    const int g = index / kDim, d = index % kDim;
    float largest, sum, output;
    merge_states<kDim>(team_states, kTeams, group, g, d, largest, sum, output);
    if (splits == 1) {
      out[((int64_t)h * group + g) * kDim + d] = from_float<T>(output / sum);
    } else {
      const int64_t at = ((int64_t)h * splits + split) * group + g;
      partial_out[at * kDim + d] = output;
      if (d == 0) {
        partial_state[2 * at] = largest;
        partial_state[2 * at + 1] = sum;
      }
    }
  }
  if (splits == 1) return;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&counters[h], 1u) == (unsigned int)splits - 1;
  __syncthreads();
  if (!is_last) return;

  // The last block of head h: each split's weight per query head, exp2(m_s - max m) / sum, into shared memory
  // (it fits: group * splits <= kTeams * group * (2 + kDim) is checked on the host), then the weighted sum of the
  // outputs. Each lane merges its splits' states as it loads them (m_s kept in shared memory), the warp merges the
  // lanes', and the weights come from shared memory: one wait on L2 (it waited twice: for the largest m, then for
  // every state again for the sum).
  float* weights = team_states;  // [group, splits]
  const int warp = threadIdx.x / 32, warp_lane = threadIdx.x % 32;
  for (int g = warp; g < group; g += kThreads / 32) {
    const float* state = partial_state + 2 * ((int64_t)h * splits * group + g);
    float largest = -INFINITY, sum = 0.f;
    for (int s = warp_lane; s < splits; s += 32) {
      const float m_s = __ldcg(state + 2 * s * group), l_s = __ldcg(state + 2 * s * group + 1);
      weights[g * splits + s] = m_s;
      merge_softmax<true>(largest, sum, m_s, l_s);
    }
    for (int offset = 16; offset > 0; offset >>= 1)
      merge_softmax<true>(largest, sum, __shfl_xor_sync(0xffffffffu, largest, offset),
                          __shfl_xor_sync(0xffffffffu, sum, offset));
    __syncwarp();
    const float inverse_sum = 1.f / sum;
    for (int s = warp_lane; s < splits; s += 32)
      weights[g * splits + s] = fast_exp2(weights[g * splits + s] - largest) * inverse_sum;
  }
  __syncthreads();
  // Four outputs per thread: each split's in one 16-byte load, a batch of kMergeBatch splits' loads in flight
  // together (predicated: fewer splits than a batch are not left to a remainder loop of one load at a time). One
  // output per thread and 8 loads in flight took 4.6 us at 32 splits of 4 query heads, d 128; this, 1 us.
  constexpr int kMergeBatch = 16;
  for (int index = threadIdx.x; index < group * kDim / 4; index += kThreads) {
    const int g = index / (kDim / 4), d = index % (kDim / 4) * 4;
    const float4* partial = reinterpret_cast<const float4*>(partial_out + ((int64_t)h * splits * group + g) * kDim + d);
    float4 output = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int first = 0; first < splits; first += kMergeBatch) {
      float4 state[kMergeBatch];
#pragma unroll
      for (int j = 0; j < kMergeBatch; ++j)
        state[j] = first + j < splits ? __ldcg(partial + (int64_t)(first + j) * group * kDim / 4)
                                      : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int j = 0; j < kMergeBatch; ++j) {
        const float weight = first + j < splits ? weights[g * splits + first + j] : 0.f;
        output.x += weight * state[j].x;
        output.y += weight * state[j].y;
        output.z += weight * state[j].z;
        output.w += weight * state[j].w;
      }
    }
    T* target = out + ((int64_t)h * group + g) * kDim + d;
    target[0] = from_float<T>(output.x);
    target[1] = from_float<T>(output.y);
    target[2] = from_float<T>(output.z);
    target[3] = from_float<T>(output.w);
  }
  if (threadIdx.x == 0) counters[h] = 0;
}

// query [H, G, D]; keys, values the page-major cache [capacity, Hkv, P, D] (read as one-head rows [capacity *
// Hkv, P, D]); rows int32 [H, k], the current page last, holding `last_len` tokens, or, with `device_length`
// (int64 [B], the cache lengths on the GPU: a captured CUDA graph, or a batch of B requests whose H = B * Hkv
// heads are request-major), ((length - 1) % P) + 1 of head h's request, h / (H / B). partial_out float32
// [>= Hkv * k * G * D], partial_state float32 [>= Hkv * k * G * 2], counters int32 [Hkv] zeros (left so).
// Returns [Hkv, G, D] in the query's dtype. The grid depends on the shapes only, never on the length.
torch::Tensor sparse_decode(torch::Tensor query, torch::Tensor keys, torch::Tensor values, torch::Tensor rows,
                            double scale, int64_t last_len, torch::Tensor partial_out, torch::Tensor partial_state,
                            torch::Tensor counters, std::optional<torch::Tensor> device_length) {
  TORCH_CHECK(query.is_cuda() && query.is_contiguous() && keys.is_contiguous() && values.is_contiguous());
  TORCH_CHECK(rows.is_contiguous() && rows.scalar_type() == at::kInt && counters.scalar_type() == at::kInt);
  TORCH_CHECK(query.scalar_type() == keys.scalar_type() && values.scalar_type() == keys.scalar_type());
  TORCH_CHECK(keys.scalar_type() == at::kHalf || keys.scalar_type() == at::kBFloat16,
              "sparse_decode takes float16 or bfloat16");
  TORCH_CHECK(!device_length || device_length->scalar_type() == at::kLong);
  const int num_heads = query.size(0), group = query.size(1), head_dim = query.size(2);
  const int page_size = keys.size(2), k = rows.size(1);
  const int heads_per_length = device_length ? num_heads / std::max<int64_t>(1, device_length->numel()) : 1;
  TORCH_CHECK(keys.dim() == 4 && num_heads % keys.size(1) == 0 && keys.size(3) == head_dim);
  TORCH_CHECK(!device_length || (int64_t)heads_per_length * device_length->numel() == num_heads,
              "device_length holds one length per request: ", num_heads, " heads over ",
              device_length ? device_length->numel() : 0, " lengths");
  TORCH_CHECK(rows.size(0) == num_heads && reinterpret_cast<uintptr_t>(keys.data_ptr()) % 16 == 0);
  if (reinterpret_cast<uintptr_t>(query.data_ptr()) % 16 != 0) query = query.clone();  // 16-byte loads
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "sparse_decode takes head_dim 64 or 128, got ", head_dim);
  TORCH_CHECK(group >= 1 && group <= 8, "sparse_decode takes up to 8 query heads per KV head, got ", group);
  TORCH_CHECK(k >= 1 && (device_length || (last_len >= 1 && last_len <= page_size)));
  TORCH_CHECK(partial_out.scalar_type() == at::kFloat && partial_state.scalar_type() == at::kFloat);
  TORCH_CHECK(partial_out.numel() >= (int64_t)num_heads * k * group * head_dim &&
              partial_state.numel() >= (int64_t)num_heads * k * group * 2 && counters.numel() >= num_heads);
  const DeviceLimits limits = device_limits(query.device().index());
  // Splits: about two blocks per SM over all heads, four where a split would hold over 128 tokens (a block waits on
  // its pages one tile after another: the paper's shape, 32 heads of 2,048 tokens, is 1 us faster at four; where
  // the splits are short, more of them cost more to merge), each of whole pages and at least 64 tokens (SmolLM2's
  // 3 heads of 1,024 tokens: 16 splits, 0.4 us faster than 32 of 32 tokens)
  const int team = head_dim / 8, threads = attention_threads(team, group), teams = threads / team;
  auto split_pages = [&](int blocks_per_sm) {
    const int wanted = std::max(1, (blocks_per_sm * limits.num_sms + num_heads - 1) / num_heads);
    return std::max((k + wanted - 1) / wanted, (64 + page_size - 1) / page_size);
  };
  const int pages_per_split = split_pages(2) * page_size > 128 ? split_pages(4) : split_pages(2);
  const int splits = (k + pages_per_split - 1) / pages_per_split;
  TORCH_CHECK(group * splits <= teams * group * (2 + head_dim));  // the last block's weights fit in shared memory
  const int shared_bytes = teams * group * (2 + head_dim) * 4;
  auto out = torch::empty_like(query);
  const c10::cuda::CUDAGuard guard(query.device());
  const float scale_log2 = (float)(scale * 1.4426950408889634);
  auto launch = [&](auto kernel, auto type_tag) {
    using T = decltype(type_tag);
    allow_max_shared(kernel, query.device().index(), limits.max_shared);  // 66 KB at d 128, G 8
    launch_kernel(kernel, dim3(num_heads, splits), threads, shared_bytes, limits,
        reinterpret_cast<const T*>(query.data_ptr()), reinterpret_cast<const T*>(keys.data_ptr()),
        reinterpret_cast<const T*>(values.data_ptr()), rows.data_ptr<int>(), reinterpret_cast<T*>(out.data_ptr()),
        partial_out.data_ptr<float>(), partial_state.data_ptr<float>(),
        reinterpret_cast<unsigned int*>(counters.data_ptr<int>()), group, page_size, k, pages_per_split * page_size,
        scale_log2, (int)last_len, device_length ? device_length->data_ptr<int64_t>() : nullptr, heads_per_length);
  };
  dispatch_decode(keys.scalar_type(), head_dim, group, [&](auto type_tag, auto dim_tag, auto group_tag) {
    using T = decltype(type_tag);
    constexpr int kTeam = decltype(dim_tag)::value / (16 / sizeof(T));  // lanes per token: D over 16-byte vectors
    launch(sparse_decode_kernel<T, kTeam, decltype(group_tag)::value>, type_tag);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- (d) Quest's decode step in one kernel: score, select and attend in a thread-block cluster per KV head ----
// Grid (C, heads), clusters of C blocks (C <= 16, Hopper and later): the cluster of head h scores, selects and attends
// for it. Block c scores pages [c * pages_per_block, ...) (as score_topk does: a team of lanes per page's bounds);
// rule mass first merges the blocks' softmax states per query head (each block writes its states into every block's
// shared memory: DSMEM). Each block writes its pages' order keys into every block's shared memory; after a cluster
// barrier every block runs the same selection over all of the head's keys (radix digits over the keys relative to
// the head's smallest, the first of 11 bits from the range's top bit, then 8-bit digits while the threshold bin
// holds more keys than are left to take; equal keys are taken in page order), so each block knows the whole
// selection without a round trip through global memory. It lists the selected pages in page order (the sink pages
// first, the current page last: k pages) and attends over its own stretch of that list, as sparse_decode's blocks
// do; the blocks' softmax states go to block 0, which merges them into the output. Against score_topk +
// sparse_decode: one launch, and no L2 round trips between the phases (scores, counters, selected rows, partial
// outputs). On the H200 (bench/RESULTS.md) it is faster for SmolLM2's 3 KV heads (15.9 against 20.5 us at 8K,
// budget 1024) and slower for 8 or 32 (its 256-thread blocks score a long context in many rounds).
constexpr int kFusedThreads = 256;  // the attention's registers (a team's G queries and outputs) rule out more
constexpr int kFusedMaxCluster = 16;
constexpr int kFusedMaxGroup = 8;

// Exclusive scan of one value per thread over a block of kFusedThreads; `total` gets the block's sum.
__device__ __forceinline__ unsigned int fused_exclusive_scan(unsigned int value, unsigned int* warp_sums,
                                                             unsigned int& total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned int inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  unsigned int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kFusedThreads / 32; ++w) {
    const unsigned int sum = warp_sums[w];
    before += w < warp ? sum : 0u;
    total += sum;
  }
  __syncthreads();  // warp_sums may be written again
  return before + inclusive - value;
}

template <typename T, int kDim, int kGroup>  // kGroup: G rounded up to 1, 2, 4 or 8
__global__ void __launch_bounds__(kFusedThreads) quest_decode_kernel(
    const T* __restrict__ query, const T* __restrict__ bounds, int64_t bounds_capacity, const T* __restrict__ keys,
    const T* __restrict__ values, T* __restrict__ out, int32_t* __restrict__ rows_out, int group, int num_pages,
    int last_len, const int64_t* __restrict__ device_length, int page_size, int k, int num_kv_heads,
    int pages_per_block, int max_pages, int rule, float mass_scale, float scale_log2, int sink_pages) {
  namespace cg = cooperative_groups;
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kScoreTeam = 2 * kDim / kVec, kScoreTeams = kFusedThreads / kScoreTeam;  // lanes per page's bounds
  constexpr int kTeam = kDim / kVec, kTeams = kFusedThreads / kTeam;                      // lanes per token
  constexpr int kRound = 8;                                   // pages per scoring team in flight
  constexpr int kState = 2 + kDim;                            // a softmax state: m, l, output
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = (int)cluster.block_rank(), blocks = (int)cluster.num_blocks();
  const int h = blockIdx.y, kv_head = h % num_kv_heads, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int query_rows = rule == kSum ? 1 : group;
  // Shared memory: split query [rows, 2D], logits [G, pages_per_block] (rule mass), the blocks' softmax states
  // [blocks, G, 2 + D] (block 0's: the others write theirs there), the selection [k], then either the head's keys
  // [max_pages] (each block writes its pages' into every block's) and a histogram [2048] (selecting) or the teams'
  // states [teams, G, 2 + D] (attending). Blocks write into each other's shared memory (stores, which the next
  // cluster barrier makes visible) and never read another's: no block waits on DSMEM loads.
  extern __shared__ __align__(16) float fused_shared[];
  float* split_query = fused_shared;
  float* logits = split_query + query_rows * 2 * kDim;
  float* block_states = logits + (rule == kMass ? group * pages_per_block : 0);
  int* selected = reinterpret_cast<int*>(block_states + blocks * group * kState);
  unsigned int* head_keys = reinterpret_cast<unsigned int*>(selected + (k + 3) / 4 * 4);
  unsigned int* histogram = head_keys + (max_pages + 3) / 4 * 4;
  float* team_states = reinterpret_cast<float*>(head_keys);
  __shared__ float mass_states[kFusedMaxCluster][2 * kFusedMaxGroup], head_max_logit[kFusedMaxGroup],
      head_inverse_sum[kFusedMaxGroup];
  __shared__ unsigned int key_ranges[kFusedMaxCluster * kFusedThreads / 32][2];
  __shared__ unsigned int warp_totals[32], found_bin, remaining, smallest_key, largest_key;

  auto started = cluster.barrier_arrive();  // every block of the cluster runs before one writes into another
  wait_for_previous_kernel();
  let_next_kernel_launch();  // (only before the attention instead: the app's decoding on SmolLM2 shapes 852 tok/s
                             // against 860, H200, 2026-12-02)
  if (device_length != nullptr) {
    num_pages = (int)((device_length[0] + page_size - 1) / page_size);
    last_len = (int)((device_length[0] - 1) % page_size) + 1;
  }
  const int candidates = num_pages - 1;  // the full pages; the current page is always read
  split_query_rows<kFusedThreads>(query, h, rule, group, kDim, split_query);
  __syncthreads();
  cluster.barrier_wait(std::move(started));

  // Scoring this block's pages: all of a team's pages' loads in flight together, kRound at a time.
  const int first_page = rank * pages_per_block, end_page = min(num_pages, first_page + pages_per_block);
  const T* head_bounds = bounds + (int64_t)kv_head * bounds_capacity * 2 * kDim;
  const int member = threadIdx.x % kScoreTeam, score_team = threadIdx.x / kScoreTeam;
  unsigned int low = 0xffffffffu, high = 0u;
  // page p's key into blocks first, first + step, ... of the cluster (each block's head keys)
  auto fold_key = [&](int p, unsigned int key, int first, int step) {
    if (p >= candidates) return;
    for (int b = first; b < blocks; b += step) cluster.map_shared_rank(head_keys, b)[p] = key;
    if (p >= sink_pages) {
      low = min(low, key);
      high = max(high, key);
    }
  };
  for (int base = first_page; base < end_page; base += kRound * kScoreTeams) {
    uint4 loaded[kRound];
#pragma unroll
    for (int u = 0; u < kRound; ++u) {
      const int p = base + u * kScoreTeams + score_team;
      loaded[u] = p < end_page ? __ldg(reinterpret_cast<const uint4*>(head_bounds + (int64_t)p * 2 * kDim) + member)
                               : make_uint4(0, 0, 0, 0);
    }
    float best[kRound];
#pragma unroll
    for (int u = 0; u < kRound; ++u) best[u] = -INFINITY;
    for (int r = 0; r < query_rows; ++r) {
      float q[kVec];
      const float4* vector = reinterpret_cast<const float4*>(split_query + r * 2 * kDim + member * kVec);
#pragma unroll
      for (int i = 0; i < kVec / 4; ++i) {
        const float4 x = vector[i];
        q[4 * i] = x.x;
        q[4 * i + 1] = x.y;
        q[4 * i + 2] = x.z;
        q[4 * i + 3] = x.w;
      }
#pragma unroll
      for (int u = 0; u < kRound; ++u) {
        const T* bound = reinterpret_cast<const T*>(&loaded[u]);
        float score = 0.f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) score += q[i] * to_float(bound[i]);
#pragma unroll
        for (int offset = kScoreTeam / 2; offset > 0; offset >>= 1)
          score += __shfl_xor_sync(0xffffffffu, score, offset);
        const int p = base + u * kScoreTeams + score_team;
        if (rule == kMass && member == 0 && p < end_page) logits[r * pages_per_block + p - first_page] = score;
        best[u] = fmaxf(best[u], score);
      }
    }
    if (rule == kMass) continue;
#pragma unroll
    for (int u = 0; u < kRound; ++u) {
      const int p = base + u * kScoreTeams + score_team;
      if (p < end_page) fold_key(p, order_key(best[u]), member, kScoreTeam);  // the team's lanes hold one score
    }
  }
  if (rule == kMass) {  // the group's softmax over every page in use, each query head's state merged over the cluster
    __syncthreads();
    const int count = end_page - first_page;
    for (int r = warp; r < group; r += kFusedThreads / 32) {
      float m = -INFINITY, l = 0.f;
      for (int i = lane; i < count; i += 32) merge_softmax(m, l, logits[r * pages_per_block + i] * mass_scale, 1.f);
      warp_merge_softmax(m, l);
      if (lane < blocks) {  // lane b writes the state into block b
        float* state = cluster.map_shared_rank(&mass_states[rank][2 * r], lane);
        state[0] = m;
        state[1] = l;
      }
    }
    cluster.sync();
    for (int r = warp; r < group; r += kFusedThreads / 32) {
      float m = lane < blocks ? mass_states[lane][2 * r] : -INFINITY;
      float l = lane < blocks ? mass_states[lane][2 * r + 1] : 0.f;
      warp_merge_softmax(m, l);
      if (lane == 0) {
        head_max_logit[r] = m;
        head_inverse_sum[r] = 1.f / l;
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < count; i += kFusedThreads) {
      float mass = 0.f;
      for (int g = 0; g < group; ++g)
        mass += __expf(logits[g * pages_per_block + i] * mass_scale - head_max_logit[g]) * head_inverse_sum[g];
      fold_key(first_page + i, order_key(mass), 0, 1);
    }
  }
  low = warp_min(low);  // each warp's key range, into every block
  high = warp_max(high);
  if (lane < blocks) {
    unsigned int* range = cluster.map_shared_rank(key_ranges[rank * kFusedThreads / 32 + warp], lane);
    range[0] = low;
    range[1] = high;
  }
  cluster.sync();  // every block's keys and key ranges are written

  if (warp == 0) {
    unsigned int smallest = 0xffffffffu, largest = 0u;
    for (int i = lane; i < blocks * kFusedThreads / 32; i += 32) {
      smallest = min(smallest, key_ranges[i][0]);
      largest = max(largest, key_ranges[i][1]);
    }
    smallest = warp_min(smallest);
    largest = warp_max(largest);
    if (lane == 0) {
      smallest_key = smallest;
      largest_key = largest;
      remaining = k - 1 - sink_pages;
    }
  }
  for (int b = threadIdx.x; b < kFirstBins; b += kFusedThreads) histogram[b] = 0;
  __syncthreads();

  // The selection: the threshold key (relative to the head's smallest) under `mask`, `prefix`, and how many keys
  // equal to it to take (the first ones in page order)
  const unsigned int span = largest_key - smallest_key;
  int shift = max(0, 32 - __clz(span) - kFirstBits);
  for (int p = sink_pages + threadIdx.x; p < candidates; p += kFusedThreads)
    atomicAdd(&histogram[(head_keys[p] - smallest_key) >> shift], 1u);
  __syncthreads();
  find_bin<kFusedThreads>(histogram, kFirstBins, warp_totals, &found_bin, &remaining);
  unsigned int prefix = found_bin << shift, mask = 0xffffffffu << shift, in_bin = histogram[found_bin];
  __syncthreads();
  while (shift > 0 && remaining < in_bin) {  // uniform: every thread reads the same shared values
    const int bits = min(8, shift), nbins = 1 << bits;
    shift -= bits;
    for (int b = threadIdx.x; b < nbins; b += kFusedThreads) histogram[b] = 0;
    __syncthreads();
    for (int p = sink_pages + threadIdx.x; p < candidates; p += kFusedThreads) {
      const unsigned int key = head_keys[p] - smallest_key;
      if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & (nbins - 1)], 1u);
    }
    __syncthreads();
    find_bin<kFusedThreads>(histogram, nbins, warp_totals, &found_bin, &remaining);
    prefix |= found_bin << shift;
    mask |= (unsigned int)(nbins - 1) << shift;
    in_bin = histogram[found_bin];
    __syncthreads();
  }
  const unsigned int equal_quota = remaining;

  // The selected pages in page order: thread t lists pages [t * per, (t + 1) * per); one scan counts, in two 16-bit
  // halves, the pages taken for sure (sinks, the current page, keys above the threshold) and the ties before each.
  const int per = (num_pages + kFusedThreads - 1) / kFusedThreads, own_first = threadIdx.x * per;
  const int own_end = min(num_pages, own_first + per);
  auto kind = [&](int p) {  // 2: taken, 1: equal to the threshold, 0: not taken
    if (p < sink_pages || p == candidates) return 2;
    const unsigned int key = (head_keys[p] - smallest_key) & mask;
    return key > prefix ? 2 : key == prefix ? 1 : 0;
  };
  unsigned int counts = 0;
  for (int p = own_first; p < own_end; ++p) {
    const int c = kind(p);
    counts += c == 2 ? 1u : c == 1 ? 0x10000u : 0u;
  }
  unsigned int total;
  const unsigned int before = fused_exclusive_scan(counts, warp_totals, total);
  unsigned int taken = before & 0xffffu, ties = before >> 16;
  for (int p = own_first; p < own_end; ++p) {
    const int c = kind(p);
    if (c == 2) selected[taken++ + min(ties, equal_quota)] = p;
    else if (c == 1 && ties < equal_quota) selected[taken + ties++] = p;
    else if (c == 1) ++ties;
  }
  __syncthreads();
  if (rows_out != nullptr && rank == 0)
    for (int i = threadIdx.x; i < k; i += kFusedThreads)
      rows_out[(int64_t)h * k + i] = selected[i] * num_kv_heads + kv_head;

  // Attention over this block's stretch of the selection, as sparse_decode's blocks do (logits in base 2)
  const int total_tokens = (k - 1) * page_size + last_len, slots = (k + blocks - 1) / blocks;
  const int begin = rank * slots * page_size, end = min(total_tokens, begin + slots * page_size);
  const auto row_of = [&](int slot) { return (int64_t)selected[slot] * num_kv_heads + kv_head; };
  attend_teams<T, kTeam, kGroup, kFusedThreads>(query + (int64_t)h * group * kDim, keys, values, row_of, group,
                                               page_size, begin, end, scale_log2, team_states);
  __syncthreads();
  // the teams' states merge into the block's, which goes to block 0's shared memory; block 0 merges the blocks'
  for (int index = threadIdx.x; index < group * kDim; index += kFusedThreads) {
    const int g = index / kDim, d = index % kDim;
    float largest, sum, output;
    merge_states<kDim>(team_states, kTeams, group, g, d, largest, sum, output);
    float* state = cluster.map_shared_rank(block_states, 0) + (rank * group + g) * kState;
    if (d == 0) {
      state[0] = largest;
      state[1] = sum;
    }
    state[2 + d] = output;
  }
  cluster.sync();  // every block's state is in block 0
  if (rank != 0) return;
  for (int index = threadIdx.x; index < group * kDim; index += kFusedThreads) {
    const int g = index / kDim, d = index % kDim;
    float largest, sum, output;  // block 0 has tokens
    merge_states<kDim>(block_states, blocks, group, g, d, largest, sum, output);
    out[((int64_t)h * group + g) * kDim + d] = from_float<T>(output / sum);
  }
}

// Allows `kernel` clusters of up to 16 blocks (Hopper's non-portable size; 8 without), once per (device, kernel), as
// allow_max_shared.
template <typename Kernel>
void allow_large_clusters(Kernel kernel, int device) {
  static std::unordered_map<int, std::unordered_set<const void*>> configured;  // device -> kernels
  std::lock_guard<std::mutex> lock(device_mutex());
  if (configured[device].insert(reinterpret_cast<const void*>(kernel)).second)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
}

// The blocks per head's cluster: at most one block per SM over all heads (like score_topk's spread), at most 16
// (Hopper's largest cluster, allowed per kernel), each with at least 32 pages to score.
int quest_decode_cluster(int num_sms, int heads, int64_t num_pages) {
  int blocks = std::max(1, std::min<int>({kFusedMaxCluster, num_sms / heads, (int)((num_pages + 31) / 32)}));
  int power = 1;
  while (power * 2 <= blocks) power *= 2;
  return power;
}

// query [Hkv, G, D]; bounds [Hkv, capacity, 2D]; keys, values [capacity, Hkv, P, D]; num_pages and last_len as
// score_topk's and sparse_decode's (with device_length, int64 [1], read on the GPU and num_pages a bound sizing the
// grid); k the pages read (the current one included), rule 0 sum, 1 max, 2 mass; rows_out int32 [Hkv, k] gets the
// one-head rows p * Hkv + h read, in page order (sinks first, the current page last). -> [Hkv, G, D].
torch::Tensor quest_decode(torch::Tensor query, torch::Tensor bounds, torch::Tensor keys, torch::Tensor values,
                           int64_t num_pages, int64_t k, double scale, int64_t last_len, torch::Tensor rows_out,
                           std::optional<torch::Tensor> device_length, int64_t rule, double mass_scale,
                           int64_t sink_pages) {
  TORCH_CHECK(query.is_cuda() && query.is_contiguous() && bounds.is_contiguous() && keys.is_contiguous() &&
              values.is_contiguous() && rows_out.is_contiguous() && rows_out.scalar_type() == at::kInt);
  TORCH_CHECK(keys.scalar_type() == at::kHalf || keys.scalar_type() == at::kBFloat16,
              "quest_decode takes float16 or bfloat16");
  TORCH_CHECK(query.scalar_type() == keys.scalar_type() && bounds.scalar_type() == keys.scalar_type() &&
              values.scalar_type() == keys.scalar_type());
  const int heads = query.size(0), group = query.size(1), head_dim = query.size(2), page_size = keys.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "quest_decode takes head_dim 64 or 128, got ", head_dim);
  TORCH_CHECK(group >= 1 && group <= 8, "quest_decode takes up to 8 query heads per KV head, got ", group);
  TORCH_CHECK(keys.size(1) == heads && bounds.size(0) == heads && bounds.size(2) == 2 * head_dim);
  TORCH_CHECK(rows_out.numel() == (int64_t)heads * k && k >= 2 && k < num_pages && num_pages <= bounds.size(1));
  TORCH_CHECK(rule == kSum || rule == kMax || rule == kMass, "rule: 0 sum, 1 max, 2 mass, got ", rule);
  TORCH_CHECK(sink_pages >= 0 && sink_pages <= k - 2);
  TORCH_CHECK(!device_length || (device_length->scalar_type() == at::kLong && device_length->numel() == 1));
  TORCH_CHECK(device_length || (last_len >= 1 && last_len <= page_size));
  TORCH_CHECK(num_pages <= 65535, "quest_decode counts pages in 16 bits");
  const int device = query.device().index();
  const DeviceLimits limits = device_limits(device);
  TORCH_CHECK(limits.major >= 9, "quest_decode needs thread-block clusters (compute capability 9.0)");
  const int blocks = quest_decode_cluster(limits.num_sms, heads, num_pages);
  const int pages_per_block = (int)((num_pages + blocks - 1) / blocks);
  const int team = head_dim / 8, teams = kFusedThreads / team, state = 2 + head_dim;
  const int query_rows = rule == kSum ? 1 : group;
  const int64_t selecting = (num_pages + 3) / 4 * 4 + kFirstBins, attending = (int64_t)teams * group * state;
  const int64_t words = query_rows * 2 * head_dim + (rule == kMass ? group * pages_per_block : 0) +
                        (int64_t)blocks * group * state + (k + 3) / 4 * 4 + std::max(selecting, attending);
  TORCH_CHECK(words * 4 <= limits.max_shared - 2048, "quest_decode: ", num_pages, " pages do not fit in shared memory");
  const int shared_bytes = (int)(words * 4);
  auto out = torch::empty_like(query);
  const c10::cuda::CUDAGuard guard(query.device());
  const float scale_log2 = (float)(scale * 1.4426950408889634);
  auto launch = [&](auto kernel, auto type_tag) {
    using T = decltype(type_tag);
    allow_max_shared(kernel, device, limits.max_shared);
    allow_large_clusters(kernel, device);
    launch_in_clusters(kernel, dim3(blocks, heads), blocks, kFusedThreads, shared_bytes, limits,
        reinterpret_cast<const T*>(query.data_ptr()), reinterpret_cast<const T*>(bounds.data_ptr()),
        (int64_t)bounds.size(1), reinterpret_cast<const T*>(keys.data_ptr()),
        reinterpret_cast<const T*>(values.data_ptr()), reinterpret_cast<T*>(out.data_ptr()),
        rows_out.data_ptr<int>(), group, (int)num_pages, (int)last_len,
        device_length ? device_length->data_ptr<int64_t>() : nullptr, page_size, (int)k, heads, pages_per_block,
        (int)num_pages, (int)rule, (float)mass_scale, scale_log2, (int)sink_pages);
  };
  dispatch_decode(keys.scalar_type(), head_dim, group, [&](auto type_tag, auto dim_tag, auto group_tag) {
    launch(quest_decode_kernel<decltype(type_tag), decltype(dim_tag)::value, decltype(group_tag)::value>, type_tag);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("append_kv", &append_kv, "write new K/V into their pages and fold them into the page bounds",
        py::arg("new_keys"), py::arg("new_values"), py::arg("keys"), py::arg("values"), py::arg("bounds"),
        py::arg("start"), py::arg("device_length") = py::none(), py::arg("bounds_table") = py::none(),
        py::arg("row_offsets") = py::none());
  m.def("score_topk", &score_topk, "score every full page and write the top pages' one-head rows, current last",
        py::arg("query"), py::arg("bounds"), py::arg("num_pages"), py::arg("k"), py::arg("scores"),
        py::arg("key_ranges"), py::arg("counters"), py::arg("out"), py::arg("device_length") = py::none(),
        py::arg("page_size") = 16, py::arg("rule") = 0, py::arg("group_scores") = py::none(),
        py::arg("mass_scale") = 1.0, py::arg("sink_pages") = 0, py::arg("bounds_table") = py::none());
  m.def("sparse_decode", &sparse_decode, "decode attention of each KV head's query group over its selected pages",
        py::arg("query"), py::arg("keys"), py::arg("values"), py::arg("rows"), py::arg("scale"), py::arg("last_len"),
        py::arg("partial_out"), py::arg("partial_state"), py::arg("counters"), py::arg("device_length") = py::none());
  m.def("quest_decode", &quest_decode, "score, select and attend over the selected pages in one kernel",
        py::arg("query"), py::arg("bounds"), py::arg("keys"), py::arg("values"), py::arg("num_pages"), py::arg("k"),
        py::arg("scale"), py::arg("last_len"), py::arg("rows_out"), py::arg("device_length") = py::none(),
        py::arg("rule") = 0, py::arg("mass_scale") = 1.0, py::arg("sink_pages") = 0);
}
