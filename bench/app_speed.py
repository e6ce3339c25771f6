"""The app as fast as the engine? The same document, question and settings answered by the served app (streaming
through gradio_client, tracing on as the UI does) and by `Session` directly (traced as well), in one run.

The app is served by `launch.py` in a process of its own (as a deployment runs it; this process plays the browser),
with the model's own settings. Each run is the first question after the document (the app's New chat between runs),
so every run decodes the same prompt greedily. Measured, per run:

- engine: decode tok/s of `Session.answer` in this process while the server idles (RunStats.decode_tokens_per_s);
- app, at the client: tokens streamed after the first update that held text, over the time from that update to the
  final one (the final update carries the plots: its cost is in); the tokens in the first update are its text's
  tokens (re-tokenized: within a token of the streamed ones); the client looks for updates every 20 ms;
- app, in the server: the decode tok/s the app's metrics report (the engine's clock inside the app, so the app's
  own work between tokens is in it).

    python bench/app_speed.py          # writes the app_speed section of bench/RESULTS.md; a JSON line last
"""
import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradio_client import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from app import handlers  # noqa: E402
from app.documents import sample_text  # noqa: E402
from bench.results import write_section  # noqa: E402
from quest_core.backends import make_backend  # noqa: E402
from quest_core.config import Decoding, QuestConfig  # noqa: E402
from quest_core.models import load_model  # noqa: E402
from quest_core.session import Session  # noqa: E402

SAMPLE = "Hamlet, the opening (~6K tokens)"
QUESTION = "Write out the first twenty lines of the play again, word for word."
ASK_OUTPUTS = ["chat", "question", "metrics"]  # the first of the /ask outputs (app/layout.py)
CLIENT_POLL_S = 0.02  # how often this client looks for the app's updates


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="quest", choices=["quest", "dense"])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=6, help="runs of each, alternating engine and app")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(port: int, max_new_tokens: int) -> tuple[subprocess.Popen, Client]:
    """`python launch.py` on `port`, and a client, once it answers."""
    log = tempfile.NamedTemporaryFile(prefix="app_speed-", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "launch.py", "--port", str(port), "--max-new-tokens",
                               str(max_new_tokens)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited; its log: {log.name}")
        try:
            return server, Client(f"http://127.0.0.1:{port}/", verbose=False)
        except Exception:  # not listening yet
            time.sleep(1)
    raise TimeoutError("the app did not start within 10 minutes")


def app_run(client, args, settings: QuestConfig, decoding: Decoding, tokenizer) -> dict:
    """One answer through the app, with `settings` and `decoding` (what the app's sliders start at)."""
    client.predict(api_name="/new_chat")
    submitted = time.perf_counter()
    job = client.submit(QUESTION, settings.mode, settings.budget, settings.page_size, settings.dense_layers, False,
                        args.max_new_tokens, decoding.temperature, decoding.repetition_penalty,
                        decoding.no_repeat_ngram_size, settings.dense_layers, 0, api_name="/ask")
    first_at = first_text = None
    while not job.done():  # not `for update in job`: gradio_client's iterator polls every millisecond, a load
        time.sleep(CLIENT_POLL_S)  # that a browser does not put on the server's two cores
        updates = job.outputs()
        if first_at is None and updates and updates[-1][0] and handlers.answer_text(updates[-1][0][-1]):
            first_at, first_text = time.perf_counter(), handlers.answer_text(updates[-1][0][-1])
    final_at = time.perf_counter()
    shown = dict(zip(ASK_OUTPUTS, job.result()))
    found = re.search(r"(\d+) tokens? · decode \*\*([\d.]+) tok/s\*\*", shown["metrics"])
    tokens = int(found.group(1))
    in_first = len(tokenizer(first_text, add_special_tokens=False)["input_ids"])  # the text's tokens, within one
    return {"tokens": tokens, "client_tok_s": (tokens - in_first) / (final_at - first_at),
            "server_tok_s": float(found.group(2)), "whole_answer_s": final_at - submitted,
            "text": handlers.answer_text(shown["chat"][-1])}


def engine_run(session: Session, args) -> dict:
    run = session.answer(QUESTION, trace=True, keep=False, max_new_tokens=args.max_new_tokens)
    return {"tokens": run.new_tokens, "tok_s": run.decode_tokens_per_s, "whole_answer_s": run.ttft_s + run.decode_s,
            "text": run.text}


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer = load_model()
    document = sample_text(SAMPLE)
    session = Session(model, tokenizer, backend=make_backend("auto", next(model.parameters()).device, model.dtype))
    settings = session.configure(mode=args.mode)  # otherwise the model's own settings, as the app starts with
    decoding = session.decoding
    ingested = session.ingest(document)
    session.answer("Who is Horatio?", max_new_tokens=4, trace=True, keep=False)  # warm-up
    server, client = serve(free_port(), args.max_new_tokens)
    try:
        client.predict(document, None, None, SAMPLE, 50, api_name="/load_document")
        engine, app = [], []
        for _ in range(args.runs):  # alternating, so a change in the machine's load hits both alike
            engine.append(engine_run(session, args))
            app.append(app_run(client, args, settings, decoding, tokenizer))
            print(json.dumps({"engine": engine[-1], "app": app[-1]}), flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    summary = {
        "mode": args.mode, "document_tokens": ingested.document_tokens, "new_tokens": engine[0]["tokens"],
        "runs": args.runs, "engine_tok_s": round(statistics.median(run["tok_s"] for run in engine), 2),
        "app_tok_s": round(statistics.median(run["client_tok_s"] for run in app), 2),
        "app_server_tok_s": round(statistics.median(run["server_tok_s"] for run in app), 2),
        "engine_whole_answer_s": round(statistics.median(run["whole_answer_s"] for run in engine), 2),
        "app_whole_answer_s": round(statistics.median(run["whole_answer_s"] for run in app), 2),
        "load_average": os.getloadavg()[0],
        "same_answers": {"engine_runs": len({run["text"] for run in engine}) == 1,
                         "app_runs": len({run["text"] for run in app}) == 1,
                         "engine_and_app": engine[0]["text"] == app[0]["text"]},
    }
    # the machine's speed drifts over minutes (a shared host): each app run is set against the engine run before it
    ratios = [a["client_tok_s"] / e["tok_s"] for e, a in zip(engine, app)]
    summary["app_over_engine"] = round(statistics.median(ratios), 3)
    if not args.no_write:
        write_section("app_speed", "The app vs the engine: decode speed through gradio_client",
                      report(summary, settings, engine, app))
    print(json.dumps({"bench": "app_speed", **summary}))


def report(summary: dict, settings: QuestConfig, engine: list[dict], app: list[dict]) -> str:
    same = summary["same_answers"]
    rows = "\n".join(f"| {i + 1} | {e['tok_s']:.2f} | {a['client_tok_s']:.2f} | {a['server_tok_s']:.2f} | "
                     f"{e['whole_answer_s']:.2f} | {a['whole_answer_s']:.2f} |" for i, (e, a) in enumerate(zip(engine,
                                                                                                              app)))
    return (
        f"The default model, {summary['mode']} with the app's settings for it (budget {settings.budget}, pages of "
        f"{settings.page_size}, {settings.dense_layers} dense layers, greedy with the chat decoding defaults), on "
        f"*{SAMPLE}* ({summary['document_tokens']:,} tokens), the question \"{QUESTION}\", "
        f"{summary['new_tokens']} new tokens; traced in both (the app always traces: its plots). The app is "
        "`launch.py` in its own process; this process is its client and, while the app idles, runs the engine. "
        "Runs alternate engine, app. Medians:\n\n"
        f"- engine decode: **{summary['engine_tok_s']} tok/s**\n"
        f"- app decode at the client: **{summary['app_tok_s']} tok/s** "
        f"(**{summary['app_over_engine']:.2f}x** the engine: the median of each app run over the engine run "
        f"before it); inside the app: {summary['app_server_tok_s']} tok/s\n"
        f"- whole answer (question prefill + decode; for the app, submit to the final update): engine "
        f"{summary['engine_whole_answer_s']} s, app {summary['app_whole_answer_s']} s\n"
        f"- load average (1 min) at the end: {summary['load_average']:.2f} on {os.cpu_count()} cores\n"
        f"- the same answer text: engine runs {same['engine_runs']}, app runs {same['app_runs']}, engine and app "
        f"{same['engine_and_app']}\n\n"
        "| run | engine tok/s | app tok/s (client) | app tok/s (server) | engine answer s | app answer s |\n"
        f"|---:|---:|---:|---:|---:|---:|\n{rows}\n")


if __name__ == "__main__":
    main()
