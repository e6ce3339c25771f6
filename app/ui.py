"""The Gradio app: a thin view over `quest_core.session.Session`. `build_app(model, tokenizer)` returns the Blocks.

Per-user state lives in `gr.State` (a `ChatState`, whose KV is freed as soon as the browser leaves); the model is
shared and all model work is queued under one concurrency id, so it runs one request at a time. Limits (document
tokens, new tokens, open sessions) are `build_app` arguments; the upload size is `launch`'s `max_file_size`.
"""
import ctypes
import gc
import html
import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch

from quest_core.config import default_config
from quest_core.session import Session

from . import figures
from .documents import SUFFIXES, DocumentError, read_document

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLES = {
    "Hamlet, the opening (~6K tokens)": "hamlet_opening.txt",
    "Hamlet, the whole play (~53K tokens: longer than the context)": "hamlet.txt",
    "Milton, Areopagitica (~24K tokens)": "areopagitica.txt",
}
NEEDLE = "Needle in a haystack (passkey at a chosen depth)"
REFRESH_S = 1.0  # the plots refresh at most this often while streaming
TEXT_REFRESH_S = 0.2  # and the answer text
MODEL_WORK = "model"  # the queue's concurrency id for everything that runs the model
CHARS_PER_TOKEN = 8  # a generous bound on characters per token: texts over the limit are refused before tokenizing


@dataclass
class ChatState:
    """One browser session's conversation and what the plots show."""
    session: Session | None = None
    document: str = ""
    steps: list = field(default_factory=list)            # StepTraces of the last answer
    step_times: dict = field(default_factory=dict)        # mode -> seconds per step of its last answer
    tokens_per_s: dict = field(default_factory=dict)      # mode -> decode tok/s of its last answer
    page_labels: list = field(default_factory=list)
    last_question: str = ""
    owner: str = ""                                       # the browser session's hash

    def close(self):
        """Free the session's KV; an answer still streaming stops after its current token."""
        if self.session is not None:
            self.session.cancel()
            self.session.reset()
            free_memory()
        self.session = None


class OpenSessions:
    """The ChatStates that hold a model session: one per browser session, at most `limit` at once."""

    def __init__(self, limit: int):
        self.limit, self.states, self.lock = limit, {}, threading.Lock()

    def open(self, owner: str, new_session) -> ChatState:
        """`owner`'s ChatState, made with `new_session()` if it has none; a gr.Error when `limit` are open."""
        with self.lock:
            state = self.states.get(owner)
            if state is None:
                if len(self.states) >= self.limit:
                    raise gr.Error(f"The server is busy ({self.limit} sessions are open): try again shortly.")
                state = self.states[owner] = ChatState(session=new_session(), owner=owner)
            return state

    def close(self, state: ChatState | None) -> None:
        if state is None:
            return
        state.close()
        with self.lock:
            if self.states.get(state.owner) is state:
                del self.states[state.owner]

    def close_owner(self, owner: str) -> None:
        self.close(self.states.get(owner))


def backend_notice(backend) -> str:
    """Which attention backend runs, and why when it is not the one asked for or runs without our CUDA kernels."""
    return "torch" if backend is None else backend.describe()


def _malloc_trim():
    """glibc's malloc_trim, or None (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None


MALLOC_TRIM = _malloc_trim()


def free_memory() -> None:
    """Hand freed memory back: CUDA's cached blocks, and on glibc the free pages of the arenas that the server's
    threads allocate from (without this, RSS stays at its high-water mark after the sessions are gone)."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def is_out_of_memory(error: BaseException) -> bool:
    return (isinstance(error, (torch.OutOfMemoryError, MemoryError))
            or isinstance(error, RuntimeError) and "can't allocate memory" in str(error))  # CPU allocator


def reraise_out_of_memory(error: Exception, advice: str):
    """Re-raises `error`; running out of memory becomes a gr.Error with `advice`, once what it held is freed."""
    if not is_out_of_memory(error):
        raise error
    error.__traceback__ = None  # its frames hold the failed call's tensors
    free_memory()
    raise gr.Error(f"Out of memory {advice}") from None


def needle_document(depth_percent: float, filler_tokens_hint: int = 5000) -> tuple[str, str]:
    """A passkey hidden at `depth_percent` of a public-domain filler; returns (document, passkey)."""
    filler = ASSETS.joinpath("areopagitica.txt").read_text()[: filler_tokens_hint * 4]
    passkey = str(10000 + (hash(round(depth_percent, 2)) % 90000))
    cut = int(len(filler) * depth_percent / 100)
    cut = filler.rfind("\n", 0, cut) + 1 if cut else 0
    needle = f"\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n"
    return filler[:cut] + needle + filler[cut:], passkey


def build_app(model, tokenizer, backend=None, max_new_tokens: int = 1024, gpu=lambda fn: fn,
              max_document_tokens: int = 100_000, max_sessions: int = 16) -> gr.Blocks:
    """`gpu` wraps the functions that run the model (Hugging Face Spaces' `spaces.GPU`, or nothing).
    Longer documents are refused; a document longer than the context is cut to its head or tail on request.
    Each browser session with a loaded document holds its KV until it leaves; past `max_sessions` the server is busy."""
    max_context = getattr(model.config, "max_position_embeddings", None) or 8192
    max_chars = CHARS_PER_TOKEN * max_document_tokens
    defaults = default_config(model.config)
    num_layers = model.config.num_hidden_layers
    num_kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    sessions = OpenSessions(max_sessions)
    server_status = (f"Attention backend: **{backend_notice(backend)}** on {next(model.parameters()).device} · "
                     f"documents up to {max_document_tokens:,} tokens, answers up to {max_new_tokens:,} tokens, "
                     f"{max_sessions} sessions at once.")

    def too_long(text: str, tokens: int | None = None) -> str:
        """Why `text` is over the limits, or ""; characters are counted first (50 MB takes minutes to tokenize)."""
        if len(text) > max_chars:
            return f"The document has {len(text):,} characters; this server takes up to {max_chars:,}."
        if tokens is not None and tokens > max_document_tokens:
            return f"The document has {tokens:,} tokens; this server takes up to {max_document_tokens:,}."
        return ""

    # ---- document ----

    def read_upload(file):
        if file is None:
            return gr.skip(), gr.skip()
        try:
            text = read_document(file, Path(file).name)
        except DocumentError as error:
            raise gr.Error(str(error))
        if problem := too_long(text):
            raise gr.Error(f"{problem} Upload a shorter part of it.")
        return text, describe(text)

    def pick_sample(name, depth):
        if name == NEEDLE:
            text, passkey = needle_document(depth)
            return text, describe(text) + f" The passkey is **{passkey}**: ask *What is the pass key?*"
        if name in SAMPLES:
            text = ASSETS.joinpath(SAMPLES[name]).read_text()
            return text, describe(text)
        return gr.skip(), gr.skip()

    def describe(text: str) -> str:
        if not text.strip():
            return "No document yet."
        if problem := too_long(text):
            return f"**Too long:** {problem}"
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if problem := too_long(text, tokens):
            return f"**Too long:** {problem}"
        share = 100 * tokens / max_context
        note = ""
        if tokens > max_context - 512:
            note = (f" **Longer than the model's {max_context}-token context:** choose *keep the head* or "
                    "*keep the tail* below, then load.")
        return f"{tokens:,} tokens, {share:.0f}% of the model's {max_context:,}-token context.{note}"

    @gpu
    def load_document(text, cut, state, request: gr.Request, progress=gr.Progress()):
        if not text or not text.strip():
            raise gr.Error("The document is empty: upload a file, paste text or pick a sample.")
        if problem := too_long(text):
            raise gr.Error(problem)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if problem := too_long(text, len(ids)):
            raise gr.Error(problem)
        room = max_context - 512  # leave room for the questions and answers
        if len(ids) > room:
            if cut not in ("keep the head", "keep the tail"):
                raise gr.Error(f"The document has {len(ids):,} tokens and the context holds {max_context:,}: "
                               "choose keep the head or keep the tail, then load again.")
            ids = ids[:room] if cut == "keep the head" else ids[-room:]
            text = tokenizer.decode(ids)
        if state is None or state.session is None:
            state = sessions.open(request.session_hash, lambda: Session(model, tokenizer, defaults, backend))
        progress(0, desc="Prefilling the document")
        started = time.perf_counter()
        try:
            ingested = state.session.ingest(text, progress=lambda done, total: progress(done / total, desc="Prefill"))
        except Exception as error:
            state.session.reset()  # no half-loaded document: the partial KV is freed
            state.document = ""
            reraise_out_of_memory(error, f"while prefilling {len(ids):,} tokens: load a shorter document, or keep "
                                         "only its head or its tail.")
        state.document, state.steps = text, []
        state.page_labels = []
        status = (f"Loaded {ingested.document_tokens:,} tokens (prefill {time.perf_counter() - started:.1f} s). "
                  "Ask away: follow-up questions reuse the document's KV.")
        return state, status, []

    # ---- answering ----

    def apply_settings(state, mode, budget, page_size, dense_layers):
        if state is None or state.session is None or not state.document:
            raise gr.Error("Load a document first.")
        state.session.configure(mode=mode, budget=int(budget), page_size=int(page_size),
                                dense_layers=int(dense_layers))

    def labels_for(state: ChatState) -> list[str]:
        """Hover text per page: token range and a snippet of the text."""
        session = state.session
        page_size = session.config.page_size
        ids = session.token_ids
        labels = []
        for start in range(0, len(ids), page_size):
            snippet = tokenizer.decode(ids[start:start + page_size]).replace("\n", " ")
            labels.append(f"tokens {start}-{min(start + page_size, len(ids)) - 1}: {html.escape(snippet[:60])}")
        return labels + ["(new tokens)"] * 64

    def metrics_text(state: ChatState, run, mode: str) -> str:
        if run is None:
            return ""
        lines = [f"**{mode}** · TTFT {run.ttft_s:.2f} s · decode {run.decode_tokens_per_s:.1f} tok/s · "
                 f"{run.new_tokens} tokens · prefilled {run.prefill_tokens} new tokens, reused {run.reused_tokens}"]
        traced = [s for s in state.steps if s is not None]
        if traced:
            last = traced[-1]
            theory = last.dense_bytes / max(last.read_bytes, 1)
            lines.append(f"KV read per step: {last.read_bytes / 2**20:.2f} MiB of {last.dense_bytes / 2**20:.2f} MiB "
                         f"dense → theoretical attention speedup {theory:.1f}×")
            recall = [s.recall for s in traced if s.recall is not None]
            if recall:
                mean_recall = torch.nanmean(torch.stack(recall)).item()
                lines.append(f"Selection recall (dense attention mass on the selected pages): {mean_recall:.3f}")
        other = "dense" if mode == "quest" else "quest"
        if other in state.tokens_per_s and run.decode_tokens_per_s:
            lines.append(f"Measured: {run.decode_tokens_per_s / state.tokens_per_s[other]:.2f}× the last {other} "
                         f"answer ({state.tokens_per_s[other]:.1f} tok/s)")
        return "  \n".join(lines)

    def plots(state: ChatState, layer, head, step_index, over_time=True):
        """(heads x pages at one step, steps x pages for one head); the second only if `over_time`."""
        traced = [s for s in state.steps if s is not None] if state else []
        if not traced or state.session is None:
            return None, None
        page_size = state.session.config.page_size
        if not state.page_labels:
            state.page_labels = labels_for(state)
        layer = min(int(layer), num_layers - 1)
        head = min(int(head), num_kv_heads - 1)
        step = traced[min(int(step_index), len(traced) - 1)] if step_index >= 0 else traced[-1]
        return (figures.heads_by_pages(step, layer, page_size, state.page_labels),
                figures.steps_by_pages(traced, layer, head, page_size) if over_time else None)

    def sparkline(state: ChatState, mode: str, times: list[float]):
        other = "dense" if mode == "quest" else "quest"
        return figures.step_times(times, state.step_times.get(other, []), mode, f"last {other} answer")

    @gpu
    def ask(question, history, state, mode, budget, page_size, dense_layers, inspect, layer, head):
        if not question or not question.strip():
            raise gr.Error("Type a question first.")
        apply_settings(state, mode, budget, page_size, dense_layers)
        history = list(history or []) + [{"role": "user", "content": question},
                                         {"role": "assistant", "content": ""}]
        state.steps, state.page_labels, state.last_question = [], [], question
        times, answer, last_refresh, last_text = [], "", 0.0, 0.0
        session = state.session
        yield history, "Prefilling the question…", gr.skip(), gr.skip(), gr.skip(), ""
        try:
            for step in session.ask(question, max_new_tokens=max_new_tokens, trace=True, inspect=bool(inspect)):
                answer += step.text
                times.append(step.seconds)
                state.steps.append(step.trace)
                history[-1]["content"] = answer
                now = time.perf_counter()
                if now - last_refresh > REFRESH_S:
                    last_refresh = now
                    heads_plot, _ = plots(state, layer, head, -1, over_time=False)
                    yield (history, metrics_text(state, session.last_run, mode), sparkline(state, mode, times[1:]),
                           heads_plot or gr.skip(), gr.skip(), "")
                elif now - last_text > TEXT_REFRESH_S:
                    last_text = now
                    yield history, gr.skip(), gr.skip(), gr.skip(), gr.skip(), ""
        except Exception as error:
            reraise_out_of_memory(error, "while answering: the document stays loaded; ask for less, or load a "
                                         "shorter document.")
        run = session.last_run
        state.step_times[mode], state.tokens_per_s[mode] = times[1:], run.decode_tokens_per_s
        heads_plot, steps_plot = plots(state, layer, head, -1)
        note = "" if run.stop_reason != "cancelled" else " (stopped)"
        history[-1]["content"] = run.text + note  # exactly the answer the conversation keeps
        yield history, metrics_text(state, run, mode), sparkline(state, mode, times[1:]), heads_plot, steps_plot, ""

    def stop(state):
        """Ends the answer being generated after its current token; `ask` then sends the answer marked stopped."""
        if state is not None and state.session is not None:
            state.session.cancel()

    @gpu
    def compare(question, state, budget, page_size, dense_layers):
        """Answers `question` (or, if empty, the last one asked) once dense and once with Quest."""
        question = question if question and question.strip() else (state.last_question if state else "")
        if not question:
            raise gr.Error("Type a question first.")
        answers = {}
        for mode in ("dense", "quest"):
            apply_settings(state, mode, budget, page_size, dense_layers)
            try:
                run = state.session.answer(question, max_new_tokens=max_new_tokens, keep=False)
            except Exception as error:
                reraise_out_of_memory(error, "while comparing: the document stays loaded; load a shorter one.")
            answers[mode] = run
            state.tokens_per_s[mode] = run.decode_tokens_per_s
        return divergence_html(answers["dense"], answers["quest"])

    def divergence_html(dense, quest):
        dense_ids = [s.token_id for s in dense.steps]
        quest_ids = [s.token_id for s in quest.steps]
        first = next((i for i, (a, b) in enumerate(zip(dense_ids, quest_ids)) if a != b), None)
        if first is None and len(dense_ids) != len(quest_ids):
            first = min(len(dense_ids), len(quest_ids))

        def render(run, label):
            pieces = [html.escape(s.text) for s in run.steps]
            if first is not None and first < len(pieces):
                pieces[first] = f"<mark title='first divergent token'>{pieces[first] or '∅'}</mark>"
            body = "".join(pieces).replace("\n", "<br>")
            return (f"<b>{label}</b> · {run.decode_tokens_per_s:.1f} tok/s · TTFT {run.ttft_s:.2f} s"
                    f"<div class='answer'>{body}</div>")

        verdict = ("Identical answers." if first is None else
                   f"The answers diverge at token {first}.")
        return render(dense, "Dense"), render(quest, f"Quest (budget {quest.budget})"), verdict

    # ---- inspection ----

    def page_text(state, page):
        if state is None or state.session is None or not state.session.token_ids:
            return "Load a document and ask a question first."
        page_size = state.session.config.page_size
        ids = state.session.token_ids
        page = int(page)
        if not 0 <= page * page_size < len(ids):
            return f"Page {page} is outside the context ({-(-len(ids) // page_size)} pages)."
        start, end = page * page_size, min((page + 1) * page_size, len(ids))
        return f"Page {page}: tokens {start}-{end - 1}\n\n{tokenizer.decode(ids[start:end])}"

    def export_trace(state):
        traced = [s for s in (state.steps if state else []) if s is not None]
        if not traced:
            raise gr.Error("No trace yet: ask a question first.")
        run = state.session.last_run
        data = {"run": run.summary(), "page_size": state.session.config.page_size,
                "steps": [{"context_len": s.context_len, "seconds": s.seconds, "dense_bytes": s.dense_bytes,
                           "read_bytes": s.read_bytes,
                           "selected_pages": None if s.selected_pages is None else s.selected_pages.tolist(),
                           "recall": None if s.recall is None else [[None if r != r else r for r in row]
                                                                     for row in s.recall.tolist()]}
                          for s in traced]}
        path = Path(tempfile.mkdtemp(prefix="quest-trace-")) / "trace.json"
        path.write_text(json.dumps(data))
        return str(path)

    def release(request: gr.Request):
        """The browser left: free its KV now (gradio keeps a closed session's state for an hour)."""
        sessions.close_owner(request.session_hash)

    # ---- layout ----

    with gr.Blocks(title="Quest: query-aware sparse attention") as demo:
        state = gr.State(None, delete_callback=sessions.close)
        gr.Markdown("# Quest: query-aware sparse attention\nUpload a long document, chat with it, and flip between "
                    "dense attention and Quest, which reads only the KV pages each head needs. The heatmaps show "
                    "which pages every head picked at every step.")
        gr.Markdown(server_status, elem_id="server-status")
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label=f"Document ({', '.join(SUFFIXES)})", file_types=list(SUFFIXES),
                                 type="filepath")
                with gr.Row():
                    sample = gr.Dropdown([*SAMPLES, NEEDLE], label="…or a sample", value=None)
                    depth = gr.Slider(0, 100, 50, step=5, label="needle depth %")
                document = gr.Textbox(label="…or paste text", lines=6, max_lines=12)
                doc_info = gr.Markdown("No document yet.", elem_id="doc-info")
                with gr.Row():
                    cut = gr.Radio(["keep the head", "keep the tail"], label="if too long", value=None)
                    load = gr.Button("Load document", variant="primary")
                load_status = gr.Markdown(elem_id="load-status")
            with gr.Column(scale=1):
                mode = gr.Radio(["quest", "dense"], value="quest", label="attention", elem_id="mode")
                budget = gr.Slider(64, 4096, defaults.budget, step=64, label="token budget")
                page_size = gr.Dropdown([4, 8, 16, 32], value=defaults.page_size, label="page size")
                dense_layers = gr.Slider(0, num_layers, defaults.dense_layers, step=1, label="dense layers")
                inspect = gr.Checkbox(label="Inspect: measure selection recall (slower)")
        chatbot = gr.Chatbot(label="Chat", height=360, elem_id="chat")
        with gr.Row():
            question = gr.Textbox(placeholder="Ask about the document", show_label=False, scale=4)
            send = gr.Button("Send", variant="primary", scale=1)
            stop_button = gr.Button("Stop", scale=1)
            compare_button = gr.Button("Compare dense vs Quest", scale=1)
        metrics = gr.Markdown(elem_id="metrics")
        times_plot = gr.Plot(label="time per token")
        with gr.Row():
            layer = gr.Slider(0, num_layers - 1, defaults.dense_layers, step=1, label="layer")
            head = gr.Slider(0, num_kv_heads - 1, 0, step=1, label="KV head")
            step_pick = gr.Slider(-1, max_new_tokens, -1, step=1, label="step (-1: latest)")
        heads_plot = gr.Plot(label="pages read by each KV head", elem_id="heads-plot")
        steps_plot = gr.Plot(label="selection over time", elem_id="steps-plot")
        with gr.Row():
            page = gr.Number(0, label="show page", precision=0)
            page_span = gr.Textbox(label="page text", lines=3)
            export = gr.Button("Export trace JSON")
            trace_file = gr.File(label="trace")
        with gr.Accordion("Compare", open=False) as compare_box:
            verdict = gr.Markdown(elem_id="verdict")
            with gr.Row():
                dense_answer = gr.HTML()
                quest_answer = gr.HTML()

        upload.change(read_upload, upload, [document, doc_info], api_name="read_upload")
        sample.change(pick_sample, [sample, depth], [document, doc_info], api_name="pick_sample")
        depth.release(pick_sample, [sample, depth], [document, doc_info], api_visibility="private")
        document.blur(describe, document, doc_info, api_visibility="private")
        load.click(load_document, [document, cut, state], [state, load_status, chatbot], concurrency_id=MODEL_WORK,
                   api_name="load_document")
        ask_inputs = [question, chatbot, state, mode, budget, page_size, dense_layers, inspect, layer, head]
        ask_outputs = [chatbot, metrics, times_plot, heads_plot, steps_plot, question]  # state changes in place
        send.click(ask, ask_inputs, ask_outputs, concurrency_id=MODEL_WORK, api_name="ask")
        question.submit(ask, ask_inputs, ask_outputs, concurrency_id=MODEL_WORK, api_visibility="private")
        # Stop ends the answer through the session, not by cancelling the event: the stream then ends with what the
        # conversation keeps, marked stopped.
        stop_button.click(stop, state, None, queue=False, api_name="stop")
        compare_button.click(lambda: gr.Accordion(open=True), None, compare_box, api_visibility="private").then(
            compare, [question, state, budget, page_size, dense_layers],
            [dense_answer, quest_answer, verdict], concurrency_id=MODEL_WORK, api_name="compare")
        for picker in (layer, head, step_pick):
            picker.release(plots, [state, layer, head, step_pick], [heads_plot, steps_plot], api_visibility="private")
        page.submit(page_text, [state, page], page_span, api_name="page_text")
        export.click(export_trace, state, trace_file, api_name="export_trace")
        demo.unload(release)
    demo.queue(default_concurrency_limit=1)
    return demo
