"""Decode speed on the default model: HF `generate` vs our dense vs our Quest, side by side, in one run. Quest runs
with `--page-size` and rule sum, and with the app's default for this model (quest_core.config.default_config: pages
of 4, rule mass) beside the two-level ranking (pages of 2, coarse_factor 4, rule mass), both at `--budget` and at
`--small-budget`, where the two-level ranking is meant to help.

Each context length is prefilled once per engine (HF through a reused DynamicCache prefix, ours through the
paged cache); every timed run then decodes `--new-tokens` tokens (EOS suppressed) from the same prompt.
decode tok/s = (tokens - 1) / (time of last token - time of first token); the table shows the median of runs.

    python bench/cpu_decode.py                   # 1K, 4K, 8K; writes bench/RESULTS.md
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results import write_section  # noqa: E402
from quest_core.config import QuestConfig, default_config  # noqa: E402
from quest_core.generation import decode, prefill  # noqa: E402
from quest_core.hf import QuestCache, cache_argument, use_quest  # noqa: E402
from quest_core.models import load_model  # noqa: E402


class Timestamps:
    """A `generate` streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def tokens_per_s(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def hf_generate_runs(model, prompt, new_tokens, runs):
    ids = torch.tensor([prompt])
    prefix = DynamicCache(config=model.config)
    cache_arg = cache_argument(model)
    with torch.inference_mode():
        model(ids[:, :-1], **{cache_arg: prefix})
    speeds = []
    for run in range(runs + 1):  # the first run warms up
        streamer = Timestamps()
        model.generate(ids, **{cache_arg: copy.deepcopy(prefix)}, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, streamer=streamer)
        if run:
            speeds.append(tokens_per_s(streamer.times[1:]))
    return speeds


def ours_runs(model, cache, prompt, new_tokens, runs):
    speeds = []
    for run in range(runs + 1):
        cache.truncate(len(prompt) - 1)
        logits = prefill(model, cache, prompt[-1:])
        times = []
        for _ in decode(model, cache, logits, new_tokens, min_new_tokens=new_tokens):
            times.append(time.perf_counter())
        if run:
            speeds.append(tokens_per_s(times))
    return speeds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8000])
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--small-budget", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    model, tokenizer = load_model(dtype=args.dtype, device="cpu")
    document = (Path(__file__).resolve().parent.parent / "assets" / "hamlet.txt").read_text()
    document_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    quest = QuestConfig(mode="quest", budget=args.budget, page_size=args.page_size)
    quest_app = default_config(model.config).with_changes(budget=args.budget)
    two_level = quest_app.with_changes(page_size=2, coarse_factor=4)
    app_label = f"page {quest_app.page_size}, {quest_app.group_rule}"
    rows = []
    for context in args.contexts:
        prompt = document_ids[:context]
        model.set_attn_implementation("sdpa")
        hf = hf_generate_runs(model, prompt, args.new_tokens, args.runs)
        use_quest(model)
        cache = QuestCache(model.config.num_hidden_layers, quest)
        prefill(model, cache, prompt[:-1])
        cache.set_config(quest.with_changes(mode="dense"))
        dense = ours_runs(model, cache, prompt, args.new_tokens, args.runs)
        cache.set_config(quest)
        sparse = ours_runs(model, cache, prompt, args.new_tokens, args.runs)
        runs = {"hf_generate": hf, "ours_dense": dense, "ours_quest": sparse}
        for name, config in (("ours_quest_app", quest_app), ("ours_two_level", two_level)):
            for suffix, budget in (("", args.budget), ("_small", args.small_budget)):
                cache.set_config(config.with_changes(budget=budget))
                runs[name + suffix] = ours_runs(model, cache, prompt, args.new_tokens, args.runs)
        row = {"context": context, **{name: statistics.median(speeds) for name, speeds in runs.items()}, "runs": runs}
        rows.append(row)
        print(json.dumps(row), flush=True)

    table = [f"| context | HF generate tok/s | ours dense tok/s | ours Quest tok/s (page {args.page_size}, sum) | "
             f"ours Quest tok/s ({app_label}) | Quest / HF | Quest / dense | Quest ({app_label}) / dense "
             "| dense / HF |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['context']} | {r['hf_generate']:.1f} | {r['ours_dense']:.1f} | {r['ours_quest']:.1f} "
                     f"| {r['ours_quest_app']:.1f} | {r['ours_quest'] / r['hf_generate']:.2f}x "
                     f"| {r['ours_quest'] / r['ours_dense']:.2f}x | {r['ours_quest_app'] / r['ours_dense']:.2f}x "
                     f"| {r['ours_dense'] / r['hf_generate']:.2f}x |")
    levels = [f"| context | {app_label} @{args.budget} | two-level @{args.budget} | two-level / {app_label} | "
              f"{app_label} @{args.small_budget} | two-level @{args.small_budget} | two-level / {app_label} |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        app, small_app = r["ours_quest_app"], r["ours_quest_app_small"]
        levels.append(f"| {r['context']} | {app:.1f} | {r['ours_two_level']:.1f} | {r['ours_two_level'] / app:.2f}x | "
                      f"{small_app:.1f} | {r['ours_two_level_small']:.1f} | "
                      f"{r['ours_two_level_small'] / small_app:.2f}x |")
    body = (f"Default model (SmolLM2-135M-Instruct, {model.dtype}), batch 1, {args.new_tokens} new tokens per run, "
            f"median of {args.runs} runs after a warm-up; Quest budget {args.budget}, dense layers "
            f"{quest.dense_layers}, pages of {args.page_size} with group rule sum (the engine's default), and pages "
            f"of {quest_app.page_size} with rule {quest_app.group_rule} (the app's default for this model). Prompt: "
            f"the first N tokens of assets/hamlet.txt. The torch backend's dense decode reads the head-major cache in "
            f"place (no per-step copy). Load average (1 min) at the start and end: {load_before:.1f}, "
            f"{os.getloadavg()[0]:.1f} (the end figure counts this run's own "
            f"{torch.get_num_threads()} threads; a start figure near the core count would mean other work shared "
            "the cores).\n\n"
            + "\n".join(table) +
            "\n\nThe two-level ranking (`QuestConfig(page_size=2, coarse_factor=4)`: pairs of pages of 2 first, from "
            "their bounds kept as tokens arrive, then the pages of the best pairs; rule mass) against the app's "
            "default, decode tok/s:\n\n" + "\n".join(levels))
    if not args.no_write:
        write_section("cpu_decode", "CPU decode: HF generate vs ours dense vs ours Quest", body)
    print(json.dumps({"bench": "cpu_decode", "rows": [{k: v for k, v in r.items() if k != "runs"} for r in rows]}))


if __name__ == "__main__":
    main()
