"""The token loop: chunked prefill, then one forward per new token. Batch size 1, any transformers decoder
switched to the quest attention (see `hf.use_quest`); `next_token` is the choice of a token from a step's logits,
the same here and in the batched engine (quest_core/engine.py)."""
import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from .cuda_graph import graph_decoder
from .hf import QuestCache, cache_argument, forward
from .sampling import sample


@torch.inference_mode()
def prefill(model, cache: QuestCache, token_ids: list[int], chunk_size: int = 512, progress=None) -> torch.Tensor:
    """Append `token_ids` to the cache in chunks; returns the last position's logits [vocab].

    progress(done, total) is called after each chunk."""
    device = next(model.parameters()).device
    cache_arg = cache_argument(model)
    cache.reserve(cache.length + len(token_ids))
    logits = None
    for start in range(0, len(token_ids), chunk_size):
        chunk = torch.tensor([token_ids[start:start + chunk_size]], device=device)
        logits = forward(model, cache, chunk, cache_arg)
        if progress:
            progress(min(start + chunk_size, len(token_ids)), len(token_ids))
    return logits


@torch.inference_mode()
def decode(model, cache: QuestCache, logits: torch.Tensor, max_new_tokens: int, stop_ids=(), min_new_tokens: int = 0,
           temperature: float = 0.0, top_p: float = 1.0, generator=None, should_stop=lambda: False,
           cuda_graph: bool = True, processors: LogitsProcessorList | None = None):
    """Yields new token ids, starting from the prefill's `logits`, until a stop id (not yielded),
    `max_new_tokens`, or `should_stop()` after a token. `processors` (transformers' logits processors, see
    `answer_processors`) see the answer's own ids. With `cuda_graph`, steps replay a CUDA graph where they
    can (see quest_core/cuda_graph.py); greedy, with no processor but a repetition penalty, they run ahead of
    the host there (traced too, except with an adaptive budget)."""
    device = logits.device
    cache_arg = cache_argument(model)
    stop_ids = list(stop_ids)
    cache.reserve(cache.length + max_new_tokens)  # no tensor of the cache moves while decoding
    graph = graph_decoder(model, cache, cache_arg) if cuda_graph else None
    penalty = repetition_penalty_only(processors)
    traced_adaptive = cache.trace is not None and cache.config.top_p is not None  # counts read on the host
    if graph is not None and temperature <= 0 and penalty is not None and not traced_adaptive:
        yield from graph.greedy(logits, max_new_tokens, stop_ids, min_new_tokens, should_stop, penalty)
        return
    answer_ids = torch.empty(1, 0, dtype=torch.long, device=device)
    for index in range(max_new_tokens):
        token_id = next_token(logits, answer_ids, index, stop_ids, min_new_tokens, temperature, top_p, generator,
                              processors)
        if token_id in stop_ids:
            return
        yield token_id
        if processors:
            answer_ids = torch.cat([answer_ids, answer_ids.new_full((1, 1), token_id)], dim=1)
        if index + 1 == max_new_tokens or should_stop():
            return
        if graph is not None:
            logits = graph.step(token_id)
        else:
            logits = forward(model, cache, torch.tensor([[token_id]], device=device), cache_arg)


def next_token(logits: torch.Tensor, answer_ids: torch.Tensor | None, index: int, stop_ids: list[int],
               min_new_tokens: int = 0, temperature: float = 0.0, top_p: float = 1.0, generator=None,
               processors: LogitsProcessorList | None = None) -> int:
    """The answer's token number `index` from logits [vocab] (changed in place): stop ids barred before
    `min_new_tokens`, `processors` on the answer's ids [1, index] (None without processors), then `sample`."""
    if index < min_new_tokens and stop_ids:
        logits[stop_ids] = -float("inf")
    if processors:
        logits = processors(answer_ids, logits[None])[0]
    return int(sample(logits, temperature, top_p, generator))


def answer_processors(repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> LogitsProcessorList:
    """transformers' repetition penalty and no-repeat n-grams, as `decode` applies them: to the answer's ids."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    return processors


def repetition_penalty_only(processors: LogitsProcessorList | None) -> float | None:
    """The repetition penalty of `processors` where that is all they do (1.0 for none), which a CUDA graph's
    greedy pick applies itself; None for any other processor."""
    if not processors:
        return 1.0
    only = processors[0]
    if len(processors) == 1 and type(only) is RepetitionPenaltyLogitsProcessor \
            and getattr(only, "prompt_ignore_length", None) is None:
        return only.penalty
    return None


def generate_ids(model, cache: QuestCache, prompt_ids: list[int], max_new_tokens: int, chunk_size: int = 512,
                 **kwargs) -> list[int]:
    """Greedy (by default) continuation of `prompt_ids`, as a list: the oracle tests' entry point."""
    logits = prefill(model, cache, prompt_ids, chunk_size)
    return list(decode(model, cache, logits, max_new_tokens, **kwargs))
