"""Batch: N sessions of one engine asked at once vs the same N asked one after another, on the default model.

Each session loads its own document (a different slice of Areopagitica); then, after a warm-up answer each, the N
questions are answered one after another (each alone in the engine: batch 1), then all at once (threads: the engine
decodes them together). Both rounds start from the loaded documents (`new_chat`) and force answers of the same length
(`min_new_tokens`), greedy. The aggregate time is the wall time of a round; the speedup is sequential / together.

    python bench/batch.py                      # 4 sessions, 64-token answers, the model's Quest settings
"""
import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.results import write_section  # noqa: E402
from quest_core.config import default_config  # noqa: E402
from quest_core.engine import Engine  # noqa: E402
from quest_core.models import load_model  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--document-tokens", type=int, default=1500, help="each session's document (Quest reads "
                        "its budget of 1024 tokens of it per KV head)")
    parser.add_argument("--mode", default="quest", choices=["quest", "dense"])
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    return parser.parse_args(argv)


def answer(session, question: str, tokens: int) -> dict:
    run = session.answer(question, max_new_tokens=tokens, min_new_tokens=tokens)
    session.new_chat()
    return {"tokens": [step.token_id for step in run.steps], "ttft_s": run.ttft_s,
            "decode_tokens_per_s": run.decode_tokens_per_s}


def together(sessions, questions, tokens: int) -> list[dict]:
    results = [None] * len(sessions)

    def one(index):
        results[index] = answer(sessions[index], questions[index], tokens)

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer = load_model()
    engine = Engine(model, tokenizer)
    ids = tokenizer(ROOT.joinpath("assets", "areopagitica.txt").read_text(), add_special_tokens=False)["input_ids"]
    sessions, questions = [], []
    for index in range(args.sessions):
        session = engine.session(default_config(model.config, mode=args.mode))
        start = index * args.document_tokens
        session.ingest(tokenizer.decode(ids[start:start + args.document_tokens]))
        sessions.append(session)
        questions.append(f"Summarize the argument of this passage ({index + 1}) in plain words.")
    together(sessions, questions, 4)  # warm-up
    sequential, sequential_s = timed(lambda: [answer(s, q, args.max_new_tokens) for s, q in zip(sessions, questions)])
    batched, batched_s = timed(lambda: together(sessions, questions, args.max_new_tokens))
    same = sum(a["tokens"] == b["tokens"] for a, b in zip(sequential, batched))
    total_tokens = args.sessions * args.max_new_tokens
    summary = {"sessions": args.sessions, "max_new_tokens": args.max_new_tokens, "mode": args.mode,
               "document_tokens": args.document_tokens, "dtype": str(model.dtype).removeprefix("torch."),
               "torch_threads": torch.get_num_threads(), "sequential_s": round(sequential_s, 2),
               "together_s": round(batched_s, 2), "speedup": round(sequential_s / batched_s, 2),
               "sequential_tokens_per_s": round(total_tokens / sequential_s, 1),
               "together_tokens_per_s": round(total_tokens / batched_s, 1),
               "sequential_ttft_s": round(max(r["ttft_s"] for r in sequential), 2),
               "together_ttft_s": round(max(r["ttft_s"] for r in batched), 2), "same_answers": same}
    if not args.no_write:
        write_section("batch", f"Batch: {args.sessions} sessions asked at once vs one after another",
                      report(summary))
    print(json.dumps({"bench": "batch", **summary}))


def report(summary: dict) -> str:
    return (
        f"{summary['sessions']} sessions of one engine, each with its own {summary['document_tokens']}-token slice of "
        f"Areopagitica, answer one question each ({summary['max_new_tokens']} new tokens forced, greedy, "
        f"{summary['mode']} with the model's settings, {summary['dtype']}, {summary['torch_threads']} torch threads): "
        "first one after another, then all at once (the engine decodes them in one batched step).\n\n"
        "| | wall s (aggregate) | tok/s (all answers) | slowest TTFT s |\n|---|---:|---:|---:|\n"
        f"| one after another | {summary['sequential_s']} | {summary['sequential_tokens_per_s']} | "
        f"{summary['sequential_ttft_s']} |\n"
        f"| at once | {summary['together_s']} | {summary['together_tokens_per_s']} | {summary['together_ttft_s']} |\n\n"
        f"- speedup (aggregate): **{summary['speedup']}x**\n"
        f"- answers identical token for token in both rounds: {summary['same_answers']} of {summary['sessions']} "
        "(fp32 equality is a test, tests/test_batch.py; in bf16 a batched matrix product may round differently "
        "from a one-row one)\n")


if __name__ == "__main__":
    main()
