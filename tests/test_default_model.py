"""On the embedded default model (SmolLM2-135M-Instruct): our dense decode is HF `generate`, token for token,
and a follow-up question reuses the document's KV."""
from pathlib import Path

import pytest
import torch

from quest_core.config import QuestConfig
from quest_core.models import load_model
from quest_core.session import Session

pytestmark = pytest.mark.slow  # the default model in float32 over a 2K-token prompt: minutes on 2 cores
ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model(dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def document(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    ids = tokenizer(ASSETS.joinpath("hamlet.txt").read_text(), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:2000])  # a ~2K-token prompt


def test_dense_session_equals_hf_generate_and_full_budget_quest_equals_dense(model_and_tokenizer, document):
    model, tokenizer = model_and_tokenizer
    session = Session(model, tokenizer, QuestConfig(mode="dense"))
    session.ingest(document)
    question = "Who is Francisco?"
    dense = session.answer(question, max_new_tokens=64, min_new_tokens=64, repetition_penalty=1.0)
    prompt_ids = session.token_ids[: dense.prompt_tokens]

    model.set_attn_implementation("sdpa")
    expected = model.generate(torch.tensor([prompt_ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    expected_ids = expected[0, len(prompt_ids):].tolist()
    assert [step.token_id for step in dense.steps] == expected_ids

    session = Session(model, tokenizer, QuestConfig(mode="quest", budget=4096))
    session.ingest(document)
    quest = session.answer(question, max_new_tokens=64, min_new_tokens=64, repetition_penalty=1.0)
    assert [step.token_id for step in quest.steps] == expected_ids


def test_follow_up_prefills_only_its_own_tokens(model_and_tokenizer, document):
    model, tokenizer = model_and_tokenizer
    session = Session(model, tokenizer, QuestConfig(mode="quest", budget=256))
    ingested = session.ingest(document)
    first = session.answer("Who speaks first?", max_new_tokens=16, trace=True)
    assert first.reused_tokens >= ingested.document_tokens - 1  # at most a boundary token re-read
    assert first.prefill_tokens <= first.prompt_tokens - ingested.document_tokens + 1
    assert all(step.trace.read_bytes < step.trace.dense_bytes for step in first.steps[1:])

    cached = len(session.token_ids)
    session.configure(mode="dense", page_size=8)  # new settings: no new prefill of the document
    follow_up = session.answer("And who answers?", max_new_tokens=16)
    new_turn = follow_up.prompt_tokens - cached
    assert follow_up.reused_tokens == cached
    assert follow_up.prefill_tokens == new_turn
    assert follow_up.prefill_tokens < 30
