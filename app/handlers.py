"""What the app does, as plain functions over one browser session's `ChatState`: read an upload, pick a sample, load
a document, ask (streaming), stop, start a new chat, compare dense and Quest, and the views of the last answer (pages
read, where the model looked, page text, trace export). Token counts, context room, page texts and timings come from
the engine (`quest_core.session`); nothing here tokenizes or touches tensors.

Every handler takes the `Server` first and returns (or, streaming, yields) a dict of views keyed by name (see
`layout.py`, which turns them into component updates; a view left out stays as it is). A `UserError` is a refusal
the user can act on: it becomes a warning toast and one log line, and nothing else changes.
"""
import functools
import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from quest_core.config import TWO_LEVEL_FACTOR
from quest_core.engine import Engine, pool_tokens
from quest_core.session import ContextFullError, Session, cut_document, measure_document

from . import figures, looked, views
from .documents import NEEDLE, DocumentError, find_needle, needle_document, read_document, sample_text
from .sessions import ChatState, OpenSessions, free_memory, is_out_of_memory

log = logging.getLogger("quest.app")
CHARS_PER_TOKEN = 8     # a generous bound: texts with more characters than 8 x the token limit are refused untokenized
REFRESH_S = 1.0         # the answer's text, metrics and context meter refresh this often while it streams; the plots
                        # come at its end (each refresh costs the decoding thread time on 2 cores: bench/app_speed.py)
FIRST_TOKEN_POLL_S = 0.05  # until the first token shows, the stream is looked at this often
STOP_WAIT_S = 30        # the longest wait for an abandoned answer's current token
CUTS = {"keep the head": "head", "keep the tail": "tail"}
HIDDEN = gr.update(visible=False)
PROGRESS = gr.Progress()  # as a default argument, it asks Gradio for a progress tracker


class UserError(Exception):
    """A request the app refuses; the message says what happened and what to do."""


@dataclass
class Server:
    """What every handler shares: the model and its limits, the open sessions, and the engine that runs their model
    work (their answers decode together)."""
    model: object
    tokenizer: object
    backend: object
    sessions: OpenSessions
    max_new_tokens: int = 256
    max_document_tokens: int = 100_000
    engine: Engine | None = None  # None: one on `backend`

    def __post_init__(self):
        self.engine = self.engine or Engine(self.model, self.tokenizer, self.backend, pool_tokens(self.model))
        # a new document is measured for its note, again for the note of the end kept, and by Load: once each text
        self.fit = functools.lru_cache(maxsize=4)(functools.partial(measure_document, self.tokenizer,
                                                                    self.model.config))

    @property
    def max_context(self) -> int:
        return getattr(self.model.config, "max_position_embeddings", None) or 8192

    def new_session(self) -> Session:
        return self.engine.session()


def notify(message: str) -> str:
    """A refusal or failure the user should read: a warning toast, and one log line."""
    log.info("user error: %s", message)
    gr.Warning(message)
    return message


def failed(error: Exception) -> str:
    """Any exception a handler lets out becomes a readable warning (its message, returned); a bug also logs its
    traceback."""
    if isinstance(error, UserError):
        return notify(str(error))
    if is_out_of_memory(error):
        error.__traceback__ = None  # its frames hold the failed call's tensors
        free_memory()
        return notify("Out of memory: the document stays loaded; ask for a shorter answer or load a shorter document.")
    log.exception("unexpected error")
    return notify(f"Something went wrong ({type(error).__name__}: {error}). The document stays loaded: try again, or "
                  "load it again.")


def loaded_session(state: ChatState | None) -> Session:
    if state is None or state.session is None or not state.document_name:
        raise UserError("Load a document first: upload a file, paste text or pick a sample, then press Load.")
    return state.session


def configure(session: Session, mode=None, budget=None, page_size=None, dense_layers=None, top_p=None,
              two_level=None) -> None:
    """top_p 0 turns the adaptive budget off; two_level ranks pairs of pages first (QuestConfig.coarse_factor)."""
    try:
        session.configure(mode=mode, budget=None if budget is None else int(budget),
                          page_size=None if page_size is None else int(page_size),
                          dense_layers=None if dense_layers is None else int(dense_layers),
                          top_p=None if top_p is None else float(top_p),
                          coarse_factor=None if two_level is None else TWO_LEVEL_FACTOR * bool(two_level))
    except ValueError as error:
        raise UserError(f"These settings do not work together: {error}.") from None


# ---- the document ----

def measure(server: Server, text: str):
    """The document's DocumentFit; a UserError past the server's limits (characters are counted first: 50 MB of
    text takes minutes to tokenize)."""
    max_chars = CHARS_PER_TOKEN * server.max_document_tokens
    if len(text) > max_chars:
        raise UserError(f"The document has {len(text):,} characters; this server takes up to {max_chars:,}. "
                        "Use a shorter part of it.")
    fit = server.fit(text)
    if fit.tokens > server.max_document_tokens:
        raise UserError(f"The document has {fit.tokens:,} tokens; this server takes up to "
                        f"{server.max_document_tokens:,}. Use a shorter part of it.")
    return fit


def candidate(server: Server, text: str, note: str = "") -> dict:
    """The views for a document about to be loaded: what loading it would do, the cut choice if needed (an upload
    or a sample also puts its text in the paste box). The choice is shown, never reset: a reset that reached the
    browser after the person chose (the browser test once checked *keep the head* and then loaded with no choice)
    would undo the choice unseen."""
    fit = measure(server, text)
    return {"doc_info": views.document_note(fit, server.max_context) + note, "cut": gr.update(visible=not fit.fits)}


def still_loaded(state: ChatState | None) -> str:
    return f" Still loaded: {state.document_name}." if state is not None and state.document_name else ""


def read_upload(server: Server, file, state: ChatState | None) -> dict:
    """An uploaded file becomes the document to load; a refused one is cleared from the file box."""
    if file is None:
        return {}
    try:
        text = read_document(file, Path(file).name)
        return candidate(server, text) | {"pasted": text, "sample": None}
    except (DocumentError, UserError) as error:
        notify(str(error))
        return {"upload": None, "pasted": "", "sample": None, "cut": HIDDEN,
                "doc_info": f"**Not loaded:** {str(error).rstrip('.')}.{still_loaded(state)}"}


def pick_sample(server: Server, name: str | None, depth: float) -> dict:
    if not name:
        return {}
    note = ""
    if name == NEEDLE:
        note = f" The passkey is **{needle_document(depth)[1]}**: ask *What is the pass key?*"
    text = sample_text(name, depth)
    return candidate(server, text, note) | {"pasted": text, "upload": None}


def describe(server: Server, text: str) -> dict:
    if not text or not text.strip():
        return {"doc_info": "No document yet: upload a file, pick a sample or paste text.", "cut": HIDDEN}
    try:
        return candidate(server, text)
    except UserError as error:
        return {"doc_info": f"**Too long:** {error}", "cut": HIDDEN}


def choose_cut(server: Server, text: str, cut: str | None) -> dict:
    """An end was chosen to keep of a document longer than the context: the note says what loading keeps."""
    if not text or cut not in CUTS:
        return {}
    return {"doc_info": views.document_note(measure(server, text), server.max_context, CUTS[cut])}


NO_ANSWER = "Ask a question: this view then shades the passages the model read while answering."


def answers_cleared() -> dict:
    """The views of the conversation and its last answer, emptied (a new document, New chat)."""
    return {"chat": [], "metrics": "", "heads_plot": HIDDEN, "time_plot": HIDDEN, "tokens": HIDDEN, "looked": HIDDEN,
            "looked_note": NO_ANSWER, "compare_box": HIDDEN, "dense_answer": "", "quest_answer": "", "verdict": "",
            "page_text": "", "trace_file": None}


def load_document(server: Server, text: str, cut: str | None, file, sample: str | None, depth: float,
                  state: ChatState | None, request: gr.Request, progress=PROGRESS) -> dict:
    """Prefill the document (cut to its head or tail if it is longer than the context leaves room for); every view
    of the previous document is cleared. A sample is made again from its name and needle depth: Load clicked at once
    after typing a depth can arrive before the paste box holds the sample at that depth."""
    if sample:
        text = sample_text(sample, depth)
    if not text or not text.strip():
        raise UserError("Nothing to load: upload a file, pick a sample or paste text first.")
    fit = measure(server, text)
    if not fit.fits:
        if cut not in CUTS:
            raise UserError(f"The document has {fit.tokens:,} tokens; at most {fit.max_tokens:,} leave room for "
                            "questions and answers: choose keep the head or keep the tail, then load again.")
        text = cut_document(server.tokenizer, server.model.config, text, CUTS[cut])
    if state is None or state.session is None:
        state = server.sessions.open(request.session_hash, server.new_session)
        if state is None:
            raise UserError(f"The server is busy ({views.counted(server.sessions.limit, 'session')} open): try again "
                            "shortly.")
    state.forget_document()
    cleared = {"state": state, "cut": HIDDEN, "headline": "", "speed_plot": HIDDEN} | answers_cleared()
    started = time.perf_counter()
    progress(0, desc="Prefilling the document")
    try:
        ingested = state.session.ingest(text, progress=lambda done, total: progress(done / total, desc="Prefill"))
    except Exception as error:
        state.session.reset()  # no half-loaded document: the partial KV is freed
        if not is_out_of_memory(error):
            raise
        error.__traceback__ = None
        free_memory()
        message = (f"Out of memory while prefilling {fit.tokens:,} tokens: load a shorter document, or keep only "
                   "its head or its tail.")
        notify(message)
        return cleared | {"document": gr.update(label="Document"), "doc_info": f"**Not loaded:** {message}",
                          "meter": ""}
    name = sample or (Path(file).name if file else "pasted text")
    state.document_name = f"{name}{f' ({cut})' if not fit.fits else ''}"
    state.needle = find_needle(text)
    loaded = (f"{state.document_name}: {views.counted(ingested.document_tokens, 'token')}, prefilled in "
              f"{time.perf_counter() - started:.1f} s")
    return cleared | {"document": gr.update(label=f"Document · {loaded}", open=False),
                      "doc_info": f"**Loaded** {loaded}. Ask away: follow-up questions reuse the document's KV.",
                      "meter": views.meter(state.session.context_usage())}


# ---- answering ----

def ask(server: Server, question: str, mode: str, budget, page_size, dense_layers, inspect: bool, max_new_tokens,
        temperature, repetition_penalty, no_repeat_ngram_size, layer, head, top_p, two_level: bool,
        state: ChatState | None):
    """Stream the answer to `question`: the first token as soon as it comes, then the chat, metrics and context meter
    every REFRESH_S, everything at the end."""
    session = loaded_session(state)
    question = (question or "").strip()
    if not question:
        notify("Type a question first.")  # a warning only: the last answer's views stay
        yield {}
        return
    configure(session, mode, budget, page_size, dense_layers, top_p, two_level)
    attention = views.attention_used(session.config)
    decoding = dict(max_new_tokens=min(int(max_new_tokens), server.max_new_tokens), temperature=float(temperature),
                    repetition_penalty=float(repetition_penalty), no_repeat_ngram_size=int(no_repeat_ngram_size))
    before = list(state.chat)
    user = {"role": "user", "content": question}
    yield {"chat": before + [user, answer_message(attention, "")], "question": "",
           "metrics": views.metrics(mode, [], None)}
    answer = Streaming(session.ask(question, trace=True, inspect=bool(inspect), **decoding), session.cancel)

    def notices():  # once the engine has started the answer (its RunStats says what it dropped)
        return turn_notices(session.last_run, decoding["max_new_tokens"])

    notes, shown = None, 0
    try:
        while not answer.done.wait(REFRESH_S if shown else FIRST_TOKEN_POLL_S):
            steps = list(answer.steps)
            if len(steps) == shown:
                continue
            shown, run = len(steps), session.last_run
            if notes is None:
                notes = notices()
            chat = before + notes + [user, answer_message(attention, "".join(s.text for s in steps))]
            yield {"chat": chat, "metrics": views.metrics(mode, steps, run),
                   "meter": views.meter(session.context_usage(steps[-1].context_len))}
        answer.raise_error()
    except ContextFullError as error:  # refused: the question stays in its box, the last answer's metrics stay
        notify(str(error))
        state.chat = before + [user, notice("The question does not fit", f"{error}")]
        yield {"chat": state.chat, "question": question, "metrics": last_metrics(state),
               "meter": views.meter(session.context_usage())}
        return
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        error.__traceback__ = None
        free_memory()
        message = "Out of memory while answering: the document stays loaded; ask for a shorter answer."
        notify(message)
        state.chat = before + [notice("Out of memory", message)]
        yield {"chat": state.chat, "question": question, "meter": views.meter(session.context_usage())}
        return
    finally:
        answer.stop()
    if notes is None:  # no step was shown while streaming
        notes = notices()
    run = session.last_run
    stopped = " (stopped)" if run.stop_reason == "cancelled" else ""
    state.chat = before + notes + [user, answer_message(attention, run.text + stopped)]
    state.answer, state.question, state.picked_step = run, question, None
    state.page_texts = session.page_texts()
    if run.new_tokens > 1 and not inspect:  # an inspected answer also ran dense attention at each step: not a speed
        state.speeds[mode] = speed(run, "chat")
    yield {"chat": state.chat, "metrics": last_metrics(state),
           "meter": views.meter(session.context_usage()), **speed_views(state),
           **answer_views(state, session, int(layer), int(head))}


class Streaming:
    """An answer's stream of engine Steps, read on a thread of its own: the engine never waits while the page is
    updated (Gradio sends each update before it asks a generator for the next)."""

    def __init__(self, stream, cancel):
        self.stream, self.cancel, self.steps, self.error = stream, cancel, [], None
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True, name="answer").start()

    def _read(self):
        try:
            for step in self.stream:
                self.steps.append(step)
        except Exception as error:
            self.error = error
        finally:
            self.stream.close()
            self.done.set()

    def raise_error(self):
        if self.error is not None:
            raise self.error

    def stop(self):
        """If the answer is still running (the page went away), end it after its current token and wait for that,
        so the engine lets go of its request."""
        if not self.done.is_set():
            self.cancel()
            self.done.wait(STOP_WAIT_S)


ATTENTION_LINE_END = "</small>\n\n"


def answer_message(attention: str, text: str) -> dict:
    """An answer for the chat, under a small line saying which attention produced it (views.attention_used): the
    chat keeps each answer's, whatever the settings of the next."""
    return {"role": "assistant", "content": f"<small>{attention}{ATTENTION_LINE_END}{text}"}


def message_text(message: dict) -> str:
    """A chat message's text as Gradio's API returns it: a string, or a list of text parts."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def answer_text(message: dict) -> str:
    """The text of an answer_message as the API returns it, without its attention line: what the API's clients
    compare and time."""
    return message_text(message).partition(ATTENTION_LINE_END)[2]


def notice(title: str, text: str) -> dict:
    """A chat message that is not part of the conversation: a titled note."""
    return {"role": "assistant", "content": text, "metadata": {"title": f"⚠️ {title}", "status": "done"}}


def turn_notices(run, asked_tokens: int) -> list[dict]:
    """Notes for the chat: turns the engine dropped to make room, and an answer capped by the room left."""
    notes = []
    if run.dropped_turns:
        turns = "turn" if run.dropped_turns == 1 else f"{run.dropped_turns} turns"
        notes.append(notice(f"Context full: the oldest {turns} dropped",
                            f"To make room for this answer, the oldest question/answer {turns} left the model's "
                            "context (they stay shown above; the model no longer sees them). The document stays. "
                            "**New chat** frees the whole conversation."))
    if run.max_new_tokens < asked_tokens:
        cap = views.counted(run.max_new_tokens, "token")
        notes.append(notice(f"Answer capped at {cap}",
                            f"Room for only {cap} is left beside the document and this question; **New chat** frees "
                            "the conversation's room."))
    return notes


def page_marks(session: Session, question: str, needle: str | None) -> dict:
    marks = {"question": session.pages_of(question)}
    if needle:
        marks["needle"] = session.pages_of(needle)
    return marks


def stop(server: Server, state: ChatState | None) -> dict:
    """End the answer being generated after its current token; `ask` then shows it marked stopped."""
    if state is not None and state.session is not None:
        state.session.cancel()
    return {}


def new_chat(server: Server, state: ChatState | None) -> dict:
    """Forget the questions and answers, and the views of the last one; keep the document and its KV (and what the
    headline measured on it)."""
    if state is None or state.session is None or not state.document_name:
        return {"chat": []}
    state.session.new_chat()
    state.forget_answers()
    return answers_cleared() | {"meter": views.meter(state.session.context_usage())}


def comparing(server: Server, question: str, state: ChatState | None) -> dict:
    """Compare's panel as it starts, naming the question it answers: the one typed, else the last one asked."""
    question = (question or "").strip() or (state.question if state is not None else "")
    return {"compare_box": gr.update(visible=True),
            "verdict": f"Comparing{f' *{question}*' if question else ''}: dense first, then Quest…"}


def compare(server: Server, question: str, budget, page_size, dense_layers, max_new_tokens, repetition_penalty,
            no_repeat_ngram_size, top_p, two_level: bool, state: ChatState | None, progress=PROGRESS) -> dict:
    """The same question (or the last one asked) answered dense and with Quest on the same context, greedily; the
    conversation does not keep either answer. Stop ends the comparison: no verdict and no speed from a cut answer."""
    session = loaded_session(state)
    question = (question or "").strip() or state.question
    if not question:
        raise UserError("Type a question first: Compare answers it once dense and once with Quest.")
    decoding = dict(max_new_tokens=min(int(max_new_tokens), server.max_new_tokens), temperature=0.0,
                    repetition_penalty=float(repetition_penalty), no_repeat_ngram_size=int(no_repeat_ngram_size))
    runs, shown = {}, 0.0
    for done, mode in enumerate(("dense", "quest")):
        configure(session, mode, budget, page_size, dense_layers, top_p, two_level)
        label = "Quest" if mode == "quest" else "dense"
        progress(done / 2, desc=f"{label}: prefilling")
        try:
            for step in session.ask(question, keep=False, trace=True, **decoding):
                if time.perf_counter() - shown > 0.5:
                    shown = time.perf_counter()
                    progress((done + step.index / decoding["max_new_tokens"]) / 2, desc=f"{label}: token {step.index}")
        except ContextFullError as error:
            raise UserError(str(error)) from None
        runs[mode] = session.last_run
        if runs[mode].stop_reason == "cancelled":
            break
        state.speeds[mode] = speed(runs[mode], "Compare")
    stopped = any(run.stop_reason == "cancelled" for run in runs.values())
    first = None if stopped else views.first_difference(runs["dense"], runs["quest"])
    verdict = ("**Stopped**: no verdict on an answer cut short." if stopped else "**Identical answers.**"
               if first is None else f"**The answers differ from token {first} on** (marked).")
    quest = runs.get("quest")
    return {"dense_answer": views.compare_pane(runs["dense"], "Dense", first),
            "quest_answer": views.compare_pane(quest, f"Quest ({views.budget_text(quest)})", first) if quest
            else "<b>Quest</b> · not run: Compare was stopped",
            "verdict": f"{verdict} Question: *{question}*", "compare_box": gr.update(visible=True),
            **speed_views(state)}


def speed(run, source: str) -> views.Speed:
    traced = traced_steps(run.steps)
    read = sum(trace.read_bytes for trace in traced)
    kv_ratio = sum(trace.dense_bytes for trace in traced) / read if read else 1.0
    return views.Speed(run.decode_tokens_per_s, run.attention_s, kv_ratio, run.prompt_tokens, source,
                       kv_series(traced), shared=run.shared_steps > 0)


def kv_series(traced) -> tuple:
    return tuple(trace.context_len for trace in traced), tuple(trace.read_bytes for trace in traced)


def speed_views(state: ChatState) -> dict:
    speeds = {mode: (s.ms_per_token, None if s.attention_s is None else 1000 * s.attention_s)
              for mode, s in state.speeds.items()}
    return {"headline": views.headline(state.speeds),
            "speed_plot": gr.update(value=figures.time_per_token(speeds), visible=True) if speeds else HIDDEN}


def last_metrics(state: ChatState) -> str:
    """The metrics of the last answer in the chat ("" when there is none)."""
    run = state.answer
    return "" if run is None else views.metrics(run.mode, run.steps, run, mean_recall(run))


def mean_recall(run) -> float | None:
    values = [value for step in run.steps if step.trace is not None and step.trace.recall is not None
              for value in step.trace.recall.flatten().tolist() if value == value]  # NaN: dense layers
    return sum(values) / len(values) if values else None


# ---- the views of the last answer ----

def traced_steps(steps) -> list:
    return [step.trace for step in steps if step.trace is not None]


def page_labels(page_texts: list[str], page_size: int) -> list[str]:
    return [f"page {page}: tokens {page * page_size}-{(page + 1) * page_size - 1}<br>"
            f"{text[:60].replace(chr(10), ' ').replace('<', '&lt;')}" for page, text in enumerate(page_texts)]


def answer_views(state: ChatState, session: Session, layer: int, head: int) -> dict:
    """Pages read (at the picked token or the last), over time, and where the model looked."""
    run = state.answer
    traced = traced_steps(run.steps)
    marks = page_marks(session, state.question, state.needle)  # the cache holds the question once the answer ends
    if not traced:
        return {"heads_plot": HIDDEN, "time_plot": HIDDEN, **looked_views(state, session)}
    page_size = run.page_size
    step = picked_trace(state) or traced[-1]
    heads = figures.pages_read(step, layer, page_size, page_labels(state.page_texts, page_size), marks)
    if all(trace.selected_pages is None for trace in traced):  # dense: the bytes it read, beside the other mode's
        series = {mode: s.kv_steps for mode, s in state.speeds.items() if mode != run.mode and s.kv_steps[0]}
        over_time = figures.kv_read_per_step({run.mode: kv_series(traced), **series})
    else:
        over_time = figures.selection_over_time(traced, layer, head, page_size, marks)
    return {"heads_plot": gr.update(value=heads, visible=True), "time_plot": gr.update(value=over_time, visible=True),
            **looked_views(state, session)}


def picked_trace(state: ChatState):
    if state.picked_step is None or state.picked_step >= len(state.answer.steps):
        return None
    return state.answer.steps[state.picked_step].trace


def looked_views(state: ChatState, session: Session) -> dict:
    """The answer's tokens (one picked) and the text the model saw, each passage shaded by how often it was read
    during the whole answer or, with a token picked, at that token's step."""
    run = state.answer
    groups = looked.passages(state.page_texts, breaks=(session.document_pages().stop,))
    tokens = [(step.text, "picked" if index == state.picked_step else None) for index, step in enumerate(run.steps)]
    if state.picked_step is None:
        shares = looked.page_shares(traced_steps(run.steps), len(state.page_texts))
        scope = "during the whole answer"
    else:
        step = run.steps[state.picked_step]
        shares = looked.page_shares([step.trace], len(state.page_texts))
        scope = f"to produce the picked token {step.text!r} (step {state.picked_step})"
    if shares is None:
        why = ("the first token comes from the prefill, which reads every page"
               if state.picked_step == 0 else "every page was read: dense mode, or a context within the budget")
        note = f"Nothing to shade {scope}: {why}. Ask with Quest to see where it looked."
    else:
        top = looked.top_passages(groups, shares)
        quotes = " · ".join(f"“{' '.join(p.text.split())[:70]}…”" for p in top)
        note = (f"Passages shaded by how often their pages were read {scope}, over the sparse layers and KV heads. "
                f"Most read: {quotes}. Click a token of the answer for its step; click it again for the whole answer.")
    return {"tokens": gr.update(value=tokens, visible=True),
            "looked": gr.update(value=looked.shaded(state.page_texts, groups, shares), visible=True),
            "looked_note": note}


def show_plots(server: Server, layer, head, state: ChatState | None) -> dict:
    """The layer or KV head picker moved."""
    if state is None or state.answer is None:
        return {}
    return answer_views(state, state.session, int(layer), int(head))


def pick_token(server: Server, layer, head, state: ChatState | None, event: gr.SelectData) -> dict:
    """A token of the answer was clicked: show what its step read (a second click on it: the whole answer)."""
    if state is None or state.answer is None:
        return {}
    index = event.index if isinstance(event.index, int) else event.index[0]
    state.picked_step = None if index == state.picked_step else index
    return answer_views(state, state.session, int(layer), int(head))


def page_text(server: Server, page, state: ChatState | None) -> dict:
    """A page's text: of the cache as the last chat answer left it (the pages its plots number; a Compare since then
    has run on past it), or as it is now before any answer."""
    if state is None or state.session is None or not state.document_name:
        raise UserError("Load a document first.")
    texts = state.page_texts or state.session.page_texts()
    page_size = state.session.config.page_size
    page = int(page or 0)
    if not 0 <= page < len(texts):
        raise UserError(f"Page {page} is outside the context: it has pages 0 to {len(texts) - 1}.")
    return {"page_text": f"Page {page}: tokens {page * page_size}-{page * page_size + page_size - 1}\n\n{texts[page]}"}


def export_trace(server: Server, state: ChatState | None) -> dict:
    run = state.answer if state is not None else None
    if run is None or not traced_steps(run.steps):
        raise UserError("No trace yet: ask a question first.")
    data = {"run": run.summary(), "question": state.question,  # step: the answer's token number, as the app shows
            # it; step 0, the first token, comes from the prefill and has no decode step to trace
            "steps": [{"step": index, "token": step.text, "context_len": trace.context_len, "seconds": trace.seconds,
                       "attention_s": trace.attention_s, "dense_bytes": trace.dense_bytes,
                       "read_bytes": trace.read_bytes,
                       "pages_read": None if trace.pages_read is None else trace.pages_read.tolist(),
                       "selected_pages": None if trace.selected_pages is None else trace.selected_pages.tolist(),
                       "recall": None if trace.recall is None else [[None if r != r else r for r in row]
                                                                    for row in trace.recall.tolist()]}
                      for index, step in enumerate(run.steps) if (trace := step.trace) is not None]}
    path = Path(tempfile.mkdtemp(prefix="quest-trace-")) / "trace.json"
    path.write_text(json.dumps(data))
    return {"trace_file": str(path)}


def release(server: Server, request: gr.Request) -> None:
    """The browser left: free its KV now (Gradio keeps a closed session's state for an hour)."""
    server.sessions.close_owner(request.session_hash)
