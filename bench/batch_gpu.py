"""Batched decode on the GPU: aggregate decode tok/s of B requests decoding together over one page pool (the engine's
batch step, `hf.forward_batch`: one FlashInfer batch decode for dense, our scorer and our sparse decode each once
over the batch for Quest), Llama-3.1-8B shapes with random bf16 weights, ours dense vs ours Quest (budget 2048), each
beside its bytes floor: the weights once per step plus every request's KV reads, at the copy bandwidth measured in
this run.

    python bench/batch_gpu.py      # 32K at batch 1, 4, 8, 16; 128K at batch 1, 2, 4; writes gpu_batch in RESULTS.md

One prompt is prefilled once per context and its pages are copied into every request's run (each request still
reads its own pages). Each batch's steps replay a CUDA graph of the batch (the engine's BatchGraphDecoder, the decoder
layers compiled) and run ahead of the host (the graph picks each request's greedy token; the host queues step i + 1
before it reads step i's tokens), as the engine runs a greedy batch; for comparison, the same graph with the host
waiting for each step's tokens before it queues the next, and eager steps. HF `generate` at the same batches:
bench/batch_hf.py.
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.attention_kernels import copy_bandwidth  # noqa: E402
from bench.e2e import KERNEL_KINDS, kernel_time_by_kind, llama_8b_shaped, random_prompt, step_weight_bytes  # noqa: E402
from bench.results import write_section  # noqa: E402
from quest_core.backends import make_backend  # noqa: E402
from quest_core.config import default_config, head_dim  # noqa: E402
from quest_core.cuda_graph import BatchGraphDecoder  # noqa: E402
from quest_core.generation import prefill  # noqa: E402
from quest_core.hf import QuestCache, cache_argument, forward_batch, use_quest  # noqa: E402
from quest_core.paged_cache import PagePool  # noqa: E402

BATCHES = {32768: [1, 4, 8, 16], 131072: [1, 2, 4]}
PROFILED = {(32768, 8), (131072, 4)}  # the batches of the targets: where each step's time goes


@torch.inference_mode()
def copy_cache(source: QuestCache, target: QuestCache) -> None:
    """`target` (an empty cache of the same pool) holds `source`'s tokens: its pages copied into target's run."""
    target.reserve(source.run.num_pages * source.run.pool.page_size)
    pool, used = source.run.pool, source.layers[0].num_pages
    for index, (from_layer, to_layer) in enumerate(zip(source.layers, target.layers)):
        for storage in (pool.keys[index], pool.values[index]):
            storage[target.run.start:target.run.start + used].copy_(storage[source.run.start:source.run.start + used])
        to_layer.page_bounds.copy_(from_layer.page_bounds)
        to_layer.length = from_layer.length


def ahead(caches, graph: BatchGraphDecoder):
    """Greedy steps of `caches` run ahead of the host (`graph.greedy`, as the engine runs a greedy batch)."""
    return graph.greedy(caches, [0] * len(caches), [[]] * len(caches), [0] * len(caches))


@torch.inference_mode()
def decode_tok_s(model, caches, steps: int, graph: BatchGraphDecoder | None, runs_ahead: bool = False) -> float:
    """Aggregate tok/s of `steps` greedy batch steps after 2 warm-up steps (with `graph`: its eager step and its
    capture): replayed from `graph` and run ahead of the host, replayed with the host waiting for each step's tokens
    before it queues the next, or eager; the caches end as they began."""
    cache_arg = cache_argument(model)
    start_length = caches[0].length
    tokens = [0] * len(caches)
    times = []
    if runs_ahead:
        with contextlib.closing(ahead(caches, graph)) as picks:
            for _ in range(steps + 2):
                next(picks)
                times.append(time.perf_counter())
    else:
        for _ in range(steps + 2):
            logits = graph.step(caches, tokens) if graph else forward_batch(model, caches, tokens, cache_arg)
            tokens = logits.argmax(-1).tolist()
            times.append(time.perf_counter())
    for cache in caches:
        cache.truncate(start_length)
    return len(caches) * steps / (times[-1] - times[1])


@torch.inference_mode()
def profile_step(caches, graph: BatchGraphDecoder, steps: int = 4) -> tuple[dict, float]:
    """({kind: GPU us per step}, wall ms per step) over `steps` graph replays run ahead of the host, under the
    profiler (after the eager step and the capture); the caches end as they began."""
    start_length = caches[0].length
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    with contextlib.closing(ahead(caches, graph)) as picks:
        for _ in range(2):
            next(picks)
        torch.cuda.synchronize()  # the step queued ahead is done: the window holds the `steps` steps queued in it
        profiler.start()
        started = time.perf_counter()
        for _ in range(steps):
            next(picks)
        torch.cuda.synchronize()  # the last step queued in the window
        wall_ms = 1e3 * (time.perf_counter() - started) / steps
        profiler.stop()
    for cache in caches:
        cache.truncate(start_length)
    return kernel_time_by_kind(profiler, steps), wall_ms


def floor_tok_s(model, batch: int, context: int, budget: int | None, bandwidth: float) -> float:
    """The bytes floor: a step reads the weights once and each request's KV (Quest: the 2 dense layers whole, the
    others' selected pages and every page's bounds)."""
    config = model.config
    weight_bytes = step_weight_bytes(model)
    token_bytes = 2 * config.num_key_value_heads * head_dim(config) * 2  # K and V of one token in one layer, bf16
    layers = config.num_hidden_layers
    if budget is None:
        kv_bytes = layers * context * token_bytes
    else:
        bounds_bytes = (context // 16) * config.num_key_value_heads * 2 * head_dim(config) * 2
        kv_bytes = 2 * context * token_bytes + (layers - 2) * (budget * token_bytes + bounds_bytes)
    return batch / ((weight_bytes + batch * kv_bytes) / bandwidth)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    new_tokens = args.steps + 8
    model = llama_8b_shaped(max(args.contexts) + new_tokens)
    use_quest(model)
    backend = make_backend("auto", "cuda", model.dtype)
    quest = default_config(model.config, budget=args.budget)
    dense = quest.with_changes(mode="dense")
    bandwidth = copy_bandwidth()
    config = model.config
    pool_tokens = max(max(BATCHES[c]) * (c + 1024) for c in args.contexts)
    pool = PagePool(config.num_hidden_layers, pool_tokens // quest.page_size, config.num_key_value_heads,
                    quest.page_size, head_dim(config), model.dtype, "cuda")
    graph = BatchGraphDecoder(model, cache_argument(model))
    rows = []
    for context in args.contexts:
        caches = [QuestCache(config.num_hidden_layers, dense, backend, pool) for _ in range(max(BATCHES[context]))]
        caches[0].reserve(context + new_tokens)
        prefill(model, caches[0], random_prompt(config.vocab_size, context), chunk_size=8192)
        for cache in caches[1:]:
            copy_cache(caches[0], cache)
        for batch in BATCHES[context]:
            row = dict(context=context, batch=batch)
            for name, settings in (("dense", dense), ("quest", quest)):
                for cache in caches[:batch]:
                    cache.set_config(settings)
                row[f"{name}_tok_s"] = decode_tok_s(model, caches[:batch], args.steps, graph, runs_ahead=True)
                row[f"{name}_waiting_tok_s"] = decode_tok_s(model, caches[:batch], args.steps, graph)
                row[f"{name}_eager_tok_s"] = decode_tok_s(model, caches[:batch], args.steps, None)
                row["graph"], row["compiled"] = not graph.failed, graph.compile_layers
                if (context, batch) in PROFILED:
                    row[f"{name}_gpu_us"], row[f"{name}_profiled_ms"] = profile_step(caches[:batch], graph)
                row[f"{name}_floor_tok_s"] = floor_tok_s(model, batch, context,
                                                         None if name == "dense" else args.budget, bandwidth)
            rows.append(row)
            print(json.dumps(row), flush=True)
        graph.reset()
        del caches
        torch.cuda.empty_cache()
    table = ["| context | batch | ours dense tok/s (floor) | ours Quest tok/s (floor) | Quest / dense | floor ratio | "
             "host waiting: dense / Quest tok/s | eager dense / Quest tok/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['context']} | {r['batch']} | {r['dense_tok_s']:.1f} ({r['dense_floor_tok_s']:.0f}) | "
                     f"{r['quest_tok_s']:.1f} ({r['quest_floor_tok_s']:.0f}) | "
                     f"{r['quest_tok_s'] / r['dense_tok_s']:.2f}x | "
                     f"{r['quest_floor_tok_s'] / r['dense_floor_tok_s']:.2f}x | "
                     f"{r['dense_waiting_tok_s']:.1f} / {r['quest_waiting_tok_s']:.1f} | "
                     f"{r['dense_eager_tok_s']:.1f} / {r['quest_eager_tok_s']:.1f} |")
    kinds = [*KERNEL_KINDS, "other"]
    profile = ["| context | batch | engine | " + " | ".join(f"{kind} ms" for kind in kinds) + " | GPU total ms | "
               "step ms | floor ms |", "|---:|---:|---|" + "---:|" * (len(kinds) + 3)]
    for r in (r for r in rows if (r["context"], r["batch"]) in PROFILED):
        for name in ("dense", "quest"):
            times = r[f"{name}_gpu_us"]
            profile.append(f"| {r['context']} | {r['batch']} | {name} | " +
                           " | ".join(f"{times[k] / 1e3:.2f}" for k in kinds) +
                           f" | {sum(times.values()) / 1e3:.2f} | {r[f'{name}_profiled_ms']:.2f} | "
                           f"{1e3 * r['batch'] / r[f'{name}_floor_tok_s']:.2f} |")
    body = (f"Llama-3.1-8B shapes (32 layers, 32 q / 8 kv heads, d 128), random bf16 weights; B requests decode "
            f"together over one page pool, aggregate tok/s over {args.steps} greedy steps after 2 warm-up steps; "
            f"Quest budget {args.budget}, pages of 16, 2 dense layers; backend "
            f"{backend.describe()}. Each batch's steps replay a CUDA graph captured for it (quest_core/cuda_graph.py's "
            f"BatchGraphDecoder: {'captured' if all(r['graph'] for r in rows) else 'capture FAILED: eager'}; the "
            f"decoder layers {'compiled' if all(r['compiled'] for r in rows) else 'NOT compiled (compiling failed)'}"
            ") and run ahead of the host (BatchGraphDecoder.greedy: the graph picks each request's token, the host "
            "queues step i + 1 before it reads step i's tokens), as the engine runs a greedy batch. The last two "
            "columns: the same graph with the host waiting for each step's tokens before it queues the next, and "
            "the same steps eagerly, the layers as they are. Floor: the weights once "
            f"per step plus each request's KV (Quest: its 2 dense layers whole, its selected pages and every page's "
            f"bounds in the others) at the copy bandwidth measured in this run, {bandwidth / 1e12:.2f} TB/s.\n\n"
            + "\n".join(table) +
            "\n\nWhere a step's time goes at the targets' batches: GPU kernel time per step by kind from the profiler "
            "over 4 graph replays run ahead of the host (our kernels: the KV append, the scorer and the sparse decode, "
            "each once per layer over the batch; other: copies and PyTorch's element-wise kernels), the step's wall "
            "time under the profiler and the bytes floor.\n\n"
            + "\n".join(profile))
    if not args.no_write:
        write_section("gpu_batch", "GPU batched decode: ours dense vs ours Quest, batch 1-16", body)
    print(json.dumps({"bench": "gpu_batch", "rows": rows}))


if __name__ == "__main__":
    main()
