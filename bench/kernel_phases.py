"""Where our Quest kernels' time goes, phase by phase: timers (the SM's clock64, and %globaltimer across blocks)
inserted by thread 0 of each block into a copy of kernels/quest_kernels.cu, built as a module of its own, then one
call of score_topk, of sparse_decode and (for at most 4 KV heads, on Hopper) of quest_decode per shape after a
warm-up, its data flushed from L2. Phases are in microseconds at 1.98 GHz (the H200's SM clock; the globaltimer
totals check it). On a GPU: `python bench/kernel_phases.py`; each insertion point is asserted, so a change to the
kernels that moves one fails here first.

score_topk: split query (the query's split rows into shared memory), scored (this block's pages), mass, key range
(rule mass: the block's softmax states, the wait for the head's other blocks, its pages' mass; the key range folded),
is last (the fence and the head's counter), clear (the histogram cleared), histogram (the first radix digit over every
candidate), find_bin, sweep 2 (the pages above the threshold bin out, the bin's to a list), list rank.
sparse_decode: a block's query and tokens, its teams' merge and partial write, then the last block's fence, weights
and merged output.
quest_decode (the one kernel): ONE_KERNEL_PHASES, the median over a head's blocks (block 0 for its output)."""
import os
import sys
from functools import partial
from pathlib import Path

import torch
from torch.utils.cpp_extension import load as build

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from quest_core import kernels  # noqa: E402
from quest_core.paged_cache import PagedLayer  # noqa: E402

DTYPE = torch.bfloat16
CLOCK_GHZ = 1.98
SHAPES = [  # name, KV heads, group, head_dim, page, rule, context, budget
    ("Llama-3.1-8B heads 8K", 8, 4, 128, 16, "sum", 8192, 2048),
    ("Llama-3.1-8B heads 32K", 8, 4, 128, 16, "sum", 32768, 2048),
    ("Llama-3.1-8B heads 128K", 8, 4, 128, 16, "sum", 131072, 2048),
    ("Llama-2-7B heads 32K", 32, 1, 128, 16, "sum", 32768, 2048),
    ("SmolLM2-135M heads 8K", 3, 3, 64, 4, "mass", 8192, 1024)]
SCORE_PHASES = ["split query", "scored", "mass, key range", "is last", "clear", "histogram", "find_bin", "sweep 2",
                "list rank"]

TIMERS = '''
__device__ unsigned long long g_trace[8192 * 20];
__device__ __forceinline__ void trace_mark(int i) {
  if (threadIdx.x == 0) {
    unsigned long long t, c = clock64();
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    const int b = blockIdx.x * gridDim.y + blockIdx.y;
    g_trace[b * 20 + i] = t;
    g_trace[b * 20 + 10 + i] = c;
  }
}
torch::Tensor read_trace() {
  auto out = torch::empty({8192 * 20}, torch::kLong);
  C10_CUDA_CHECK(cudaMemcpyFromSymbol(out.data_ptr(), g_trace, sizeof(unsigned long long) * 8192 * 20));
  return out;
}
void clear_trace() {
  static unsigned long long zeros[8192 * 20] = {};
  C10_CUDA_CHECK(cudaMemcpyToSymbol(g_trace, zeros, sizeof(zeros)));
}
'''

def mark(i, sync=False, indent=2):
    return " " * indent + ("__syncthreads(); " if sync else "") + f"trace_mark({i});\n"


# (text before the timer, text after it, the timer): each pair must occur once in the kernels
MARKS = [
    # score_topk
    ("  const int request = h / num_kv_heads, kv_head = h % num_kv_heads;  // request 0 without a bounds table\n", "",
     mark(0)),
    ("h, rule, group, head_dim, split_query);\n  __syncthreads();\n", "", mark(1)),
    ("", "  // Rule mass: the block's softmax states to the block states", mark(2, sync=True)),
    ("", "  __threadfence();\n  __syncthreads();\n"
         "  if (threadIdx.x == 0) is_last = atomicAdd(&counters[h], 1u) == (rule == kMass", mark(3, sync=True)),
    ("  if (!is_last) return;\n", "\n  // The last block of head h: every", mark(4)),
    ("  unsigned int keys[kHeldKeys];\n", "", mark(5, sync=True)),
    ("  __syncthreads();\n", "  find_bin(histogram, kFirstBins", mark(6)),
    ("  const unsigned int first_digit = found_bin;\n", "", mark(7)),
    ("  __syncthreads();\n", "  if (threadIdx.x == 0) head_out[k - 1]", mark(8)),
    ("num_kv_heads + kv_head;\n    }\n", "    return;\n  }\n  // without the list", mark(9, sync=True, indent=4)),
    # sparse_decode
    ("  const int32_t* head_rows = rows + (int64_t)h * k;\n", "", mark(0)),
    ("", "  __syncthreads();\n  // the block's teams merge", mark(2, sync=True)),
    ("", "  if (splits == 1) return;\n  __threadfence();", mark(3, sync=True)),
    ("", "  float* weights = team_states;  // [group, splits]\n", mark(4)),
    ("* inverse_sum;\n  }\n  __syncthreads();\n", "", mark(5)),
    ("  if (threadIdx.x == 0) counters[h] = 0;\n", "}\n", mark(6, sync=True)),
    # quest_decode (one kernel)
    ("  auto started = cluster.barrier_arrive();  // every block of the cluster runs before one writes into another\n",
     "", mark(0)),
    ("  cluster.barrier_wait(std::move(started));\n", "", mark(1)),
    ("", "  low = warp_min(low);  // each warp's key range, into every block", mark(2, sync=True)),
    ("  cluster.sync();  // every block's keys and key ranges are written\n", "", mark(3)),
    ("  const unsigned int equal_quota = remaining;\n", "", mark(4)),
    ("", "  if (rows_out != nullptr && rank == 0)", mark(5)),
    ("", "  // the teams' states merge into the block's", mark(6, sync=True)),
    ("  cluster.sync();  // every block's state is in block 0\n", "", mark(7)),
    ("    out[((int64_t)h * group + g) * kDim + d] = from_float<T>(output / sum);\n  }\n", "}\n", mark(8, sync=True)),
]
ONE_KERNEL_PHASES = ["started, split query", "scored (rule mass: and the softmax states' barrier)",
                     "keys and key ranges written, barrier", "selection", "page list", "attention",
                     "states to block 0, barrier", "block 0's output"]


def timed_source() -> str:
    """kernels/quest_kernels.cu with the timers in."""
    source = kernels.SOURCE.read_text()
    for before, after, timer in MARKS:
        assert source.count(before + after) == 1, f"kernel_phases: no single place for a timer at {before + after!r}"
        source = source.replace(before + after, before + timer + after)
    source = source.replace("// ---- (a) KV append", TIMERS + "\n// ---- (a) KV append", 1)
    module_start = "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n"
    source = source.replace(module_start, module_start + '  m.def("read_trace", &read_trace);\n'
                            '  m.def("clear_trace", &clear_trace);\n')
    return source


def build_module():
    path = Path("/tmp/quest_kernels_phases.cu")
    path.write_text(timed_source())
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    return build(name="quest_kernels_phases", sources=[str(path)], extra_cuda_cflags=["-O3"], extra_cflags=["-O3"])


def traced(module, call, flush):
    """Warm up, then one call with the timers cleared, its data out of L2 (a read of `flush`, 4x the L2 cache, between:
    a decode step reads each layer's cache once, from DRAM; called again and again, a layer's bounds come from L2, and
    the runs before 2026-12-02 timed the scoring so. A read, not a write: a written flush leaves L2 full of dirty lines,
    whose write-back to DRAM would share the call's bandwidth):
    [blocks that ran, 20] (globaltimer ns 0-9, clock64 10-19)."""
    for _ in range(20):
        call()
    flush.amax()
    torch.cuda.synchronize()
    module.clear_trace()
    call()
    torch.cuda.synchronize()
    trace = module.read_trace().view(-1, 20)
    return trace[trace[:, 0] > 0]


def us(cycles):
    return (cycles.double() / (CLOCK_GHZ * 1e3)).mean().item()


def main():
    module = build_module()
    l2_bytes = torch.cuda.get_device_properties().L2_cache_size
    flush = torch.ones(4 * l2_bytes // 4, dtype=torch.float32, device="cuda")  # 4x the L2 cache, 4 bytes an element
    for name, num_kv_heads, group, head_dim, page, rule, context, budget in SHAPES:
        layer = PagedLayer(page, block_pages=1024, kernels=module)
        for start in range(0, context, 8192):
            n = min(8192, context - start)
            layer.update(torch.randn(1, num_kv_heads, n, head_dim, device="cuda", dtype=DTYPE),
                         torch.randn(1, num_kv_heads, n, head_dim, device="cuda", dtype=DTYPE))
        query = torch.randn(num_kv_heads, group, head_dim, device="cuda", dtype=DTYPE)
        scorer, decoder = kernels.ScoreTopK(module), kernels.SparseDecode(module)
        k = -(-budget // page)
        rows = torch.empty(num_kv_heads, k, dtype=torch.int32, device="cuda")
        t = traced(module, partial(scorer, query, layer.page_bounds, layer.num_pages, k, rows, group_rule=rule), flush)
        last = t[t[:, 4] > 0]  # the last block of each head, which selects
        start = t[:, 0].min()
        phases = [us((last[:, 11 + i] - last[:, 10 + i]).clamp(min=0)) for i in range(len(SCORE_PHASES))]
        print(f"{name}, budget {budget}: score_topk over {layer.num_pages} pages, k {k}, {t.shape[0]} blocks; "
              f"every block scored by {(t[:, 2] - start).max().item() / 1e3:.2f} us, the last block done at "
              f"{(last[:, 8:10].amax(1) - start).max().item() / 1e3:.2f} us (globaltimer); the last block's phases "
              f"(us): " + ", ".join(f"{p} {v:.2f}" for p, v in zip(SCORE_PHASES, phases)))
        for attention_budget in (512, 2048):
            k = -(-attention_budget // page)
            rows = torch.empty(num_kv_heads, k, dtype=torch.int32, device="cuda")
            scorer(query, layer.page_bounds, layer.num_pages, k, rows, group_rule=rule)
            attend = partial(decoder, query, layer.keys, layer.values, rows, head_dim ** -0.5, context)
            t = traced(module, attend, flush)
            last, start = t[t[:, 4] > 0], t[:, 0].min()
            print(f"    sparse_decode, budget {attention_budget}: {t.shape[0]} blocks; a block's query and tokens "
                  f"{us(t[:, 12] - t[:, 10]):.2f} us, its teams' merge and partial write {us(t[:, 13] - t[:, 12]):.2f} "
                  f"us, every block's partials written by {(t[:, 3] - start).max().item() / 1e3:.2f} us; the last "
                  f"block's fence {us(last[:, 14] - last[:, 13]):.2f}, weights {us(last[:, 15] - last[:, 14]):.2f}, "
                  f"output {us(last[:, 16] - last[:, 15]):.2f} us, done at "
                  f"{(last[:, 6] - start).max().item() / 1e3:.2f} us")
        if num_kv_heads > 4 or torch.cuda.get_device_capability()[0] < 9:
            continue  # the flashinfer backend runs the one kernel for layers of at most 4 KV heads (Hopper)
        k = -(-budget // page)
        rows = torch.empty(num_kv_heads, k, dtype=torch.int32, device="cuda")
        t = traced(module, partial(kernels.quest_decode, module, query, layer.page_bounds, layer.keys, layer.values,
                                   layer.num_pages, k, rows, head_dim ** -0.5, context, group_rule=rule), flush)
        phases = [(t[:, 11 + i] - t[:, 10 + i]).clamp(min=0) for i in range(len(ONE_KERNEL_PHASES))]
        phases[-1] = phases[-1][t[:, 8] > 0]  # block 0 of each head writes the output
        print(f"    quest_decode (one kernel), budget {budget}: {t.shape[0]} blocks, done at "
              f"{(t[:, 8].max() - t[:, 0].min()).item() / 1e3:.2f} us (globaltimer); phases (us, median over blocks): "
              + ", ".join(f"{p} {p_us:.2f}" for p, p_us in zip(ONE_KERNEL_PHASES, (
                  c.double().median().item() / (CLOCK_GHZ * 1e3) for c in phases))))


if __name__ == "__main__":
    main()
