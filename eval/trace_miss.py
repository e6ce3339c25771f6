"""Issue 15 item 5, a first look: the two report-split passkeys that Quest (model default) misses at budget 128 while
dense attention finds them, both in the Britannica text at 7.5K tokens. The key's tokens are forced one step at a
time; each step prints the probability of the right token at budgets 128 and 256 and how many (sparse layer, KV
head) pairs read a page holding the token to copy next (the space before the key, then its digits), in either mention
of the key.

    python -m eval.trace_miss     # about 3 minutes on one thread

Or any one prompt of a split, dense and the two-level ranking (pages of 2, coarse_factor 4) beside the model default:

    python -m eval.trace_miss --prompt holdout2:as_you_like_it:3072:0.5:97347
"""
import argparse

import torch

from quest_core.config import QuestConfig, default_config
from quest_core.generation import prefill
from quest_core.hf import QuestCache, cache_argument, forward
from quest_core.models import load_model
from quest_core.trace import Trace

from . import passkey, report
from .miss_probe import DTYPE_HELP

# (split, filler, context, depth, passkey) of the misses, from results/report/passkey-2.csv
MISSES = (("report", "britannica_shakespeare", 7500, 0.1, "69294"),
          ("report", "britannica_shakespeare", 7500, 0.3, "83370"))


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", help="split:filler:context:depth:key (default: the two Britannica misses)")
    parser.add_argument("--dtype", default="bf16", help=DTYPE_HELP)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype=args.dtype, device="cpu")
    misses = MISSES
    configs = [(f"default@{b}", default_config(model.config, budget=b)) for b in (128, 256)]
    if args.prompt:
        split, filler, context, depth, key = args.prompt.split(":")
        misses = ((split, filler, int(context), float(depth), key),)
        two_level = default_config(model.config, page_size=2, coarse_factor=4)
        configs = [("dense", QuestConfig(mode="dense"))] + configs + [
            (f"two-level@{b}", two_level.with_changes(budget=b)) for b in (128, 256)]
    for split, filler, context, depth, key in misses:
        text = report.report_texts(report.HELD_OUT_SPLITS[split])[filler]
        prompt = passkey.chat_prompt(tokenizer, text, context, depth, key)
        answer = tokenizer(" " + key, add_special_tokens=False)["input_ids"]  # a space, then one token per digit
        mentions = [i for i in range(len(prompt) - 5) if prompt[i:i + 5] == answer[1:]]
        cache = QuestCache(model.config.num_hidden_layers, QuestConfig(mode="dense"))
        prefill(model, cache, prompt[:-1])
        for name, config in configs:
            cache.truncate(len(prompt) - 1)
            cache.set_config(config)
            cache.trace = Trace()
            forced = [prompt[-1]] + answer
            for step, token in enumerate(forced[:-1]):
                logits = forward(model, cache, torch.tensor([[token]]), cache_argument(model))
                selected = cache.trace.end_step(cache.length, 0.0, model.config.num_hidden_layers).selected_pages
                wanted = forced[step + 1]
                targets = [m + step - 1 for m in mentions]  # the token to copy next: the space, then a digit
                pages = {t // config.page_size for t in targets}
                selected = torch.full((1, 1, 1), -1) if selected is None else selected  # dense: no layer selects
                sparse = [layer for layer in range(selected.shape[0]) if selected[layer, 0, 0] >= 0]
                probability = torch.softmax(logits.float(), -1)
                hits = sum(any(int(p) in pages for p in selected[layer, head])
                           for layer in sparse for head in range(selected.shape[1]))
                top = int(logits.argmax())
                print(f"{filler} {context} depth {depth} {name} step {step}: wants {tokenizer.decode([wanted])!r} "
                      f"p={probability[wanted]:.2f}, argmax {tokenizer.decode([top])!r} p={probability[top]:.2f}; "
                      f"(layer, head) pairs reading the next digit's page: {hits}/{len(sparse) * selected.shape[1]}",
                      flush=True)
            cache.trace = None


if __name__ == "__main__":
    main()
