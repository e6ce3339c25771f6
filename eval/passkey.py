"""Passkey retrieval: a random 5-digit key hidden at a depth of filler text; exact match of the greedy answer.

Each (filler, context, depth) prompt is prefilled once (from where it departs from the previous prompt); every
method then re-reads only the prompt's last token and decodes the answer, so all methods see identical KV."""
import random
import re

from quest_core.generation import decode, prefill
from quest_core.hf import QuestCache
from quest_core.trace import Trace, mean_pages_read

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about it.\n\n")
REPETITIVE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
CHAT_QUESTION = "\n\nWhat is the pass key?"
CHAT_ANSWER = "The pass key is"


def passkey_prompt(tokenizer, filler: str, context: int, depth: float, passkey: str) -> list[int]:
    """Token ids of a prompt of about `context` tokens with the passkey sentence at `depth` (0..1) of the filler."""
    needle = tokenizer(f" The pass key is {passkey}. Remember it. {passkey} is the pass key. ",
                       add_special_tokens=False)["input_ids"]
    head = tokenizer(INTRO, add_special_tokens=False)["input_ids"]
    tail = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    filler_ids = tokenizer(filler, add_special_tokens=False)["input_ids"]
    room = context - len(head) - len(tail) - len(needle)
    while len(filler_ids) < room:
        filler_ids = filler_ids + filler_ids
    filler_ids = filler_ids[:room]
    cut = int(room * depth)
    return head + filler_ids[:cut] + needle + filler_ids[cut:] + tail


def chat_prompt(tokenizer, filler: str, context: int, depth: float, passkey: str) -> list[int]:
    """The prompt as the app puts it (app/documents.py, quest_core/session.py): the chat template with its system
    prompt, a document of about `context` tokens holding the passkey sentence on a line of its own at `depth` (at a
    line break), the question, and the answer begun with "The pass key is"."""
    from quest_core.session import DEFAULT_SYSTEM

    def render(document: str) -> list[int]:
        messages = [{"role": "system", "content": DEFAULT_SYSTEM},
                    {"role": "user", "content": document + CHAT_QUESTION}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + CHAT_ANSWER
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    needle = f"\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n"
    filler_ids = tokenizer(filler, add_special_tokens=False)["input_ids"]
    room = context - len(render(needle))
    while len(filler_ids) < room:
        filler_ids = filler_ids + filler_ids
    text = tokenizer.decode(filler_ids[:room])
    cut = text.rfind("\n", 0, int(len(text) * depth)) + 1
    return render(text[:cut] + needle + text[cut:])


def traced_answer(model, cache: QuestCache, last_prompt_id: int, new_tokens: int) -> tuple[list[int], float | None]:
    """The greedy answer after the prompt's last token (the cache holds the rest), and the pages a KV head of a
    sparse layer read per step on average (trace.mean_pages_read; None where every layer was dense)."""
    cache.trace = Trace()
    logits = prefill(model, cache, [last_prompt_id])
    answer_ids = []
    for token_id in decode(model, cache, logits, new_tokens):  # one forward before each token
        cache.trace.end_step(cache.length, 0.0, model.config.num_hidden_layers)
        answer_ids.append(token_id)
    pages = mean_pages_read(cache.trace.steps)
    cache.trace = None
    return answer_ids, pages


def run(model, tokenizer, fillers: dict, contexts, depths, method_rows, seed=0, new_tokens=8, log=print,
        skip_unsolved=False, prompt_of=passkey_prompt):
    """Rows of (filler, context, depth, method, budget, passkey, answer, correct, pages: traced_answer's mean pages
    read). skip_unsolved: where dense attention (method_rows[0]) misses the passkey, the other methods are not run
    (accuracy over the prompts dense solves needs none of them). prompt_of: passkey_prompt (a plain text to
    continue) or chat_prompt."""
    rng = random.Random(seed)
    cache = QuestCache(model.config.num_hidden_layers, method_rows[0][2])
    rows, cached = [], []
    for filler_name, filler in fillers.items():
        for context in contexts:
            for depth in sorted(depths):  # prompts of rising depth share the text before the earlier needle
                passkey = str(rng.randint(10000, 99999))
                prompt = prompt_of(tokenizer, filler, context, depth, passkey)
                common = next((i for i, (a, b) in enumerate(zip(cached, prompt[:-1])) if a != b),
                              min(len(cached), len(prompt) - 1))
                cache.truncate(common)
                cache.set_config(method_rows[0][2])
                prefill(model, cache, prompt[common:-1])
                cached = prompt[:-1]
                for name, budget, config in method_rows:
                    if budget >= context:  # the whole prompt fits the budget: the method is dense attention
                        continue
                    cache.truncate(len(prompt) - 1)
                    cache.set_config(config)
                    answer_ids, pages = traced_answer(model, cache, prompt[-1], new_tokens)
                    answer = tokenizer.decode(answer_ids)
                    found = re.search(r"\d{5}", answer)
                    rows.append(dict(filler=filler_name, context=context, depth=depth, method=name, budget=budget,
                                     passkey=passkey, answer=answer.strip(), correct=bool(found and
                                                                                         found.group() == passkey),
                                     pages=pages))
                    if skip_unsolved and name == method_rows[0][0] and not rows[-1]["correct"]:
                        break
                log(f"passkey {filler_name} {context} depth {depth:.2f}: " + " ".join(
                    f"{r['method']}@{r['budget']}={int(r['correct'])}" for r in rows
                    if (r["filler"], r["context"], r["depth"]) == (filler_name, context, depth)))
    return rows
