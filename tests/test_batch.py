"""The engine decodes the answers of its sessions together: the same greedy tokens as one after another (fp32), with
requests joining, stopping and leaving mid-way, each with its own settings, and newcomers' prefills interleaved with
the others' decode steps one chunk at a time."""
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quest_core import engine as engine_module
from quest_core.config import Decoding, QuestConfig
from quest_core.engine import Engine
from quest_core.models import load_model

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# (settings, decoding, document tokens, answer tokens): dense and Quest, fixed and adaptive budgets, pages of 4, 8
# and 16, penalties on and off, documents and answers of different lengths
REQUESTS = [
    (QuestConfig(mode="dense", dense_layers=1), Decoding(repetition_penalty=1.0), 150, 24),
    (QuestConfig(budget=64, page_size=16, dense_layers=1), Decoding(), 300, 30),
    (QuestConfig(budget=32, page_size=8, dense_layers=1, top_p=0.8, min_budget=16),
     Decoding(repetition_penalty=1.5, no_repeat_ngram_size=2), 220, 20),
    (QuestConfig(budget=48, page_size=4, dense_layers=0, group_rule="mass"), Decoding(), 260, 28),
    (QuestConfig(budget=40, page_size=8, dense_layers=1, group_rule="max"), Decoding(), 180, 26),
]
JOINS, STOPS = 3, 4  # the request that joins once the others are decoding, and the one stopped mid-way


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(dtype="fp32", device="cpu")[1]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def document_of(tokenizer, start, tokens):
    ids = tokenizer(ASSETS.joinpath("hamlet.txt").read_text(), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[start:start + tokens])


def loaded_sessions(engine, tokenizer, count: int | None = None):
    """Sessions for the first `count` REQUESTS (None: all), each with its document loaded."""
    sessions = []
    for index, (config, decoding, tokens, _) in enumerate(REQUESTS[:count]):
        session = engine.session(config, decoding=decoding)
        session.ingest(document_of(tokenizer, 400 * index, tokens))
        sessions.append(session)
    return sessions


def ask(session, index, **kwargs):
    answer_tokens = REQUESTS[index][3]
    return session.ask(f"Question {index}: who speaks?", max_new_tokens=answer_tokens, min_new_tokens=answer_tokens,
                       trace=True, **kwargs)


def asked_at_once(sessions, ask, timeout: float = 120) -> list[list[int]]:
    """Each session's answer tokens, `ask(session, index)` (its tokens: anything with a token_id) asked for all of
    them at once, a thread each."""
    tokens = [None] * len(sessions)

    def consume(index):
        tokens[index] = [step.token_id for step in ask(sessions[index], index)]

    threads = [threading.Thread(target=consume, args=(index,)) for index in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return tokens


def record_batches(monkeypatch, decode_s: float = 0.0) -> list:
    """The engine's forwards, in order: ("decode", batch size) or ("prefill", the cache's id); a decode step takes
    at least `decode_s`."""
    log = []
    forward_batch, forward = engine_module.forward_batch, engine_module.forward

    def batched(model, caches, token_ids, cache_arg):
        log.append(("decode", len(caches)))
        time.sleep(decode_s)
        return forward_batch(model, caches, token_ids, cache_arg)

    def single(model, cache, input_ids, cache_arg):
        log.append(("prefill", id(cache)))
        return forward(model, cache, input_ids, cache_arg)

    monkeypatch.setattr(engine_module, "forward_batch", batched)
    monkeypatch.setattr(engine_module, "forward", single)
    return log


def one_after_another(model, tokenizer) -> list[list[int]]:
    sessions = loaded_sessions(Engine(model, tokenizer), tokenizer)
    return [[step.token_id for step in ask(session, index)] for index, session in enumerate(sessions)]


def test_batched_answers_equal_one_after_another(model, tokenizer, monkeypatch):
    """Requests 0-2 and 4 start together, 3 joins once 0 has 5 tokens, 4 is stopped after its 6th token."""
    expected = one_after_another(model, tokenizer)
    sessions = loaded_sessions(Engine(model, tokenizer), tokenizer)
    log = record_batches(monkeypatch, decode_s=0.02)  # request 0's 5 tokens outlast the other threads' start
    tokens = [[] for _ in sessions]
    traces = [[] for _ in sessions]
    first_has_five = threading.Event()

    def consume(index):
        if index == JOINS:
            first_has_five.wait(60)
        for step in ask(sessions[index], index):
            tokens[index].append(step.token_id)
            traces[index].append(step.trace)
            if index == 0 and len(tokens[0]) == 5:
                first_has_five.set()
            if index == STOPS and len(tokens[index]) == 6:
                sessions[index].cancel()

    threads = [threading.Thread(target=consume, args=(index,)) for index in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for index in range(len(sessions)):
        if index == STOPS:
            assert 6 <= len(tokens[index]) < REQUESTS[index][3]
            assert sessions[index].last_run.stop_reason == "cancelled"
            assert tokens[index] == expected[index][:len(tokens[index])]
        else:
            assert tokens[index] == expected[index], f"request {index}"
    decode_sizes = [size for kind, size in log if kind == "decode"]
    assert max(decode_sizes) >= 4, decode_sizes  # they did decode together
    joined = log.index(("prefill", id(sessions[JOINS].cache)))
    assert ("decode", 4) in log[:joined]  # the others were decoding when 3 joined
    assert any(kind == "decode" and size >= 4 for kind, size in log[joined:])  # and it decoded with them
    # each request kept its own settings: its page size and budget in its trace, none for dense
    for index, (config, *_) in enumerate(REQUESTS):
        selections = [trace.selected_pages for trace in traces[index][1:]]
        if config.mode == "dense":
            assert all(selected is None for selected in selections)
            continue
        assert all(selected.shape[-1] == config.budget // config.page_size for selected in selections)
        sparse = [layer for layer in range(3) if layer >= config.dense_layers]
        assert all((selected[sparse] >= 0).any() for selected in selections)
        assert sessions[index].token_ids == sessions[index].token_ids[:sessions[index].cache.length]
        assert len(sessions[index].token_ids) == sessions[index].cache.length


def test_a_consumer_that_leaves_frees_its_request_and_the_others_go_on(model, tokenizer):
    expected = [step.token_id for step in ask(loaded_sessions(Engine(model, tokenizer), tokenizer, 2)[1], 1)]
    sessions = loaded_sessions(Engine(model, tokenizer), tokenizer, 2)
    leaving, staying = ask(sessions[0], 0), ask(sessions[1], 1)
    next(leaving), next(leaving), next(staying)
    leaving.close()  # the browser left: the engine lets go of the request before close returns
    assert sessions[0].last_run.stop_reason == "cancelled" and sessions[0].last_run.new_tokens == 2
    assert len(sessions[0].token_ids) == sessions[0].cache.length  # the engine's run-ahead is cut back
    rest = [step.token_id for step in staying]
    assert [sessions[1].last_run.steps[0].token_id] + rest == expected
    assert sessions[0].answer("Again?", max_new_tokens=4, min_new_tokens=4).new_tokens == 4  # still usable


def test_stop_and_reset_end_a_request_within_a_step(model, tokenizer):
    first, second = loaded_sessions(Engine(model, tokenizer), tokenizer, 2)
    stream = ask(first, 0)
    other = ask(second, 1)
    next(stream), next(other)
    first.cancel()
    shown = 1 + sum(1 for _ in stream)  # at most the tokens already produced when it was cancelled
    run = first.last_run
    assert run.stop_reason == "cancelled" and run.new_tokens == shown < REQUESTS[0][3]
    assert first.turns[-1].answer_ids == [step.token_id for step in run.steps]  # the turn keeps what was shown
    second.reset()  # while its answer streams: it stops, its KV is freed
    assert second.cache.length == 0
    assert len(list(other)) < REQUESTS[1][3]
    assert first.answer("Next?", max_new_tokens=4, min_new_tokens=4).new_tokens == 4


def test_a_newcomer_prefills_one_chunk_between_decode_steps(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer)
    decoding = engine.session(REQUESTS[1][0])
    decoding.ingest(document_of(tokenizer, 0, 200))
    log = record_batches(monkeypatch, decode_s=0.01)  # the answer outlasts the newcomer's prefill
    stream = decoding.ask("Who?", max_new_tokens=400, min_new_tokens=400)
    next(stream)
    newcomer = engine.session(REQUESTS[0][0], prefill_chunk=64)
    newcomer.ingest(document_of(tokenizer, 1000, 300))  # 5+ chunks while the other answer decodes
    chunks = [index for index, (kind, cache) in enumerate(log) if (kind, cache) == ("prefill", id(newcomer.cache))]
    assert len(chunks) >= 5
    assert all(("decode", 1) in log[a:b] for a, b in zip(chunks, chunks[1:]))  # a decode step between chunks
    stream.close()
    assert decoding.last_run.new_tokens < 400
    assert decoding.last_run.shared_steps >= len(chunks) - 1  # each waited for a chunk: slower than alone
    assert decoding.answer("Who?", max_new_tokens=8, min_new_tokens=8).shared_steps == 0


def test_an_engine_that_does_not_batch_gives_the_same_answers(model, tokenizer):
    """The flashinfer backend's way (forced here on the torch backend): one request at a time, through
    `generation.decode`; answers asked at once come out as they do one after another."""
    expected = one_after_another(model, tokenizer)
    engine = Engine(model, tokenizer)
    engine.batches = False
    sessions = loaded_sessions(engine, tokenizer)
    assert asked_at_once(sessions, ask) == expected
    assert all(step.trace is not None for session in sessions for step in session.last_run.steps[1:])
