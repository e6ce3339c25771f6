// The floor of Quest's decode reads on this GPU, measured instead of computed from the copy bandwidth: kernels that
// read exactly the bytes Quest's kernels read, a layer's page bounds and then the selected pages' K and V rows, with
// the dependency between the two (two kernels, the second a programmatic dependent as sparse_decode is; or one
// kernel whose blocks wait for their head's other blocks between the two reads), and that compute nothing but an
// XOR of what they read, so that no load can be dropped (bench/read_floor.py checks each XOR against torch's).
// For bench/read_floor.py only; Quest's own kernels are kernels/quest_kernels.cu.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

constexpr int kInFlight = 4;  // 16-byte loads in flight a thread (Quest's scorer: 4 pages a team)

__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ uint4 xor4(uint4 a, uint4 b) {
  return make_uint4(a.x ^ b.x, a.y ^ b.y, a.z ^ b.z, a.w ^ b.w);
}

// The block's XOR into sink [kSinkSlots, 4], slot = the block's index % kSinkSlots: one atomic a word and block,
// spread over slots. (An atomic a warp on one slot's 4 words queued behind each other: on the H200 the bounds' read
// at the paper's shape took 14.2 us so, 9.7 this way.)
constexpr int kSinkSlots = 64;
__device__ void fold(uint4 value, unsigned int* sink) {
  __shared__ uint4 warp_values[32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    value.x ^= __shfl_xor_sync(0xffffffffu, value.x, offset);
    value.y ^= __shfl_xor_sync(0xffffffffu, value.y, offset);
    value.z ^= __shfl_xor_sync(0xffffffffu, value.z, offset);
    value.w ^= __shfl_xor_sync(0xffffffffu, value.w, offset);
  }
  if (threadIdx.x % 32 == 0) warp_values[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < blockDim.x / 32; ++w) value = xor4(value, warp_values[w]);
    unsigned int* slot = sink + 4 * ((blockIdx.y * gridDim.x + blockIdx.x) % kSinkSlots);
    atomicXor(slot, value.x);
    atomicXor(slot + 1, value.y);
    atomicXor(slot + 2, value.z);
    atomicXor(slot + 3, value.w);
  }
}

// The block's share [begin, end) of one head's page bounds, read as 16-byte vectors.
__device__ uint4 read_bounds_share(const uint4* head_bounds, int64_t used_vectors) {
  const int64_t share = (used_vectors + gridDim.y - 1) / gridDim.y;
  const int64_t begin = blockIdx.y * share, end = min(used_vectors, begin + share);
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int64_t base = begin + threadIdx.x; base < end; base += (int64_t)blockDim.x * kInFlight) {
    uint4 loaded[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int64_t i = base + (int64_t)u * blockDim.x;
      loaded[u] = i < end ? __ldg(head_bounds + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) acc = xor4(acc, loaded[u]);
  }
  return acc;
}

// The block's share of one head's k selected pages (one-head rows: row r is `page_vectors` vectors at r *
// page_vectors of the cache read as [pages * Hkv, P, D]), their keys and values.
__device__ uint4 read_pages_share(const uint4* keys, const uint4* values, const int* head_rows, int k,
                                  int page_vectors) {
  const int share = (k + gridDim.y - 1) / gridDim.y;
  const int first = blockIdx.y * share, count = max(0, min(k, first + share) - first);
  const int64_t vectors = (int64_t)count * page_vectors;
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int64_t base = threadIdx.x; base < vectors; base += (int64_t)blockDim.x * kInFlight) {
    uint4 loaded[2 * kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int64_t i = base + (int64_t)u * blockDim.x;
      loaded[2 * u] = loaded[2 * u + 1] = make_uint4(0, 0, 0, 0);
      if (i < vectors) {
        const int64_t at = (int64_t)__ldg(head_rows + first + i / page_vectors) * page_vectors + i % page_vectors;
        loaded[2 * u] = __ldg(keys + at);
        loaded[2 * u + 1] = __ldg(values + at);
      }
    }
#pragma unroll
    for (int u = 0; u < 2 * kInFlight; ++u) acc = xor4(acc, loaded[u]);
  }
  return acc;
}

// Grid (Hkv, blocks a head). bounds [Hkv, capacity, 2D] as head_vectors vectors a head, the first used_vectors read.
__global__ void read_bounds_kernel(const uint4* bounds, int64_t head_vectors, int64_t used_vectors,
                                   unsigned int* sink) {
  wait_for_previous_kernel();
  fold(read_bounds_share(bounds + blockIdx.x * head_vectors, used_vectors), sink);
}

// Grid (Hkv, splits). rows [Hkv, k].
__global__ void read_pages_kernel(const uint4* keys, const uint4* values, const int* rows, int k, int page_vectors,
                                  unsigned int* sink) {
  wait_for_previous_kernel();
  fold(read_pages_share(keys, values, rows + blockIdx.x * k, k, page_vectors), sink);
}

// Both in one grid (Hkv, blocks a head), all resident at once: each block reads its share of its head's bounds, waits
// until the head's blocks all have (counters [Hkv, 2]: arrived, left; zeros, left so), then reads its share of the
// head's selected pages.
__global__ void read_chain_kernel(const uint4* bounds, int64_t head_vectors, int64_t used_vectors, const uint4* keys,
                                  const uint4* values, const int* rows, int k, int page_vectors,
                                  unsigned int* counters, unsigned int* sink) {
  wait_for_previous_kernel();
  const int h = blockIdx.x;
  uint4 acc = read_bounds_share(bounds + h * head_vectors, used_vectors);
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int* arrived = counters + 2 * h;
    __threadfence();
    atomicAdd(arrived, 1u);
    while (atomicAdd(arrived, 0u) < gridDim.y) {}
    if (atomicAdd(arrived + 1, 1u) == gridDim.y - 1) arrived[0] = arrived[1] = 0;  // the last to leave
  }
  __syncthreads();
  fold(xor4(acc, read_pages_share(keys, values, rows + h * k, k, page_vectors)), sink);
}

template <typename... Parameters, typename... Arguments>
void launch(void (*kernel)(Parameters...), dim3 grid, int threads, Arguments... arguments) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.stream = c10::cuda::getCurrentCUDAStream();
  config.attrs = &attribute;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Parameters>(arguments)...));
}

const uint4* vectors(const torch::Tensor& t) { return reinterpret_cast<const uint4*>(t.data_ptr()); }
unsigned int* words(torch::Tensor& t) { return reinterpret_cast<unsigned int*>(t.data_ptr<int32_t>()); }

// bounds [Hkv, capacity, 2D] (16-bit), its first num_pages pages a head; sink int32 [kSinkSlots, 4]
void read_bounds(torch::Tensor bounds, int64_t num_pages, int64_t blocks_per_head, int64_t threads,
                 torch::Tensor sink) {
  const c10::cuda::CUDAGuard guard(bounds.device());
  const int64_t page_vectors = bounds.size(2) * 2 / 16;
  launch(read_bounds_kernel, dim3(bounds.size(0), blocks_per_head), threads, vectors(bounds),
         bounds.size(1) * page_vectors, num_pages * page_vectors, words(sink));
}

// keys, values [capacity, Hkv, P, D] (16-bit); rows int32 [Hkv, k], one-head rows p * Hkv + h
void read_pages(torch::Tensor keys, torch::Tensor values, torch::Tensor rows, int64_t splits, int64_t threads,
                torch::Tensor sink) {
  const c10::cuda::CUDAGuard guard(keys.device());
  launch(read_pages_kernel, dim3(rows.size(0), splits), threads, vectors(keys), vectors(values),
         rows.data_ptr<int32_t>(), (int)rows.size(1), (int)(keys.size(2) * keys.size(3) * 2 / 16), words(sink));
}

// The blocks a multiprocessor holds at once of read_chain_kernel at `threads` threads.
int64_t chain_blocks_per_sm(int64_t threads) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, read_chain_kernel, threads, 0));
  return blocks;
}

// read_bounds then read_pages as one kernel; counters int32 [Hkv, 2] zeros. The grid must be resident at once.
void read_chain(torch::Tensor bounds, int64_t num_pages, torch::Tensor keys, torch::Tensor values, torch::Tensor rows,
                int64_t blocks_per_head, int64_t threads, torch::Tensor counters, torch::Tensor sink) {
  const c10::cuda::CUDAGuard guard(bounds.device());
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, bounds.get_device()));
  TORCH_CHECK(bounds.size(0) * blocks_per_head <= sms * chain_blocks_per_sm(threads),
              "read_chain: the grid must be resident at once");
  const int64_t page_vectors = bounds.size(2) * 2 / 16;
  launch(read_chain_kernel, dim3(bounds.size(0), blocks_per_head), threads, vectors(bounds),
         bounds.size(1) * page_vectors, num_pages * page_vectors, vectors(keys), vectors(values),
         rows.data_ptr<int32_t>(), (int)rows.size(1), (int)(keys.size(2) * keys.size(3) * 2 / 16), words(counters),
         words(sink));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("sink_slots") = kSinkSlots;
  m.def("read_bounds", &read_bounds);
  m.def("read_pages", &read_pages);
  m.def("read_chain", &read_chain);
  m.def("chain_blocks_per_sm", &chain_blocks_per_sm);
}
