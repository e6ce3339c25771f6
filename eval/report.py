"""The report split: accuracy on texts that no setting was chosen on (issue 15).

Every setting chosen from eval numbers (the app default's pages of 4 and group rule `mass`, the budgets) was chosen
on the tuning split: Hamlet, Areopagitica and the repetitive filler (eval/run.py). This reports on three other
public-domain works (eval/texts/SOURCES.md): passkey retrieval with n in every cell, decode-mode perplexity over
windows with standard errors, and whether Quest's chat answers match dense's (eval/agreement.py).

    python -m eval.report --part passkey      # the three parts run apart (one thread each: on 2 shared cores
    python -m eval.report --part perplexity   # one thread per process is several times faster than two), and
    python -m eval.report --part agreement    # may run side by side
    python -m eval.report --write             # the report section at the head of eval/RESULTS.md

Each part prefills a prompt or document once and decodes every method and budget from that cache, cut back.
Parts write eval/results/report/<part>.csv or .json and <part>.meta.json (date, seconds, threads, load)."""
import argparse
import csv
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from quest_core.models import load_model

from . import agreement, passkey, perplexity
from .methods import methods
from .run import write_section

HERE = Path(__file__).resolve().parent
TEXTS = HERE / "texts"
REPORT_TEXTS = ("macbeth", "julius_caesar", "paradise_lost", "britannica_shakespeare")
TUNING_TEXTS = tuple(HERE.parent / "assets" / name for name in ("hamlet.txt", "hamlet_opening.txt", "areopagitica.txt"))
OUT = HERE / "results" / "report"
# Quest as the app runs it (the model's default_config: pages of 4, rule mass), the engine's pages of 16 and rule
# sum, and StreamingLLM. An adaptive-budget method (issue 15, item 4: "quest-topp", QuestConfig.top_p) joins this
# list, and eval/methods.py, once the config has it.
METHODS = ["quest-default", "quest", "streaming"]
SETTINGS = dict(fillers=list(REPORT_TEXTS), prompt="chat", contexts=[2048, 4096, 7500],
                depths=[0.1, 0.3, 0.5, 0.7, 0.9], budgets=[128, 256, 1024], new_tokens=6, methods=METHODS,
                ppl_texts=["macbeth", "julius_caesar", "paradise_lost"], ppl_windows_per_text=7, ppl_first=2048,
                ppl_last=8000, ppl_scored=16, ppl_budgets=[256, 1024],
                qa_methods=["quest-default"], qa_budgets=[256, 1024], qa_max_new_tokens=24)
LABELS = {"dense": "dense", "quest-default": "Quest, model default (pages of 4, rule mass)",
          "quest": "Quest, pages of 16, rule sum", "streaming": "StreamingLLM (pages of 16)"}


def report_texts() -> dict[str, str]:
    """The report split's fillers, name -> text."""
    return {name: (TEXTS / f"{name}.txt").read_text() for name in REPORT_TEXTS}


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); the error is nan below 2 values."""
    values = list(values)
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def window_starts(n_tokens: int, settings: dict) -> list[int]:
    """Evenly spaced window starts from ppl_first to the last window that ends by ppl_last (and by the text's end)."""
    last = min(n_tokens, settings["ppl_last"]) - settings["ppl_scored"]
    count = settings["ppl_windows_per_text"]
    return [round(settings["ppl_first"] + i * (last - settings["ppl_first"]) / (count - 1)) for i in range(count)]


def run_part(part: str, settings: dict, shard: tuple[int, int] = (0, 1), fillers=None, log=print) -> None:
    """Run one part. The passkey part's shard (i, n) takes every n-th of the (filler, context) pairs of `fillers`
    (default: settings["fillers"]) from the i-th, each pair on a seed of its own (its index among all the report
    texts' pairs), and writes passkey-i.csv (passkey-<fillers>-i.csv for other fillers)."""
    model, tokenizer = load_model()
    started, now = time.perf_counter(), datetime.datetime.now(datetime.UTC)
    load = os.getloadavg()[0]
    OUT.mkdir(parents=True, exist_ok=True)
    if part == "passkey":
        pairs = [(f, c) for f in REPORT_TEXTS for c in settings["contexts"]]
        chosen = [i for i, (f, _) in enumerate(pairs) if f in (fillers or settings["fillers"])]
        prompt_of = dict(chat=passkey.chat_prompt, plain=passkey.passkey_prompt)[settings["prompt"]]
        rows = []
        for index in chosen[shard[0]::shard[1]]:
            filler, context = pairs[index]
            rows += passkey.run(model, tokenizer, {filler: report_texts()[filler]}, [context], settings["depths"],
                                methods(settings["budgets"], settings["methods"], model.config), seed=index,
                                new_tokens=settings["new_tokens"], log=log, skip_unsolved=True,
                                prompt_of=prompt_of)
        extra = "depths-" if settings["depths"] != SETTINGS["depths"] else ""
        part = f"passkey-{'+'.join(fillers) + '-' if fillers else ''}{extra}{shard[0]}"
    elif part == "perplexity":
        ids = {name: tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in report_texts().items()
               if name in settings["ppl_texts"]}
        rows = perplexity.run_windows(model, ids, {name: window_starts(len(v), settings) for name, v in ids.items()},
                                      settings["ppl_scored"],
                                      methods(settings["ppl_budgets"], settings["methods"], model.config), log=log)
    else:  # the documents' shard, saved after every question
        extra = "budgets-" if settings["qa_budgets"] != SETTINGS["qa_budgets"] else ""
        part = f"agreement-{extra}{shard[0]}"
        documents = list(agreement.QUESTIONS)[shard[0]::shard[1]]
        rows = agreement.run(model, tokenizer, methods(settings["qa_budgets"], settings["qa_methods"], model.config),
                             settings["qa_max_new_tokens"], {d: agreement.QUESTIONS[d] for d in documents}, log=log,
                             on_question=lambda rows: (OUT / f"{part}.json").write_text(json.dumps(rows, indent=1)))
    if not part.startswith("agreement"):
        with open(OUT / f"{part}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    meta = dict(part=part, date=f"{now:%Y-%m-%d %H:%M} UTC", seconds=time.perf_counter() - started,
                threads=torch.get_num_threads(), load_at_start=load, cpus=os.cpu_count(),
                machine=f"{platform.machine()}, {platform.processor() or platform.system()}, torch {torch.__version__}",
                command=shlex.join(["python", "-m", "eval.report", *sys.argv[1:]]), settings=settings)
    (OUT / f"{part}.meta.json").write_text(json.dumps(meta, indent=1))


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("context", "budget", "start"):
            if key in row:
                row[key] = int(row[key])
        for key in ("depth", "ppl"):
            if key in row:
                row[key] = float(row[key])
        if "correct" in row:
            row["correct"] = row["correct"] == "True"
    return rows


def passkey_counts(rows: list[dict], group=lambda r: "all") -> dict:
    """(group, method, budget) -> (found, n) over the prompts dense attention solves; (group, "dense", 0) -> (solved,
    prompts). A method skipped where the context fits its budget is left out of that cell."""
    solved = {(r["filler"], r["context"], r["depth"]) for r in rows if r["method"] == "dense" and r["correct"]}
    counts = {}
    for r in rows:
        prompt = (r["filler"], r["context"], r["depth"])
        if r["method"] != "dense" and prompt not in solved:
            continue
        cell = counts.setdefault((group(r), r["method"], r["budget"]), [0, 0])
        cell[0] += r["correct"]
        cell[1] += 1
    return {key: tuple(v) for key, v in counts.items()}


def fraction(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.0%})" if n else "–"


def passkey_tables(rows: list[dict], settings: dict) -> tuple[str, str]:
    columns = [(m, b) for b in settings["budgets"] for m in settings["methods"]]
    total = passkey_counts(rows)
    head = ["| method | " + " | ".join(f"budget {b}" for b in settings["budgets"]) + " |",
            "|---|" + "---:|" * len(settings["budgets"])]
    for method in settings["methods"]:
        head.append(f"| {LABELS.get(method, method)} | " + " | ".join(
            fraction(*total.get(("all", method, b), (0, 0))) for b in settings["budgets"]) + " |")
    k, n = total[("all", "dense", 0)]
    head.append(f"| dense (solved / prompts) | {fraction(k, n)} |" + " |" * (len(settings["budgets"]) - 1))

    cells = passkey_counts(rows, lambda r: (r["filler"], str(r["context"])))
    by_filler = passkey_counts(rows, lambda r: (r["filler"], "all"))
    by_context = passkey_counts(rows, lambda r: ("all", str(r["context"])))
    groups = [(f, str(c)) for f in dict.fromkeys(r["filler"] for r in rows) for c in settings["contexts"]]
    groups += [(f, "all") for f in dict.fromkeys(r["filler"] for r in rows)]
    groups += [("all", str(c)) for c in settings["contexts"]]
    table = ["| filler | context | dense | " + " | ".join(f"{m}@{b}" for m, b in columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for group in groups:
        counts = {**cells, **by_filler, **by_context}
        table.append(f"| {group[0]} | {group[1]} | {fraction(*counts[(group, 'dense', 0)])} | " + " | ".join(
            fraction(*counts.get((group, m, b), (0, 0))) for m, b in columns) + " |")
    return "\n".join(head), "\n".join(table)


def perplexity_table(rows: list[dict]) -> str:
    dense = {(r["text"], r["start"]): r["ppl"] for r in rows if r["method"] == "dense"}
    keys = list(dict.fromkeys((r["method"], r["budget"]) for r in rows))
    lines = ["| method | budget | windows | perplexity, mean ± SE | vs dense, paired: mean ± SE |",
             "|---|---:|---:|---:|---:|"]
    for method, budget in keys:
        cell = [r for r in rows if (r["method"], r["budget"]) == (method, budget)]
        ppl, se = mean_se(r["ppl"] for r in cell)
        ratio, ratio_se = mean_se(100 * (r["ppl"] / dense[(r["text"], r["start"])] - 1) for r in cell)
        lines.append(f"| {LABELS.get(method, method)} | {budget or ''} | {len(cell)} | {ppl:.2f} ± {se:.2f} | "
                     f"{ratio:+.2f}% ± {ratio_se:.2f}% |")
    return "\n".join(lines)


def agreement_table(runs: list[list[dict]]) -> str:
    lines = ["| method | budget | questions | identical to dense | first divergent token, mean (answers that differ) "
             "| ROUGE-L vs dense, mean ± SE |", "|---|---:|---:|---:|---:|---:|"]
    for (method, budget), cell in agreement.merge([agreement.summary(rows) for rows in runs]).items():
        divergence = (f"{statistics.fmean(cell['divergences']):.1f} (n={len(cell['divergences'])})"
                      if cell["divergences"] else "–")
        rouge, se = mean_se(cell["rouge"])
        lines.append(f"| {LABELS.get(method, method)} | {budget} | {cell['n']} | "
                     f"{fraction(cell['identical'], cell['n'])} | {divergence} | {rouge:.3f} ± {se:.3f} |")
    return "\n".join(lines)


def write(out: Path = HERE) -> None:
    metas = (sorted(OUT.glob("passkey-*.meta.json")) + [OUT / "perplexity.meta.json"]
             + sorted(OUT.glob("agreement-*.meta.json")))
    meta = {path.name.removesuffix(".meta.json"): json.loads(path.read_text()) for path in metas}
    settings = meta["passkey-0"]["settings"]
    key_rows = [row for path in sorted(OUT.glob("passkey-*.csv")) for row in read_csv(path)]
    ppl_rows = read_csv(OUT / "perplexity.csv")
    qa_runs = [json.loads(path.read_text()) for path in sorted(OUT.glob("agreement-*.json"))
               if not path.name.endswith(".meta.json")]
    qa_rows = [row for rows in qa_runs for row in rows]
    fillers = list(dict.fromkeys(r["filler"] for r in key_rows))
    contexts = sorted({r["context"] for r in key_rows})
    depths = sorted({r["depth"] for r in key_rows})
    prompts = len({(r["filler"], r["context"], r["depth"]) for r in key_rows})
    headline, cells = passkey_tables(key_rows, settings)
    runs = "\n".join(f"- {part}: `{m['command']}`, {m['date']}, {m['seconds'] / 60:.1f} min on {m['threads']} thread "
                     f"(load average {m['load_at_start']:.1f} at its start)" for part, m in meta.items())
    questions = len({(r["document"], r["question"]) for r in qa_rows})
    documents = [d for d in agreement.QUESTIONS if any(r["document"] == d for r in qa_rows)]
    scored = settings["ppl_scored"]
    windows = len({(r["text"], r["start"]) for r in ppl_rows})
    text = f"""## Report split: held-out texts

*Macbeth*, *Julius Caesar*, *Paradise Lost* Book I and the 1911 Britannica's article *Shakespeare*.

No setting was chosen on these texts (eval/texts/SOURCES.md; `tests/test_eval_report.py` checks that they share
no passage with the tuning texts). Written by `python -m eval.report --write` (eval/report.py) from the runs
below, up to six side by side, each process on one thread (one thread per process ran several times faster than
two on these shared cores); the settings are those of the passkey runs, with the changes their commands name.

- model: SmolLM2-135M-Instruct (embedded default), float32 on CPU, 2 dense layers
- machine: {meta['perplexity']['machine']}, {meta['perplexity']['cpus']} cores shared with other work
{runs}
- settings: `{json.dumps(settings)}`

### Passkey retrieval on held-out fillers

A 5-digit key at a depth of a report text's opening, in the prompt as the app puts it (`passkey.chat_prompt`: the
chat template, the key's sentence on a line of its own, the answer begun with "The pass key is"), greedy, 6 new
tokens, exact match. Each cell:
passkeys found / prompts whose passkey dense attention finds (n), over {prompts} prompts ({len(fillers)} fillers ×
contexts {', '.join(map(str, contexts))} × depths {', '.join(map(str, depths))}: see the runs above); the dense row:
found / all prompts.

{headline}

Per filler and context (`method@budget`; `quest-default` is the model's default, pages of 4 and rule mass; `quest`
pages of 16 and rule sum):

{cells}

### Perplexity in decode mode ({windows} windows of {scored} tokens)

Windows of {scored} tokens, {settings['ppl_windows_per_text']} per text ({', '.join(settings['ppl_texts'])}), their
starts evenly spaced from token {settings['ppl_first']} to {settings['ppl_last']} of the text; every token scored
one decode step at a time after what precedes it. Perplexity: mean over windows ± standard error; vs dense: the
mean of each window's ratio to dense's perplexity on the same window, ± its standard error.

{perplexity_table(ppl_rows)}

### Do Quest's answers match dense's?

{questions} questions over {len(documents)} documents ({', '.join(documents)}: the first two are the app's
samples, of the tuning split; each as the app loads it, its head where it is longer than the context), answered
with the chat decoding defaults (`Decoding()`: greedy, repetition penalty 1.2) through `Session`, at most
{settings['qa_max_new_tokens']} new tokens, by dense attention and by Quest with the model's default settings.
First divergent token: 0-based position of the first token where the answer differs from dense's. ROUGE-L:
F-measure of the longest common subsequence of lowercased words. Questions and answers:
`results/report/agreement-*.json`.

{agreement_table(qa_runs)}

CSV: `results/report/passkey-*.csv` (every prompt's answer), `results/report/perplexity.csv` (every window).
"""
    write_section(out / "RESULTS.md", "report", text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--part", choices=["passkey", "perplexity", "agreement"])
    action.add_argument("--write", action="store_true", help="write the report section of eval/RESULTS.md")
    parser.add_argument("--shard", default="0/1", help="i/n: the passkey or agreement part's i-th of n shards")
    parser.add_argument("--fillers", help="comma-separated report texts for the passkey part (default: "
                        "SETTINGS['fillers'])")
    parser.add_argument("--depths", help="comma-separated depths for the passkey part (default: SETTINGS['depths'])")
    parser.add_argument("--qa-budgets", help="comma-separated budgets for the agreement part (default: "
                        "SETTINGS['qa_budgets'])")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.write:
        write()
        return
    torch.set_num_threads(args.threads)
    shard = tuple(int(x) for x in args.shard.split("/"))
    fillers = args.fillers.split(",") if args.fillers else None
    settings = dict(SETTINGS, depths=[float(d) for d in args.depths.split(",")]) if args.depths else SETTINGS
    if args.qa_budgets:
        settings = dict(settings, qa_budgets=[int(b) for b in args.qa_budgets.split(",")])
    run_part(args.part, settings, shard, fillers,
             log=lambda message: print(time.strftime("%H:%M:%S"), message, flush=True))


if __name__ == "__main__":
    main()
