"""The Gradio app's layout and wiring: `build_app(model, tokenizer)` returns the Blocks. What each event does is in
`app/handlers.py`; this file places the components and connects them.

Two columns from 1200 px: the document, the chat, the question, Compare and the settings on the left; the context
meter, live metrics, the Quest-vs-dense headline, the pages-read plots and "where the model looked" on the right.
Per-user state lives in `gr.State` (a ChatState, whose KV is freed as soon as the browser leaves); the model is
shared through one `Engine`, which decodes the sessions' answers together, so the model work of up to
`max_sessions` users runs at once (one concurrency id for it all).
"""
import functools
import inspect

import gradio as gr

from quest_core.config import Decoding, default_config

from . import handlers, views
from .documents import NEEDLE, SAMPLES, SUFFIXES
from .sessions import OpenSessions

MODEL_WORK = "model"  # the queue's concurrency id for everything that runs the model (through the engine)
QUEUE_POLL_S = 0.02  # how often Gradio's queue looks for a job to start when it has none running
QUEUE_PROGRESS_S = 0.1  # and for progress to send
# Text edited in the paste box wins over the sample or upload that filled it, decided in the browser: the box's text
# when it gained focus is kept, and where it has changed, the upload and the sample are let go as it loses focus and
# again as Load is clicked (its inputs: pasted, cut, upload, sample, ...). Gradio's input event misses text pasted
# from the menu, and a reply from the server can come after Load's click: a browser walk loaded the sample over the
# edit. A new sample, depth or upload forgets the kept text (its event's inputs pass through).
FILLS_PASTE_BOX = "(...inputs) => { window.pasteAtFocus = undefined; return inputs; }"
EDITED = "window.pasteAtFocus !== undefined && text !== window.pasteAtFocus"
LET_GO_IF_EDITED = f"(text, upload, sample) => {EDITED} ? [null, null] : [upload, sample]"
LOAD_INPUTS = f"(text, cut, upload, sample, ...rest) => [text, cut, ...({EDITED} ? [null, null] : [upload, sample]), " \
              "...rest]"


def event(server, handler, outputs: list[str], failure: dict | None = None, gpu=lambda fn: fn):
    """`handler(server, ...)` as a Gradio event function with `outputs` (view names): the dict it returns (or yields)
    becomes updates of those components, a view it leaves out is skipped, and an exception it lets out becomes a
    readable warning (handlers.failed) and the views in `failure` (a string there gets the message in place of
    "{message}"), instead of Gradio's error state."""
    bound = gpu(functools.partial(handler, server))

    def updates(view: dict | None) -> tuple:
        view = view or {}
        unknown = set(view) - set(outputs)
        assert not unknown, f"{handler.__name__} returned views it does not output: {unknown}"
        values = tuple(view.get(name, gr.skip()) for name in outputs)
        return values[0] if len(values) == 1 else values or None

    def failed(error: Exception) -> dict:
        message = handlers.failed(error)
        return {name: value.replace("{message}", message) if isinstance(value, str) else value
                for name, value in (failure or {}).items()}

    if inspect.isgeneratorfunction(handler):
        def run(*args):
            try:
                for view in bound(*args):
                    yield updates(view)
            except Exception as error:
                yield updates(failed(error))
    else:
        def run(*args):
            try:
                return updates(bound(*args))
            except Exception as error:
                return updates(failed(error))
    run.__name__, run.__annotations__ = handler.__name__, handler.__annotations__  # Gradio reads the annotations
    run.__signature__ = inspect.signature(functools.partial(handler, server))
    return run


# Gradio lays HighlightedText's spans out as flex items, each as tall as its lines: passages of several lines stood
# side by side in columns. As inline text they read in order (pass to launch: `demo.launch(css=CSS)`), whole words
# wrapped (Gradio breaks them anywhere), and with no space where one passage meets the next (Gradio's markup has
# spaces between its spans: a browser walk read "Claud ius"), the text alone sized and shaded.
CSS = """
#looked .textfield { display: block; }
#looked .token-container, #looked .token { display: inline; font-size: 0; }
#looked .token { margin: 0; padding-left: 0; padding-right: 0; }
#looked .token, #answer-tokens .token { word-break: normal; overflow-wrap: break-word; }
#looked .text { font-size: var(--text-md); background: inherit; }
"""


def build_app(model, tokenizer, backend=None, max_new_tokens: int = 256, gpu=lambda fn: fn,
              max_document_tokens: int = 100_000, max_sessions: int = 16) -> gr.Blocks:
    """`gpu` wraps the functions that run the model (Hugging Face Spaces' `spaces.GPU`, or nothing). Longer
    documents are refused; a document longer than the context is cut to its head or tail on request. Each browser
    session with a loaded document holds its KV until it leaves; past `max_sessions` the server is busy."""
    sessions = OpenSessions(max_sessions)
    server = handlers.Server(model, tokenizer, backend, sessions, max_new_tokens, max_document_tokens)
    quest = default_config(model.config)
    decoding = Decoding()
    num_layers = model.config.num_hidden_layers
    num_kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    adaptive = backend is None or backend.adaptive_budget  # None: sessions make the torch backend

    with gr.Blocks(title="Quest: query-aware sparse attention", fill_width=True) as demo:
        c = {"state": gr.State(None, delete_callback=sessions.close)}
        gr.Markdown("## Quest: query-aware sparse attention\nChat with a long document, with dense attention or with "
                    "Quest, which reads only the KV pages each head needs, and see which pages it read.")
        gr.Markdown(views.header(model, views.backend_text(backend), server.max_context, max_new_tokens,
                                 max_sessions), elem_id="server-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=11, min_width=560):
                with gr.Accordion("Document", open=True, elem_id="document") as c["document"]:
                    with gr.Tabs():
                        with gr.Tab("Upload"):
                            c["upload"] = gr.File(label=f"A file ({' '.join(SUFFIXES)})", file_types=list(SUFFIXES),
                                                  type="filepath", height=110)
                        with gr.Tab("Sample"):
                            with gr.Row():
                                c["sample"] = gr.Dropdown([*SAMPLES, NEEDLE], value=None, label="Sample", scale=3)
                                c["depth"] = gr.Slider(0, 100, 50, step=5, label="Needle depth, %", scale=2,
                                                       info="where the passkey sits in the haystack")
                        with gr.Tab("Paste"):
                            c["pasted"] = gr.Textbox(label="Text", lines=4, max_lines=8, elem_id="pasted",
                                                     placeholder="Paste a document here")
                    c["doc_info"] = gr.Markdown("No document yet: upload a file, pick a sample or paste text.",
                                                elem_id="doc-info")
                    with gr.Row():
                        c["cut"] = gr.Radio(list(handlers.CUTS), label="Too long", visible=False, scale=3,
                                            info="which end to keep of a document longer than the context")
                        load = gr.Button("Load document", variant="primary", scale=1)
                c["chat"] = gr.Chatbot(label="Chat", height=380, elem_id="chat", buttons=["copy"],
                                       placeholder=("Load a document, then ask about it. New chat keeps the "
                                                    "loaded document."))
                with gr.Row():
                    c["question"] = gr.Textbox(placeholder="Ask about the document", show_label=False, scale=4,
                                               elem_id="question", container=False)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80)
                with gr.Row():
                    stop = gr.Button("Stop", size="md", min_width=80)
                    new_chat = gr.Button("New chat", size="md", min_width=80)
                    compare = gr.Button("Compare dense vs Quest", size="md", scale=2, elem_id="compare-button")
                with gr.Group(visible=False, elem_id="compare-box") as c["compare_box"]:
                    c["verdict"] = gr.Markdown(elem_id="verdict", container=True)
                    with gr.Row():
                        c["dense_answer"] = gr.HTML(elem_id="dense-answer", container=True, padding=True)
                        c["quest_answer"] = gr.HTML(elem_id="quest-answer", container=True, padding=True)
                with gr.Accordion("Settings: attention and decoding", open=False, elem_id="settings"):
                    with gr.Row():
                        c["mode"] = gr.Radio(["quest", "dense"], value="quest", label="Attention", elem_id="mode",
                                             info="dense reads every KV page; Quest only the top pages per head")
                        c["budget"] = gr.Slider(64, 4096, quest.budget, step=64, label="Token budget",
                                                info="KV tokens Quest reads per layer and KV head at each step")
                    c["top_p"] = gr.Slider(0, 1, 0, step=0.05, label="Top-p (adaptive budget)", elem_id="top-p",
                                           interactive=adaptive,
                                           info=(f"0: off. Above 0, each KV head reads pages until they hold this "
                                                 f"share of its estimated attention: at least {quest.min_budget} "
                                                 "tokens, at most the token budget" if adaptive else
                                                 f"needs the torch backend; this server runs {backend.name}"))
                    with gr.Row():
                        c["page_size"] = gr.Dropdown([2, 4, 8, 16, 32], value=quest.page_size, label="Page size",
                                                     info="tokens per page: Quest scores and reads whole pages")
                        c["two_level"] = gr.Checkbox(False, label="Two-level ranking", elem_id="two-level",
                                                     info="rank pairs of pages first, then the pages of the best "
                                                          "pairs: with pages of 2 it kept 62 of 63 held-out passkeys "
                                                          "at budget 128, where pages of 4 kept 45 (eval/RESULTS.md)")
                        c["dense_layers"] = gr.Slider(0, num_layers - 1, quest.dense_layers, step=1,
                                                      label="Dense layers",
                                                      info="the first layers always read everything (the last "
                                                           "stays Quest's)")
                    with gr.Row():
                        c["max_new_tokens"] = gr.Slider(1, max(max_new_tokens, 2), min(decoding.max_new_tokens,
                                                                                       max_new_tokens),
                                                        step=1, label="Answer length", elem_id="max-new-tokens",
                                                        info="most tokens per answer (also capped by the room left)")
                        c["temperature"] = gr.Slider(0, 1.5, decoding.temperature, step=0.05, label="Temperature",
                                                     info="0: greedy, the same answer every time (Compare is greedy)")
                    with gr.Row():
                        c["repetition_penalty"] = gr.Slider(1.0, 2.0, decoding.repetition_penalty, step=0.05,
                                                            label="Repetition penalty",
                                                            info="above 1, tokens already in the answer are less "
                                                                 "likely again (the document's are not)")
                        c["no_repeat_ngram_size"] = gr.Slider(0, 10, decoding.no_repeat_ngram_size, step=1,
                                                              label="No repeat n-gram",
                                                              info="the answer never repeats a run of this many of its "
                                                                   "tokens (0: off)")
                    c["inspect"] = gr.Checkbox(label="Inspect: measure selection recall (slower)",
                                               info="a dense pass per layer: the share of attention on the pages "
                                                    "Quest read")
            with gr.Column(scale=10, min_width=560):
                c["meter"] = gr.HTML(elem_id="meter")
                c["metrics"] = gr.Markdown(elem_id="metrics")
                c["headline"] = gr.Markdown(elem_id="headline")
                c["speed_plot"] = gr.Plot(visible=False, show_label=False, elem_id="speed-plot")
                with gr.Tabs():
                    with gr.Tab("Pages read"):
                        with gr.Row():
                            c["layer"] = gr.Slider(0, num_layers - 1, quest.dense_layers, step=1, label="Layer",
                                                   info="the plots show this layer")
                            c["head"] = gr.Slider(0, num_kv_heads - 1, 0, step=1, label="KV head",
                                                  info="the plot over the answer shows this head")
                        c["heads_plot"] = gr.Plot(visible=False, show_label=False, elem_id="heads-plot")
                        c["time_plot"] = gr.Plot(visible=False, show_label=False, elem_id="time-plot")
                    with gr.Tab("Where the model looked", elem_id="looked-tab"):
                        c["looked_note"] = gr.Markdown(handlers.NO_ANSWER, elem_id="looked-note")
                        c["tokens"] = gr.HighlightedText(visible=False, label="The answer: click a token",
                                                         elem_id="answer-tokens", show_inline_category=False,
                                                         color_map={"picked": "#f97316"})
                        with gr.Row(max_height=440):  # scrolls: an 8K-token document is long
                            c["looked"] = gr.HighlightedText(visible=False, label="What the model saw",
                                                             elem_id="looked")
                    with gr.Tab("Page text and trace"):
                        with gr.Row():
                            c["page"] = gr.Number(0, label="Page", precision=0, info="press Enter to show its text")
                            export = gr.Button("Export trace JSON")
                        c["page_text"] = gr.Textbox(label="Page text", lines=3, elem_id="page-text")
                        c["trace_file"] = gr.File(label="Trace")

        def on(trigger, handler, inputs, outputs, failure=None, **kwargs):
            runs_model = kwargs.get("concurrency_id") == MODEL_WORK
            if runs_model:  # the engine schedules the model work: one job per open session may run
                kwargs["concurrency_limit"] = max_sessions
            fn = event(server, handler, outputs, failure, gpu if runs_model else lambda f: f)
            return trigger(fn, [c[name] for name in inputs], [c[name] for name in outputs], **kwargs)

        document = ["pasted", "doc_info", "cut"]
        described = [
            on(c["upload"].upload, handlers.read_upload, ["upload", "state"], ["upload", "sample", *document],
               api_name="read_upload", js=FILLS_PASTE_BOX),
            on(c["sample"].input, handlers.pick_sample, ["sample", "depth"], ["upload", *document],
               api_name="pick_sample", js=FILLS_PASTE_BOX),
            on(c["depth"].release, handlers.pick_sample, ["sample", "depth"], ["upload", *document],
               api_visibility="private", js=FILLS_PASTE_BOX),
            # the note follows typing (only the latest text is measured); text put in without keystrokes, on blur
            on(c["pasted"].input, handlers.describe, ["pasted"], ["doc_info", "cut"], api_visibility="private",
               trigger_mode="always_last", show_progress="hidden"),
            on(c["pasted"].blur, handlers.describe, ["pasted"], ["doc_info", "cut"], api_visibility="private")]
        c["pasted"].focus(None, [c["pasted"]], None, js="(text) => { window.pasteAtFocus = text; }", queue=False)
        c["pasted"].blur(None, [c["pasted"], c["upload"], c["sample"]], [c["upload"], c["sample"]],
                         js=LET_GO_IF_EDITED, queue=False)
        on(c["cut"].input, handlers.choose_cut, ["pasted", "cut"], ["doc_info"], api_visibility="private")
        for new_document in described:  # an end already chosen stays chosen: the note then says what Load keeps
            on(new_document.then, handlers.choose_cut, ["pasted", "cut"], ["doc_info"], api_visibility="private")
        answers = ["chat", "meter", "metrics", "heads_plot", "time_plot", "tokens", "looked", "looked_note",
                   "compare_box", "dense_answer", "quest_answer", "verdict", "page_text", "trace_file"]
        # a new document clears its measured speeds too (load_document's outputs keep their API order)
        cleared = [*answers[:3], "headline", "speed_plot", *answers[3:]]
        on(load.click, handlers.load_document, ["pasted", "cut", "upload", "sample", "depth", "state"],
           ["state", "document", "doc_info", "cut", *cleared], failure={"doc_info": "**Not loaded:** {message}"},
           concurrency_id=MODEL_WORK, api_name="load_document", show_progress_on=[c["doc_info"]], js=LOAD_INPUTS)

        ask_inputs = ["question", "mode", "budget", "page_size", "dense_layers", "inspect", "max_new_tokens",
                      "temperature", "repetition_penalty", "no_repeat_ngram_size", "layer", "head", "top_p",
                      "two_level", "state"]
        answer = ["heads_plot", "time_plot", "tokens", "looked", "looked_note"]
        ask_outputs = ["chat", "question", "metrics", "meter", "headline", "speed_plot", *answer]
        for trigger, visibility in ((send.click, "public"), (c["question"].submit, "private")):
            on(trigger, handlers.ask, ask_inputs, ask_outputs, failure={"metrics": "⚠️ {message}"},
               concurrency_id=MODEL_WORK, api_visibility=visibility,
               show_progress="minimal", show_progress_on=[c["metrics"]], **({"api_name": "ask"} if visibility ==
                                                                             "public" else {}))
        # Stop ends the answer through the session, not by cancelling the event: the stream then ends with what the
        # conversation keeps, marked stopped.
        on(stop.click, handlers.stop, ["state"], [], queue=False, api_name="stop")
        for trigger, api in ((new_chat.click, {"api_name": "new_chat"}), (c["chat"].clear,
                                                                            {"api_visibility": "private"})):
            stopped = on(trigger, handlers.stop, ["state"], [], queue=False, api_visibility="private")
            on(stopped.then, handlers.new_chat, ["state"], answers, concurrency_id=MODEL_WORK, **api)
        comparing = on(compare.click, handlers.comparing, ["question", "state"], ["compare_box", "verdict"],
                       queue=False, api_visibility="private")
        on(comparing.then, handlers.compare, ["question", "budget", "page_size", "dense_layers", "max_new_tokens",
                                              "repetition_penalty", "no_repeat_ngram_size", "top_p", "two_level",
                                              "state"],
           ["dense_answer", "quest_answer", "verdict", "compare_box", "headline", "speed_plot"],
           failure={"compare_box": handlers.HIDDEN, "verdict": "**Not compared:** {message}"},
           concurrency_id=MODEL_WORK, api_name="compare",
           show_progress_on=[c["verdict"]])
        for picker in ("layer", "head"):
            on(c[picker].release, handlers.show_plots, ["layer", "head", "state"], answer, api_visibility="private")
        on(c["tokens"].select, handlers.pick_token, ["layer", "head", "state"], answer, api_visibility="private")
        on(c["page"].submit, handlers.page_text, ["page", "state"], ["page_text"], failure={"page_text": "{message}"},
           api_name="page_text")
        on(export.click, handlers.export_trace, ["state"], ["trace_file"], api_name="export_trace")
        demo.unload(event(server, handlers.release, []))
    demo.queue(default_concurrency_limit=1)
    # Gradio's queue polls for work every millisecond on Linux (every 50 ms on Windows): an idle server then wakes
    # its event loop 1,000 times a second, beside the decoding thread on 2 cores. A job now waits up to QUEUE_POLL_S
    # to start.
    demo._queue.sleep_when_free = QUEUE_POLL_S
    demo._queue.progress_update_sleep_when_free = QUEUE_PROGRESS_S
    return demo
