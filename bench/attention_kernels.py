"""Per-layer decode attention latency on the GPU, Llama-3.1-8B heads (32 q / 8 kv, d 128), page 16, bf16:
FlashInfer dense decode vs our Quest stages (fused score + top-k kernel, FlashInfer sparse decode) and total, eager
and CUDA-graph replayed, beside a bytes floor from the copy bandwidth measured in the same run.

    python bench/attention_kernels.py            # writes the gpu_kernels section of bench/RESULTS.md
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flashinfer  # noqa: E402

from bench.results import write_section  # noqa: E402
from quest_core import kernels  # noqa: E402
from quest_core.paged_cache import PagedLayer  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
GROUP = NUM_HEADS // NUM_KV_HEADS
DTYPE = torch.bfloat16


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


def graph_us(fn, calls=20) -> float:
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


def build_layer(context: int, module) -> PagedLayer:
    layer = PagedLayer(PAGE, block_pages=1024, kernels=module)
    chunk = 8192
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        layer.update(torch.randn(1, NUM_KV_HEADS, n, HEAD_DIM, device="cuda", dtype=DTYPE),
                     torch.randn(1, NUM_KV_HEADS, n, HEAD_DIM, device="cuda", dtype=DTYPE))
    return layer


def workspace():
    return torch.empty(256 << 20, dtype=torch.uint8, device="cuda")


def measure(context: int, budgets: list[int], module, bandwidth: float) -> list[dict]:
    layer = build_layer(context, module)
    num_pages, last = layer.num_pages, layer.last_page_len
    scaling = HEAD_DIM ** -0.5
    query = torch.randn(NUM_KV_HEADS, GROUP, HEAD_DIM, device="cuda", dtype=DTYPE)
    cache = (layer.keys, layer.values)
    one_head = (layer.keys.view(-1, 1, PAGE, HEAD_DIM), layer.values.view(-1, 1, PAGE, HEAD_DIM))
    host = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731

    indptr, last_len = torch.zeros(2, dtype=torch.int32, device="cuda"), torch.zeros(1, dtype=torch.int32,
                                                                                      device="cuda")
    all_pages = torch.arange(num_pages, dtype=torch.int32, device="cuda")
    dense = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), "HND", use_cuda_graph=True,
                                                           paged_kv_indptr_buffer=indptr,
                                                           paged_kv_indices_buffer=all_pages,
                                                           paged_kv_last_page_len_buffer=last_len)
    dense.plan(host(0, num_pages), all_pages, host(last), NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE,
               sm_scale=scaling, q_data_type=DTYPE, kv_data_type=DTYPE)
    dense_q = query.reshape(1, NUM_HEADS, HEAD_DIM)
    dense_us = per_call_us(lambda: dense.run(dense_q, cache))
    dense_graph_us = graph_us(lambda: dense.run(dense_q, cache))
    dense_bytes = 2 * context * NUM_KV_HEADS * HEAD_DIM * 2

    scorer = kernels.ScoreTopK(module)
    rows_out = []
    for budget in budgets:
        k = -(-budget // PAGE)
        rows = torch.empty(NUM_KV_HEADS, k, dtype=torch.int32, device="cuda")
        sparse_indptr = torch.arange(0, NUM_KV_HEADS * k + 1, k, dtype=torch.int32, device="cuda")
        sparse_last = torch.full((NUM_KV_HEADS,), last, dtype=torch.int32, device="cuda")
        sparse = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), "HND", use_cuda_graph=True,
                                                                paged_kv_indptr_buffer=sparse_indptr,
                                                                paged_kv_indices_buffer=rows.view(-1),
                                                                paged_kv_last_page_len_buffer=sparse_last)
        scorer(query, layer.page_bounds, num_pages, k, rows)
        sparse.plan(sparse_indptr.cpu(), rows.view(-1), sparse_last.cpu(), GROUP, 1, HEAD_DIM, PAGE,
                    sm_scale=scaling, q_data_type=DTYPE, kv_data_type=DTYPE)

        def select(k=k, rows=rows):
            scorer(query, layer.page_bounds, num_pages, k, rows)

        def attend(sparse=sparse):
            sparse.run(query, one_head)

        def quest():
            select()
            attend()

        select_us, attend_us, total_us = per_call_us(select), per_call_us(attend), per_call_us(quest)
        select_graph_us, attend_graph_us, total_graph_us = graph_us(select), graph_us(attend), graph_us(quest)
        tokens = (k - 1) * PAGE + last
        quest_bytes = (num_pages * NUM_KV_HEADS * 2 * HEAD_DIM * 2  # page bounds
                       + 2 * tokens * NUM_KV_HEADS * HEAD_DIM * 2)  # selected K and V
        floor_us = quest_bytes / bandwidth * 1e6
        row = dict(context=context, budget=budget, dense_us=dense_us, dense_graph_us=dense_graph_us,
                   score_topk_us=select_us, sparse_attention_us=attend_us, quest_us=total_us,
                   score_topk_graph_us=select_graph_us, sparse_attention_graph_us=attend_graph_us,
                   quest_graph_us=total_graph_us, bytes_floor_us=floor_us, speedup=dense_us / total_us,
                   speedup_graph=dense_graph_us / total_graph_us, floor_ratio=total_graph_us / floor_us,
                   dense_floor_us=dense_bytes / bandwidth * 1e6)
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    return rows_out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    module = kernels.load()
    if module is None:
        sys.exit("the CUDA kernels did not build")
    bandwidth = copy_bandwidth()
    rows = [row for context in args.contexts for row in measure(context, args.budgets, module, bandwidth)]
    table = ["| context | budget | FlashInfer dense µs | score+top-k µs | sparse attn µs | Quest µs | "
             "dense graph µs | score+top-k graph µs | sparse attn graph µs | Quest graph µs | speedup (eager) | "
             "speedup (graph) | bytes floor µs | Quest graph / floor |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['context']} | {r['budget']} | {r['dense_us']:.1f} | {r['score_topk_us']:.1f} | "
                     f"{r['sparse_attention_us']:.1f} | {r['quest_us']:.1f} | {r['dense_graph_us']:.1f} | "
                     f"{r['score_topk_graph_us']:.1f} | {r['sparse_attention_graph_us']:.1f} | "
                     f"{r['quest_graph_us']:.1f} | {r['speedup']:.1f}x | {r['speedup_graph']:.1f}x | "
                     f"{r['bytes_floor_us']:.1f} | {r['floor_ratio']:.2f}x |")
    body = (f"One layer's decode attention, batch 1, Llama-3.1-8B heads ({NUM_HEADS} q / {NUM_KV_HEADS} kv, "
            f"d {HEAD_DIM}), page {PAGE}, bf16, FlashInfer {flashinfer.__version__}. Times are medians of 9 "
            "repeats of 50 back-to-back calls (eager) or of a CUDA graph holding 20 calls. The bytes floor is "
            "the page bounds plus the selected K/V divided by the device-to-device copy bandwidth measured in "
            f"this run ({bandwidth / 1e12:.2f} TB/s).\n\n" + "\n".join(table))
    if not args.no_write:
        write_section("gpu_kernels", "GPU: per-layer decode attention, FlashInfer dense vs Quest", body)
    print(json.dumps({"bench": "gpu_kernels", "rows": rows}))


if __name__ == "__main__":
    main()
