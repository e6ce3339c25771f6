"""The report split's pieces against oracles: ROUGE-L on strings checked by hand, the standard error against its
definition, the counting of passkey cells, and a report split that shares no text with the tuning split; and the
claims eval/RESULTS.md makes, on the committed results."""
import itertools
import json
import math
import random

import pytest
import torch

from eval import agreement, report
from eval.miss_probe import fp8_outward, int8_outward
from eval.passkey import REPETITIVE


@pytest.mark.parametrize("candidate, reference, expected", [
    ("the cat sat on the mat", "the cat lay on the mat", 5 / 6),  # LCS: the cat on the mat
    ("a b c d", "a c", 2 / 3),                                    # P = 2/4, R = 2/2: 2PR/(P+R) = 2/3
    ("a c", "a b c d", 2 / 3),
    ("The Cat, sat!", "the cat sat", 1.0),                        # lowercased words, punctuation dropped
    ("x y z", "a b c", 0.0),
    ("", "", 1.0),
    ("", "a", 0.0),
    ("b a", "a b", 0.5),                                          # order matters: LCS 1 of 2
])
def test_rouge_l(candidate, reference, expected):
    assert agreement.rouge_l(candidate, reference) == pytest.approx(expected)


def test_first_divergence():
    assert agreement.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert agreement.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert agreement.first_divergence([5], [6]) == 0
    assert agreement.first_divergence([1, 2], [1, 2, 3]) == 2


def test_mean_and_standard_error():
    mean, se = report.mean_se([1, 2, 3, 4])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)  # sample variance 5/3 (n - 1 = 3), over sqrt(4)
    rng = random.Random(0)
    values = [rng.gauss(10, 2) for _ in range(400)]
    assert report.mean_se(values)[1] == pytest.approx(2 / 20, rel=0.15)
    assert math.isnan(report.mean_se([3.0])[1])


def assert_shares_no_line(name: str, text: str, others: list[str]):
    """No sampled line of 40 characters or more of `text` is in `others`, nor one of theirs in it; and `text` fills
    the largest passkey context without repeating."""
    assert len(text) > 3 * 8192, f"{name} cannot fill the largest passkey context without repeating"
    lines = [line for line in text.splitlines() if len(line) >= 40]
    for line in random.Random(name).sample(lines, min(40, len(lines))):  # (Acts: a line per chapter)
        assert all(line not in other for other in others), f"{name}: {line!r} is in another split"
    for other in others:
        other_lines = [line for line in other.splitlines() if len(line) >= 40] or [other]
        for line in random.Random(0).sample(other_lines, min(40, len(other_lines))):
            assert line not in text


def test_report_and_holdout_splits_share_no_text_with_the_splits_before_them():
    assert set(report.REPORT_TEXTS).isdisjoint(path.stem for path in report.TUNING_TEXTS)
    tuning = [path.read_text() for path in report.TUNING_TEXTS] + [REPETITIVE]
    assert set(report.SETTINGS["fillers"]) | set(report.SETTINGS["ppl_texts"]) <= set(report.REPORT_TEXTS)
    assert list(report.HELD_OUT_SPLITS) == ["report", "holdout", "holdout2"]
    before = tuning
    for names in report.HELD_OUT_SPLITS.values():  # each split against every split read before it
        texts = report.report_texts(names)
        for name, text in texts.items():
            assert_shares_no_line(name, text, before)
        before = before + list(texts.values())
    assert {"macbeth", "julius_caesar", "paradise_lost"} <= set(agreement.DOCUMENTS)


def test_passkey_cells_count_only_prompts_dense_solves():
    rows = [dict(filler="f", context=2048, depth=d, method=m, budget=b, correct=c)
            for d, m, b, c in [(0.1, "dense", 0, True), (0.1, "quest", 128, True), (0.1, "streaming", 128, False),
                               (0.5, "dense", 0, False), (0.5, "quest", 128, True), (0.5, "streaming", 128, True),
                               (0.9, "dense", 0, True), (0.9, "quest", 128, False), (0.9, "streaming", 128, True)]]
    counts = report.passkey_counts(rows)
    assert counts[("all", "dense", 0)] == (2, 3)
    assert counts[("all", "quest", 128)] == (1, 2)
    assert counts[("all", "streaming", 128)] == (1, 2)
    assert report.fraction(1, 2) == "1/2 (50%)"
    settings = dict(budgets=[128], methods=["quest", "streaming"], contexts=[2048])
    headline, cells = report.passkey_tables(rows, settings)
    assert "1/2 (50%)" in headline and "2/3 (67%)" in headline
    assert "| f | 2048 | 2/3 (67%) | 1/2 (50%) | 1/2 (50%) |" in cells


def test_window_starts_stay_in_the_text_and_the_context():
    settings = dict(report.SETTINGS)
    for n_tokens in (8459, 9763):
        starts = report.window_starts(n_tokens, settings)
        assert len(starts) == settings["ppl_windows_per_text"] == len(set(starts))
        assert starts[0] == settings["ppl_first"]
        assert starts[-1] + settings["ppl_scored"] <= min(n_tokens, settings["ppl_last"])


def test_weights_digest_tells_weights_apart_by_one_rounding_step():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    torch.manual_seed(0)
    same = LlamaForCausalLM(config)
    assert report.weights_digest(model) == report.weights_digest(same)
    with torch.no_grad():
        weight = same.model.layers[1].mlp.down_proj.weight
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(1.0))
    assert report.weights_digest(model) != report.weights_digest(same)


def test_agreement_variants_answer_in_sessions_of_their_own_arithmetic():
    assert agreement.variant("dense-chunk256") == (256, None)
    assert agreement.variant("dense-bf16") == (512, "bfloat16")  # the app's prefill chunk
    assert agreement.variant("dense") == agreement.variant("quest-default") == (512, None)


def test_agreement_summary():
    rows = [dict(document="d", question=q, method=m, budget=b, answer=a, ids=i)
            for q, m, b, a, i in [("q1", "dense", 0, "a b", [1, 2]), ("q1", "quest", 128, "a b", [1, 2]),
                                  ("q2", "dense", 0, "a b c", [1, 2, 3]), ("q2", "quest", 128, "a c", [1, 3])]]
    cell = agreement.summary(rows)[("quest", 128)]
    assert (cell["n"], cell["identical"], cell["divergences"]) == (2, 1, [1])
    assert cell["rouge"] == pytest.approx([1.0, 0.8])


@pytest.mark.parametrize("context, depth", [(2048, 0.1), (2048, 0.5), (7500, 0.9)])
def test_chat_prompt_holds_the_key_on_its_own_line_at_its_depth(default_model, context, depth):
    from eval import passkey

    tokenizer = default_model[1]
    ids = passkey.chat_prompt(tokenizer, report.report_texts()["macbeth"], context, depth, "12345")
    assert abs(len(ids) - context) <= 8
    text = tokenizer.decode(ids)
    assert text.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    needle = "\nThe pass key is 12345. Remember it. 12345 is the pass key.\n"
    assert text.count(needle) == 1 and "\n" + needle in text  # after a line break of the text
    document = text[text.index("<|im_start|>user\n"):text.index("\n\nWhat is the pass key?")]
    assert abs(document.index(needle) / len(document) - depth) < 0.05


# What eval/RESULTS.md claims of the committed report-split results (eval/results/report; no model runs): each
# test fails if the results change so that the claim no longer holds.

def test_results_quest_finds_every_passkey_dense_finds_at_budget_256():
    counts = report.passkey_counts(report.passkey_results())
    solved, prompts = counts[("all", "dense", 0)]
    assert counts[("all", "quest-default", 256)] == (solved, solved), "one miss, or a prompt dense solves left out"
    assert solved >= 30 and prompts >= 70


def test_results_perplexity_at_budget_1024_within_one_percent_of_dense_error_bar_included():
    mean, se = report.versus_dense(report.read_csv(report.OUT / "perplexity.csv"), "quest-default", 1024)
    assert mean + se <= 1.0


def test_results_streaming_clearly_worse_than_quest_at_budget_256():
    rows = report.read_csv(report.OUT / "perplexity.csv")
    streaming, streaming_se = report.versus_dense(rows, "streaming", 256)
    quest, quest_se = report.versus_dense(rows, "quest-default", 256)
    assert streaming - streaming_se > quest + quest_se  # outside both error bars
    assert streaming - streaming_se > 0


def agreement_cells() -> dict:
    """The committed answer-agreement runs (results/report/agreement-*.json), merged: (method, budget) -> cell."""
    return agreement.merge([agreement.summary(rows) for rows in report.agreement_runs()])


def test_results_the_two_level_ranking_answers_as_dense_does_more_often_than_the_default_at_budget_1024():
    cells = agreement_cells()
    two_level, default = cells[("quest-two-level", 1024)], cells[("quest-default", 1024)]
    assert two_level["n"] == default["n"] >= 40
    assert two_level["identical"] > default["identical"]


def test_results_rounding_moves_no_dense_answer_but_bfloat16_moves_some():
    cells = agreement_cells()
    rechunked, bf16 = cells[("dense-chunk256", 1024)], cells[("dense-bf16", 1024)]
    assert rechunked["n"] == bf16["n"] >= 40
    assert rechunked["identical"] == rechunked["n"]
    assert bf16["identical"] < 0.8 * bf16["n"]


def test_results_the_default_answers_as_dense_does_more_often_as_its_budget_grows():
    cells = agreement_cells()
    identical = [cells[("quest-default", budget)]["identical"] for budget in (256, 1024, 2048, 4096)]
    assert identical == sorted(set(identical))  # strictly more at each budget
    assert identical[-1] >= 0.8 * cells[("quest-default", 4096)]["n"]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 15's target is not met on the report split: at "
                   "budget 1024 the model default gives dense's answer to 6/40 questions, the two-level ranking 13/40, "
                   "the oracle (the pages of 4 holding the most dense attention) 16/40; dense itself in bfloat16 gives "
                   "float32 dense's answer to 20/40; the default reaches 32/40 at budget 4096")
@pytest.mark.parametrize("method", ["quest-default", "quest-two-level"])
def test_results_at_budget_1024_four_answers_in_five_are_identical_to_dense(method):
    cell = agreement_cells()[(method, 1024)]
    assert cell["identical"] >= 0.8 * cell["n"]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 15's target is not met on the report split: "
                   "top_p 0.99 (chosen on the tuning split) finds 28/33 reading 156.9 pages per KV head and step, "
                   "budget 256 33/33 reading 64")
def test_results_adaptive_budget_finds_what_budget_256_finds_reading_fewer_pages():
    rows = report.passkey_results()
    settings = report.SETTINGS
    topp = ("quest-topp", settings["top_p_budget"])
    counts, pages = report.passkey_counts(rows), report.mean_pages(rows)
    fixed = ("quest-default", settings["top_p_match"])
    assert counts[("all", *topp)][0] >= counts[("all", *fixed)][0]
    assert pages[topp] < pages[fixed]


TWO_LEVEL_REPORT_ROWS = {128: "two-level-report-*.jsonl", 256: "two-level-256-report-*.jsonl",
                         1024: "two-level-1024-report-*.jsonl"}


@pytest.mark.parametrize("budget", [128, 256, 1024])
def test_results_the_two_level_ranking_finds_every_passkey_dense_finds(budget):
    """The committed probe rows of the report split (eval/results/probes/two-level[-256|-1024]-report-*.jsonl): with
    coarse_factor 4 (chosen on the tuning split) Quest finds each of the at least 50 passkeys dense finds."""
    rows = probe_rows(TWO_LEVEL_REPORT_ROWS[budget])
    solved = [row for row in rows if row["dense"]]
    assert len(rows) == 180 and len(solved) >= 50
    assert all(row[f"2lvl4@{budget}"] for row in solved)


@pytest.mark.parametrize("budget", [128, 256])
def test_results_the_model_default_misses_some_passkeys_on_the_report_split(budget):
    rows = probe_rows(TWO_LEVEL_REPORT_ROWS[budget])
    solved = [row for row in rows if row["dense"]]
    assert sum(row[f"base@{budget}"] for row in solved) < len(solved)


def test_fp8_outward_rounds_each_bound_to_the_nearest_float8_value_outside_it():
    """eval.miss_probe.fp8_outward against a brute force over float8 e4m3's 256 codes: each max becomes the smallest
    value of the type at or above it, each min the largest at or below it, +-inf beyond the type's range (448)."""
    bounds = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * 30  # [Hkv, pages, 2D]: max, min
    bounds[0, 0, 0], bounds[0, 0, 8], bounds[1, 1, 1], bounds[1, 1, 9] = 1000.0, -1000.0, 0.001, -0.001
    bounds[1, 2, 2], bounds[1, 2, 10] = 1.5, -1.5  # values of the type: kept as they are
    codes = torch.arange(256).to(torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[codes.isfinite()].tolist()
    top, bottom = bounds.chunk(2, dim=-1)
    expected_top = [min((c for c in codes if c >= x), default=math.inf) for x in top.flatten().tolist()]
    expected_bottom = [max((c for c in codes if c <= x), default=-math.inf) for x in bottom.flatten().tolist()]
    rounded_top, rounded_bottom = fp8_outward(bounds).chunk(2, dim=-1)
    assert rounded_top.flatten().tolist() == expected_top
    assert rounded_bottom.flatten().tolist() == expected_bottom


def test_int8_outward_rounds_each_bound_to_the_nearest_step_of_its_dimension_outside_it():
    """eval.miss_probe.int8_outward: with a KV head and dimension's step its largest |bound| over the pages / 127,
    each max becomes a multiple of the step at or above it and each min one at or below it, less than a step away
    (up to float32 rounding), -127..127 steps."""
    bounds = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * 30  # [Hkv, pages, 2D]: max, min
    bounds[1, 2, 2], bounds[1, 2, 10] = 0.0, 0.0  # on a step: kept as they are
    rounded = int8_outward(bounds)
    assert rounded[1, 2, 2] == 0 and rounded[1, 2, 10] == 0
    for head, page, dim in itertools.product(range(2), range(5), range(16)):
        column = bounds[head, :, dim % 8].abs().tolist() + bounds[head, :, dim % 8 + 8].abs().tolist()
        step = max(column) / 127
        x, y = bounds[head, page, dim].item(), rounded[head, page, dim].item()
        assert (y >= x) if dim < 8 else (y <= x)
        assert abs(y - x) <= step * (1 + 1e-5)
        assert abs(y / step - round(y / step)) < 1e-3 and abs(round(y / step)) <= 127


@pytest.mark.parametrize("rows_of, bounds, budgets, found, kept", [
    ("fp8-bounds-holdout2", "fp8", (128, 256), [35, 27, 43, 43], (93.0, 95.3)),
    ("int8-bounds-holdout2", "int8", (128, 256), [35, 36, 43, 43], (98.5, 99.2)),
    ("int8-bounds-sum16-holdout2", "int8", (256, 512), [8, 7, 24, 24], (98.6, 99.3))])
def test_results_8_bit_page_bounds_float8_loses_passkeys_at_budget_128_int8_does_not(rows_of, bounds, budgets, found,
                                                                                      kept):
    """eval/RESULTS.md on the 8-bit page bounds' rows (second holdout split, 2K and 4K; the model default, and the
    settings of Llama-3.1-8B's heads: rule sum, pages of 16): keys found of dense's 45 by the default and the rounded
    bounds at the two budgets, and the share of the exact bounds' pages the rounded ones keep, its least and most over
    the prompts in percent."""
    rows = probe_rows(f"{rows_of}-*.jsonl")
    assert len(rows) == 72 and sum(row["dense"] for row in rows) == 45
    assert [found_and_pages(rows, f"{variant}@{budget}")[0] for budget in budgets
            for variant in ("base", bounds)] == found
    shares = [100 * row[f"{bounds}@{budget}:kept"] for row in rows if row["dense"] for budget in budgets]
    assert (round(min(shares), 1), round(max(shares), 1)) == kept


def probe_rows(pattern: str) -> list[dict]:
    """The committed rows of eval/miss_probe.py runs (eval/results/probes/<pattern>)."""
    return [json.loads(line) for path in sorted((report.OUT.parent / "probes").glob(pattern))
            for line in path.read_text().splitlines()]


def found_and_pages(rows: list[dict], variant: str) -> tuple[int, float]:
    """Passkeys a probe variant finds among those dense finds, and its mean pages per KV head and step on them."""
    solved = [row for row in rows if row["dense"]]
    return sum(row[variant] for row in solved), sum(row[variant + ":pages"] for row in solved) / len(solved)


def test_results_the_two_level_adaptive_budget_was_chosen_on_the_tuning_split():
    """The rule: of the adaptive budgets tried on the tuning split (top_p grid x min_budget 64 and 16, at most 256
    tokens), the fewest pages among those finding as many passkeys as the fixed budget 256; it chose top_p 0.5 with
    min_budget 64, the setting the report split reports."""
    tried = {}
    for pattern, fewest in (("two-level-top-p-tuning-*.jsonl", 64), ("two-level-top-p-min16-tuning-*.jsonl", 16)):
        rows = probe_rows(pattern)
        assert len(rows) == 72
        target = found_and_pages(rows, "2lvl4@256")[0]
        solved = next(row for row in rows if row["dense"])  # (a row dense misses stops at dense)
        for variant in [key for key in solved if key.startswith("2lvl4-topp") and ":" not in key]:
            found, pages = found_and_pages(rows, variant)
            if found >= target:
                tried[variant.removeprefix("2lvl4-topp").removesuffix("@256"), fewest] = pages
    assert min(tried, key=tried.get) == ("0.5", 64)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 15's target is not met on the report split: "
                   "top_p 0.5 with min_budget 64 over the two-level ranking finds 57/60 reading 32.1 pages of 2, "
                   "the fixed budget 256 60/60 reading 128")
def test_results_the_two_level_adaptive_budget_finds_what_budget_256_finds_reading_fewer_pages():
    rows = probe_rows("two-level-top-p-report-*.jsonl")
    assert len(rows) == 180 and sum(row["dense"] for row in rows) >= 50
    chosen, fixed = found_and_pages(rows, "2lvl4-topp0.5-min64@256"), found_and_pages(rows, "2lvl4@256")
    assert chosen[1] < fixed[1]
    assert chosen[0] >= fixed[0]


def test_results_on_the_holdout_split_the_two_level_ranking_keeps_its_passkeys_at_budget_128():
    """The holdout split's committed rows (eval/results/probes/two-level-top-p-holdout-*.jsonl: 3 texts x contexts
    1536-7500 x 9 depths, first read after the tuning and report splits chose the two-level ranking): with
    coarse_factor 4 Quest finds at least 90% of the at least 50 passkeys dense finds at budget 128, where the model
    default finds fewer than 90%."""
    rows = probe_rows("two-level-top-p-holdout-*.jsonl")
    solved = [row for row in rows if row["dense"]]
    assert len(rows) == 135 and len(solved) >= 50
    assert found_and_pages(rows, "2lvl4@128")[0] >= 0.9 * len(solved)
    assert found_and_pages(rows, "base@128")[0] < 0.9 * len(solved)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 15's targets are not met on the holdout split: "
                   "at budget 256 the two-level ranking finds 62/63 (dense's answer to one Britannica prompt at 4K is "
                   "missed by every method at 256), and top_p 0.98 with min_budget 16 finds 59/63 reading 94.1 pages "
                   "of 2 where the fixed budget 256 finds 62/63 reading 128")
@pytest.mark.parametrize("variant", ["2lvl4@256", "2lvl4-topp0.98-min16@256"])
def test_results_on_the_holdout_split_budget_256_and_its_adaptive_budget_find_every_passkey(variant):
    rows = probe_rows("two-level-top-p-holdout-*.jsonl")
    assert found_and_pages(rows, variant)[0] == sum(row["dense"] for row in rows)


def second_holdout_rows() -> tuple[list[dict], int]:
    """The second holdout split's committed rows (eval/results/probes/two-level-top-p-holdout2-*.jsonl: 4 plays x
    contexts 1536-7500 x 9 depths, first read after the three splits before it chose the settings, commit e55b7d9
    naming them before the run) and how many of their passkeys dense finds."""
    rows = probe_rows("two-level-top-p-holdout2-*.jsonl")
    assert len(rows) == 180
    return rows, sum(row["dense"] for row in rows)


def test_results_on_the_second_holdout_split_budget_128_and_the_adaptive_budget_meet_their_targets():
    """With at least 50 passkeys dense finds: the two-level ranking finds at least 90% of them at budget 128 (the
    model default fewer), and its adaptive budget (top_p 0.98, 128 to 256 tokens) as many as the fixed budget 256,
    reading fewer pages."""
    rows, solved = second_holdout_rows()
    assert solved >= 50
    assert found_and_pages(rows, "2lvl4@128")[0] >= 0.9 * solved > found_and_pages(rows, "base@128")[0]
    adaptive, fixed = found_and_pages(rows, "2lvl4-topp0.98-min128@256"), found_and_pages(rows, "2lvl4@256")
    assert adaptive[0] >= fixed[0] and adaptive[1] < fixed[1]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 15's target is not met on the second holdout "
                   "split: at budget 256 the two-level ranking finds 102/103 (As You Like It at 3K tokens, depth 0.5, "
                   "answers 9742. for 97347, a key the fixed budget 128 finds)")
def test_results_on_the_second_holdout_split_budget_256_finds_every_passkey():
    rows, solved = second_holdout_rows()
    assert found_and_pages(rows, "2lvl4@256")[0] == solved
