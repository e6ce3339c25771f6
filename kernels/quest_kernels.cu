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

// ---- (a) KV append fused with the page min/max update ----
// Block (h, j) owns the j-th page that the new tokens touch, for KV head h; thread d owns element d. The block
// walks its tokens in order, so no two blocks touch one page's bounds: no atomics. Bounds are exact values of T
// (or +-inf), so the float round trip is exact. The new tokens start at `start`, or, when `device_length` is
// given (a captured CUDA graph), at device_length[0] - num_new: the cache length after the append, on the GPU.
template <typename T>
__global__ void append_kv_kernel(const T* __restrict__ new_keys, const T* __restrict__ new_values,
                                 T* __restrict__ keys, T* __restrict__ values, T* __restrict__ bounds,
                                 int64_t start, const int64_t* __restrict__ device_length, int num_new,
                                 int num_kv_heads, int page_size, int head_dim, int64_t capacity) {
  const int h = blockIdx.x, d = threadIdx.x;
  if (device_length != nullptr) start = device_length[0] - num_new;
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
               torch::Tensor bounds, int64_t start, std::optional<torch::Tensor> device_length) {
  TORCH_CHECK(keys.is_cuda() && keys.is_contiguous() && values.is_contiguous() && bounds.is_contiguous());
  TORCH_CHECK(new_keys.scalar_type() == keys.scalar_type() && bounds.scalar_type() == keys.scalar_type());
  TORCH_CHECK(!device_length || device_length->scalar_type() == at::kLong);
  new_keys = new_keys.contiguous();
  new_values = new_values.contiguous();
  const int num_kv_heads = keys.size(1), page_size = keys.size(2), head_dim = keys.size(3);
  const int num_new = new_keys.size(1);
  TORCH_CHECK(head_dim <= 1024 && (device_length || (start + num_new + page_size - 1) / page_size <= keys.size(0)));
  const c10::cuda::CUDAGuard guard(keys.device());
  const dim3 grid(num_kv_heads, (num_new + page_size - 2) / page_size + 1);  // pages a run of tokens can touch
  const int threads = (head_dim + 31) / 32 * 32;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kv_type(keys.scalar_type(), [&](auto type_tag) {
    using T = decltype(type_tag);
    append_kv_kernel<T><<<grid, threads, 0, stream>>>(
        reinterpret_cast<const T*>(new_keys.data_ptr()), reinterpret_cast<const T*>(new_values.data_ptr()),
        reinterpret_cast<T*>(keys.data_ptr()), reinterpret_cast<T*>(values.data_ptr()),
        reinterpret_cast<T*>(bounds.data_ptr()), start,
        device_length ? device_length->data_ptr<int64_t>() : nullptr, num_new, num_kv_heads, page_size, head_dim,
        bounds.size(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- (b) page scoring fused with top-k selection ----
// Grid (Hkv, blocks per head), 256 threads. Scoring: a team of lanes (up to a warp) per page reads the page's
// bounds in 16-byte vectors against the group's split query held in registers, four pages in flight per team;
// scores go to `scores`, and each block adds its pages' top 12 key bits to a histogram per head (`histograms`):
// the first pass of the radix select, done in parallel. The last block of a head to finish (a counter per head)
// finishes the radix select (12, then 8 more bits: the key of the (k-1)-th largest score and how many equal to
// it to take) in one sweep over the scores and writes FlashInfer's one-head page rows p * Hkv + h, the current
// page last. It leaves the counter and the histogram zeroed for the next call.
constexpr int kThreads = 256;
constexpr int kUnroll = 4;        // pages in flight per team
constexpr int kMaxChunks = 4;     // 16-byte vectors per lane and page: 2D <= 4 * 32 * (16 / sizeof(T))
constexpr int kFirstBits = 12;    // radix digits: bits 31-20, 19-8, 7-0 of the order key
constexpr int kFirstBins = 1 << kFirstBits;
constexpr int kSweepBatch = 8;   // scores each thread loads at once in the top-k sweep

__device__ __forceinline__ unsigned int order_key(float score) {  // larger float -> larger unsigned key
  const unsigned int bits = __float_as_uint(score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Adds one to histogram[bin] for each lane with counts == true; lanes hitting one bin share a single atomic.
// Every lane of the warp must call it.
__device__ __forceinline__ void add_to_bin(unsigned int* histogram, unsigned int bin, bool counts) {
  const unsigned int key = counts ? bin : 0xffffffffu;
  const unsigned int same = __match_any_sync(0xffffffffu, key);
  if (counts && (threadIdx.x % 32) == __ffs(same) - 1) atomicAdd(&histogram[bin], __popc(same));
}

// The bin holding the remaining-th largest key (counting from the top bin down) of a block-wide histogram, and
// how many keys of that bin are still to take. Thread t owns bins nbins-1-t*per ... nbins-(t+1)*per.
__device__ void find_bin(const unsigned int* histogram, int nbins, unsigned int* warp_totals,
                         unsigned int* found_bin, unsigned int* remaining) {
  const int per = nbins / kThreads, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int top = nbins - 1 - threadIdx.x * per;
  unsigned int own = 0;
  for (int i = 0; i < per; ++i) own += histogram[top - i];
  unsigned int above = own;  // inclusive scan over threads, from the top bins down
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned int other = __shfl_up_sync(0xffffffffu, above, offset);
    if (lane >= offset) above += other;
  }
  if (lane == 31) warp_totals[warp] = above;
  __syncthreads();
  const unsigned int want = *remaining;
  for (int w = 0; w < warp; ++w) above += warp_totals[w];
  above -= own;  // keys in the bins above this thread's
  __syncthreads();  // every thread has read `remaining` before one rewrites it
  if (above < want && above + own >= want) {
    int i = 0;
    for (; above + histogram[top - i] < want; ++i) above += histogram[top - i];
    *found_bin = top - i;
    *remaining = want - above;
  }
  __syncthreads();
}

template <typename T, int kChunks>  // kChunks: 16-byte vectors per lane and page (1, 2 or 4)
__global__ void __launch_bounds__(kThreads) score_topk_kernel(
    const T* __restrict__ query, const T* __restrict__ bounds, float* __restrict__ scores,
    unsigned int* __restrict__ histograms, unsigned int* __restrict__ counters, int32_t* __restrict__ out,
    int group, int head_dim, int64_t capacity, int num_pages, const int64_t* __restrict__ device_length,
    int page_size, int k, int num_kv_heads, int pages_per_block, int list_capacity) {
  constexpr int kVec = 16 / sizeof(T);
  // Shared: the split query [2D] (float), the histogram [4096], the threshold bin's keys and pages [list_capacity]
  extern __shared__ float shared[];
  float* split_query = shared;
  unsigned int* histogram = reinterpret_cast<unsigned int*>(shared + 2 * head_dim);
  unsigned int* list_keys = histogram + kFirstBins;
  int* list_pages = reinterpret_cast<int*>(list_keys + list_capacity);
  __shared__ unsigned int warp_totals[kThreads / 32];
  __shared__ unsigned int found_bin, remaining, taken_greater, taken_equal, list_length;
  __shared__ bool is_last;
  const int h = blockIdx.x;
  if (device_length != nullptr) num_pages = (int)((device_length[0] + page_size - 1) / page_size);
  const int candidates = num_pages - 1;  // the full pages; the current page is always selected

  for (int d = threadIdx.x; d < head_dim; d += kThreads) {  // sum over the group of relu(q), then of min(q, 0)
    float positive = 0.f, negative = 0.f;
    for (int g = 0; g < group; ++g) {
      const float q = to_float(query[((int64_t)h * group + g) * head_dim + d]);
      positive += fmaxf(q, 0.f);
      negative += fminf(q, 0.f);
    }
    split_query[d] = positive;
    split_query[head_dim + d] = negative;
  }
  for (int b = threadIdx.x; b < kFirstBins; b += kThreads) histogram[b] = 0;
  __syncthreads();

  // Scoring. A team of `team` lanes (a power of two, within one warp) scores one page; lane j of a team holds
  // vectors j, j + team, ... of the split query.
  const int num_vectors = 2 * head_dim / kVec;
  const int team = num_vectors >= 32 ? 32 : 1 << (32 - __clz(num_vectors - 1));
  const int member = threadIdx.x % team, team_index = threadIdx.x / team, teams = kThreads / team;
  float q[kChunks][kVec];
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int v = member + c * team;
      q[c][i] = v < num_vectors ? split_query[v * kVec + i] : 0.f;
    }
  float* head_scores = scores + (int64_t)h * capacity;
  unsigned int* head_histogram = histograms + (int64_t)h * kFirstBins;
  const int block_first = blockIdx.y * pages_per_block;
  const int block_end = min(candidates, block_first + pages_per_block);
  for (int base = block_first; base < block_first + pages_per_block; base += kUnroll * teams) {
    uint4 loaded[kUnroll][kChunks];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = base + u * teams + team_index;
      const uint4* page = reinterpret_cast<const uint4*>(bounds + ((int64_t)h * capacity + p) * 2 * head_dim);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int v = member + c * team;
        loaded[u][c] = (p < block_end && v < num_vectors) ? __ldg(page + v) : make_uint4(0, 0, 0, 0);
      }
    }
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
      const bool valid = p < block_end && member == 0;
      if (valid) head_scores[p] = score;
      add_to_bin(histogram, order_key(score) >> (32 - kFirstBits), valid);
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kFirstBins; b += kThreads)
    if (histogram[b]) atomicAdd(&head_histogram[b], histogram[b]);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&counters[h], 1u) == gridDim.y - 1;
  __syncthreads();
  if (!is_last) return;

  // The last block of head h: every score and the first digit's histogram are in global memory now.
  for (int b = threadIdx.x; b < kFirstBins; b += kThreads) {
    histogram[b] = __ldcg(head_histogram + b);
    head_histogram[b] = 0;  // ready for the next call
  }
  if (threadIdx.x == 0) {
    remaining = k - 1;
    taken_greater = taken_equal = list_length = 0;
  }
  __syncthreads();
  find_bin(histogram, kFirstBins, warp_totals, &found_bin, &remaining);
  const unsigned int first_prefix = found_bin << 20, first_mask = 0xfff00000u;
  // One sweep over the scores: pages above the threshold bin are selected now; those in it (few, as a rule) go
  // to a list in shared memory, which the last two passes and the final pick then read. If they do not fit,
  // those steps sweep all scores again.
  const bool use_list = histogram[found_bin] <= (unsigned int)list_capacity;
  int32_t* head_out = out + (int64_t)h * k;
  for (int p0 = 0; p0 < candidates; p0 += kThreads * kSweepBatch) {
    unsigned int keys[kSweepBatch];  // loads first, all in flight together; then the atomics
#pragma unroll
    for (int j = 0; j < kSweepBatch; ++j) {
      const int p = p0 + j * kThreads + threadIdx.x;
      keys[j] = p < candidates ? order_key(__ldcg(head_scores + p)) : 0u;
    }
#pragma unroll
    for (int j = 0; j < kSweepBatch; ++j) {
      const int p = p0 + j * kThreads + threadIdx.x;
      if (p >= candidates) break;
      if ((keys[j] & first_mask) > first_prefix) {
        head_out[atomicAdd(&taken_greater, 1u)] = p * num_kv_heads + h;
      } else if (use_list && (keys[j] & first_mask) == first_prefix) {
        const unsigned int slot = atomicAdd(&list_length, 1u);
        list_keys[slot] = keys[j];
        list_pages[slot] = p;
      }
    }
  }
  __syncthreads();
  const int length = use_list ? (int)list_length : candidates;
  auto key_at = [&](int i) { return use_list ? list_keys[i] : order_key(__ldcg(head_scores + i)); };
  auto page_at = [&](int i) { return use_list ? list_pages[i] : i; };
  unsigned int prefix = first_prefix, mask = first_mask;
  const int shifts[2] = {8, 0}, bits[2] = {12, 8};
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    const int nbins = 1 << bits[pass];
    for (int b = threadIdx.x; b < nbins; b += kThreads) histogram[b] = 0;
    __syncthreads();
    for (int i0 = 0; i0 < length; i0 += kThreads) {  // whole warps iterate together (for add_to_bin)
      const int i = i0 + threadIdx.x;
      const unsigned int key = i < length ? key_at(i) : 0u;
      add_to_bin(histogram, (key >> shifts[pass]) & (nbins - 1), i < length && (key & mask) == prefix);
    }
    __syncthreads();
    find_bin(histogram, nbins, warp_totals, &found_bin, &remaining);
    prefix |= found_bin << shifts[pass];
    mask |= (unsigned int)(nbins - 1) << shifts[pass];
  }
  // `prefix` is now the key of the (k-1)-th largest score; take the keys above it and `remaining` equal to it.
  const unsigned int equal_quota = remaining, greater = (k - 1) - equal_quota;
  for (int i = threadIdx.x; i < length; i += kThreads) {
    const unsigned int key = key_at(i);
    if ((key & first_mask) != first_prefix) continue;  // (without the list) taken in the sweep, or below
    if (key > prefix) {
      head_out[atomicAdd(&taken_greater, 1u)] = page_at(i) * num_kv_heads + h;
    } else if (key == prefix) {
      const unsigned int slot = atomicAdd(&taken_equal, 1u);
      if (slot < equal_quota) head_out[greater + slot] = page_at(i) * num_kv_heads + h;
    }
  }
  if (threadIdx.x == 0) {
    head_out[k - 1] = (num_pages - 1) * num_kv_heads + h;
    counters[h] = 0;
  }
}

// num_pages: the pages in use (the last one is the current page), or, with `device_length`, an upper bound on
// them that sizes the grid (the kernel reads the length from the GPU: a captured CUDA graph).
void score_topk(torch::Tensor query, torch::Tensor bounds, int64_t num_pages, int64_t k, torch::Tensor scores,
                torch::Tensor histograms, torch::Tensor counters, torch::Tensor out,
                std::optional<torch::Tensor> device_length, int64_t page_size) {
  TORCH_CHECK(query.is_cuda() && bounds.is_contiguous() && scores.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(query.scalar_type() == bounds.scalar_type() && scores.scalar_type() == at::kFloat);
  TORCH_CHECK(out.scalar_type() == at::kInt && counters.scalar_type() == at::kInt);
  TORCH_CHECK(histograms.scalar_type() == at::kInt && histograms.numel() >= bounds.size(0) * kFirstBins);
  TORCH_CHECK(k >= 2 && k < num_pages && num_pages <= bounds.size(1) && scores.size(1) >= bounds.size(1));
  TORCH_CHECK(!device_length || device_length->scalar_type() == at::kLong);
  query = query.contiguous();
  const int num_kv_heads = query.size(0), group = query.size(1), head_dim = query.size(2);
  const int vector = 16 / query.element_size();
  TORCH_CHECK((2 * head_dim) % vector == 0 && 2 * head_dim <= kMaxChunks * 32 * vector,
              "score_topk takes an even head_dim (a multiple of 4 in 16-bit types) up to ", kMaxChunks * 16 * vector);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(bounds.data_ptr()) % 16 == 0);
  const int num_vectors = 2 * head_dim / vector;
  int team = 1;
  while (team < std::min(num_vectors, 32)) team *= 2;
  const int chunks = (num_vectors + team - 1) / team;
  static int max_shared = -1;
  if (max_shared < 0)
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          query.device().index()));
  const int pages_per_block = (kThreads / team) * kUnroll * 2;  // short blocks, many in flight
  const int blocks_per_head = std::max<int>(1, (num_pages - 1 + pages_per_block - 1) / pages_per_block);
  const int fixed = (2 * head_dim + kFirstBins) * 4;
  const int list_capacity = std::min<int>({2048, (int)(num_pages - 1), (max_shared - fixed - 1024) / 8});
  const int shared_bytes = fixed + 8 * list_capacity;
  const c10::cuda::CUDAGuard guard(query.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kv_type(query.scalar_type(), [&](auto type_tag) {
    using T = decltype(type_tag);
    auto launch = [&](auto kernel) {
      static std::unordered_set<const void*> configured;  // allow each kernel over 48 KB of shared memory, once
      if (!configured.count(reinterpret_cast<const void*>(kernel))) {
        cudaFuncAttributes attributes;
        C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            max_shared - (int)attributes.sharedSizeBytes));
        configured.insert(reinterpret_cast<const void*>(kernel));
      }
      kernel<<<dim3(num_kv_heads, blocks_per_head), kThreads, shared_bytes, stream>>>(
          reinterpret_cast<const T*>(query.data_ptr()), reinterpret_cast<const T*>(bounds.data_ptr()),
          scores.data_ptr<float>(), reinterpret_cast<unsigned int*>(histograms.data_ptr<int>()),
          reinterpret_cast<unsigned int*>(counters.data_ptr<int>()), out.data_ptr<int>(), group, head_dim,
          bounds.size(1), num_pages, device_length ? device_length->data_ptr<int64_t>() : nullptr, page_size, k,
          num_kv_heads, pages_per_block, list_capacity);
    };
    if (chunks == 1) launch(score_topk_kernel<T, 1>);
    else if (chunks == 2) launch(score_topk_kernel<T, 2>);
    else launch(score_topk_kernel<T, 4>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("append_kv", &append_kv, "write new K/V into their pages and fold them into the page bounds",
        py::arg("new_keys"), py::arg("new_values"), py::arg("keys"), py::arg("values"), py::arg("bounds"),
        py::arg("start"), py::arg("device_length") = py::none());
  m.def("score_topk", &score_topk, "score every full page and write the top pages' one-head rows, current last",
        py::arg("query"), py::arg("bounds"), py::arg("num_pages"), py::arg("k"), py::arg("scores"),
        py::arg("histograms"), py::arg("counters"), py::arg("out"), py::arg("device_length") = py::none(),
        py::arg("page_size") = 16);
}
