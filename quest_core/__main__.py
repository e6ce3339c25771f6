"""Command line: `python -m quest_core generate --doc FILE --question TEXT [options]`.

Plain output streams the answer to stdout (stats go to stderr); --json prints one JSON object instead."""
import argparse
import json
import sys
import time
from pathlib import Path

from .backends import make_backend
from .config import GROUP_RULES, TWO_LEVEL_FACTOR, Decoding, default_config
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
    model_default = "default: the model's (quest_core.config.default_config: 4 for 64-dim heads, else 16)"
    generate.add_argument("--budget", type=int, help="tokens of KV read per head and layer (default: 1024)")
    generate.add_argument("--page-size", type=int, help=f"tokens per page ({model_default})")
    generate.add_argument("--dense-layers", type=int, help="the first layers attend densely (default: 2)")
    generate.add_argument("--group-rule", choices=GROUP_RULES,
                          help="how a KV group's query heads combine page scores (default: mass for 64-dim heads, "
                               "else sum)")
    generate.add_argument("--page-top-p", type=float, metavar="P",
                          help="an adaptive budget: each KV head reads pages until they hold an estimated share P of "
                               "its attention, from --min-budget up to --budget tokens; --json reports mean_pages_read "
                               "(default: off, a fixed budget; the torch backend only)")
    generate.add_argument("--min-budget", type=int,
                          help="with --page-top-p: the fewest tokens a head reads (default: 64)")
    generate.add_argument("--coarse-factor", type=int, metavar="F",
                          help="a two-level ranking: pairs of pages first, then the pages of the best F * k / 2 pairs "
                               f"(k: the budget's pages); {TWO_LEVEL_FACTOR} with --page-size 2 kept the most held-out "
                               "passkeys at small budgets (eval/RESULTS.md) (default: 0, pages ranked by their own "
                               "bounds)")
    decoding = Decoding()
    generate.add_argument("--max-new-tokens", type=int, default=decoding.max_new_tokens)
    generate.add_argument("--temperature", type=float, default=decoding.temperature, help="0 is greedy")
    generate.add_argument("--top-p", type=float, default=decoding.top_p, help="nucleus sampling (temperature > 0)")
    generate.add_argument("--repetition-penalty", type=float, default=decoding.repetition_penalty,
                          help="on the answer's own tokens; 1 is off")
    generate.add_argument("--no-repeat-ngram-size", type=int, default=decoding.no_repeat_ngram_size,
                          help="no n-gram twice in the answer; 0 is off")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--model", help="HF id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    generate.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    generate.add_argument("--device", default="auto",
                          help="auto: the GPU, or every GPU (accelerate's device map) when several are visible, else "
                               "the CPU; cuda keeps the model on one GPU")
    generate.add_argument("--backend", default="auto", choices=["auto", "torch", "flashinfer"],
                          help="attention backend; auto: flashinfer with our CUDA kernels on a GPU, else torch")
    generate.add_argument("--json", action="store_true", help="print one JSON object with the answer and stats")
    return parser.parse_args(argv)


def generate(args) -> dict:
    document = args.doc.read_text(encoding="utf-8")
    model, tokenizer = load_model(args.model, args.dtype, args.device, log=log)
    config = default_config(model.config, mode=args.mode, budget=args.budget, page_size=args.page_size,
                            dense_layers=args.dense_layers, group_rule=args.group_rule, top_p=args.page_top_p,
                            min_budget=args.min_budget, coarse_factor=args.coarse_factor)
    decoding = Decoding(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty,
                        args.no_repeat_ngram_size, args.seed)
    backend = make_backend(args.backend, next(model.parameters()).device, model.dtype)
    session = Session(model, tokenizer, config, backend, decoding)
    started = time.perf_counter()
    ingested = session.ingest(document, progress=lambda done, total: log(f"prefill {done}/{total} tokens"))
    for step in session.ask(args.question, trace=config.top_p is not None):  # the trace counts the pages read
        if not args.json:
            print(step.text, end="", flush=True)
    run = session.last_run
    result = run.summary()
    result.update(group_rule=config.group_rule, min_budget=config.min_budget,
                  repetition_penalty=decoding.repetition_penalty,
                  ttft_s=ingested.prefill_s + run.ttft_s, document_tokens=ingested.document_tokens,
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
