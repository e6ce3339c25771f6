"""Load test: concurrent users of the app, each with a document of their own.

Serves the app in this process on a free 127.0.0.1 port (nothing else is contacted), then starts `--clients`
gradio_client sessions at once. Each uploads a different ~300-600-token slice of Areopagitica carrying a unique
made-up fact (a person's 5-digit locker code), loads it, and asks for the code. Per question, measured by the client:
queue wait (submit -> the job's first update, which the app sends as the job starts), TTFT (submit -> the first
streamed text of the answer) and the engine's decode tok/s. An answer is correct if it holds its own code and leaks
if it holds any other user's code. Server memory (RSS) is read before, with every session open, and after the
clients leave. The app's sessions share one engine: their answers decode together, and a prefill (a document or a
question) runs one chunk between two decode steps.

    python bench/load.py                          # 8 clients, Quest, budget 256; writes bench/RESULTS.md
    python bench/load.py --max-new-tokens 128     # longer answers (section load-128)
"""
import argparse
import gc
import json
import os
import random
import re
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from app import handlers  # noqa: E402
from app.layout import build_app  # noqa: E402
from app.sessions import ChatState  # noqa: E402
from bench.results import write_section  # noqa: E402
from launch import warm_up  # noqa: E402
from quest_core.config import Decoding  # noqa: E402
from quest_core.models import load_model  # noqa: E402

FIRST_NAMES = ["Orla", "Tobiah", "Mirren", "Castor", "Ysolde", "Bram", "Elowen", "Quill", "Senna", "Idris",
               "Marisol", "Fenwick", "Anouk", "Lazlo", "Petra", "Rune"]
LAST_NAMES = ["Vantrell", "Okonkwo-Hale", "Brisbane", "Quarrington", "Delacroix", "Fairweather", "Munroe", "Szabo",
              "Lindqvist", "Ashdown", "Carraway", "Petrakis", "Holloway", "Ibarra", "Kettering", "Nakamura"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mode", default="quest", choices=["quest", "dense"])
    parser.add_argument("--budget", type=int, default=256, help="Quest's token budget (the documents are longer)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    return parser.parse_args(argv)


def documents(tokenizer, count: int, seed: int) -> list[dict]:
    """`count` documents: different slices of Areopagitica, each with one person's locker code in its middle."""
    rng = random.Random(seed)
    names = [f"{first} {last}" for first, last in zip(rng.sample(FIRST_NAMES, count), rng.sample(LAST_NAMES, count))]
    codes = [str(code) for code in rng.sample(range(10000, 100000), count)]
    ids = tokenizer(ROOT.joinpath("assets", "areopagitica.txt").read_text(), add_special_tokens=False)["input_ids"]
    docs = []
    for index, (name, code) in enumerate(zip(names, codes)):
        length = rng.randrange(280, 560)
        start = 1000 + index * 700
        before, after = tokenizer.decode(ids[start:start + length // 2]), tokenizer.decode(
            ids[start + length // 2:start + length])
        fact = f"\n\nA note for the record: {name}'s locker code is {code}. Remember it.\n\n"
        docs.append({"name": name, "code": code, "text": before + fact + after,
                     "question": f"What is {name}'s locker code?"})
    for doc in docs:  # each code is in its own document only
        assert sum(other["code"] in doc["text"] for other in docs) == 1
    return docs


def one_user(url: str, doc: dict, folder: Path, start: threading.Barrier, args, deadline: float) -> dict:
    """Upload, load and ask as one browser session; returns its timings, answer and client."""
    client = Client(url, verbose=False)
    path = folder / f"{doc['name'].split()[0].lower()}.txt"
    path.write_text(doc["text"])
    start.wait()
    began = time.perf_counter()
    _, _, text, info, _ = client.predict(handle_file(str(path)), api_name="/read_upload")
    status = client.submit(text, None, None, None, 50, api_name="/load_document").result(
        timeout=deadline - time.monotonic())[0]
    submitted = time.perf_counter()
    decoding = Decoding()
    job = client.submit(doc["question"], args.mode, args.budget, 16, 2, False, args.max_new_tokens,
                        decoding.temperature, decoding.repetition_penalty, decoding.no_repeat_ngram_size, 2, 0,
                        api_name="/ask")
    first_update = first_text = None
    for history, *_ in job:
        now = time.perf_counter()
        first_update = first_update or now
        if first_text is None and handlers.answer_text(history[-1]).strip():
            first_text = now
        if time.monotonic() > deadline:
            job.cancel()
            raise TimeoutError("the load test ran past --timeout")
    history, _, metrics, *_ = job.result(timeout=max(deadline - time.monotonic(), 1))
    engine = re.search(r"(\d+) tokens? · decode \*\*([\d.]+) tok/s\*\* · TTFT ([\d.]+) s", metrics)
    return {"client": client, "name": doc["name"], "code": doc["code"], "load_status": status,
            "document_tokens": int(re.match(r"([\d,]+) tokens?", info).group(1).replace(",", "")),
            "load_s": submitted - began, "queue_wait_s": first_update - submitted,
            "ttft_s": first_text - submitted if first_text else None, "answer": handlers.answer_text(history[-1]),
            "engine_ttft_s": float(engine.group(3)), "decode_tokens_per_s": float(engine.group(2)),
            "new_tokens": int(engine.group(1)), "total_s": time.perf_counter() - submitted}


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_sessions(demo) -> int:
    """Browser sessions whose ChatState still holds a model session (read from gradio's state holder)."""
    return sum(isinstance(value, ChatState) and value.session is not None
               for holder in list(demo.state_holder.session_data.values()) for value in holder.state_data.values())


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer = load_model()
    warm_up(model, tokenizer, None, print)  # the torch backend, as build_app's engine makes it
    docs = documents(tokenizer, args.clients, args.seed)
    demo = build_app(model, tokenizer, max_new_tokens=args.max_new_tokens, max_sessions=max(16, args.clients))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + args.timeout
    gc.collect()
    rss_before = rss_mib()
    try:
        with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(args.clients) as pool:
            start = threading.Barrier(args.clients)
            began = time.perf_counter()
            futures = [pool.submit(one_user, url, doc, Path(folder), start, args, deadline) for doc in docs]
            users = [future.result(timeout=max(deadline - time.monotonic(), 1)) for future in futures]
            wall_s = time.perf_counter() - began
        rss_open, sessions_open = rss_mib(), open_sessions(demo)
        for user in users:
            user.pop("client").close()  # the browser leaves: the app frees its KV when the heartbeat ends
        while open_sessions(demo) and time.monotonic() < deadline:
            time.sleep(0.5)
        gc.collect()
        rss_after, sessions_left = rss_mib(), open_sessions(demo)
    finally:
        demo.close()

    codes = {user["code"] for user in users}
    for user in users:
        user["correct"] = user["code"] in user["answer"]
        user["leaked"] = sorted(code for code in codes - {user["code"]} if code in user["answer"])
    leaks = sum(len(user["leaked"]) for user in users)
    summary = {
        "clients": args.clients, "mode": args.mode, "budget": args.budget, "max_new_tokens": args.max_new_tokens,
        "completed": sum("Loaded" in user["load_status"] and bool(user["answer"].strip()) for user in users),
        "correct": sum(user["correct"] for user in users), "leaks": leaks, "wall_s": round(wall_s, 1),
        "rss_mib": {"before": round(rss_before), "sessions_open": round(rss_open), "after_leaving": round(rss_after)},
        "sessions_open": sessions_open, "sessions_open_after_leaving": sessions_left,
    }
    for key in ("queue_wait_s", "ttft_s", "engine_ttft_s", "decode_tokens_per_s", "load_s"):
        values = [user[key] for user in users if user[key] is not None]
        summary[key] = {"p50": round(percentile(values, 0.5), 2), "p95": round(percentile(values, 0.95), 2)}
    for user in users:
        print(json.dumps(user), flush=True)
    if not args.no_write:
        section = "load" if args.max_new_tokens == 32 else f"load-{args.max_new_tokens}"
        write_section(section, f"Load: {args.clients} concurrent sessions on the app, answers of up to "
                      f"{args.max_new_tokens} tokens", report(summary, users))
    print(json.dumps({"bench": "load", **summary}))
    if leaks or summary["completed"] < args.clients:
        sys.exit(1)


def report(summary: dict, users: list[dict]) -> str:
    rows = "\n".join(
        f"| {user['name']} | {user['document_tokens']} | {user['queue_wait_s']:.2f} | "
        f"{'-' if user['ttft_s'] is None else round(user['ttft_s'], 2)} | {user['decode_tokens_per_s']:.1f} | "
        f"{user['new_tokens']} | {'yes' if user['correct'] else 'no'} | {', '.join(user['leaked']) or '-'} | "
        f"{' '.join(user['answer'].split())[:60].replace('|', '/')} |" for user in users)
    stats = "\n".join(f"| {label} | {summary[key]['p50']} | {summary[key]['p95']} |" for key, label in [
        ("queue_wait_s", "queue wait, s (submit -> the job starts)"),
        ("ttft_s", "TTFT, s (submit -> first streamed text; client)"),
        ("engine_ttft_s", "TTFT in the engine, s (prefill of the question + first token)"),
        ("decode_tokens_per_s", "decode tok/s (engine)"),
        ("load_s", "upload + load the document, s (queue included)")])
    rss = summary["rss_mib"]
    return (
        f"{summary['clients']} gradio_client sessions start together against the app served on 127.0.0.1 (default "
        f"model, {summary['mode']}, budget {summary['budget']}, page 16, at most {summary['max_new_tokens']} new "
        "tokens). Each uploads its own document (a slice of Areopagitica with one person's made-up 5-digit locker "
        "code), loads it and asks for that code. The sessions share one engine: answers decode together in one "
        "batched step, and each prefill (a document, a question) runs one chunk of 512 tokens between two steps, the "
        "shortest first.\n\n"
        f"- completed: {summary['completed']} of {summary['clients']}; wall time {summary['wall_s']} s\n"
        f"- correct answers (the answer holds its own code): {summary['correct']} of {summary['clients']}\n"
        f"- cross-session leaks (an answer holds another session's code): **{summary['leaks']}**\n"
        f"- server RSS: {rss['before']} MiB before, {rss['sessions_open']} MiB with {summary['sessions_open']} "
        f"sessions open, {rss['after_leaving']} MiB after the clients left "
        f"({summary['sessions_open_after_leaving']} sessions still holding KV)\n\n"
        f"| per question | p50 | p95 |\n|---|---:|---:|\n{stats}\n\n"
        "| user | doc tokens | queue wait s | TTFT s | decode tok/s | new tokens | correct | leaked codes | answer |\n"
        f"|---|---:|---:|---:|---:|---:|---|---|---|\n{rows}\n")


if __name__ == "__main__":
    main()
