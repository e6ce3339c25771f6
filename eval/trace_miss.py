"""Issue 15 item 5, a first look: the two report-split passkeys that Quest (model default) misses at budget 128 while
dense attention finds them, both in the Britannica text at 7.5K tokens. The key's tokens are forced one step at a
time; each step prints the probability of the right token at budgets 128 and 256 and how many (sparse layer, KV
head) pairs read a page holding the token to copy next (the space before the key, then its digits), in either mention
of the key.

    python -m eval.trace_miss     # about 3 minutes on one thread
"""
import torch

from quest_core.config import QuestConfig, default_config
from quest_core.generation import prefill
from quest_core.hf import QuestCache, cache_argument, forward
from quest_core.models import load_model
from quest_core.trace import Trace

from . import passkey, report

MISSES = ((0.1, "69294"), (0.3, "83370"))  # (depth, passkey) of the misses, from results/report/passkey-2.csv


@torch.inference_mode()
def main():
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    text = report.report_texts()["britannica_shakespeare"]
    for depth, key in MISSES:
        prompt = passkey.chat_prompt(tokenizer, text, 7500, depth, key)
        answer = tokenizer(" " + key, add_special_tokens=False)["input_ids"]  # a space, then one token per digit
        mentions = [i for i in range(len(prompt) - 5) if prompt[i:i + 5] == answer[1:]]
        cache = QuestCache(model.config.num_hidden_layers, QuestConfig(mode="dense"))
        prefill(model, cache, prompt[:-1])
        for budget in (128, 256):
            config = default_config(model.config, budget=budget)
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
                sparse = [layer for layer in range(selected.shape[0]) if selected[layer, 0, 0] >= 0]
                hits = sum(any(int(p) in pages for p in selected[layer, head])
                           for layer in sparse for head in range(selected.shape[1]))
                top = int(logits.argmax())
                print(f"depth {depth} budget {budget} step {step}: wants {tokenizer.decode([wanted])!r} argmax "
                      f"{tokenizer.decode([top])!r} p={torch.softmax(logits, -1)[wanted]:.2f}; (layer, head) pairs "
                      f"reading the next digit's page: {hits}/{len(sparse) * selected.shape[1]}", flush=True)
            cache.trace = None


if __name__ == "__main__":
    main()
