"""Session: the context never overflows (old turns dropped, never the document), a suspended stream never blocks
reset, new_chat keeps the document's KV, and the answer-only penalties are transformers' processors step by step
(and a CUDA graph's own greedy pick applies the repetition penalty as they do)."""
import threading
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quest_core.config import Decoding, QuestConfig
from quest_core.cuda_graph import greedy_pick
from quest_core.generation import answer_processors, next_token
from quest_core.models import load_model
from quest_core.session import ContextFullError, Session, cut_document, measure_document

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(dtype="fp32", device="cpu")[1]


def tiny_session(tokenizer, context=512, **kwargs):
    """A random 2-layer Llama with the default model's tokenizer and a short context."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
    return Session(LlamaForCausalLM(config).eval(), tokenizer, QuestConfig(budget=64, page_size=16), **kwargs)


def document_of(tokenizer, tokens):
    ids = tokenizer(ASSETS.joinpath("hamlet.txt").read_text(), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:tokens])


def test_old_turns_make_room_and_the_document_stays(tokenizer):
    session = tiny_session(tokenizer)
    session.ingest(document_of(tokenizer, 300))
    prefix = session.token_ids[: session.document_tokens]
    runs = [session.answer(f"Question {i}?", max_new_tokens=60, min_new_tokens=60) for i in range(5)]
    assert all(run.new_tokens == 60 for run in runs)
    assert sum(run.dropped_turns for run in runs) >= 2  # 5 x ~75 tokens of turns do not fit beside 300
    for run in runs:
        assert run.prompt_tokens + run.new_tokens <= 512
        assert all(step.context_len <= 512 for step in run.steps)
    assert session.token_ids[: len(prefix) - 1] == prefix[:-1]  # the last one may merge with the question's
    assert session.messages[0]["content"].startswith(session.document)  # the first kept question holds it
    usage = session.context_usage()
    assert usage.document_tokens == len(prefix) and usage.room_tokens == 512 - len(session.token_ids)


def test_when_turns_must_go_enough_go_that_the_next_questions_reuse_the_cache(tokenizer):
    """A conversation past the context drops the oldest turns in a batch, not one per question (each drop prefills
    every later turn again: 12 s before each answer in a browser walk): the question after a drop drops nothing and
    prefills only itself."""
    session = tiny_session(tokenizer, context=1024)
    session.ingest(document_of(tokenizer, 300))
    runs = [session.answer(f"Question {i}?", max_new_tokens=30, min_new_tokens=30) for i in range(40)]
    dropped = [i for i, run in enumerate(runs) if run.dropped_turns]
    assert len(dropped) >= 2  # 40 turns of ~45 tokens do not fit beside 300
    for i in dropped:
        assert i + 1 not in dropped  # the next question finds room
        assert runs[i].prompt_tokens + 30 + (1024 - session.document_tokens) // 4 <= 1024
    for previous, run in zip(runs, runs[1:]):
        if not run.dropped_turns:
            assert run.reused_tokens >= previous.prompt_tokens


@pytest.mark.slow
def test_a_long_document_and_long_answers_on_the_default_model(default_model):
    """The app's case at full size: a ~7.4K-token document in an 8K context and four answers of 200+ tokens."""
    model, tokenizer = default_model
    session = Session(model, tokenizer)
    session.ingest(document_of(tokenizer, 7400))
    prefix = session.token_ids[: session.document_tokens]
    assert len(prefix) >= 7300
    runs = [session.answer(f"Question {i}: retell the scene, speaker by speaker.", min_new_tokens=200)
            for i in range(4)]
    assert all(run.new_tokens >= 200 for run in runs), [run.new_tokens for run in runs]
    assert sum(run.dropped_turns for run in runs) >= 1
    for run in runs:
        assert run.prompt_tokens + run.new_tokens <= model.config.max_position_embeddings
        assert all(step.context_len <= model.config.max_position_embeddings for step in run.steps)
    assert session.cache.length <= model.config.max_position_embeddings
    assert session.document_tokens == len(prefix)
    assert session.token_ids[: len(prefix) - 1] == prefix[:-1]  # the last one may merge with the question's


def test_the_answer_is_capped_to_the_room_and_a_question_too_long_is_refused(tokenizer):
    session = tiny_session(tokenizer)
    session.ingest(document_of(tokenizer, 380))
    run = session.answer("Who?", max_new_tokens=200, min_new_tokens=200)
    assert run.max_new_tokens == run.new_tokens == 512 - run.prompt_tokens < 200
    assert run.stop_reason == "max_new_tokens"
    with pytest.raises(ContextFullError, match="shorter question"):
        session.answer("Why? " * 80)
    assert session.answer("Who?", max_new_tokens=8).new_tokens == 8  # still usable


def test_documents_are_measured_and_cut_to_fit(tokenizer):
    session = tiny_session(tokenizer)
    text = document_of(tokenizer, 900)
    fit = measure_document(tokenizer, session.model.config, text)
    assert not fit.fits and fit.max_tokens == 384  # a quarter of a short context is left for the conversation
    with pytest.raises(ValueError, match="keep its head or its tail"):
        session.ingest(text)
    long_session = tiny_session(tokenizer, context=1024)
    head = cut_document(tokenizer, long_session.model.config, text, "head")
    assert text.startswith(head[:200]) and measure_document(tokenizer, long_session.model.config, head).fits
    assert text.endswith(cut_document(tokenizer, long_session.model.config, text, "tail")[-200:])


def test_new_chat_keeps_the_document_kv(tokenizer):
    """New chat keeps the document's KV as ingest left it, so the first question asked again prefills the same
    tokens (here the question's tokens merge with the document's last one, which the first ask prefilled again)
    and, greedy, gets the same answer; a chunk of 12 tokens and one of 11 round differently, which changed the
    default model's answer after a few tokens."""
    session = tiny_session(tokenizer)
    session.ingest(document_of(tokenizer, 200))
    first = session.answer("Who?", max_new_tokens=8)
    assert first.reused_tokens == session.document_tokens - 1  # the merge this test is about
    session.new_chat()
    assert session.turns == [] and len(session.token_ids) == session.cache.length == session.document_tokens - 1
    again = session.answer("Who?", max_new_tokens=8)
    assert (again.reused_tokens, again.prefill_tokens, again.text) == (first.reused_tokens, first.prefill_tokens,
                                                                      first.text)


def test_reset_while_a_stream_is_suspended_does_not_block(tokenizer):
    session = tiny_session(tokenizer)
    session.ingest(document_of(tokenizer, 200))
    stream = session.ask("Who?", max_new_tokens=20, min_new_tokens=20)
    next(stream)  # the consumer stops reading here and never resumes
    done = threading.Event()
    worker = threading.Thread(target=lambda: (session.reset(), done.set()), daemon=True)
    worker.start()
    assert done.wait(10), "reset() blocked behind a suspended answer"
    stream.close()  # the old stream ends without writing into the reset session
    assert session.turns == [] and session.token_ids == []
    session.ingest(document_of(tokenizer, 100))
    assert session.answer("Who?", max_new_tokens=4).new_tokens == 4


def test_answer_penalties_are_transformers_processors_on_the_answer(tokenizer):
    session = tiny_session(tokenizer, decoding=Decoding(repetition_penalty=1.5, no_repeat_ngram_size=2))
    session.ingest(document_of(tokenizer, 100))
    run = session.answer("Who?", max_new_tokens=24, min_new_tokens=24)
    prompt = session.token_ids[: run.prompt_tokens]
    processors = answer_processors(1.5, 2)
    model, answer = session.model, []
    model.set_attn_implementation("sdpa")
    for _ in range(24):  # the oracle: a full forward per token, the processors on the answer's ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, -1:].float()
        answer.append(int(processors(torch.tensor([answer], dtype=torch.long), logits)[0].argmax()))
    assert [step.token_id for step in run.steps] == answer
    assert len(set(zip(answer, answer[1:]))) == len(answer) - 1  # no bigram twice


def test_a_cuda_graphs_greedy_pick_is_next_token_with_the_repetition_penalty():
    """`cuda_graph.greedy_pick` (the pick a graph makes for itself, to run ahead of the host) against
    `generation.next_token` with transformers' repetition penalty on the answer's ids, stop ids blocked or not:
    rows of a batch with their own penalties, their answers so far, logits of both signs (all negative in half the
    trials, where the penalty's multiplication decides the pick). It runs on the CPU too."""
    generator = torch.Generator().manual_seed(0)
    penalties, stop_ids = [1.0, 1.3, 2.0], [3, 4]
    for trial in range(100):
        logits = torch.randn(3, 50, generator=generator) * 3 - (10.0 if trial % 4 < 2 else 0.0)  # all negative
        answers = [torch.randint(0, 50, (int(torch.randint(0, 12, (), generator=generator)),),
                                 generator=generator).tolist() for _ in penalties]
        blocked = trial % 2 == 0
        seen = torch.zeros(3, 50, dtype=torch.bool)
        for row, answer in enumerate(answers):
            seen[row, answer] = True
        stop_bias = torch.zeros(3, 50)
        stop_bias[:, stop_ids] = -torch.inf if blocked else 0.0
        picks = torch.zeros(3, dtype=torch.long)
        greedy_pick(logits.clone(), seen, torch.tensor(penalties)[:, None], stop_bias, out=picks)
        expected = [next_token(row.clone(), torch.tensor([answer], dtype=torch.long), 0, stop_ids, int(blocked),
                               processors=answer_processors(penalty))
                    for row, answer, penalty in zip(logits, answers, penalties)]
        assert picks.tolist() == expected, trial
        assert seen[torch.arange(3), picks].all()  # the picks are seen for the next step
