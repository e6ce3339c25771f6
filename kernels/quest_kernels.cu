// Quest's CUDA kernels. Each has a torch twin in quest_core that is its test oracle:
//   append_kv   <-> quest_core.paged_cache.PagedLayer.append (the torch path)
//   score_topk  <-> quest_core.selection.page_scores + select_pages
//
// Layouts (quest_core/paged_cache.py): keys, values [capacity, Hkv, P, D]; page_bounds [Hkv, capacity, 2D]
// (the page's key max, then its key min), in the KV dtype on the GPU.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

// ---- (a) KV append fused with the page min/max update ----
// Block (h, j) owns the j-th page that the new tokens touch, for KV head h; thread d owns element d. The block
// walks its tokens in order, so no two blocks touch one page's bounds: no atomics. Bounds are exact values of T
// (or +-inf), so the float round trip is exact.
template <typename T>
__global__ void append_kv_kernel(const T* __restrict__ new_keys, const T* __restrict__ new_values,
                                 T* __restrict__ keys, T* __restrict__ values, T* __restrict__ bounds,
                                 int64_t start, int num_new, int num_kv_heads, int page_size, int head_dim,
                                 int64_t capacity) {
  const int h = blockIdx.x, d = threadIdx.x;
  const int64_t page = start / page_size + blockIdx.y;
  const int64_t first = max(start, page * page_size), last = min(start + num_new, (page + 1) * page_size);
  if (first >= last || d >= head_dim) return;
  T* page_max = bounds + ((int64_t)h * capacity + page) * 2 * head_dim;
  T* page_min = page_max + head_dim;
  float kmax = to_float(page_max[d]), kmin = to_float(page_min[d]);
  for (int64_t t = first; t < last; ++t) {
    const int64_t src = ((int64_t)h * num_new + (t - start)) * head_dim + d;
    const int64_t dst = ((page * num_kv_heads + h) * page_size + (t - page * page_size)) * head_dim + d;
    const T k = new_keys[src];
    keys[dst] = k;
    values[dst] = new_values[src];
    kmax = fmaxf(kmax, to_float(k));
    kmin = fminf(kmin, to_float(k));
  }
  page_max[d] = from_float<T>(kmax);
  page_min[d] = from_float<T>(kmin);
}

void append_kv(torch::Tensor new_keys, torch::Tensor new_values, torch::Tensor keys, torch::Tensor values,
               torch::Tensor bounds, int64_t start) {
  TORCH_CHECK(keys.is_cuda() && keys.is_contiguous() && values.is_contiguous() && bounds.is_contiguous());
  TORCH_CHECK(new_keys.scalar_type() == keys.scalar_type() && bounds.scalar_type() == keys.scalar_type());
  new_keys = new_keys.contiguous();
  new_values = new_values.contiguous();
  const int num_kv_heads = keys.size(1), page_size = keys.size(2), head_dim = keys.size(3);
  const int num_new = new_keys.size(1);
  TORCH_CHECK(head_dim <= 1024 && (start + num_new + page_size - 1) / page_size <= keys.size(0));
  const c10::cuda::CUDAGuard guard(keys.device());
  const dim3 grid(num_kv_heads, (num_new + page_size - 2) / page_size + 1);  // pages a run of tokens can touch
  const int threads = (head_dim + 31) / 32 * 32;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kv_type(keys.scalar_type(), [&](auto type_tag) {
    using T = decltype(type_tag);
    append_kv_kernel<T><<<grid, threads, 0, stream>>>(
        reinterpret_cast<const T*>(new_keys.data_ptr()), reinterpret_cast<const T*>(new_values.data_ptr()),
        reinterpret_cast<T*>(keys.data_ptr()), reinterpret_cast<T*>(values.data_ptr()),
        reinterpret_cast<T*>(bounds.data_ptr()), start, num_new, num_kv_heads, page_size, head_dim,
        bounds.size(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- (b) page scoring fused with top-k selection ----
// Grid (Hkv, blocks per head). Every block scores a slice of the full pages of its KV head (a warp per page,
// lanes over d) into `scores`; the last block of a head to finish (a counter per head) then radix-selects the
// top k-1 and writes FlashInfer's one-head page rows p * Hkv + h, the current page last.
constexpr int kThreads = 512;
constexpr int kPagesPerWarp = 8;

__device__ __forceinline__ unsigned int order_key(float score) {  // larger float -> larger unsigned key
  const unsigned int bits = __float_as_uint(score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) score_topk_kernel(
    const T* __restrict__ query, const T* __restrict__ bounds, float* __restrict__ scores,
    unsigned int* __restrict__ counters, int32_t* __restrict__ out, int group, int head_dim, int64_t capacity,
    int num_pages, int k, int num_kv_heads) {
  extern __shared__ float split_query[];  // [2D]: sum over the group of relu(q), then of min(q, 0)
  __shared__ unsigned int histogram[256];
  __shared__ unsigned int shared_prefix, shared_remaining, taken_greater, taken_equal;
  __shared__ bool is_last;
  const int h = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float positive = 0.f, negative = 0.f;
    for (int g = 0; g < group; ++g) {
      const float q = to_float(query[((int64_t)h * group + g) * head_dim + d]);
      positive += fmaxf(q, 0.f);
      negative += fminf(q, 0.f);
    }
    split_query[d] = positive;
    split_query[head_dim + d] = negative;
  }
  __syncthreads();
  const int candidates = num_pages - 1;  // the full pages; the current page is always selected
  float* head_scores = scores + (int64_t)h * capacity;
  const int per_block = (kThreads / 32) * kPagesPerWarp;
  const int block_first = blockIdx.y * per_block;
  for (int p = block_first + warp; p < min(candidates, block_first + per_block); p += kThreads / 32) {
    const T* page = bounds + ((int64_t)h * capacity + p) * 2 * head_dim;
    float score = 0.f;
    for (int d = lane; d < 2 * head_dim; d += 32) score += split_query[d] * to_float(page[d]);
    for (int offset = 16; offset > 0; offset >>= 1) score += __shfl_xor_sync(0xffffffffu, score, offset);
    if (lane == 0) head_scores[p] = score;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&counters[h], 1u) == gridDim.y - 1;
  __syncthreads();
  if (!is_last) return;

  // Radix select, 8 bits at a time from the top: the key of the (k-1)-th largest score, and how many scores
  // equal to it to take.
  unsigned int prefix = 0, mask = 0;
  if (threadIdx.x == 0) shared_remaining = k - 1;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) histogram[b] = 0;
    __syncthreads();
    for (int p0 = 0; p0 < candidates; p0 += kThreads) {  // whole warps iterate together (for the shuffles)
      const int p = p0 + threadIdx.x;
      const unsigned int key = p < candidates ? order_key(__ldcg(head_scores + p)) : 0u;
      const bool counts = p < candidates && (key & mask) == prefix;
      // Scores share their top bits, so many lanes hit one bin: one atomic per distinct bin in the warp.
      const unsigned int bin = counts ? (key >> shift) & 255u : 256u;
      const unsigned int same = __match_any_sync(0xffffffffu, bin);
      if (counts && lane == __ffs(same) - 1) atomicAdd(&histogram[bin], __popc(same));
    }
    __syncthreads();
    if (warp == 0) {  // find the bin holding the remaining-th largest: lane l owns bins 255-8l .. 248-8l
      unsigned int counts[8], own = 0;
      for (int i = 0; i < 8; ++i) own += counts[i] = histogram[255 - 8 * lane - i];
      unsigned int above = own;  // inclusive scan from lane 0 (the top bins) upwards
      for (int offset = 1; offset < 32; offset <<= 1) {
        const unsigned int other = __shfl_up_sync(0xffffffffu, above, offset);
        if (lane >= offset) above += other;
      }
      above -= own;  // bins above this lane's
      const unsigned int remaining = shared_remaining;
      __syncwarp();  // every lane has read it before one lane rewrites it
      if (above < remaining && above + own >= remaining) {
        int i = 0;
        for (; above + counts[i] < remaining; ++i) above += counts[i];
        shared_remaining = remaining - above;
        shared_prefix = prefix | ((unsigned int)(255 - 8 * lane - i) << shift);
      }
    }
    __syncthreads();
    prefix = shared_prefix;
    mask |= 255u << shift;
  }
  if (threadIdx.x == 0) {
    taken_greater = 0;
    taken_equal = 0;
  }
  __syncthreads();
  const unsigned int equal_quota = shared_remaining, greater = (k - 1) - equal_quota;
  int32_t* head_out = out + (int64_t)h * k;
  for (int p = threadIdx.x; p < candidates; p += kThreads) {
    const unsigned int key = order_key(__ldcg(head_scores + p));
    if (key > prefix) {
      head_out[atomicAdd(&taken_greater, 1u)] = p * num_kv_heads + h;
    } else if (key == prefix) {
      const unsigned int slot = atomicAdd(&taken_equal, 1u);
      if (slot < equal_quota) head_out[greater + slot] = p * num_kv_heads + h;
    }
  }
  if (threadIdx.x == 0) {
    head_out[k - 1] = (num_pages - 1) * num_kv_heads + h;
    counters[h] = 0;  // ready for the next call
  }
}

void score_topk(torch::Tensor query, torch::Tensor bounds, int64_t num_pages, int64_t k, torch::Tensor scores,
                torch::Tensor counters, torch::Tensor out) {
  TORCH_CHECK(query.is_cuda() && bounds.is_contiguous() && scores.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(query.scalar_type() == bounds.scalar_type() && scores.scalar_type() == at::kFloat);
  TORCH_CHECK(out.scalar_type() == at::kInt && counters.scalar_type() == at::kInt);
  TORCH_CHECK(k >= 2 && k < num_pages && num_pages <= bounds.size(1) && scores.size(1) >= bounds.size(1));
  query = query.contiguous();
  const int num_kv_heads = query.size(0), group = query.size(1), head_dim = query.size(2);
  const int per_block = (kThreads / 32) * kPagesPerWarp;
  const c10::cuda::CUDAGuard guard(query.device());
  const dim3 grid(num_kv_heads, (num_pages - 1 + per_block - 1) / per_block);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kv_type(query.scalar_type(), [&](auto type_tag) {
    using T = decltype(type_tag);
    score_topk_kernel<T><<<grid, kThreads, 2 * head_dim * sizeof(float), stream>>>(
        reinterpret_cast<const T*>(query.data_ptr()), reinterpret_cast<const T*>(bounds.data_ptr()),
        scores.data_ptr<float>(), reinterpret_cast<unsigned int*>(counters.data_ptr<int>()),
        out.data_ptr<int>(), group, head_dim, bounds.size(1), num_pages, k, num_kv_heads);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("append_kv", &append_kv, "write new K/V into their pages and fold them into the page bounds");
  m.def("score_topk", &score_topk, "score every full page and write the top pages' one-head rows, current last");
}
