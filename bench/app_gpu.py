"""The app's decoding on a GPU (issue 16): a model of the embedded default's shapes (SmolLM2-135M: 30 layers, 9 q /
3 kv heads of 64 dims; random bf16 weights built from a config, nothing downloaded), 8K tokens of context, the app's
Quest settings for it (`default_config`: pages of 4, rule mass, budget 1024) and its chat decoding (greedy with
`Decoding`'s repetition penalty), batch 1 on CUDA graphs, as `generation.decode` runs them; or, with `--shape
llama3-8b`, a model of Llama-3.1-8B's shapes at 32K with budget 2048 (the issue's example of the trace's cost).
Decode tok/s of dense and Quest, traced as the app traces (every step's selected pages, for its plots) and
untraced, in one run; then where a traced step's host time goes (cProfile over a traced Quest answer: the functions
with the most time of their own); and the GPU kernels of an untraced step of each (torch.profiler: time per step
by kernel).

    python bench/app_gpu.py                      # writes the gpu_app section of bench/RESULTS.md
    python bench/app_gpu.py --shape llama3-8b    # writes gpu_app_llama3_8b
"""
import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cpu_decode import tokens_per_s  # noqa: E402
from bench.e2e import llama_8b_shaped, random_bf16_model, random_prompt  # noqa: E402
from bench.results import write_section  # noqa: E402
from quest_core.backends import make_backend  # noqa: E402
from quest_core.config import Decoding, default_config  # noqa: E402
from quest_core.generation import answer_processors, decode, prefill  # noqa: E402
from quest_core.hf import QuestCache, use_quest  # noqa: E402
from quest_core.trace import Trace  # noqa: E402


def smollm2_shaped(max_context: int):
    return random_bf16_model(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                         max_position_embeddings=max_context, rope_theta=100000.0,
                                         tie_word_embeddings=True))


# --shape: (RESULTS.md section, title, model builder(max context), default context, Quest budget: None for the
# app's default)
SHAPES = {"smollm2": ("gpu_app", "SmolLM2-135M shapes (30 layers, 9 q / 3 kv heads, d 64)", smollm2_shaped,
                      8192 - 300, None),
          "llama3-8b": ("gpu_app_llama3_8b", "Llama-3.1-8B shapes (32 layers, 32 q / 8 kv heads, d 128)",
                        llama_8b_shaped, 32768, 2048)}


def answer_tok_s(model, cache, prompt, new_tokens: int, traced: bool) -> float:
    """Decode tok/s of one answer after the prompt (the cache holds all but its last token), as the app decodes:
    the answer's repetition penalty, a trace's step ended after each token when traced; over the steps after the
    first two (eager, then the graph's capture)."""
    cache.truncate(len(prompt) - 1)
    logits = prefill(model, cache, prompt[-1:])
    cache.trace = Trace() if traced else None  # as the engine: the prefill untraced, a step ended per later token
    processors = answer_processors(Decoding.repetition_penalty)
    times = []
    for _ in decode(model, cache, logits, new_tokens, min_new_tokens=new_tokens, processors=processors):
        if traced and times:
            cache.trace.end_step(cache.length, 0.0, model.config.num_hidden_layers)
        times.append(time.perf_counter())
    cache.trace = None
    return tokens_per_s(times[2:])


def host_profile(model, cache, prompt, new_tokens: int, top: int = 12) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    answer_tok_s(model, cache, prompt, new_tokens, traced=True)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def step_kernels(model, cache, prompt, new_tokens: int, top: int = 14) -> tuple[str, float]:
    """The GPU kernels of an untraced answer's steps (the first, eager one and the graph's replays): a table of
    the `top` kernels by time, µs per step and calls per step, and the kernels' µs per step in all."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        answer_tok_s(model, cache, prompt, new_tokens, traced=False)
    kernels = [event for event in profiler.key_averages() if event.device_time_total > 0]
    kernels.sort(key=lambda event: -event.device_time_total)
    steps = new_tokens - 1
    rows = ["| kernel | µs per step | calls per step |", "|---|---:|---:|"]
    for event in kernels[:top]:
        rows.append(f"| `{event.key[:90]}` | {event.device_time_total / steps:.1f} | {event.count / steps:.1f} |")
    total = sum(event.device_time_total for event in kernels) / steps
    rows.append(f"| all {len(kernels)} kernels | {total:.1f} | {sum(e.count for e in kernels) / steps:.1f} |")
    return "\n".join(rows), total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="smollm2")
    parser.add_argument("--context", type=int, help="tokens of context (default: the shape's)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    section, title, build_model, context, budget = SHAPES[args.shape]
    args.context = args.context or context
    model = build_model(max(8192, args.context + args.new_tokens + 16))
    use_quest(model)
    backend = make_backend("auto", "cuda", model.dtype)
    quest = default_config(model.config, budget=budget)
    prompt = random_prompt(model.config.vocab_size, args.context)
    cache = QuestCache(model.config.num_hidden_layers, quest, backend)
    prefill(model, cache, prompt[:-1], chunk_size=2048)
    speeds = {}
    for mode in ("dense", "quest"):
        cache.set_config(quest.with_changes(mode=mode))
        for traced in (False, True):
            answer_tok_s(model, cache, prompt, 8, traced)  # warm-up: compiling, captures
            runs = [answer_tok_s(model, cache, prompt, args.new_tokens, traced) for _ in range(args.runs)]
            speeds[mode, traced] = sorted(runs)[len(runs) // 2]
            print(json.dumps(dict(mode=mode, traced=traced, tok_s=runs)), flush=True)
    profile = host_profile(model, cache, prompt, args.new_tokens)
    print(profile)
    kernel_tables = {}
    for mode in ("dense", "quest"):
        cache.set_config(quest.with_changes(mode=mode))
        table, total = step_kernels(model, cache, prompt, args.new_tokens)
        kernel_tables[mode] = (f"**{mode}**: the kernels' time, {total:.1f} µs per step in all, against "
                               f"{1e6 / speeds[mode, False]:.1f} µs per untraced step above\n\n{table}")
        print(kernel_tables[mode], flush=True)
    table = ["| engine | untraced tok/s | traced tok/s | traced / untraced |", "|---|---:|---:|---:|"]
    for mode in ("dense", "quest"):
        table.append(f"| {mode} | {speeds[mode, False]:.1f} | {speeds[mode, True]:.1f} | "
                     f"{speeds[mode, True] / speeds[mode, False]:.2f}x |")
    body = (f"{title}, random bf16 weights, {args.context} tokens of "
            f"context, batch 1, {args.new_tokens} new tokens greedy with the repetition penalty "
            f"{Decoding.repetition_penalty} (the app's chat decoding), backend {backend.name}; Quest with the app's "
            f"settings for this model{' but the budget' if budget else ''} (budget {quest.budget}, pages of "
            f"{quest.page_size}, rule {quest.group_rule}, "
            f"{quest.dense_layers} dense layers). Steps replay a CUDA graph, queued ahead of the host (the graph "
            "applies the repetition penalty; a traced step's pages reach the host in stream order); tok/s over the "
            f"steps after the first two (eager, capture), the median of {args.runs} answers. Traced: as the app "
            "runs, every step's selected pages recorded and the trace's step ended after each token.\n\n" +
            "\n".join(table) +
            "\n\nWhere a traced Quest answer's host time goes (cProfile, the functions with the most time of their "
            "own; the profiler's overhead is in it):\n\n```\n" + profile.strip() + "\n```\n\n"
            f"The GPU kernels of an untraced answer of {args.new_tokens} tokens, per step (torch.profiler, CUDA "
            "activity; the first step is eager, the rest replay the graph; a kernel launched as a programmatic "
            "dependent, as ours, FlashInfer's and on Hopper the compiled layers' are, counts from when its blocks "
            "start, which can be while the kernel before it runs: the times overlap, and their sum can exceed the "
            "step's):\n\n" +
            "\n\n".join(kernel_tables.values()))
    if not args.no_write:
        write_section(section, f"GPU: the app's decoding, traced and untraced ({title.split(' (')[0]})", body)


if __name__ == "__main__":
    main()
