"""The report split: accuracy on texts that no setting was chosen on (issue 15).

Every setting chosen from eval numbers (the app default's pages of 4 and group rule `mass`, the budgets, the adaptive
budget's top_p) was chosen on the tuning split: Hamlet, Areopagitica and the repetitive filler (eval/run.py, and the
top-p part here). This reports on four other public-domain works (eval/texts/SOURCES.md): passkey retrieval with n
in every cell and the pages read, decode-mode perplexity over windows with standard errors, and whether Quest's chat
answers match dense's (eval/agreement.py).

    python -m eval.report --part top-p        # first: top_p chosen on the tuning split's passkeys (Hamlet,
                                              # Areopagitica), which the passkey and perplexity parts read back
    python -m eval.report --part passkey      # the parts run apart (on CPU one thread each: on 2 shared cores one
    python -m eval.report --part perplexity   # thread per process is several times faster than two), and may run
    python -m eval.report --part agreement    # side by side; --device cuda runs them on a GPU
    python -m eval.report --write             # the report section at the head of eval/RESULTS.md

Each part prefills a prompt or document once and decodes every method and budget from that cache, cut back.
Parts write <out>/<part>.csv or .json and <part>.meta.json (date, seconds, device, threads, load); --out moves
<out> from eval/results/report.
"""
import argparse
import csv
import datetime
import hashlib
import itertools
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
import transformers

from quest_core.config import QuestConfig, default_config
from quest_core.models import load_model

from . import agreement, passkey, perplexity
from .methods import DENSE, methods
from .run import write_section

HERE = Path(__file__).resolve().parent
TEXTS = HERE / "texts"
REPORT_TEXTS = ("macbeth", "julius_caesar", "paradise_lost", "britannica_shakespeare")
# A second held-out split, first read on 2026-12-01 to report what was chosen on the tuning and report splits
HOLDOUT_TEXTS = ("britannica_shakespeare_late", "merry_wives", "kjv_acts")
# A third, first read on 2026-12-01 to report what the three splits before it chose together
HOLDOUT2_TEXTS = ("much_ado", "twelfth_night", "as_you_like_it", "henry_iv_part_1")
HELD_OUT_SPLITS = dict(report=REPORT_TEXTS, holdout=HOLDOUT_TEXTS, holdout2=HOLDOUT2_TEXTS)  # in the order first read
TUNING_TEXTS = tuple(HERE.parent / "assets" / name for name in ("hamlet.txt", "hamlet_opening.txt", "areopagitica.txt"))
TOP_P_FILLERS = ("hamlet", "areopagitica")  # the tuning split's prose (hamlet_opening is Hamlet's head)
OUT = HERE / "results" / "report"
# Quest as the app runs it (the model's default_config: pages of 4, rule mass), the same with the adaptive budget
# (top_p from the top-p part; the column's budget its most, min_budget 64 its fewest tokens), the engine's pages of
# 16 and rule sum, StreamingLLM, and the oracle on the default's pages (the most any page selection could find: the
# pages holding the most dense attention).
METHODS = ["quest-default", "quest-topp", "quest", "streaming", "oracle-default"]
SETTINGS = dict(fillers=list(REPORT_TEXTS), prompt="chat", contexts=[1536, 2048, 3072, 4096, 7500],
                depths=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], budgets=[128, 256, 1024], new_tokens=6,
                methods=METHODS, top_p_grid=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999], top_p_budget=1024,
                top_p_match=256, ppl_texts=["macbeth", "julius_caesar", "paradise_lost"], ppl_windows_per_text=7,
                ppl_first=2048, ppl_last=8000, ppl_scored=16, ppl_budgets=[256, 1024],
                qa_methods=["quest-default", "oracle-default"], qa_budgets=[128, 256, 1024], qa_max_new_tokens=24)
LABELS = {"dense": "dense", "quest-default": "Quest, model default (pages of 4, rule mass)",
          "quest-topp": "Quest, model default, adaptive budget (top-p; budget: the most)",
          "quest": "Quest, pages of 16, rule sum", "streaming": "StreamingLLM (pages of 16)",
          "oracle-default": "oracle: the pages of 4 holding the most dense attention",
          "quest-two-level": "Quest, two-level ranking (pages of 2, coarse_factor 4, rule mass)",
          "dense-chunk256": "dense, the document prefilled in chunks of 256 tokens, not 512",
          "dense-bf16": "dense in bfloat16 (the app's dtype on a CPU), not float32"}


def report_texts(names=REPORT_TEXTS) -> dict[str, str]:
    """The report split's fillers (or a holdout split's: HOLDOUT_TEXTS, HOLDOUT2_TEXTS), name -> text."""
    return {name: (TEXTS / f"{name}.txt").read_text() for name in names}


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


def tuning_texts() -> dict[str, str]:
    """The tuning split's prose that top_p is chosen on, name -> text."""
    return {path.stem: path.read_text() for path in TUNING_TEXTS if path.stem in TOP_P_FILLERS}


def passkey_pairs(texts, settings: dict) -> list[tuple[int, str, int]]:
    """(seed, filler, context): every (filler, context) pair of `texts` on a seed of its own, its index."""
    return [(seed, filler, context) for seed, (filler, context)
            in enumerate(itertools.product(texts, settings["contexts"]))]


def passkey_rows(model, tokenizer, texts: dict, pairs, method_rows, settings: dict, log) -> list[dict]:
    """passkey.run over `pairs` (passkey_pairs), over the prompts dense attention solves."""
    prompt_of = dict(chat=passkey.chat_prompt, plain=passkey.passkey_prompt)[settings["prompt"]]
    rows = []
    for seed, filler, context in pairs:
        rows += passkey.run(model, tokenizer, {filler: texts[filler]}, [context], settings["depths"], method_rows,
                            seed=seed, new_tokens=settings["new_tokens"], log=log, skip_unsolved=True,
                            prompt_of=prompt_of)
    return rows


def top_p_methods(model_config, settings: dict) -> list[tuple[str, int, QuestConfig]]:
    """Dense, the model default at the budget to match (top_p_match), and the adaptive budget at each top_p of the
    grid, with top_p_budget tokens its most."""
    match, most = settings["top_p_match"], settings["top_p_budget"]
    return [("dense", 0, DENSE[1]), ("quest-default", match, default_config(model_config, budget=match))] + [
        (f"quest-topp-{p}", most, default_config(model_config, budget=most, top_p=p)) for p in settings["top_p_grid"]]


def choose_top_p(rows: list[dict], settings: dict) -> float:
    """The smallest top_p of the grid whose adaptive budget finds as many of the passkeys dense finds as the model
    default at budget top_p_match (the fewer pages read, the smaller p); the largest where none does."""
    counts = passkey_counts(rows)
    target = counts.get(("all", "quest-default", settings["top_p_match"]), (0, 0))[0]
    enough = [p for p in settings["top_p_grid"]
              if counts.get(("all", f"quest-topp-{p}", settings["top_p_budget"]), (0, 0))[0] >= target]
    return min(enough, default=max(settings["top_p_grid"]))


def chosen_top_p(out: Path) -> float:
    """The top_p that the top-p part chose on the tuning split."""
    path = out / "top-p.meta.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python -m eval.report --part top-p` first (it chooses top_p on "
                         "the tuning split)")
    return json.loads(path.read_text())["settings"]["top_p"]


def run_part(model, tokenizer, part: str, settings: dict, out: Path = OUT, shard: tuple[int, int] = (0, 1),
             fillers=None, log=print) -> None:
    """Run one part into `out`. The passkey part's shard (i, n) takes every n-th of the (filler, context) pairs of
    `fillers` (default: settings["fillers"]) from the i-th, each pair on a seed of its own (its index among all the
    report texts' pairs), and writes passkey-i.csv (passkey-<fillers>-i.csv for other fillers)."""
    started, now = time.perf_counter(), datetime.datetime.now(datetime.UTC)
    load = os.getloadavg()[0]
    out.mkdir(parents=True, exist_ok=True)
    if part == "top-p":
        rows = passkey_rows(model, tokenizer, tuning_texts(), passkey_pairs(TOP_P_FILLERS, settings),
                            top_p_methods(model.config, settings), settings, log)
        settings = dict(settings, top_p=choose_top_p(rows, settings))
    elif part == "passkey":
        settings = dict(settings, top_p=chosen_top_p(out))
        pairs = [pair for pair in passkey_pairs(REPORT_TEXTS, settings) if pair[1] in (fillers or settings["fillers"])]
        rows = passkey_rows(model, tokenizer, report_texts(), pairs[shard[0]::shard[1]],
                            methods(settings["budgets"], settings["methods"], model.config, settings["top_p"]),
                            settings, log)
        extra = "".join(f"{key}-" for key in ("contexts", "depths", "methods") if settings[key] != SETTINGS[key])
        part = f"passkey-{'+'.join(fillers) + '-' if fillers else ''}{extra}{shard[0]}"
    elif part == "perplexity":
        settings = dict(settings, top_p=chosen_top_p(out))
        ids = {name: tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in report_texts().items()
               if name in settings["ppl_texts"]}
        rows = perplexity.run_windows(model, ids, {name: window_starts(len(v), settings) for name, v in ids.items()},
                                      settings["ppl_scored"], methods(settings["ppl_budgets"], settings["methods"],
                                                                      model.config, settings["top_p"]), log=log)
    else:  # the documents' shard, saved after every question
        extra = ("budgets-" if settings["qa_budgets"] != SETTINGS["qa_budgets"] else "") + (
            f"methods-{'+'.join(settings['qa_methods'])}-" if settings["qa_methods"] != SETTINGS["qa_methods"] else "")
        part = f"agreement-{extra}{shard[0]}"
        documents = list(agreement.QUESTIONS)[shard[0]::shard[1]]
        rows = agreement.run(model, tokenizer, methods(settings["qa_budgets"], settings["qa_methods"], model.config),
                             settings["qa_max_new_tokens"], {d: agreement.QUESTIONS[d] for d in documents}, log=log,
                             on_question=lambda rows: (out / f"{part}.json").write_text(json.dumps(rows, indent=1)))
    if not part.startswith("agreement"):
        with open(out / f"{part}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    device = model.device
    meta = dict(part=part, date=f"{now:%Y-%m-%d %H:%M} UTC", seconds=time.perf_counter() - started,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                dtype=str(model.dtype).removeprefix("torch."), threads=torch.get_num_threads(), load_at_start=load,
                cpus=os.cpu_count(),
                machine=f"{platform.machine()}, {platform.processor() or platform.system()}, torch {torch.__version__}",
                cpu_capability=torch.backends.cpu.get_cpu_capability(), transformers=transformers.__version__,
                weights_sha256=weights_digest(model),
                command=shlex.join(["python", "-m", "eval.report", *sys.argv[1:]]), settings=settings)
    (out / f"{part}.meta.json").write_text(json.dumps(meta, indent=1))


def weights_digest(model) -> str:
    """sha256 of the model's parameters in order: runs whose digests differ did not run the same weights (a GGUF
    de-quantized by another transformers, say), whatever their code."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


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
        if "pages" in row:
            row["pages"] = float(row["pages"]) if row["pages"] else None
    return rows


def passkey_results(results: Path = OUT) -> list[dict]:
    """The passkey parts' rows in `results`, one per prompt, method and budget: where runs repeat one (a run of other
    methods repeats dense's, to know which prompts it solves), a row that counted the pages read wins, else the
    first file's."""
    rows = {}
    for path in sorted(results.glob("passkey-*.csv")):
        for row in read_csv(path):
            key = (row["filler"], row["context"], row["depth"], row["method"], row["budget"])
            if key not in rows or (row.get("pages") is not None and rows[key].get("pages") is None):
                rows[key] = row
    return list(rows.values())


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


def mean_pages(rows: list[dict]) -> dict:
    """(method, budget) -> the pages a KV head of a sparse layer read per step (passkey.traced_answer), averaged over
    the prompts dense attention solves; only rows that hold the count (runs before it have none)."""
    solved = {(r["filler"], r["context"], r["depth"]) for r in rows if r["method"] == "dense" and r["correct"]}
    pages = {}
    for r in rows:
        if r["method"] != "dense" and (r["filler"], r["context"], r["depth"]) in solved and r.get("pages") is not None:
            pages.setdefault((r["method"], r["budget"]), []).append(r["pages"])
    return {key: statistics.fmean(values) for key, values in pages.items()}


def fraction(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.0%})" if n else "–"


def passkey_tables(rows: list[dict], settings: dict) -> tuple[str, str]:
    """The headline (each method at each budget over every prompt dense solves, and the pages read where the rows
    count them) and the cells (cells_table)."""
    total, pages = passkey_counts(rows), mean_pages(rows)
    header = ["| method | " + " | ".join(f"budget {b}" for b in settings["budgets"]) + " |",
              "|---|" + "---:|" * len(settings["budgets"])]
    head = header + [f"| {LABELS.get(method, method)} | " + " | ".join(
        fraction(*total.get(("all", method, b), (0, 0))) for b in settings["budgets"]) + " |"
        for method in settings["methods"]]
    k, n = total[("all", "dense", 0)]
    head.append(f"| dense (solved / prompts) | {fraction(k, n)} |" + " |" * (len(settings["budgets"]) - 1))
    if pages:  # runs from before the pages were counted have none
        head += ["", "Mean pages read per KV head of a sparse layer per step, over the same prompts (the current page\n"
                 "included; with a fixed budget, the budget's pages):", ""] + header + [
            f"| {LABELS.get(method, method)} | " + " | ".join(
                f"{pages[(method, b)]:.1f}" if (method, b) in pages else "–" for b in settings["budgets"]) + " |"
            for method in settings["methods"]]
    return "\n".join(head), cells_table(rows, settings)


def cells_table(rows: list[dict], settings: dict) -> str:
    """Passkey counts per (filler, context), per filler and per context, every method at every budget."""
    columns = [(m, b) for b in settings["budgets"] for m in settings["methods"]]
    cells = passkey_counts(rows, lambda r: (r["filler"], str(r["context"])))
    by_filler = passkey_counts(rows, lambda r: (r["filler"], "all"))
    by_context = passkey_counts(rows, lambda r: ("all", str(r["context"])))
    counts = {**cells, **by_filler, **by_context}
    groups = [(f, str(c)) for f in dict.fromkeys(r["filler"] for r in rows) for c in settings["contexts"]]
    groups += [(f, "all") for f in dict.fromkeys(r["filler"] for r in rows)]
    groups += [("all", str(c)) for c in settings["contexts"]]
    table = ["| filler | context | dense | " + " | ".join(f"{m}@{b}" for m, b in columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for group in groups:
        table.append(f"| {group[0]} | {group[1]} | {fraction(*counts[(group, 'dense', 0)])} | " + " | ".join(
            fraction(*counts.get((group, m, b), (0, 0))) for m, b in columns) + " |")
    return "\n".join(table)


def top_p_table(rows: list[dict], settings: dict) -> str:
    """The top-p part's choice: passkeys found (of those dense finds) and mean pages read, the model default at the
    budget to match first, then the adaptive budget at each top_p of the grid."""
    counts, pages = passkey_counts(rows), mean_pages(rows)
    cells = [("quest-default", settings["top_p_match"], f"model default, budget {settings['top_p_match']}")] + [
        (f"quest-topp-{p}", settings["top_p_budget"], f"top-p {p}, {QuestConfig.min_budget}–"
         f"{settings['top_p_budget']} tokens" + (" (chosen)" if p == settings["top_p"] else ""))
        for p in settings["top_p_grid"]]
    lines = ["| setting | passkeys found | mean pages read |", "|---|---:|---:|"]
    for method, budget, label in cells:
        found = fraction(*counts.get(("all", method, budget), (0, 0)))
        lines.append(f"| {label} | {found} | {pages.get((method, budget), math.nan):.1f} |")
    return "\n".join(lines)


def versus_dense(rows: list[dict], method: str, budget: int) -> tuple[float, float]:
    """Perplexity against dense's on the same window, in percent above it: mean and standard error over windows."""
    dense = {(r["text"], r["start"]): r["ppl"] for r in rows if r["method"] == "dense"}
    return mean_se(100 * (r["ppl"] / dense[(r["text"], r["start"])] - 1) for r in rows
                   if (r["method"], r["budget"]) == (method, budget))


def perplexity_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys((r["method"], r["budget"]) for r in rows))
    lines = ["| method | budget | windows | perplexity, mean ± SE | vs dense, paired: mean ± SE |",
             "|---|---:|---:|---:|---:|"]
    for method, budget in keys:
        cell = [r for r in rows if (r["method"], r["budget"]) == (method, budget)]
        ppl, se = mean_se(r["ppl"] for r in cell)
        ratio, ratio_se = versus_dense(rows, method, budget)
        lines.append(f"| {LABELS.get(method, method)} | {budget or ''} | {len(cell)} | {ppl:.2f} ± {se:.2f} | "
                     f"{ratio:+.2f}% ± {ratio_se:.2f}% |")
    return "\n".join(lines)


def agreement_table(runs: list[list[dict]]) -> str:
    lines = ["| method | budget | questions | identical to dense | first divergent token, mean (answers that differ) "
             "| ROUGE-L vs dense, mean ± SE |", "|---|---:|---:|---:|---:|---:|"]
    for (method, budget), cell in agreement.merge([agreement.summary(rows) for rows in runs]).items():
        budget = "–" if method.startswith("dense") else budget
        divergence = (f"{statistics.fmean(cell['divergences']):.1f} (n={len(cell['divergences'])})"
                      if cell["divergences"] else "–")
        rouge, se = mean_se(cell["rouge"])
        lines.append(f"| {LABELS.get(method, method)} | {budget} | {cell['n']} | "
                     f"{fraction(cell['identical'], cell['n'])} | {divergence} | {rouge:.3f} ± {se:.3f} |")
    return "\n".join(lines)


def where(meta: dict) -> str:
    """The device a part ran on, in words (runs before the device was recorded ran on CPU)."""
    if meta.get("device", "cpu") != "cpu":
        return f"{meta['device']}, {meta['dtype']}"
    return f"{meta['threads']} CPU thread (load average {meta['load_at_start']:.1f} at its start)"


def top_p_section(results: Path) -> str:
    """How top_p was chosen, from the top-p part's run on the tuning split ("" where there is none)."""
    if not (results / "top-p.meta.json").exists():
        return ""
    settings = json.loads((results / "top-p.meta.json").read_text())["settings"]
    rows = read_csv(results / "top-p.csv")
    counts = passkey_counts(rows)
    matched = (counts.get(("all", f"quest-topp-{settings['top_p']}", settings["top_p_budget"]), (0, 0))[0]
               >= counts.get(("all", "quest-default", settings["top_p_match"]), (0, 0))[0])
    rule = "" if matched else " None of the grid did, so the largest was taken."
    return f"""
### The adaptive budget's top_p, chosen on the tuning split

`quest-topp` is the model default with `QuestConfig.top_p`: each KV head of a sparse layer reads the current page,
then pages in decreasing estimated share of its group's attention until they hold top_p of it, from
{QuestConfig.min_budget} tokens (`min_budget`, the config's default) up to the budget. top_p = {settings['top_p']} was
chosen by `python -m eval.report --part top-p` on the tuning split's prose (*Hamlet*, *Areopagitica*; the chat
prompt, contexts {', '.join(map(str, settings['contexts']))} × depths {', '.join(map(str, settings['depths']))}): the
smallest top_p of the grid whose adaptive budget, at most
{settings['top_p_budget']} tokens, finds as many of the passkeys dense finds as the model default at budget
{settings['top_p_match']}.{rule} No report-split number entered the choice.

{top_p_table(rows, settings)}
"""


def agreement_runs(results: Path = OUT) -> list[list[dict]]:
    """The rows of each answer-agreement run in `results` (agreement-*.json)."""
    return [json.loads(path.read_text()) for path in sorted(results.glob("agreement-*.json"))
            if not path.name.endswith(".meta.json")]


def write(results: Path = OUT, markdown: Path = HERE / "RESULTS.md") -> None:
    """The report section of `markdown` from the parts' outputs in `results`."""
    metas = (sorted(results.glob("top-p.meta.json")) + sorted(results.glob("passkey-*.meta.json"))
             + [results / "perplexity.meta.json"] + sorted(results.glob("agreement-*.meta.json")))
    meta = {path.name.removesuffix(".meta.json"): json.loads(path.read_text()) for path in metas}
    key_rows = passkey_results(results)
    settings = dict(meta["passkey-0"]["settings"],
                    methods=[m for m in METHODS if any(r["method"] == m for r in key_rows)])
    ppl_rows = read_csv(results / "perplexity.csv")
    qa_runs = agreement_runs(results)
    qa_rows = [row for rows in qa_runs for row in rows]
    fillers = list(dict.fromkeys(r["filler"] for r in key_rows))
    contexts = sorted({r["context"] for r in key_rows})
    depths = sorted({r["depth"] for r in key_rows})
    prompts = len({(r["filler"], r["context"], r["depth"]) for r in key_rows})
    headline, cells = passkey_tables(key_rows, settings)
    runs = "\n".join(f"- {part}: `{m['command']}`, {m['date']}, {m['seconds'] / 60:.1f} min on {where(m)}"
                     for part, m in meta.items())
    questions = len({(r["document"], r["question"]) for r in qa_rows})
    documents = [d for d in agreement.QUESTIONS if any(r["document"] == d for r in qa_rows)]
    scored = settings["ppl_scored"]
    windows = len({(r["text"], r["start"]) for r in ppl_rows})
    text = f"""## Report split: held-out texts

*Macbeth*, *Julius Caesar*, *Paradise Lost* Book I and the 1911 Britannica's article *Shakespeare*.

No setting was chosen on these texts (eval/texts/SOURCES.md; `tests/test_eval_report.py` checks that they share
no passage with the tuning texts). Written by `python -m eval.report --write` (eval/report.py) from the runs
below (on CPU each process on one thread, several side by side); the settings are those of the passkey runs, with
the changes their commands name.

- model: SmolLM2-135M-Instruct (embedded default), {meta['passkey-0'].get('dtype', 'float32')} on \
{meta['passkey-0'].get('device', 'cpu')}, 2 dense layers
- machine: {meta['perplexity']['machine']}, {meta['perplexity']['cpus']} cores
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

Per filler and context (`method@budget`; `quest-default` is the model's default, pages of 4 and rule mass;
`quest-topp` the same with the adaptive budget; `quest` pages of 16 and rule sum):

{cells}
{top_p_section(results)}
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
{settings['qa_max_new_tokens']} new tokens, by dense attention, by Quest with the model's default settings and by
the oracle (per KV head, the pages of 4 holding the most dense attention: the best recall any selection of that
many pages has; it separates what the budget costs from what Quest's page scores cost). Two rows of dense attention
say what "identical" asks: the document prefilled in chunks of 256 tokens instead of 512 (the same sums rounded in
another order: in the last layers the cached keys move by about 1e-5), and the whole model in bfloat16, the app's
dtype on a CPU. Each run is against its own dense answers (in float32, chunks of 512). First divergent token:
0-based position of the first token where the answer differs from dense's. ROUGE-L: F-measure of the longest common
subsequence of lowercased words. Questions and answers: `results/report/agreement-*.json`.

{agreement_table(qa_runs)}

CSV: `results/report/passkey-*.csv` (every prompt's answer), `results/report/perplexity.csv` (every window).
"""
    write_section(markdown, "report", text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--part", choices=["top-p", "passkey", "perplexity", "agreement"])
    action.add_argument("--write", action="store_true", help="write the report section of eval/RESULTS.md")
    parser.add_argument("--shard", default="0/1", help="i/n: the passkey or agreement part's i-th of n shards")
    parser.add_argument("--fillers", help="comma-separated report texts for the passkey part (default: "
                        "SETTINGS['fillers'])")
    parser.add_argument("--contexts", help="comma-separated contexts for the passkey part (default: "
                        "SETTINGS['contexts'])")
    parser.add_argument("--depths", help="comma-separated depths for the passkey part (default: SETTINGS['depths'])")
    parser.add_argument("--methods", help="comma-separated methods for the passkey part (default: SETTINGS['methods'])")
    parser.add_argument("--qa-budgets", help="comma-separated budgets for the agreement part (default: "
                        "SETTINGS['qa_budgets'])")
    parser.add_argument("--qa-methods", help="comma-separated methods for the agreement part (default: "
                        "SETTINGS['qa_methods']; oracle-default is the ceiling of any page selection; dense-chunk256 "
                        "and dense-bf16 are dense's own answers under other arithmetic)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--out", type=Path, default=OUT, help="the parts' outputs (default: eval/results/report)")
    args = parser.parse_args()
    if args.write:
        write(args.out)
        return
    torch.set_num_threads(args.threads)
    shard = tuple(int(x) for x in args.shard.split("/"))
    fillers = args.fillers.split(",") if args.fillers else None
    settings = SETTINGS
    if args.contexts:
        settings = dict(settings, contexts=[int(c) for c in args.contexts.split(",")])
    if args.depths:
        settings = dict(settings, depths=[float(d) for d in args.depths.split(",")])
    if args.methods:
        settings = dict(settings, methods=args.methods.split(","))
    if args.qa_budgets:
        settings = dict(settings, qa_budgets=[int(b) for b in args.qa_budgets.split(",")])
    if args.qa_methods:
        settings = dict(settings, qa_methods=args.qa_methods.split(","))
    model, tokenizer = load_model(dtype=args.dtype, device=args.device)
    run_part(model, tokenizer, args.part, settings, args.out, shard, fillers,
             log=lambda message: print(time.strftime("%H:%M:%S"), message, flush=True))


if __name__ == "__main__":
    main()
