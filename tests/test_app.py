"""The app, driven over its API with gradio_client against a server on 127.0.0.1 (see conftest.app_url)."""
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from quest_core.config import default_config
from quest_core.session import Session

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # each test runs the default model for 30 s to 2 minutes on 2 cores
QUESTION = "Who is Francisco?"
MAX_NEW_TOKENS = 24  # conftest.app_url's build_app(max_new_tokens=24)


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def short_document(tmp_path_factory, default_model):
    """~1K tokens of Hamlet, as an uploaded .txt file."""
    _, tokenizer = default_model
    ids = tokenizer(ROOT.joinpath("assets", "hamlet.txt").read_text(), add_special_tokens=False)["input_ids"]
    path = tmp_path_factory.mktemp("docs") / "hamlet_short.txt"
    path.write_text(tokenizer.decode(ids[:1000]))
    return path


def ask(client, question, mode="quest", budget=256, inspect=False, history=()):
    job = client.submit(question, list(history), mode, budget, 16, 2, inspect, 2, 0, api_name="/ask")
    updates = list(job)
    return updates, job.result()


def answer_text(history):
    content = history[-1]["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def first_divergence(dense_ids, quest_ids):
    """The index of the first token where two answers differ (the shorter one's length if one is a prefix of the
    other), or None if they are the same."""
    first = next((i for i, (a, b) in enumerate(zip(dense_ids, quest_ids)) if a != b), None)
    if first is None and len(dense_ids) != len(quest_ids):
        first = min(len(dense_ids), len(quest_ids))
    return first


def shown_text(answer_html):
    """The text one side of Compare shows: tags and the empty-token mark dropped."""
    return html.unescape(re.sub(r"<[^>]+>", "", answer_html.replace("<br>", "\n"))).replace("∅", "")


def test_upload_ask_stream_metrics_heatmap_and_compare(client, short_document, default_model):
    model, tokenizer = default_model
    text, info = client.predict(handle_file(str(short_document)), api_name="/read_upload")
    assert text == short_document.read_text() and "tokens" in info
    status, _ = client.predict(text, None, api_name="/load_document")
    assert status.startswith("Loaded")

    updates, (history, metrics, times_plot, heads_plot, steps_plot, _) = ask(client, QUESTION, inspect=True)
    assert len(updates) >= 2  # streamed, not one final message
    assert answer_text(history).strip()
    assert "tok/s" in metrics and "KV read per step" in metrics and "recall" in metrics
    heatmap = json.loads(heads_plot["plot"])
    assert heatmap["data"][0]["type"] == "heatmap"
    assert json.loads(steps_plot["plot"])["data"][0]["type"] == "heatmap"
    assert json.loads(times_plot["plot"])["data"]

    follow_up, (history, metrics, *_rest) = ask(client, "And Bernardo?", history=history)
    assert "reused" in metrics and len(history) == 4

    dense_html, quest_html, verdict = client.predict(QUESTION, 256, 16, 2, api_name="/compare")
    assert "Dense" in dense_html and "Quest" in quest_html
    # the oracle: the engine itself, on the same conversation with the same settings, outside the app
    session = Session(model, tokenizer, default_config(model.config))
    session.ingest(text)
    session.configure(mode="quest", budget=256, page_size=16, dense_layers=2)
    for question in (QUESTION, "And Bernardo?"):
        session.answer(question, max_new_tokens=MAX_NEW_TOKENS)
    runs = {}
    for mode in ("dense", "quest"):
        session.configure(mode=mode)
        runs[mode] = session.answer(QUESTION, max_new_tokens=MAX_NEW_TOKENS, keep=False)
    ids = {mode: [step.token_id for step in run.steps] for mode, run in runs.items()}
    first = first_divergence(ids["dense"], ids["quest"])
    if first is None:
        assert "Identical" in verdict and "diverge" not in verdict, (verdict, ids)
    else:
        said = re.search(r"diverge at token (\d+)", verdict)
        assert said and int(said.group(1)) == first, (verdict, first, ids)
    for mode, answer_html in (("dense", dense_html), ("quest", quest_html)):
        answer = "".join(step.text for step in runs[mode].steps)
        assert answer.strip() and answer in shown_text(answer_html), (mode, answer, answer_html)

    trace_path = client.predict(api_name="/export_trace")
    trace = json.loads(Path(trace_path).read_text())
    assert trace["steps"] and trace["steps"][-1]["selected_pages"]


def test_dense_answer_equals_the_cli(client, short_document):
    text, _ = client.predict(handle_file(str(short_document)), api_name="/read_upload")
    client.predict(text, None, api_name="/load_document")
    _, (history, *_rest) = ask(client, QUESTION, mode="dense")
    cli = subprocess.run([sys.executable, "-m", "quest_core", "generate", "--doc", str(short_document),
                          "--question", QUESTION, "--mode", "dense", "--max-new-tokens", str(MAX_NEW_TOKENS),
                          "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True, env=dict(os.environ))
    assert answer_text(history) == json.loads(cli.stdout)["text"]


def test_a_document_longer_than_the_context_needs_an_explicit_cut(client):
    text, info = client.predict("Hamlet, the whole play (~53K tokens: longer than the context)", 50,
                                api_name="/pick_sample")
    assert "Longer than the model" in info
    with pytest.raises(Exception, match="keep the head or keep the tail"):
        client.predict(text, None, api_name="/load_document")
    status, _ = client.predict(text, "keep the tail", api_name="/load_document")
    assert status.startswith("Loaded")
