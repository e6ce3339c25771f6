"""Scratch probe (issue 15 item 5): chat passkeys on the tuning split's prose (or, to report a variant chosen there,
the report split's; or, for what the tuning and report splits chose together, the holdout split's; or, for what
those three chose, the second holdout split's), dense vs the model default at small budgets and variants of the
selection, each variant a torch backend with one change."""
import argparse
import json
import random
import re
import sys
import time

import torch

from quest_core.backend_torch import TorchBackend, _scores
from quest_core.config import QuestConfig, default_config
from quest_core.generation import prefill
from quest_core.hf import QuestCache
from quest_core.models import load_model
from quest_core.selection import page_scores, select_pages

from . import passkey, report

# The probes ran in load_model's "auto" dtype until 2026-12-01: bfloat16 on a CPU with AVX-512 (the machines of
# that day's runs: they reproduce its numbers), float32 on others; their rows did not say which.
DTYPE_HELP = "the model's dtype (default bf16, what the probes of 2026-12-01 ran in; fp32 as eval.report)"


_FP8_CODES = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float()
_FP8_VALUES = torch.cat([torch.tensor([-torch.inf, torch.inf]), _FP8_CODES[_FP8_CODES.isfinite()]]).unique()  # sorted


def fp8_outward(page_bounds: torch.Tensor) -> torch.Tensor:
    """page_bounds [Hkv, pages, 2D] (max then min) stored as float8 e4m3 would hold them for scoring: each max rounded
    up and each min down to a value of that type (+-inf beyond its largest), so they still bound every key of the
    page; returned in float32."""
    top, bottom = page_bounds.float().chunk(2, dim=-1)
    up = _FP8_VALUES[torch.searchsorted(_FP8_VALUES, top.contiguous())]
    down = _FP8_VALUES[torch.searchsorted(_FP8_VALUES, bottom.contiguous(), right=True) - 1]
    return torch.cat([up, down], dim=-1)


def int8_outward(page_bounds: torch.Tensor) -> torch.Tensor:
    """page_bounds [Hkv, pages, 2D] (max then min) stored as int8 with a scale per KV head and dimension (the largest
    bound of that dimension over the pages, / 127): each max rounded up and each min down to a multiple of the scale,
    so they still bound every key of the page; returned in float32."""
    top, bottom = page_bounds.float().chunk(2, dim=-1)
    largest = torch.maximum(top.abs(), bottom.abs()).amax(dim=1, keepdim=True)  # [Hkv, 1, D]
    scale = (largest / 127 * (1 + 1e-6)).clamp(min=1e-30)  # a hair over: the largest rounds to 127 steps, not 128
    return torch.cat([(top / scale).ceil() * scale, (bottom / scale).floor() * scale], dim=-1)


class Probe(TorchBackend):
    """recent: the last `recent` full pages are always selected (out of the budget); temp: rule mass's softmax
    over bounds with logits * temp (temp < 1 flattens it); small_bounds: pages scored on their bounds rounded outward
    by it (`fp8_outward`, `int8_outward`: half the bytes a GPU's scoring reads), each selection's share of the
    pages the exact bounds select appended to `kept`."""

    def __init__(self, recent=0, temp=1.0, rule=None, sink=0, small_bounds=None):
        super().__init__()
        self.recent, self.temp, self.rule, self.sink, self.small_bounds = recent, temp, rule, sink, small_bounds
        self.kept = []

    def select(self, query, layer, num_selected, group_rule, sink_pages=0, coarse_factor=0):
        if coarse_factor:  # QuestConfig's two-level ranking, as the engine runs it
            return super().select(query, layer, num_selected, group_rule, sink_pages, coarse_factor)
        rule = self.rule or group_rule
        if rule == "mass" and self.temp != 1.0:
            q = query.to(layer.page_bounds.dtype)
            split = torch.cat([q.clamp(min=0), q.clamp(max=0)], -1)
            bounds = layer.page_bounds[:, :layer.num_pages]
            logits = torch.bmm(split, bounds.transpose(1, 2)).float()
            scores = torch.softmax(logits * query.shape[-1] ** -0.5 * self.temp, -1).sum(1)
        elif self.small_bounds:
            scores = page_scores(query, self.small_bounds(layer.page_bounds[:, :layer.num_pages]), rule)
        else:
            scores, _ = _scores(query, layer, rule)
        if self.sink:
            scores = scores.clone()
            scores[:, :self.sink] = torch.inf
        if self.recent:
            n = scores.shape[1]
            scores = scores.clone()
            scores[:, max(0, n - 1 - self.recent):n - 1] = torch.inf
        selected = select_pages(scores, num_selected)  # [Hkv, k]
        if self.small_bounds:
            exact = select_pages(_scores(query, layer, rule)[0], num_selected)
            self.kept.append((selected[:, :, None] == exact[:, None]).any(-1).float().mean().item())
        return selected


def two_level_variants(model_config, budget):
    """The model default and pages of 2 beside the two-level ranking (QuestConfig.coarse_factor) with the pages of
    2x and 4x the budget's pages' worth of pairs as candidates."""
    base = default_config(model_config, budget=budget)
    fine = base.with_changes(page_size=2)
    return [("dense", QuestConfig(mode="dense"), Probe()), (f"base@{budget}", base, Probe()),
            (f"p2@{budget}", fine, Probe()), (f"2lvl2@{budget}", fine.with_changes(coarse_factor=2), Probe()),
            (f"2lvl4@{budget}", fine.with_changes(coarse_factor=4), Probe())]


def two_level_top_p_variants(model_config, budget, grid, min_budget, fixed=(64, 128)):
    """The model default and the two-level ranking (pages of 2, coarse_factor 4) at the `fixed` budgets and `budget`,
    and the latter with the adaptive budget (QuestConfig.top_p) at each p of `grid`, `budget` tokens its most and
    `min_budget` its fewest (a grid entry "p:m" has its own fewest tokens m, named in the variant)."""
    two_level = default_config(model_config, page_size=2, coarse_factor=4, min_budget=min_budget)
    out = [("dense", QuestConfig(mode="dense"), Probe())] + [
        (f"base@{b}", default_config(model_config, budget=b), Probe()) for b in (*fixed, budget)] + [
        (f"2lvl4@{b}", two_level.with_changes(budget=b), Probe()) for b in (*fixed, budget)]
    for entry in grid:
        p, _, fewest = entry.partition(":")
        name = f"2lvl4-topp{p}" + (f"-min{fewest}" if fewest else "") + f"@{budget}"
        out.append((name, two_level.with_changes(budget=budget, top_p=float(p), min_budget=int(fewest or min_budget)),
                    Probe()))
    return out


def sink_variants(model_config, budgets):
    out = [("dense", QuestConfig(mode="dense"), Probe())]
    for b in budgets:
        base = default_config(model_config, budget=b)
        out += [(f"base@{b}", base, Probe()), (f"sink1@{b}", base, Probe(sink=1))]
    base = default_config(model_config, budget=128)
    return out + [("sink2@128", base, Probe(sink=2)), ("sink1+recent4@128", base, Probe(sink=1, recent=4))]


def oracle_variants(model_config, budgets):
    """The model default beside the oracle (the pages holding the most dense attention) on the same pages: what
    any page selection could find at each budget."""
    out = [("dense", QuestConfig(mode="dense"), Probe())]
    for b in budgets:
        base = default_config(model_config, budget=b)
        out += [(f"base@{b}", base, Probe()), (f"oracle@{b}", base.with_changes(mode="oracle"), Probe())]
    return out


def ranking_variants(model_config, budget):
    """Page rankings at one budget: the model default, the sink page, pages of 2 (with and without the sink) and the
    oracle on the default's pages."""
    base = default_config(model_config, budget=budget)
    return [("dense", QuestConfig(mode="dense"), Probe()), (f"base@{budget}", base, Probe()),
            (f"sink1@{budget}", base, Probe(sink=1)), (f"p2@{budget}", base.with_changes(page_size=2), Probe()),
            (f"p2sink1@{budget}", base.with_changes(page_size=2), Probe(sink=1)),
            (f"oracle@{budget}", base.with_changes(mode="oracle"), Probe())]


def small_bounds_variants(model_config, budgets, name, small_bounds, **changes):
    """The model default at each budget (with `changes`, QuestConfig fields) beside the same with its pages scored on
    bounds rounded outward by `small_bounds` (variant `name`@budget)."""
    out = [("dense", QuestConfig(mode="dense"), Probe())]
    for b in budgets:
        base = default_config(model_config, budget=b).with_changes(**changes)
        out += [(f"base@{b}", base, Probe()), (f"{name}@{b}", base, Probe(small_bounds=small_bounds))]
    return out


def variants(model_config, budgets):
    out = [("dense", QuestConfig(mode="dense"), Probe())]
    for b in budgets:
        base = default_config(model_config, budget=b)
        out += [(f"base@{b}", base, Probe())]
    b = 128
    base = default_config(model_config, budget=b)
    out += [(f"recent2@{b}", base, Probe(recent=2)), (f"recent4@{b}", base, Probe(recent=4)),
            (f"recent8@{b}", base, Probe(recent=8)),
            (f"temp0.5@{b}", base, Probe(temp=0.5)), (f"temp2@{b}", base, Probe(temp=2.0)),
            (f"max@{b}", base, Probe(rule="max")), (f"sum@{b}", base, Probe(rule="sum")),
            (f"dense4@{b}", base.with_changes(dense_layers=4), Probe()),
            (f"dense6@{b}", base.with_changes(dense_layers=6), Probe()),
            (f"p8@{b}", base.with_changes(page_size=8), Probe()),
            (f"p2@{b}", base.with_changes(page_size=2), Probe())]
    return out


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="2048")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--split", choices=["tuning", *report.HELD_OUT_SPLITS], default="tuning")
    parser.add_argument("--fillers", help="comma-separated texts of the split (default: all of its prose)")
    parser.add_argument("--out", default="/tmp/miss_probe.jsonl")
    parser.add_argument("--variants", default="selection",
                        choices=["selection", "sinks", "oracle", "ranking", "two-level", "two-level-top-p",
                                 "fp8-bounds", "int8-bounds", "int8-bounds-sum16"])
    parser.add_argument("--top-p-grid", default="0.5,0.7,0.8,0.9,0.95,0.98",
                        help="the shares of the two-level-top-p variants (p, or p:fewest tokens)")
    parser.add_argument("--min-budget", type=int, default=QuestConfig.min_budget,
                        help="the fewest tokens of the two-level-top-p variants")
    parser.add_argument("--fixed-budgets", default="64,128", help="the two-level-top-p variants' fixed budgets")
    parser.add_argument("--budget", type=int, default=128, help="the budget of the ranking and two-level variants")
    parser.add_argument("--dtype", default="bf16", help=DTYPE_HELP)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype=args.dtype, device="cpu")
    fillers = report.TOP_P_FILLERS if args.split == "tuning" else report.HELD_OUT_SPLITS[args.split]
    texts = report.tuning_texts() if args.split == "tuning" else report.report_texts(fillers)
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    settings = dict(report.SETTINGS, contexts=[1536, 2048, 3072, 4096, 7500])
    pairs = [p for p in report.passkey_pairs(fillers, settings)
             if p[1] in (args.fillers.split(",") if args.fillers else fillers) and p[2] in contexts]
    rows = dict(selection=lambda: variants(model.config, [128, 256]),
                sinks=lambda: sink_variants(model.config, [128, 256, 1024]),
                oracle=lambda: oracle_variants(model.config, [128, 256]),
                ranking=lambda: ranking_variants(model.config, args.budget),
                **{"fp8-bounds": lambda: small_bounds_variants(model.config, [128, 256], "fp8", fp8_outward),
                   "int8-bounds": lambda: small_bounds_variants(model.config, [128, 256], "int8", int8_outward),
                   "int8-bounds-sum16": lambda: small_bounds_variants(  # Llama-3.1-8B's settings on the GPU
                       model.config, [256, 512], "int8", int8_outward, group_rule="sum", page_size=16),
                   "two-level": lambda: two_level_variants(model.config, args.budget),
                   "two-level-top-p": lambda: two_level_top_p_variants(
                       model.config, args.budget, args.top_p_grid.split(","), args.min_budget,
                       [int(b) for b in args.fixed_budgets.split(",")])})[args.variants]()
    with open(args.out, "a") as out:
        for seed, filler, context in pairs:
            rng = random.Random(seed)
            cache = QuestCache(model.config.num_hidden_layers, rows[0][1], backend=rows[0][2])
            for depth in depths:  # the same keys as passkey.run with all 9 report depths? no: own draws
                key = str(rng.randint(10000, 99999))
                prompt = passkey.chat_prompt(tokenizer, texts[filler], context, depth, key)
                started = time.time()
                cache.truncate(0)
                cache.set_config(rows[0][1])
                prefill(model, cache, prompt[:-1])
                result = dict(filler=filler, context=context, depth=depth, key=key, dtype=args.dtype)
                for name, config, backend in rows:
                    cache.truncate(len(prompt) - 1)
                    cache.backend = backend
                    cache.set_config(config)
                    answer_ids, pages = passkey.traced_answer(model, cache, prompt[-1], 6)
                    answer = tokenizer.decode(answer_ids)
                    result[name + ":pages"] = pages and round(pages, 2)  # per KV head of a sparse layer and step
                    if backend.kept:  # smaller bounds: the share of the exact bounds' pages kept, over sparse layers
                        result[name + ":kept"] = round(sum(backend.kept) / len(backend.kept), 4)
                        backend.kept.clear()
                    found = re.search(r"\d{5}", answer)
                    result[name] = bool(found and found.group() == key)
                    result[name + ":a"] = answer.strip()
                    if name == "dense" and not result[name]:
                        break
                result["s"] = round(time.time() - started, 1)
                print(json.dumps({k: v for k, v in result.items() if not k.endswith(":a")}), flush=True)
                out.write(json.dumps(result) + "\n")
                out.flush()


if __name__ == "__main__":
    sys.exit(main())
