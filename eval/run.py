"""Accuracy of Quest against dense attention, StreamingLLM and oracle top-k on the default model.

    python -m eval.run --quick     # CI-sized: 2K-token contexts, a few budgets (minutes on 2 cores)
    python -m eval.run --full      # 1K/2K/4K/7.5K contexts, 10 depths, budgets 32..1024 (below the context)
                                   # (about 40 minutes on 2 cores; quick mode compares every group rule
                                   # and page size)

Writes eval/results/<mode>/{passkey,perplexity}.csv and *.png, and the <mode> section of eval/RESULTS.md.

These texts (Hamlet, Areopagitica, the repetitive filler) are the tuning split: the app default (pages of 4, rule
mass) was chosen on them. eval/report.py reports on texts no setting was chosen on."""
import argparse
import csv
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from quest_core.models import load_model

from . import passkey, perplexity
from .methods import NAMES, methods

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent / "assets"
QUICK = dict(contexts=[2048], depths=[0.0, 0.25, 0.5, 0.75, 1.0], budgets=[64, 128, 256], new_tokens=8,
             methods=list(NAMES), ppl_prefix=2048, ppl_scored=96, ppl_budgets=[256, 1024])
FULL = dict(contexts=[1024, 2048, 4096, 7500], depths=[round(i / 9, 3) for i in range(10)],
            budgets=[32, 128, 256, 1024], new_tokens=6, methods=["quest", "quest-p4-mass", "streaming", "oracle"],
            ppl_prefix=4096, ppl_scored=128, ppl_budgets=[64, 256, 1024])


def evaluate(model, tokenizer, settings: dict, log=print) -> dict:
    fillers = {"repetitive": passkey.REPETITIVE, "prose": ASSETS.joinpath("areopagitica.txt").read_text()}
    passkey_rows = passkey.run(model, tokenizer, fillers, settings["contexts"], settings["depths"],
                               methods(settings["budgets"], settings["methods"]), new_tokens=settings["new_tokens"],
                               log=log)
    text_ids = tokenizer(ASSETS.joinpath("hamlet.txt").read_text(), add_special_tokens=False)["input_ids"]
    ppl_rows = perplexity.run(model, text_ids, settings["ppl_prefix"], settings["ppl_scored"],
                              methods(settings["ppl_budgets"], settings["methods"]), log=log)
    return {"passkey": passkey_rows, "perplexity": ppl_rows}


def accuracy_table(rows, where_dense_found: bool = False) -> dict:
    """(method, budget) -> accuracy over all prompts, or over the prompts whose passkey dense attention found."""
    dense_found = {(r["filler"], r["context"], r["depth"]) for r in rows if r["method"] == "dense" and r["correct"]}
    table = {}
    for row in rows:
        if not where_dense_found or (row["filler"], row["context"], row["depth"]) in dense_found:
            table.setdefault((row["method"], row["budget"]), []).append(row["correct"])
    return {key: sum(v) / len(v) for key, v in table.items()}


def write_outputs(results: dict, settings: dict, mode: str, seconds: float, out: Path = HERE) -> None:
    folder = out / "results" / mode
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in results.items():
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    plot(results, folder)
    accuracy = accuracy_table(results["passkey"])
    kept = accuracy_table(results["passkey"], where_dense_found=True)
    budgets = sorted({b for (_, b) in accuracy if b})
    lines = ["| method | " + " | ".join(f"budget {b}" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for method, budget_of in (("dense", lambda b: 0), *((m, lambda b: b) for m in settings["methods"])):
        lines.append(f"| {method} | " + " | ".join(
            f"{accuracy[(method, budget_of(b))]:.0%} ({kept.get((method, budget_of(b)), float('nan')):.0%})"
            for b in budgets) + " |")
    ppl = ["| method | budget | perplexity | vs dense | mean selection recall |", "|---|---:|---:|---:|---:|"]
    dense_ppl = next(r["ppl"] for r in results["perplexity"] if r["method"] == "dense")
    for r in results["perplexity"]:
        recall = "" if r["recall"] is None else f"{r['recall']:.3f}"
        ppl.append(f"| {r['method']} | {r['budget'] or ''} | {r['ppl']:.3f} | {100 * (r['ppl'] / dense_ppl - 1):+.2f}% "
                   f"| {recall} |")
    now = datetime.datetime.now(datetime.UTC)
    text = f"""## Tuning split: {mode} mode

- model: SmolLM2-135M-Instruct (embedded default), greedy, 2 dense layers (page sizes: below)
- date: {now:%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min on {torch.get_num_threads()} threads
- command: `{shlex.join(['python', '-m', 'eval.run', *sys.argv[1:]])}`
- settings: `{json.dumps(settings)}`

### Passkey retrieval (exact match, over fillers × contexts × depths)

Each cell: accuracy over all prompts (in brackets: over the prompts whose passkey dense attention finds).
`quest`, `quest-max` and `quest-mass` use pages of 16 tokens (GQA group rule sum, the engine's default, max and
mass: see quest_core/selection.py); `quest-p8` and `quest-p4` pages of 8 and 4 tokens (rule sum), whose key bounds
are tighter; `quest-p4-mass` pages of 4 and rule mass (the app's default for this model); `streaming` and `oracle`
pages of 16.

{chr(10).join(lines)}

![passkey accuracy by budget](results/{mode}/passkey.png)

### Perplexity in decode mode (*Hamlet*, {settings['ppl_scored']} tokens after a {settings['ppl_prefix']}-token prefix)

Recall: the share of the (group-averaged) dense attention mass that falls on the selected pages, mean over steps,
sparse layers and KV heads.

{chr(10).join(ppl)}

![perplexity by budget](results/{mode}/perplexity.png)

CSV: `results/{mode}/passkey.csv`, `results/{mode}/perplexity.csv`.
"""
    write_section(out / "RESULTS.md", mode, text)


def write_section(path: Path, name: str, text: str) -> None:
    """Put `text` between the <!-- name:start/end --> markers of `path`, replacing what was there."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{text.strip()}\n{end}"
    old = path.read_text() if path.exists() else "# Accuracy evaluation\n"
    if start in old:
        new = old[:old.index(start)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + section + "\n"
    path.write_text(new)


def plot(results: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = accuracy_table(results["passkey"])
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for method in [m for m in NAMES if any(name == m for name, _ in accuracy)]:
        budgets = sorted(b for (m, b) in accuracy if m == method)
        axis.plot(budgets, [accuracy[(method, b)] for b in budgets], marker="o", label=method)
    axis.axhline(accuracy[("dense", 0)], color="black", linestyle="--", label="dense")
    axis.set(xscale="log", xlabel="token budget", ylabel="passkey accuracy", ylim=(-0.05, 1.05))
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "passkey.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 3.5))
    rows = results["perplexity"]
    for method in [m for m in NAMES if any(r["method"] == m for r in rows)]:
        points = sorted((r["budget"], r["ppl"]) for r in rows if r["method"] == method)
        axis.plot(*zip(*points), marker="o", label=method)
    axis.axhline(next(r["ppl"] for r in rows if r["method"] == "dense"), color="black", linestyle="--", label="dense")
    axis.set(xscale="log", xlabel="token budget", ylabel="perplexity")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "perplexity.png", dpi=120)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the CI-sized run (default)")
    size.add_argument("--full", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings, mode = (FULL, "full") if args.full else (QUICK, "quick")
    model, tokenizer = load_model()
    started = time.perf_counter()
    results = evaluate(model, tokenizer, settings)
    write_outputs(results, settings, mode, time.perf_counter() - started)
    print(json.dumps({"eval": mode, "passkey": {f"{m}@{b}": a for (m, b), a in accuracy_table(
        results["passkey"]).items()}, "perplexity": results["perplexity"]}))


if __name__ == "__main__":
    main()
