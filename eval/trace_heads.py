"""Scratch (issue 15 item 5): a tuning-split passkey that budget 128 misses, the key forced token by token; at each
step which query heads copy the next digit under dense attention, and whether their KV head's selection holds it."""
import argparse

import torch

from quest_core.backend_torch import TorchBackend, _scores
from quest_core.config import QuestConfig, default_config
from quest_core.generation import prefill
from quest_core.hf import QuestCache, cache_argument, forward
from quest_core.models import load_model
from quest_core.selection import page_attention_mass, select_pages

from . import passkey, report
from .miss_probe import DTYPE_HELP


class Tracer(TorchBackend):
    def __init__(self):
        super().__init__()
        self.index, self.records = {}, {}
        self.oracle_layers, self.force_pages, self.recent, self.sink = set(), None, 0, 0

    def select(self, query, layer, num_selected, group_rule, sink_pages=0, coarse_factor=0):
        i = self.index[id(layer)]
        scores, _ = _scores(query, layer, group_rule)
        keys = layer.dense()[0]
        scaling = query.shape[-1] ** -0.5
        probs = torch.softmax(torch.einsum("hgd,hsd->hgs", query.float(), keys.float()) * scaling, -1)
        if i in self.oracle_layers:
            selected = select_pages(page_attention_mass(query, keys, layer.page_size, scaling), num_selected)
        else:
            chosen = scores.clone()
            if self.sink:
                chosen[:, :self.sink] = torch.inf
            if self.force_pages is not None:
                chosen[:, self.force_pages] = torch.inf
            if self.recent:
                n = chosen.shape[1]
                chosen[:, max(0, n - 1 - self.recent):n - 1] = torch.inf
            selected = select_pages(chosen, num_selected)
        self.records[i] = dict(scores=scores, probs=probs, selected=selected, page_size=layer.page_size)
        return selected


def forced(model, cache, backend, prompt, answer, config, upto=None):
    """Replay the forced key under `config`; per step (p of the right token, argmax, records)."""
    cache.truncate(len(prompt) - 1)
    cache.set_config(config)
    tokens = [prompt[-1]] + answer
    steps = []
    for step, token in enumerate(tokens[:-1]):
        backend.records = {}
        logits = forward(model, cache, torch.tensor([[token]]), cache_argument(model))
        p = torch.softmax(logits, -1)
        steps.append((float(p[tokens[step + 1]]), int(logits.argmax()), backend.records))
        if upto is not None and step == upto:
            break
    return steps


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("prompts", nargs="+", help="filler:context:depth:key")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", default="bf16", help=DTYPE_HELP)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype=args.dtype, device="cpu")
    texts = report.tuning_texts()
    for spec in args.prompts:
        filler, context, depth, key = spec.split(":")
        prompt = passkey.chat_prompt(tokenizer, texts[filler], int(context), float(depth), key)
        answer = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
        digits = answer[1:]
        mentions = [i for i in range(len(prompt) - 5) if prompt[i:i + 5] == digits]
        backend = Tracer()
        cache = QuestCache(model.config.num_hidden_layers, QuestConfig(mode="dense"), backend=backend)
        prefill(model, cache, prompt[:-1])
        backend.index = {id(layer): i for i, layer in enumerate(cache.layers)}
        print(f"== {spec}: {len(prompt)} tokens, key at {mentions}, prompt end "
              f"{tokenizer.decode(prompt[-12:])!r}", flush=True)
        configs = {b: default_config(model.config, budget=b) for b in (128, 256)}
        runs = {b: forced(model, cache, backend, prompt, answer, c) for b, c in configs.items()}
        # dense reference: the query heads' attention on the next digit, from the 128 run's records (its queries
        # differ from dense's only through earlier sparse layers; use dense_layers=30 for exact dense)
        dense_run = forced(model, cache, backend, prompt, answer,
                           configs[128].with_changes(dense_layers=0, budget=1 << 20))
        for step in range(len(answer)):
            ps = {b: runs[b][step][0] for b in runs}
            line = (f"step {step} wants {tokenizer.decode([([prompt[-1]] + answer)[step + 1]])!r}: "
                    f"p dense {dense_run[step][0]:.2f} 128 {ps[128]:.2f} ({tokenizer.decode([runs[128][step][1]])!r})"
                    f" 256 {ps[256]:.2f}")
            print(line, flush=True)
            if step > 5:
                continue
            targets = [m + step - 1 for m in mentions]  # the token to copy next (the space, then a digit)
            for b in (128, 256):
                rec_all = runs[b][step][2]
                rows = []
                for layer, rec in sorted(rec_all.items()):
                    probs = rec["probs"]  # [Hkv, G, S] (this run's queries)
                    tmass = probs[:, :, targets].sum(-1)  # [Hkv, G]
                    page_size = rec["page_size"]
                    tpages = sorted({t // page_size for t in targets})
                    for h in range(probs.shape[0]):
                        sel = set(rec["selected"][h].tolist())
                        order = rec["scores"][h].argsort(descending=True).tolist()
                        ranks = [order.index(p) for p in tpages]
                        page_mass = torch.nn.functional.pad(probs[h], (0, -probs.shape[-1] % page_size)).view(
                            probs.shape[1], -1, page_size).sum(-1)  # [G, pages]
                        recall = page_mass[:, sorted(sel)].sum(-1)  # [G]
                        for g in range(probs.shape[1]):
                            if tmass[h, g] > 0.1:
                                rows.append(f"L{layer}h{h}g{g} m={tmass[h, g]:.2f} sel={[p in sel for p in tpages]} "
                                            f"rank={ranks} recall={recall[g]:.2f}")
                print(f"  budget {b}: heads with >0.1 of their attention on the next digit: {len(rows)}")
                for row in rows:
                    print("    " + row)
        if not args.causal:
            continue
        fail = next((s for s in range(len(answer)) if runs[128][s][1] != ([prompt[-1]] + answer)[s + 1]), None)
        if fail is None:
            continue
        print(f"  causal at step {fail}:")
        needle_pages = sorted({t // 4 for m in mentions for t in range(m - 6, m + 6)})
        backend.force_pages = needle_pages
        p = forced(model, cache, backend, prompt, answer, configs[128], fail)[fail][0]
        print(f"    force needle pages {needle_pages}: p={p:.2f}")
        backend.force_pages = None
        for r in (2, 4, 8):
            backend.recent = r
            print(f"    recent {r}: p={forced(model, cache, backend, prompt, answer, configs[128], fail)[fail][0]:.2f}")
        backend.recent = 0
        backend.sink = 1
        print(f"    sink page: p={forced(model, cache, backend, prompt, answer, configs[128], fail)[fail][0]:.2f}")
        backend.sink = 0
        gains = []
        for layer in range(2, model.config.num_hidden_layers):
            backend.oracle_layers = {layer}
            gains.append((forced(model, cache, backend, prompt, answer, configs[128], fail)[fail][0], layer))
        backend.oracle_layers = set()
        best = sorted(gains)[::-1][:8]
        print("    oracle selection in one layer: " + " ".join(f"L{layer}:{p:.2f}" for p, layer in best))
        backend.oracle_layers = set(range(2, 30))
        p = forced(model, cache, backend, prompt, answer, configs[128], fail)[fail][0]
        print(f"    oracle everywhere: p={p:.2f}")
        backend.oracle_layers = set()


if __name__ == "__main__":
    main()
