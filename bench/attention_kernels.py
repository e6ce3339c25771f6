"""Per-layer decode attention latency on the GPU, bf16: FlashInfer dense decode vs Quest's two kernels of ours
(fused score + top-k, sparse decode over the selected pages) and their total, eager and CUDA-graph replayed, beside
FlashInfer's stock sparse decode over the same pages and a bytes floor from the copy bandwidth measured in the same
run. Shapes (--shape):
    llama3-8b   Llama-3.1-8B heads (32 q / 8 kv, d 128), pages of 16, rule sum, 8K-128K   (section gpu_kernels)
    llama2-7b   Llama-2-7B heads (32 q / 32 kv, d 128), pages of 16, rule sum, 32K: the paper's configuration
    smollm2     SmolLM2-135M heads (9 q / 3 kv, d 64), pages of 4, rule mass, 8K: the app's default model

    python bench/attention_kernels.py --shape llama2-7b   # writes its section of bench/RESULTS.md
"""
import argparse
import itertools
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flashinfer  # noqa: E402

from bench.results import write_section  # noqa: E402
from quest_core import kernels  # noqa: E402
from quest_core.backend_flashinfer import ONE_KERNEL_KV_HEADS, use_tensor_cores  # noqa: E402
from quest_core.paged_cache import PagedLayer  # noqa: E402

DTYPE = torch.bfloat16


@dataclass
class Shape:
    title: str
    section: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page: int
    group_rule: str
    contexts: list = field(default_factory=list)
    budgets: list = field(default_factory=list)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def bounds_bytes(self, num_pages: int) -> int:
        """A layer's page bounds: a max and a min row per page and KV head, in bf16."""
        return num_pages * self.num_kv_heads * 2 * self.head_dim * 2

    def kv_bytes(self, tokens: int) -> int:
        """The K and V rows of `tokens` tokens of every KV head, in bf16."""
        return 2 * tokens * self.num_kv_heads * self.head_dim * 2


SHAPES = {
    "llama3-8b": Shape("Llama-3.1-8B heads", "gpu_kernels", 32, 8, 128, 16, "sum", [8192, 32768, 65536, 131072],
                       [512, 1024, 2048, 4096]),
    "llama2-7b": Shape("Llama-2-7B heads (the paper's configuration)", "gpu_kernels_llama2_7b", 32, 32, 128, 16,
                       "sum", [32768], [256, 2048]),
    "smollm2": Shape("SmolLM2-135M heads (the app's default model)", "gpu_kernels_smollm2", 9, 3, 64, 4, "mass",
                     [8192], [256, 1024]),
}


def per_call_us(fn, calls=50, repeats=9) -> float:
    """Median over `repeats` of the mean time of `calls` back-to-back calls, in microseconds."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def graph_us(fn, calls: int) -> float:
    """The same, with `calls` calls captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return per_call_us(graph.replay, calls=5) / calls


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), from a 2 GiB copy."""
    source = torch.empty(1 << 30, dtype=torch.uint16, device="cuda")
    target = torch.empty_like(source)
    seconds = per_call_us(lambda: target.copy_(source), calls=5, repeats=5) / 1e6
    return 2 * source.numel() * source.element_size() / seconds


def build_layer(shape: Shape, context: int, module) -> PagedLayer:
    layer = PagedLayer(shape.page, block_pages=1024, kernels=module)
    chunk = 8192
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        layer.update(torch.randn(1, shape.num_kv_heads, n, shape.head_dim, device="cuda", dtype=DTYPE),
                     torch.randn(1, shape.num_kv_heads, n, shape.head_dim, device="cuda", dtype=DTYPE))
    return layer


def workspace():
    return torch.empty(256 << 20, dtype=torch.uint8, device="cuda")


def layer_copies(shape: Shape, context: int, smallest_budget: int) -> int:
    """How many copies of the layer the calls cycle over, as a decode step reads each layer's cache once: enough that
    Quest's smallest read (the bounds and the smallest budget's pages) over all copies is 4x the L2 cache. One layer
    called again and again would read its bounds and pages from L2 (50 MB on the H200), faster than any decode
    step does."""
    read = shape.bounds_bytes(-(-context // shape.page)) + shape.kv_bytes(smallest_budget)
    return -(-4 * torch.cuda.get_device_properties(0).L2_cache_size // read)


def cycling(call, copies: int):
    """call(i) on copy 0, 1, ..., copies - 1, 0, ... at each call of the returned function."""
    counter = itertools.count()
    return lambda: call(next(counter) % copies)


def measure(shape: Shape, context: int, budgets: list[int], module, bandwidth: float) -> list[dict]:
    layer = build_layer(shape, context, module)
    num_pages, last = layer.num_pages, layer.last_page_len
    num_heads, num_kv_heads, head_dim, page, group = (shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                                      shape.page, shape.group)
    copies = layer_copies(shape, context, min(budgets))
    keys, values, bounds = ([tensor] + [tensor.clone() for _ in range(copies - 1)]
                            for tensor in (layer.keys, layer.values, layer.page_bounds))
    graph_calls = copies * -(-20 // copies)  # every copy in each replay of the graph
    scaling = head_dim ** -0.5
    query = torch.randn(num_kv_heads, group, head_dim, device="cuda", dtype=DTYPE)
    one_head = lambda i: (keys[i].view(-1, 1, page, head_dim), values[i].view(-1, 1, page, head_dim))  # noqa: E731
    host = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731

    indptr, last_len = torch.zeros(2, dtype=torch.int32, device="cuda"), torch.zeros(1, dtype=torch.int32,
                                                                                      device="cuda")
    all_pages = torch.arange(num_pages, dtype=torch.int32, device="cuda")
    tensor_cores = use_tensor_cores(group)  # FlashInfer's faster decode kernels for this group
    dense = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), "HND", use_cuda_graph=True,
                                                           use_tensor_cores=tensor_cores,
                                                           paged_kv_indptr_buffer=indptr,
                                                           paged_kv_indices_buffer=all_pages,
                                                           paged_kv_last_page_len_buffer=last_len)
    dense.plan(host(0, num_pages), all_pages, host(last), num_heads, num_kv_heads, head_dim, page,
               sm_scale=scaling, q_data_type=DTYPE, kv_data_type=DTYPE)
    dense_q = query.reshape(1, num_heads, head_dim)
    dense_call = cycling(lambda i: dense.run(dense_q, (keys[i], values[i])), copies)
    dense_us = per_call_us(dense_call)
    dense_graph_us = graph_us(dense_call, graph_calls)
    dense_bytes = shape.kv_bytes(context)

    scorer, decoder = kernels.ScoreTopK(module), kernels.SparseDecode(module)
    rows_out = []
    for budget in budgets:
        k = -(-budget // page)
        rows = torch.empty(num_kv_heads, k, dtype=torch.int32, device="cuda")
        sparse_indptr = torch.arange(0, num_kv_heads * k + 1, k, dtype=torch.int32, device="cuda")
        sparse_last = torch.full((num_kv_heads,), last, dtype=torch.int32, device="cuda")
        stock = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), "HND", use_cuda_graph=True,
                                                               use_tensor_cores=tensor_cores,
                                                               paged_kv_indptr_buffer=sparse_indptr,
                                                               paged_kv_indices_buffer=rows.view(-1),
                                                               paged_kv_last_page_len_buffer=sparse_last)
        scorer(query, bounds[0], num_pages, k, rows, group_rule=shape.group_rule)
        stock.plan(sparse_indptr.cpu(), rows.view(-1), sparse_last.cpu(), group, 1, head_dim, page,
                   sm_scale=scaling, q_data_type=DTYPE, kv_data_type=DTYPE)

        def select(i, k=k, rows=rows):
            scorer(query, bounds[i], num_pages, k, rows, group_rule=shape.group_rule)

        def attend(i, rows=rows):
            decoder(query, keys[i], values[i], rows, scaling, context)

        def attend_stock(i, stock=stock):
            stock.run(query, one_head(i))

        def quest(i):
            select(i)
            attend(i)

        one_rows = torch.empty_like(rows)

        def one_kernel(i, k=k, one_rows=one_rows):
            return kernels.quest_decode(module, query, bounds[i], keys[i], values[i], num_pages, k, one_rows, scaling,
                                        context, group_rule=shape.group_rule)

        stock_out = stock.run(query, one_head(0)).float()  # our kernel and FlashInfer's over the same pages
        ours_out = decoder(query, keys[0], values[0], rows, scaling, context).float()
        error = (ours_out - stock_out).norm() / stock_out.norm()
        one_out = one_kernel(0).float()  # the one kernel selects the same pages (up to ties) and attends as ours
        one_error = (one_out - ours_out).norm() / ours_out.norm()
        one_graph_us = graph_us(cycling(one_kernel, copies), graph_calls)
        calls = [cycling(f, copies) for f in (select, attend, attend_stock, quest)]
        select_us, attend_us, stock_us, total_us = (per_call_us(f) for f in calls)
        select_graph_us, attend_graph_us, stock_graph_us, total_graph_us = (graph_us(f, graph_calls) for f in calls)
        tokens = (k - 1) * page + last
        bounds_bytes, kv_bytes = shape.bounds_bytes(num_pages), shape.kv_bytes(tokens)  # the selected K and V
        floor_us = (bounds_bytes + kv_bytes) / bandwidth * 1e6
        row = dict(shape=shape.section, context=context, budget=budget, group_rule=shape.group_rule,
                   dense_us=dense_us, dense_graph_us=dense_graph_us, score_topk_us=select_us,
                   sparse_attention_us=attend_us, stock_sparse_us=stock_us, quest_us=total_us,
                   score_topk_graph_us=select_graph_us, sparse_attention_graph_us=attend_graph_us,
                   stock_sparse_graph_us=stock_graph_us, quest_graph_us=total_graph_us,
                   score_floor_us=bounds_bytes / bandwidth * 1e6, attention_floor_us=kv_bytes / bandwidth * 1e6,
                   bytes_floor_us=floor_us, speedup=dense_us / total_us, speedup_graph=dense_graph_us / total_graph_us,
                   floor_ratio=total_graph_us / floor_us, dense_floor_us=dense_bytes / bandwidth * 1e6,
                   ours_vs_stock_rel_err=error.item(), one_kernel_graph_us=one_graph_us,
                   speedup_one_kernel=dense_graph_us / one_graph_us, one_kernel_vs_ours_rel_err=one_error.item(),
                   layer_copies=copies)
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    return rows_out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    parser.add_argument("--contexts", type=int, nargs="+", help="default: the shape's")
    parser.add_argument("--budgets", type=int, nargs="+", help="default: the shape's")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    module = kernels.load()
    if module is None:
        sys.exit("the CUDA kernels did not build")
    bandwidth = copy_bandwidth()
    rows = [row for context in args.contexts or shape.contexts
            for row in measure(shape, context, args.budgets or shape.budgets, module, bandwidth)]
    copies = {row["context"]: row["layer_copies"] for row in rows}
    table = ["| context | budget | dense µs | score+top-k µs | sparse attn µs | Quest µs | dense graph µs | "
             "score+top-k graph µs (floor) | sparse attn graph µs (floor) | stock sparse graph µs | Quest graph µs | "
             "speedup (eager) | speedup (graph) | bytes floor µs | Quest graph / floor | dense graph / floor | "
             "one kernel graph µs | speedup (one kernel, graph) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['context']} | {r['budget']} | {r['dense_us']:.1f} | {r['score_topk_us']:.1f} | "
                     f"{r['sparse_attention_us']:.1f} | {r['quest_us']:.1f} | {r['dense_graph_us']:.1f} | "
                     f"{r['score_topk_graph_us']:.1f} ({r['score_floor_us']:.1f}) | "
                     f"{r['sparse_attention_graph_us']:.1f} ({r['attention_floor_us']:.1f}) | "
                     f"{r['stock_sparse_graph_us']:.1f} | {r['quest_graph_us']:.1f} | {r['speedup']:.1f}x | "
                     f"{r['speedup_graph']:.1f}x | {r['bytes_floor_us']:.1f} | {r['floor_ratio']:.2f}x | "
                     f"{r['dense_graph_us'] / r['dense_floor_us']:.2f}x | {r['one_kernel_graph_us']:.1f} | "
                     f"{r['speedup_one_kernel']:.1f}x |")
    kernel_kind = "tensor-core" if use_tensor_cores(shape.group) else "CUDA-core"
    body = (f"One layer's decode attention, batch 1, {shape.title} ({shape.num_heads} q / {shape.num_kv_heads} kv, "
            f"d {shape.head_dim}), pages of {shape.page}, group rule {shape.group_rule}, bf16, FlashInfer "
            f"{flashinfer.__version__} on its {kernel_kind} decode kernels (the faster ones for this query group: "
            "quest_core.backend_flashinfer.use_tensor_cores). Quest is our two kernels (score + top-k, sparse "
            "attention); the stock sparse column is FlashInfer's decode over the same pages, for comparison; the one "
            "kernel column is Quest's decode as a single kernel of ours (kernels.quest_decode: score, select and "
            "attend in a thread-block cluster per KV head), which the flashinfer backend runs for layers of at most "
            f"{ONE_KERNEL_KV_HEADS} KV heads. Times "
            "are medians of 9 repeats of 50 back-to-back calls (eager) or of a CUDA graph holding at least 20 calls. "
            "Each call reads the next "
            f"of several copies of the layer ({', '.join(f'{c}: {n}' for c, n in copies.items())} copies by context), "
            "as a decode step reads each layer's cache once: enough that Quest's smallest read over all of them is "
            "4x the L2 cache (one layer called again and again would read its bounds and pages from L2, faster than "
            "a decode step does; the runs before 2026-12-01 did). The bytes floor is the page bounds "
            "plus the selected K/V (each kernel's own in parentheses) divided by the device-to-device copy "
            f"bandwidth measured in this run ({bandwidth / 1e12:.2f} TB/s).\n\n" + "\n".join(table))
    if not args.no_write:
        write_section(shape.section, f"GPU: per-layer decode attention, {shape.title}, FlashInfer dense vs Quest",
                      body)
    print(json.dumps({"bench": shape.section, "rows": rows}))


if __name__ == "__main__":
    main()
