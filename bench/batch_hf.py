"""HF `generate` batched, with a static cache and torch.compile (transformers' own fast path), at the batches and
contexts of bench/batch_gpu.py: the reference beside our dense and Quest there (a run of its own: with its compile
per shape it does not fit beside them in one device call). Llama-3.1-8B shapes, random bf16 weights, B copies of one
random prompt, aggregate decode tok/s after the first decode step (the compile), beside the dense bytes floor. Where
one forward over the prompts does not fit in memory, the prefill runs in chunks (transformers' `prefill_chunk_size`:
8192, else 2048, else 512; each out-of-memory message is printed: at 32K batch 16 and 128K batch 4, 54 GiB were held
in CUDA-graph pools by then); the decode is the same.

    python bench/batch_hf.py                    # writes gpu_batch_hf_32768 and gpu_batch_hf_131072 in RESULTS.md
    python bench/batch_hf.py --contexts 131072  # one context (each a section of its own)
"""
import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.attention_kernels import copy_bandwidth  # noqa: E402
from bench.batch_gpu import BATCHES, floor_tok_s  # noqa: E402
from bench.e2e import hf_generate, llama_8b_shaped, random_prompt  # noqa: E402
from bench.results import write_section  # noqa: E402


def hf_tok_s(model, prompt, new_tokens: int, batch: int) -> tuple[float | None, int | None]:
    """(HF's static-cache decode tok/s, the prefill's chunk size): one forward over the prompts, else the largest
    chunks that fit; (None, None) where none fits."""
    for chunk in (None, 8192, 2048, 512):
        try:
            return hf_generate(model, prompt, new_tokens, static=True, batch=batch, prefill_chunk_size=chunk)[1], chunk
        except torch.OutOfMemoryError as error:
            print(f"batch {batch}, prefill chunk {chunk}: {str(error).splitlines()[0]}", file=sys.stderr)
        gc.collect()  # the failed try's cache and activations
        torch.cuda.empty_cache()
    return None, None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--new-tokens", type=int, default=64)  # 16 under-measured the compiled step (2026-11-30)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    model = llama_8b_shaped(max(args.contexts) + args.new_tokens)
    bandwidth = copy_bandwidth()
    for context in args.contexts:
        measure(model, context, args.new_tokens, bandwidth, write=not args.no_write)


def measure(model, context: int, new_tokens: int, bandwidth: float, write: bool) -> None:
    """HF at each of batch_gpu's batches of `context`, into its own section, gpu_batch_hf_<context>, written after
    each batch (a run stopped part-way keeps what it measured; a run of the other context leaves it)."""
    rows = []
    for batch in BATCHES[context]:
        prompt = random_prompt(model.config.vocab_size, context)
        row = dict(context=context, batch=batch, floor_tok_s=floor_tok_s(model, batch, context, None, bandwidth))
        row["hf_static_tok_s"], row["prefill_chunk"] = hf_tok_s(model, prompt, new_tokens, batch)
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        if write:
            write_section(f"gpu_batch_hf_{context}", f"GPU batched decode: HF generate, static cache + torch.compile, "
                          f"{context // 1024}K", report(rows, new_tokens, bandwidth))


def report(rows: list[dict], new_tokens: int, bandwidth: float) -> str:
    table = ["| context | batch | HF static cache + compile tok/s | dense bytes floor tok/s |", "|---:|---:|---:|---:|"]
    for r in rows:
        speed = "out of memory" if r["hf_static_tok_s"] is None else f"{r['hf_static_tok_s']:.1f}"
        if r["prefill_chunk"]:
            speed += f" (prefill in chunks of {r['prefill_chunk']})"
        table.append(f"| {r['context']} | {r['batch']} | {speed} | {r['floor_tok_s']:.0f} |")
    return (f"Llama-3.1-8B shapes, random bf16 weights, `generate` over B copies of one random prompt with "
            f"cache_implementation=\"static\" (transformers compiles the decode step), SDPA attention, "
            f"{new_tokens} new tokens, aggregate tok/s over the decode steps after the first (the compile). "
            f"Floor: the weights once per step plus every request's whole KV at the copy bandwidth measured in this "
            f"run, {bandwidth / 1e12:.2f} TB/s. Our dense and Quest at the same batches: the section above.\n\n"
            + "\n".join(table))


if __name__ == "__main__":
    main()
