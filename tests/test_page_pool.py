"""A GPU engine keeps every request's K/V in one page pool and attends for a whole batch at once
(hf._batch_attention): the pool's runs against a brute-force page map, and, run here on the CPU with the torch
backend over a pool (the flashinfer backend's batch calls have their twins there), greedy answers decoded together
equal the same answers one after another, in fp32; runs move as caches grow and go back when sessions end."""
import gc
import random

import pytest
import torch
from test_batch import asked_at_once, document_of, model, tokenizer  # noqa: F401 (fixtures)

from quest_core import hf
from quest_core.backend_torch import TorchBackend
from quest_core.config import Decoding, QuestConfig
from quest_core.engine import Engine
from quest_core.paged_cache import PagePool

PAGE = 8
# dense, Quest budgets and rules (two requests of one setting), a baseline and an adaptive budget (attended one at a
# time in the batch)
REQUESTS = [
    (QuestConfig(mode="dense", page_size=PAGE, dense_layers=1), 150, 20),
    (QuestConfig(budget=48, page_size=PAGE, dense_layers=1), 300, 24),
    (QuestConfig(budget=48, page_size=PAGE, dense_layers=0, group_rule="mass"), 260, 22),
    (QuestConfig(budget=48, page_size=PAGE, dense_layers=1), 180, 20),  # request 1's setting: one sparse decode
    (QuestConfig(budget=32, page_size=PAGE, dense_layers=1, group_rule="max"), 200, 26),
    (QuestConfig(budget=40, page_size=PAGE, mode="streaming"), 220, 18),
    (QuestConfig(budget=40, page_size=PAGE, dense_layers=1, top_p=0.8, min_budget=16), 240, 16),
]


def test_pool_runs_are_taken_first_fit_and_given_back_joined():
    rng = random.Random(0)
    pool = PagePool(1, 64, 1, 4, 4, torch.float32, "cpu")
    used = [False] * 64  # the brute force
    taken = []
    for _ in range(400):
        if taken and rng.random() < 0.45:
            start, pages = taken.pop(rng.randrange(len(taken)))
            pool.give(start, pages)
            used[start:start + pages] = [False] * pages
        else:
            pages = rng.randint(1, 12)
            fits = [s for s in range(64 - pages + 1) if not any(used[s:s + pages]) and (s == 0 or used[s - 1])]
            if not fits:
                with pytest.raises(MemoryError, match="consecutive free pages"):
                    pool.take(pages)
                continue
            start = pool.take(pages)
            assert start == fits[0]  # the first free run that fits
            used[start:start + pages] = [True] * pages
            taken.append((start, pages))
        runs, start = [], 0
        while start < 64:  # the free runs, maximal
            if used[start]:
                start += 1
                continue
            end = start
            while end < 64 and not used[end]:
                end += 1
            runs.append((start, end - start))
            start = end
        assert pool.free_runs == runs


def pooled_engine(model, tokenizer):  # noqa: F811
    backend = TorchBackend()
    backend.kv_layout = "page-major"  # the pool's layout (the GPU's)
    engine = Engine(model, tokenizer, backend)
    engine.pool = PagePool(model.config.num_hidden_layers, 2048, model.config.num_key_value_heads, PAGE,
                           model.config.hidden_size // model.config.num_attention_heads, torch.float32, "cpu")
    return engine


def sessions_of(engine, tokenizer):  # noqa: F811
    sessions = []
    for index, (config, tokens, _) in enumerate(REQUESTS):
        session = engine.session(config, decoding=Decoding(repetition_penalty=1.0))
        session.ingest(document_of(tokenizer, 300 * index, tokens))
        sessions.append(session)
    return sessions


def ask(session, index):
    answer_tokens = REQUESTS[index][2]
    return session.ask(f"Question {index}?", max_new_tokens=answer_tokens, min_new_tokens=answer_tokens, trace=True)


def test_batch_uploads_are_kept_least_recently_used_and_held_by_the_capture_that_read_them():
    """The flashinfer backend's cached uploads (bounds tables, pool rows) against a brute-force LRU list: at most
    1024 kept, the least recently used dropped first, so a step's own entries (its newest) are never dropped while
    it runs; what a capture reads also goes to `captured_inputs`, which its graph keeps."""
    from types import SimpleNamespace

    from quest_core.backend_flashinfer import FlashInferBackend

    rng = random.Random(1)
    backend = SimpleNamespace(capturing=False, captured_inputs=[])  # the state `_cached_upload` reads
    cache, made = {}, []
    recency, kept = [], {}  # the brute force: keys from least to most recently used, and what was made for each
    for step in range(5000):
        key = rng.randrange(1500)
        backend.capturing = step % 7 == 0
        value = FlashInferBackend._cached_upload(backend, cache, key, lambda: made.append(object()) or made[-1])
        if key in recency:  # a hit: what was made for the key, now the most recently used
            assert value is kept[key]
            recency.remove(key)
        else:
            assert value is made[-1]
            kept[key] = value
        recency.append(key)
        for dropped in recency[:-1024]:
            del kept[dropped]
        recency = recency[-1024:]
        assert list(cache) == recency
        if backend.capturing:
            assert backend.captured_inputs[-1] is value
    assert len(made) > 1500 and len(backend.captured_inputs) == len(range(0, 5000, 7))


def test_pooled_batch_equals_one_after_another(model, tokenizer, monkeypatch):  # noqa: F811
    expected = []
    for index, session in enumerate(sessions_of(Engine(model, tokenizer), tokenizer)):  # unpooled, head-major
        expected.append([step.token_id for step in ask(session, index)])

    engine = pooled_engine(model, tokenizer)
    sessions = sessions_of(engine, tokenizer)
    assert all(session.cache.run is not None for session in sessions)
    batch_sizes = []
    batch_attention = hf._batch_attention

    def recorded(module, query, scaling, caches):
        batch_sizes.append(len(caches))
        return batch_attention(module, query, scaling, caches)

    monkeypatch.setattr(hf, "_batch_attention", recorded)
    sparse_sizes = []
    decode_batch_sparse = engine.backend.decode_batch_sparse

    def recorded_sparse(query, layers, selected, scaling):
        sparse_sizes.append(len(layers))
        return decode_batch_sparse(query, layers, selected, scaling)

    monkeypatch.setattr(engine.backend, "decode_batch_sparse", recorded_sparse)
    tokens = asked_at_once(sessions, ask)
    for index in range(len(sessions)):
        assert tokens[index] == expected[index], f"request {index}"
        assert len(sessions[index].token_ids) == sessions[index].cache.length
    assert max(batch_sizes) >= 3, batch_sizes  # they attended together
    assert max(sparse_sizes) == 2  # requests 1 and 4 in one sparse decode

    pool = engine.pool
    taken = pool.num_pages - pool.free_pages
    assert taken == sum(session.cache.run.num_pages for session in sessions)
    sessions[1].cache.reserve(sessions[1].cache.length + 40 * PAGE)  # outgrows its run: every layer moves
    assert sessions[1].cache.run.num_pages >= sessions[1].cache.length // PAGE + 40
    assert [step.token_id for step in ask(sessions[1], 1)] == expected_after(model, tokenizer, 1)
    sessions.clear()
    gc.collect()
    assert pool.free_runs == [(0, pool.num_pages)]  # every run went back


def expected_after(model, tokenizer, index):  # noqa: F811
    """Request `index`'s second answer, unpooled, after its first."""
    session = sessions_of(Engine(model, tokenizer), tokenizer)[index]
    list(ask(session, index))
    return [step.token_id for step in ask(session, index)]
