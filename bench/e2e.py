"""End to end on the GPU: decode tok/s and TTFT of a Llama-3.1-8B-shaped model with random bf16 weights (built
from a config, nothing downloaded), batch 1: HF `generate` (sdpa; eager, and with a static cache, which transformers
compiles) vs ours dense vs ours Quest, in one run.

    python bench/e2e.py            # 8K, 32K, 128K; writes the gpu_e2e section of bench/RESULTS.md
"""
import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cpu_decode import Timestamps, tokens_per_s  # noqa: E402
from bench.results import write_section  # noqa: E402
from quest_core.backends import make_backend  # noqa: E402
from quest_core.config import default_config  # noqa: E402
from quest_core.generation import decode, prefill  # noqa: E402
from quest_core.hf import QuestCache, use_quest  # noqa: E402


def llama_8b_shaped(max_context: int):
    return random_bf16_model(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         max_position_embeddings=max_context, rope_theta=500000.0,
                                         tie_word_embeddings=False))


def random_bf16_model(config: LlamaConfig):
    """A Llama of `config` with random bf16 weights, built on the GPU (nothing downloaded)."""
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return model


def step_weight_bytes(model) -> int:
    """The bytes of weights a decode step reads: each parameter once, but of the input embedding one row (its table
    is read whole only where the output projection shares it: tied)."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings().weight is embedding
    return total if tied else total - (embedding.shape[0] - 1) * embedding.shape[1] * embedding.element_size()


def random_prompt(vocab_size: int, context: int) -> list[int]:
    """`context` random token ids, the same in every run (seed 0)."""
    return torch.randint(0, vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()


def hf_generate(model, prompt, new_tokens, static=False, batch=1, prefill_chunk_size=None):
    """(ttft_s, decode tok/s over the batch) of HF `generate` on `batch` copies of the prompt: eager with its dynamic
    cache, or with a static cache, for which transformers compiles the decode step itself (torch.compile, its own
    fast path); the compile happens in the first decode step, which tok/s leaves out as it does the prefill.
    prefill_chunk_size: transformers' chunked prefill (None: one forward over the prompt)."""
    model.set_attn_implementation("sdpa")
    streamer = Timestamps()
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(torch.tensor([prompt] * batch, device="cuda"), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, streamer=streamer,
                   cache_implementation="static" if static else None, prefill_chunk_size=prefill_chunk_size)
    torch.cuda.synchronize()
    return streamer.times[1] - started, batch * tokens_per_s(streamer.times[2:] if static else streamer.times[1:])


def ours(model, cache, prompt, new_tokens, cuda_graph=True):
    """(ttft_s, decode tok/s, first_steps_s) from an empty cache. With CUDA graphs the first decode step of a
    shape runs eagerly and the second captures the graph: tok/s counts the steps after them, and first_steps_s is
    what those two took (once per answer)."""
    cache.truncate(0)
    torch.cuda.synchronize()
    started = time.perf_counter()
    logits = prefill(model, cache, prompt, chunk_size=8192)
    times = []  # when each token reached the host (decode waits for it; a sync here would stall the pipeline)
    for _ in decode(model, cache, logits, new_tokens, min_new_tokens=new_tokens, cuda_graph=cuda_graph):
        times.append(time.perf_counter())
    return times[0] - started, tokens_per_s(times[2:]), times[2] - times[0]


KERNEL_KINDS = {"cuBLAS matmul": ("nvjet", "gemm", "gemv", "splitKreduce", "cutlass"),
                "Triton matmul": ("triton_tem", "_mm", "addmm"),
                "FlashInfer attention": ("flashinfer",),
                "our kernels": ("score_topk", "sparse_decode", "append_kv"),
                "Triton (compiled layers)": ("triton_",)}


def gpu_time_by_kind(model, cache, steps=4):
    """({kind: GPU us per step}, wall ms per step, the longest kernels: `longest_kernels`, busy us per step: `busy_us`)
    over `steps` graph replays decoding on from the cache's tokens, under the profiler. The first two steps (eager
    and capture) and the one queued when the profiler starts are not profiled: it starts once the GPU is idle."""
    logits = torch.zeros(model.config.vocab_size, device="cuda")
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    for index, _ in enumerate(decode(model, cache, logits, 4 + steps, min_new_tokens=4 + steps)):
        if index == 2:
            torch.cuda.synchronize()
            profiler.start()
            started = time.perf_counter()
    torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - started) / steps
    profiler.stop()
    return kernel_time_by_kind(profiler, steps), wall_ms, longest_kernels(profiler, steps), busy_us(profiler, steps)


def busy_us(profiler, steps: int) -> float:
    """GPU us per step during which at least one kernel runs: the union of a stopped profiler's kernel intervals
    over `steps` steps (kernels that overlap, as a programmatic dependent and the kernel before it, count once)."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in gpu_kernels(profiler)):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return busy / steps


def longest_kernels(profiler, steps: int, count: int = 14) -> list[tuple[str, float, float]]:
    """The `count` kernels with the most GPU time that a stopped profiler saw over `steps` steps, the longest first:
    (name, calls a step, us a call). A name is the kernel's up to its template arguments or parameters; kernels of
    one name (Inductor names the kernels of each compiled graph from 0) count together."""
    calls, total_us = Counter(), Counter()
    for event in gpu_kernels(profiler):
        name = re.split(r"[<(]", event.name)[0].removeprefix("void ").strip()
        calls[name] += 1
        total_us[name] += event.device_time
    return [(name, calls[name] / steps, us / calls[name]) for name, us in total_us.most_common(count)]


def kernel_time_by_kind(profiler, steps: int) -> dict:
    """{kind: GPU us per step} of the kernels a stopped profiler saw over `steps` steps (KERNEL_KINDS, else other)."""
    by_kind = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for event in gpu_kernels(profiler):
        kind = next((k for k, names in KERNEL_KINDS.items() if any(n in event.name for n in names)), "other")
        by_kind[kind] += event.device_time / steps
    return by_kind


def gpu_kernels(profiler):
    """The GPU kernels among a stopped profiler's events (not the host's)."""
    return (event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from bench.attention_kernels import copy_bandwidth  # imports flashinfer: GPU only

    # Inductor's compiled graphs from an earlier run (its cache folder alone exists on a fresh machine too)
    inductor_cache = "warm (an earlier run on this machine)" if any(Path(cache_dir(), "fxgraph").glob("*")) \
        else "cold"
    model = llama_8b_shaped(max(args.contexts) + args.new_tokens + 16)
    bandwidth = copy_bandwidth()
    weight_bytes = step_weight_bytes(model)
    weights_ms = 1e3 * weight_bytes / bandwidth
    backend = make_backend("auto", "cuda", model.dtype)
    quest = default_config(model.config, budget=args.budget)
    rows = []
    for context in args.contexts:
        prompt = random_prompt(model.config.vocab_size, context)
        hf_ttft, hf_speed = hf_generate(model, prompt, args.new_tokens)
        _, hf_static_speed = hf_generate(model, prompt, args.new_tokens, static=True)
        use_quest(model)
        cache = QuestCache(model.config.num_hidden_layers, quest.with_changes(mode="dense"), backend)
        started = time.perf_counter()
        ours(model, cache, prompt[:512], 8)  # warm-up: kernel builds, plans, compiling the layers (first context)
        warmup_s = time.perf_counter() - started
        dense_ttft, dense_speed, dense_first = ours(model, cache, prompt, args.new_tokens)
        dense_kinds, dense_wall, _, dense_busy = gpu_time_by_kind(model, cache)
        cache.set_config(quest)
        quest_ttft, quest_speed, quest_first = ours(model, cache, prompt, args.new_tokens)
        quest_kinds, quest_wall, quest_kernels, quest_busy = gpu_time_by_kind(model, cache)
        _, quest_eager_speed, _ = ours(model, cache, prompt, args.new_tokens, cuda_graph=False)
        graphed = cache.graph_decoder is not None and not cache.graph_decoder.failed
        row = dict(context=context, hf_ttft_s=hf_ttft, hf_tok_s=hf_speed, hf_static_tok_s=hf_static_speed,
                   dense_ttft_s=dense_ttft,
                   dense_tok_s=dense_speed, quest_ttft_s=quest_ttft, quest_tok_s=quest_speed,
                   quest_eager_tok_s=quest_eager_speed, dense_first_steps_s=dense_first,
                   quest_first_steps_s=quest_first, warmup_s=warmup_s, cuda_graph=graphed, dense_gpu_us=dense_kinds,
                   dense_profiled_ms=dense_wall, dense_busy_us=dense_busy, quest_gpu_us=quest_kinds,
                   quest_profiled_ms=quest_wall, quest_busy_us=quest_busy, quest_kernels=quest_kernels)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del cache
        torch.cuda.empty_cache()
    table = ["| context | HF generate tok/s | HF static cache + compile tok/s | ours dense tok/s | ours Quest tok/s | "
             "ours Quest eager tok/s | Quest / dense | dense / HF compiled | TTFT HF s | TTFT ours dense s | "
             "TTFT ours Quest s | first 2 steps dense / Quest ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['context']} | {r['hf_tok_s']:.1f} | {r['hf_static_tok_s']:.1f} | {r['dense_tok_s']:.1f} | "
                     f"{r['quest_tok_s']:.1f} | {r['quest_eager_tok_s']:.1f} | "
                     f"{r['quest_tok_s'] / r['dense_tok_s']:.2f}x | {r['dense_tok_s'] / r['hf_static_tok_s']:.2f}x | "
                     f"{r['hf_ttft_s']:.2f} | {r['dense_ttft_s']:.2f} | {r['quest_ttft_s']:.2f} | "
                     f"{1e3 * r['dense_first_steps_s']:.0f} / {1e3 * r['quest_first_steps_s']:.0f} |")
    kinds = [*KERNEL_KINDS, "other"]
    profile = ["| context | engine | " + " | ".join(f"{kind} ms" for kind in kinds) +
               " | GPU total ms | GPU busy ms | step ms | matmul / weights' floor |",
               "|---:|---|" + "---:|" * (len(kinds) + 4)]
    for r in rows:
        for engine in ("dense", "quest"):
            times = r[f"{engine}_gpu_us"]
            matmul_ms = (times["cuBLAS matmul"] + times["Triton matmul"]) / 1e3
            profile.append(f"| {r['context']} | {engine} | " + " | ".join(f"{times[k] / 1e3:.2f}" for k in kinds) +
                           f" | {sum(times.values()) / 1e3:.2f} | {r[f'{engine}_busy_us'] / 1e3:.2f} | "
                           f"{r[f'{engine}_profiled_ms']:.2f} | "
                           f"{matmul_ms / weights_ms:.2f}x |")
    longest = max(rows, key=lambda r: r["context"])
    kernels = ["| kernel | calls a step | µs a call | µs a step |", "|---|---:|---:|---:|"]
    kernels += [f"| `{name}` | {calls:g} | {us:.1f} | {calls * us:.1f} |"
                for name, calls, us in longest["quest_kernels"]]
    body = (f"Llama-3.1-8B shapes (32 layers, 32 q / 8 kv heads, d 128) with random bf16 weights, batch 1, "
            f"{args.new_tokens} new tokens (EOS suppressed), Quest budget {args.budget}, page 16, 2 dense layers; "
            f"backend {backend.name}; HF's compiled column is `generate(cache_implementation=\"static\")`, whose "
            "decode step transformers compiles (its tok/s leaves out the first decode step, the compile); ours "
            "decode with the step replayed as a CUDA graph "
            f"({'captured' if all(r['cuda_graph'] for r in rows) else 'capture FAILED: eager'}) that holds the "
            "decoder layers compiled by torch.compile, matrix products autotuned (quest_core/compiled_layers.py; "
            f"compiled in the warm-up before the first context, which took {rows[0]['warmup_s']:.0f} s with "
            f"Inductor's on-disk cache {inductor_cache}), greedy "
            "steps queued ahead of the host (quest_core/cuda_graph.py), and Quest also eagerly (not compiled) for "
            "comparison. Each engine prefills the whole prompt for its TTFT. Ours with graphs: the first decode step "
            "of an answer runs eagerly and the second captures the graph; every ours tok/s is over the "
            f"{args.new_tokens - 3} steps after the first two, and the last column is what those two steps took."
            "\n\n" + "\n".join(table) +
            "\n\nWhere a decode step's GPU time goes: kernel time per step by kind, from the profiler over 4 graph "
            "replays after each timed run (Triton matmul: the autotuned Triton kernels holding a matrix product; "
            "other: copies, memsets, PyTorch's own kernels), and the "
            "step's wall time under the profiler. A kernel launched as a programmatic "
            "dependent (ours, FlashInfer's, and on Hopper the compiled layers' but Inductor's matrix-product "
            "templates) counts from when its blocks start, which can be while the kernel before it runs, so the "
            "kinds' times can overlap; GPU busy counts the time any kernel runs once. The step time less GPU busy is "
            "time no kernel runs: launch gaps inside the graph and the host's work between replays. The last column: "
            "the matrix products' time "
            f"against the weights' bytes floor ({weight_bytes / 1e9:.2f} GB a step at the copy bandwidth "
            f"measured in this run, {bandwidth / 1e12:.2f} TB/s: {weights_ms:.2f} ms).\n\n" + "\n".join(profile) +
            f"\n\nThe kernels that took the most GPU time in a Quest step at {longest['context']} (the same profile; "
            "kernels of one name count together: Inductor numbers each compiled graph's kernels from 0, so the q and o "
            "projections can share a name):\n\n" + "\n".join(kernels))
    if not args.no_write:
        write_section("gpu_e2e", "GPU end to end: HF generate vs ours dense vs ours Quest", body)
    print(json.dumps({"bench": "gpu_e2e", "rows": rows}))


if __name__ == "__main__":
    main()
