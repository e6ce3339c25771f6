"""Perplexity in decode mode: after a prefix, every next token is scored one decode step at a time, so the
sparse methods really select pages (prefill is dense). Selection recall is measured on the same steps."""
import math

import torch

from quest_core.generation import prefill
from quest_core.hf import QuestCache, cache_argument, forward
from quest_core.trace import Trace


@torch.inference_mode()
def run(model, token_ids: list[int], prefix: int, scored: int, method_rows, log=print):
    """Rows of (method, budget, ppl, recall): perplexity of token_ids[prefix:prefix+scored] given what precedes,
    and the mean share of dense attention mass on the selected pages (None for dense)."""
    device = next(model.parameters()).device
    cache_arg = cache_argument(model)
    cache = QuestCache(model.config.num_hidden_layers, method_rows[0][2])
    prefill(model, cache, token_ids[:prefix - 1])  # each method's first step appends token prefix - 1
    rows = []
    for name, budget, config in method_rows:
        cache.truncate(prefix - 1)
        cache.set_config(config)
        cache.trace = Trace(inspect=name != "dense")
        nll = 0.0
        for position in range(prefix, prefix + scored):
            logits = forward(model, cache, torch.tensor([[token_ids[position - 1]]], device=device), cache_arg)
            nll -= torch.log_softmax(logits, -1)[token_ids[position]].item()
            cache.trace.end_step(cache.length, 0.0, model.config.num_hidden_layers)
        recalls = [s.recall for s in cache.trace.steps if s.recall is not None]
        recall = torch.nanmean(torch.stack(recalls)).item() if recalls else None
        cache.trace = None
        rows.append(dict(method=name, budget=budget, ppl=math.exp(nll / scored), recall=recall))
        log(f"perplexity {name}@{budget}: {rows[-1]['ppl']:.3f}, recall {recall}")
    return rows


@torch.inference_mode()
def run_windows(model, texts: dict, starts: dict, scored: int, method_rows, log=print):
    """Rows of (text, start, method, budget, ppl): for each text (name -> token ids) and each window start, the
    perplexity of ids[start:start+scored] scored one decode step at a time by every method. Each text is prefilled
    once, window by window (dense); every method re-decodes a window from the same cache, cut back to its start."""
    device = next(model.parameters()).device
    cache_arg = cache_argument(model)
    cache = QuestCache(model.config.num_hidden_layers, method_rows[0][2])
    rows = []
    for text, token_ids in texts.items():
        cache.truncate(0)
        cached = 0
        for start in sorted(starts[text]):
            cache.truncate(cached)
            cache.set_config(method_rows[0][2])
            prefill(model, cache, token_ids[cached:start - 1])  # each method's first step appends token start - 1
            cached = start - 1
            for name, budget, config in method_rows:
                cache.truncate(cached)
                cache.set_config(config)
                nll = 0.0
                for position in range(start, start + scored):
                    logits = forward(model, cache, torch.tensor([[token_ids[position - 1]]], device=device), cache_arg)
                    nll -= torch.log_softmax(logits, -1)[token_ids[position]].item()
                rows.append(dict(text=text, start=start, method=name, budget=budget, ppl=math.exp(nll / scored)))
            log(f"perplexity {text}@{start}: " + " ".join(f"{r['method']}@{r['budget']}={r['ppl']:.2f}"
                                                         for r in rows[-len(method_rows):]))
    return rows
