"""Command line: `python -m quest_core generate --doc FILE --question TEXT [options]`.

Plain output streams the answer to stdout (stats go to stderr); --json prints one JSON object instead."""
import argparse
import json
import sys
import time
from pathlib import Path

from .backends import make_backend
from .config import GROUP_RULES, QuestConfig
from .models import load_model
from .session import Session


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m quest_core", description="Quest sparse-attention engine")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="answer one question about a document")
    generate.add_argument("--doc", required=True, type=Path, help="a UTF-8 text file")
    generate.add_argument("--question", required=True)
    generate.add_argument("--mode", choices=["dense", "quest"], default="quest")
    defaults = QuestConfig()
    generate.add_argument("--budget", type=int, default=defaults.budget, help="tokens of KV read per head and layer")
    generate.add_argument("--page-size", type=int, default=defaults.page_size)
    generate.add_argument("--dense-layers", type=int, default=defaults.dense_layers)
    generate.add_argument("--group-rule", choices=GROUP_RULES, default=defaults.group_rule)
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--model", help="HF id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    generate.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    generate.add_argument("--device", default="auto")
    generate.add_argument("--backend", default="auto", choices=["auto", "torch", "flashinfer"],
                          help="attention backend; auto: flashinfer with our CUDA kernels on a GPU, else torch")
    generate.add_argument("--json", action="store_true", help="print one JSON object with the answer and stats")
    return parser.parse_args(argv)


def generate(args) -> dict:
    document = args.doc.read_text(encoding="utf-8")
    config = QuestConfig(mode=args.mode, budget=args.budget, page_size=args.page_size,
                         dense_layers=args.dense_layers, group_rule=args.group_rule)
    model, tokenizer = load_model(args.model, args.dtype, args.device, log=log)
    backend = make_backend(args.backend, next(model.parameters()).device)
    session = Session(model, tokenizer, config, backend)
    started = time.perf_counter()
    ingested = session.ingest(document, progress=lambda done, total: log(f"prefill {done}/{total} tokens"))
    for step in session.ask(args.question, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed):
        if not args.json:
            print(step.text, end="", flush=True)
    run = session.last_run
    result = run.summary()
    result.update(ttft_s=ingested.prefill_s + run.ttft_s, document_tokens=ingested.document_tokens,
                  document_prefill_s=ingested.prefill_s, question_ttft_s=run.ttft_s,
                  model=args.model or "smollm2-135m-instruct (embedded)", dtype=str(model.dtype).removeprefix("torch."),
                  device=str(session.device), backend=backend.name, elapsed_s=time.perf_counter() - started)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = generate(args)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        log(f"error: {error}")
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print()
        log(f"[{result['mode']}] {result['new_tokens']} tokens, TTFT {result['ttft_s']:.2f} s, "
            f"decode {result['decode_tokens_per_s']:.1f} tok/s, context {result['prompt_tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
