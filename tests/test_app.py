"""The app, driven over its API with gradio_client against a server on 127.0.0.1 (see conftest.app_url); the
server's own session is read from `demo.state_holder` where a check needs the engine's numbers."""
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file

from app import handlers
from app.documents import NEEDLE, SAMPLES, needle_document, sample_text
from app.layout import build_app
from app.sessions import ChatState, OpenSessions
from quest_core import session as session_module
from quest_core.config import TWO_LEVEL_FACTOR, Decoding, default_config
from quest_core.session import Session, measure_document

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # each test runs the default model for 30 s to 2 minutes on 2 cores
QUESTION = "Who is Francisco?"
MAX_NEW_TOKENS = 24  # conftest.app_url's build_app(max_new_tokens=24)
UPLOAD = ["upload", "sample", "pasted", "doc_info", "cut"]
LOAD = ["doc_info", "cut", "chat", "meter", "metrics", "headline", "speed_plot", "heads_plot", "time_plot", "tokens",
        "looked", "looked_note", "dense_answer", "quest_answer", "verdict", "page_text", "trace_file"]
ASK = ["chat", "question", "metrics", "meter", "headline", "speed_plot", "heads_plot", "time_plot", "tokens", "looked",
       "looked_note"]
COMPARE = ["dense_answer", "quest_answer", "verdict", "headline", "speed_plot"]
NEW_CHAT = ["chat", "meter", "metrics", "heads_plot", "time_plot", "tokens", "looked", "looked_note", "dense_answer",
            "quest_answer", "verdict", "page_text", "trace_file"]
DECODING = Decoding()


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


def upload(client, path) -> dict:
    return dict(zip(UPLOAD, client.predict(handle_file(str(path)), api_name="/read_upload")))


def load(client, text, cut=None, sample=None, depth=50) -> dict:
    return dict(zip(LOAD, client.predict(text, cut, None, sample, depth, api_name="/load_document")))


def ask(client, question, mode="quest", budget=256, page_size=16, inspect=False, max_new_tokens=MAX_NEW_TOKENS):
    job = client.submit(question, mode, budget, page_size, 2, inspect, max_new_tokens, DECODING.temperature,
                        DECODING.repetition_penalty, DECODING.no_repeat_ngram_size, 2, 0, api_name="/ask")
    updates = list(job)
    return updates, dict(zip(ASK, job.result()))


def value(update):
    """A component's value from an output that may be a gr.update (a dict with "visible")."""
    return update["value"] if isinstance(update, dict) and "visible" in update else update


def server_state(client) -> ChatState:
    """The ChatState the server holds for `client`'s session."""
    for blocks in gr.Blocks.get_instances():
        held = getattr(blocks, "state_holder", None)
        if held is not None and client.session_hash in held.session_data:
            return next(value for value in held.session_data[client.session_hash].state_data.values()
                        if isinstance(value, ChatState))
    raise LookupError("no server holds this client's session")


def loaded_state(default_model, document: Path, owner: str):
    """A Server of the default model with one open session that has `document` loaded, for calling handlers directly
    (no Gradio server): (server, its ChatState)."""
    model, tokenizer = default_model
    server = handlers.Server(model, tokenizer, None, OpenSessions(2), max_new_tokens=MAX_NEW_TOKENS)
    state = server.sessions.open(owner, server.new_session)
    state.session.ingest(document.read_text())
    state.document_name = document.name
    return server, state


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


def test_upload_ask_stream_metrics_plots_looked_and_compare(client, short_document, default_model):
    uploaded = upload(client, short_document)
    assert uploaded["pasted"] == short_document.read_text() and "tokens" in uploaded["doc_info"]
    assert "Loaded" in load(client, uploaded["pasted"])["doc_info"]
    session = server_state(client).session

    updates, shown = ask(client, QUESTION, inspect=True)
    assert len(updates) >= 2  # streamed, not one final message
    run = session.last_run
    assert handlers.answer_text(shown["chat"][-1]) == run.text and run.text.strip()
    assert f"{run.new_tokens} tokens · decode **{run.decode_tokens_per_s:.1f} tok/s**" in shown["metrics"]
    assert "KV read per step" in shown["metrics"] and "recall" in shown["metrics"]
    assert json.loads(value(shown["heads_plot"])["plot"])["data"][0]["type"] == "heatmap"
    assert json.loads(value(shown["time_plot"])["plot"])["data"][0]["type"] == "heatmap"
    usage = session.context_usage()
    assert f"document <b>{usage.document_tokens:,}</b>" in shown["meter"]
    assert f"room left <b>{usage.room_tokens:,}</b>" in shown["meter"]
    # where the model looked: the passages are the cache's text, in order, and the answer's tokens are its steps
    assert "".join(part["token"] for part in value(shown["looked"])) == "".join(session.page_texts())
    assert any(part["class_or_confidence"] for part in value(shown["looked"]))
    assert [part["token"] for part in value(shown["tokens"])] == [step.text for step in run.steps]

    cached = len(session.token_ids)
    _, follow_up = ask(client, "And Bernardo?")
    assert f"reused {cached:,}" in follow_up["metrics"] and len(follow_up["chat"]) == 4

    compared = dict(zip(COMPARE, client.predict(QUESTION, 256, 16, 2, MAX_NEW_TOKENS, DECODING.repetition_penalty,
                                                DECODING.no_repeat_ngram_size, api_name="/compare")))
    # the oracle: the engine itself, on the same conversation with the same settings, outside the app
    model, tokenizer = default_model
    replay = Session(model, tokenizer, default_config(model.config))
    replay.ingest(uploaded["pasted"])
    replay.configure(mode="quest", budget=256, page_size=16, dense_layers=2)
    for question in (QUESTION, "And Bernardo?"):
        replay.answer(question, max_new_tokens=MAX_NEW_TOKENS)
    runs = {}
    for mode in ("dense", "quest"):
        replay.configure(mode=mode)
        runs[mode] = replay.answer(QUESTION, max_new_tokens=MAX_NEW_TOKENS, keep=False)
    first = first_divergence(*([step.token_id for step in runs[mode].steps] for mode in ("dense", "quest")))
    if first is None:
        assert "Identical" in compared["verdict"] and "differ" not in compared["verdict"]
    else:
        assert f"differ from token {first} on" in compared["verdict"], (compared["verdict"], first)
    for mode in ("dense", "quest"):
        answer = "".join(step.text for step in runs[mode].steps)
        assert answer.strip() and answer in shown_text(compared[f"{mode}_answer"]), (mode, answer)
    speeds = server_state(client).speeds  # the two Compare runs, as the engine measured them
    assert f"{speeds['dense'].tokens_per_s:.1f} tok/s" in compared["dense_answer"]
    assert f"{speeds['quest'].tokens_per_s:.1f} tok/s" in compared["quest_answer"]
    ratio = speeds["quest"].tokens_per_s / speeds["dense"].tokens_per_s
    assert f"whole step **{ratio:.2f}×**" in compared["headline"]
    attention = speeds["dense"].attention_s / speeds["quest"].attention_s
    assert f"attention alone **{attention:.1f}×**" in compared["headline"]
    assert "Compare: the same question and context" in compared["headline"]
    assert len(session.messages) == 4  # Compare keeps neither answer

    trace = json.loads(Path(client.predict(api_name="/export_trace")).read_text())
    assert trace["steps"] and trace["steps"][-1]["selected_pages"]
    answer = server_state(client).answer  # numbered as the app numbers the answer's tokens: step 0 is the prefill's
    assert [(s["step"], s["token"]) for s in trace["steps"]] == [(i, step.text) for i, step in
                                                                 enumerate(answer.steps)][1:]


def test_the_two_level_ranking_box_answers_as_the_engine_does_with_it(client, short_document, default_model):
    document = short_document.read_text()
    load(client, document)
    session = server_state(client).session
    job = client.submit(QUESTION, "quest", 128, 2, 2, False, MAX_NEW_TOKENS, DECODING.temperature,
                        DECODING.repetition_penalty, DECODING.no_repeat_ngram_size, 2, 0, 0, True, api_name="/ask")
    shown = dict(zip(ASK, job.result()))
    assert (session.config.page_size, session.config.coarse_factor) == (2, TWO_LEVEL_FACTOR)
    assert session.last_run.coarse_factor == TWO_LEVEL_FACTOR
    assert "· budget 128, two-level ranking ·" in shown["metrics"]
    # the oracle: the engine with the same settings, outside the app (the document is past the budget: sparse steps)
    model, tokenizer = default_model
    replay = Session(model, tokenizer, default_config(model.config, budget=128, page_size=2,
                                                      coarse_factor=TWO_LEVEL_FACTOR))
    assert replay.ingest(document).document_tokens > 4 * 128
    assert replay.answer(QUESTION, max_new_tokens=MAX_NEW_TOKENS).text == session.last_run.text
    client.predict(api_name="/new_chat")


def test_dense_answers_equal_the_cli_in_the_chat_and_in_compare(client, short_document):
    assert "Loaded" in load(client, short_document.read_text())["doc_info"]
    _, shown = ask(client, QUESTION, mode="dense")
    client.predict(api_name="/new_chat")
    compared = client.predict(QUESTION, 256, 16, 2, MAX_NEW_TOKENS, DECODING.repetition_penalty,
                              DECODING.no_repeat_ngram_size, api_name="/compare")
    cli = subprocess.run([sys.executable, "-m", "quest_core", "generate", "--doc", str(short_document),
                          "--question", QUESTION, "--mode", "dense", "--max-new-tokens", str(MAX_NEW_TOKENS),
                          "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True, env=dict(os.environ))
    expected = json.loads(cli.stdout)["text"]
    assert handlers.answer_text(shown["chat"][-1]) == expected
    assert server_state(client).speeds["dense"].source == "Compare"
    assert expected.strip() and expected in shown_text(compared[0])


def test_the_context_never_overflows_and_new_chat_keeps_the_document(client):
    """A document that fills all but the conversation's room, then questions until old turns must go."""
    _, text, info, _ = client.predict("Hamlet, the whole play (~53K tokens: longer than the context)", 50,
                                      api_name="/pick_sample")
    assert "longer than the context" in info
    assert "keep the head or keep the tail" in load(client, text)["doc_info"]  # refused, with what to do
    assert "Loaded" in load(client, text, "keep the head")["doc_info"]
    session = server_state(client).session
    notices = 0
    for turn in range(30):
        _, shown = ask(client, f"Question {turn}: what does Horatio say next?")
        run = session.last_run
        assert run.new_tokens > 0 and handlers.answer_text(shown["chat"][-1]) == run.text
        assert len(session.token_ids) <= session.max_context
        dropped = [m for m in shown["chat"] if (m.get("metadata") or {}).get("title", "").startswith("⚠️ Context full")]
        assert len(dropped) == notices + (run.dropped_turns > 0)
        notices = len(dropped)
        if notices >= 2:
            break
    assert notices >= 2, "30 questions never filled the context"
    document_tokens = session.document_tokens
    shown = dict(zip(NEW_CHAT, client.predict(api_name="/new_chat")))
    assert shown["chat"] == [] and "conversation <b>0</b>" in shown["meter"] and session.messages == []
    assert shown["metrics"] == "" and shown["looked_note"].startswith("Ask a question")  # no view of an old answer
    assert server_state(client).answer is None
    _, shown = ask(client, "Who is Horatio?")
    assert f"reused {document_tokens - 1:,}" in shown["metrics"] or f"reused {document_tokens:,}" in shown["metrics"]


def test_refusals_are_messages_that_change_nothing_and_a_new_document_clears_the_old_results(client, tmp_path,
                                                                                             short_document):
    assert "Loaded" in load(client, short_document.read_text())["doc_info"]
    _, answered = ask(client, QUESTION)
    too_long = "Why? " * 4000  # does not fit beside the document: refused, the last answer's metrics stay
    _, refused = ask(client, too_long)
    assert refused["metrics"] == answered["metrics"] and refused["question"] == too_long.strip()
    # the question stays in the chat, the notice follows it
    assert [handlers.message_text(message) for message in refused["chat"][-2:-1]] == [too_long.strip()]
    assert refused["chat"][-1]["metadata"]["title"] == "⚠️ The question does not fit"
    _, empty = ask(client, "  ")
    assert empty["metrics"] == {"__type__": "update"}  # left as it is: a warning only
    client.predict(QUESTION, 256, 16, 2, MAX_NEW_TOKENS, DECODING.repetition_penalty, DECODING.no_repeat_ngram_size,
                   api_name="/compare")
    assert client.predict(3, api_name="/page_text").startswith("Page 3")
    shown_pages = len(server_state(client).page_texts)  # the pages the answer's plots number, not Compare's cache
    assert "outside the context" in client.predict(shown_pages, api_name="/page_text")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refused = upload(client, empty)
    assert refused["upload"] is None and refused["pasted"] == "" and "empty.txt is empty" in refused["doc_info"]
    assert "Still loaded: pasted text" in refused["doc_info"]
    assert "Nothing to load" in load(client, "")["doc_info"]
    assert "outside the context" in client.predict(10**6, api_name="/page_text")
    assert server_state(client).session.messages  # the conversation is still there

    loaded = load(client, "Marcellus keeps the watch. Bernardo relieves Francisco at midnight.")
    assert "Loaded" in loaded["doc_info"] and loaded["chat"] == []
    assert loaded["dense_answer"] == loaded["quest_answer"] == loaded["page_text"] == loaded["headline"] == ""
    assert server_state(client).speeds == {}


def test_leaving_the_paste_box_says_what_loading_its_text_would_do(default_model, short_document):
    """The function the layout wires to the paste box's blur event notes the pasted text's tokens, and returns only
    the views it outputs (it once returned the text too: every paste ended in a warning and no note)."""
    model, tokenizer = default_model
    text = short_document.read_text()
    describe = next(function for function in build_app(model, tokenizer).fns.values() if function.name == "describe")
    doc_info, _ = describe.fn(text)
    assert doc_info.startswith(f"{measure_document(tokenizer, model.config, text).tokens:,} tokens, ")


def test_a_long_document_is_tokenized_once_for_its_note_and_the_end_kept(default_model, monkeypatch):
    """Picking a document longer than the context with an end already chosen writes two notes (what loading would
    do, then what Load keeps): the text is tokenized for the first only."""
    model, tokenizer = default_model
    text = sample_text(next(name for name in SAMPLES if "whole play" in name))
    functions = {function.name: function.fn for function in build_app(model, tokenizer).fns.values()}
    tokenized = []
    monkeypatch.setattr(session_module, "_count", lambda tokenizer, text, count=session_module._count:
                        tokenized.append(len(text)) or count(tokenizer, text))
    functions["describe"](text)
    doc_info = functions["choose_cut"](text, "keep the head")
    assert tokenized == [len(text)] and "keeps its first" in doc_info


def test_stop_during_compare_ends_it_with_no_verdict_and_no_speed(default_model, short_document, monkeypatch):
    """Stop while Compare's dense answer streams: Quest does not run, the verdict says stopped and the headline takes
    no speed from the cut answer (a browser walk saw Quest run on, 'differ from token 0' and a headline from it)."""
    server, state = loaded_state(default_model, short_document, "compare-stop")
    ask = state.session.ask

    def ask_then_stop(*args, **kwargs):
        for step in ask(*args, **kwargs):
            if step.index == 2:
                state.session.cancel()  # as the Stop button does
            yield step

    monkeypatch.setattr(state.session, "ask", ask_then_stop)
    shown = handlers.compare(server, QUESTION, 256, 16, 2, MAX_NEW_TOKENS, DECODING.repetition_penalty,
                             DECODING.no_repeat_ngram_size, 0, False, state, progress=lambda *args, **kwargs: None)
    assert "<i>stopped</i>" in shown["dense_answer"] and "not run" in shown["quest_answer"]
    assert shown["verdict"].startswith("**Stopped**") and state.speeds == {}
    state.close()


def test_a_sample_loads_at_the_chosen_depth_even_when_the_paste_box_lags(client):
    """Load makes a sample again from its name and needle depth: clicked at once after a depth is typed, it can come
    with the paste box still holding the previous depth's text (a browser walk loaded passkey 10050 with 20 shown)."""
    stale = sample_text(NEEDLE, 50)
    assert "Loaded" in load(client, stale, sample=NEEDLE, depth=20)["doc_info"]
    assert needle_document(20)[1] in server_state(client).needle


def test_the_context_meter_grows_with_the_answer_while_it_streams(default_model, short_document, monkeypatch):
    """While an answer streams, the meter counts the tokens in the cache, as the metrics' context does (a browser
    walk saw it hold the last answer's count until the answer ended, while the metrics' context grew)."""
    server, state = loaded_state(default_model, short_document, "meter")
    state.session.answer(QUESTION, max_new_tokens=MAX_NEW_TOKENS)  # a turn before: its tokens are in the meter too
    monkeypatch.setattr(handlers, "REFRESH_S", 0.01)  # about every step shown
    streamed = []
    for shown in handlers.ask(server, "And Bernardo?", "quest", 256, 16, 2, False, MAX_NEW_TOKENS, 0.0,
                              DECODING.repetition_penalty, DECODING.no_repeat_ngram_size, 2, 0, None, False, state):
        context = re.search(r"context ([\d,]+) tokens", shown.get("metrics", ""))
        if context and "streaming" in shown["metrics"]:
            streamed.append((int(context.group(1).replace(",", "")), shown["meter"]))
    assert len(streamed) >= 3
    document = state.session.document_tokens
    for context, meter in streamed:
        assert f"conversation <b>{context - document:,}</b>" in meter
    state.close()


def test_an_inspected_answer_gives_the_headline_no_speed(default_model, short_document):
    """Inspect runs dense attention beside Quest at each step (the recall): the answer is slower, so its tok/s is not
    Quest's (a browser walk saw it become the headline's "Quest ... tok/s so far"). A plain answer gives one."""
    server, state = loaded_state(default_model, short_document, "inspect")

    def answer(inspect):
        return list(handlers.ask(server, QUESTION, "quest", 256, 16, 2, inspect, MAX_NEW_TOKENS, 0.0,
                                 DECODING.repetition_penalty, DECODING.no_repeat_ngram_size, 2, 0, None, False,
                                 state))[-1]

    inspected = answer(True)
    assert "recall" in inspected["metrics"] and state.speeds == {} and inspected["headline"] == ""
    plain = answer(False)
    assert set(state.speeds) == {"quest"} and "Quest" in plain["headline"]
    state.close()


def test_an_answers_plots_mark_the_pages_of_its_question(default_model, short_document):
    """The pages-read plots an answer ends with mark its question's pages (they were looked up while the answer
    streamed, before the question's tokens are in the session's cache: none were found, none marked)."""
    server, state = loaded_state(default_model, short_document, "question-marks")
    shown = list(handlers.ask(server, QUESTION, "quest", 256, 16, 2, False, 4, 0.0, DECODING.repetition_penalty,
                              DECODING.no_repeat_ngram_size, 2, 0, None, False, state))[-1]
    pages = state.session.pages_of(QUESTION)
    assert pages
    for plot in ("heads_plot", "time_plot"):
        marks = [trace for trace in shown[plot]["value"].data if trace.name == "question's pages"]
        assert [list(trace.x) for trace in marks] == [pages], plot
    state.close()


def test_each_answer_in_the_chat_says_which_attention_produced_it(default_model, short_document):
    """Every answer carries a small line naming its attention, from its first update on, and keeps it when a later
    answer uses another (with modes flipped between questions, only the metrics said which, and for the last answer
    only)."""
    server, state = loaded_state(default_model, short_document, "attention-line")

    def answer(question, mode):
        return list(handlers.ask(server, question, mode, 256, 16, 2, False, 4, 0.0, DECODING.repetition_penalty,
                                 DECODING.no_repeat_ngram_size, 2, 0, None, False, state))

    quest_line = "<small>Quest attention · budget 256</small>"
    streamed = answer(QUESTION, "quest")
    assert all(handlers.message_text(shown["chat"][-1]).startswith(quest_line) for shown in streamed)
    quest_text = state.answer.text
    answer("And Bernardo?", "dense")
    answers = [handlers.message_text(message) for message in state.chat if message["role"] == "assistant"]
    assert answers == [f"{quest_line}\n\n{quest_text}", f"<small>dense attention</small>\n\n{state.answer.text}"]
    assert [handlers.answer_text(message) for message in state.chat[1::2]] == [quest_text, state.answer.text]
    state.close()
