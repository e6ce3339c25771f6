"""The evaluation's quick mode on the default model, against the accuracy bounds Quest is meant to keep."""
import pytest

from eval import run as evaluation


@pytest.fixture(scope="module")
def results(default_model, tmp_path_factory):
    model, tokenizer = default_model
    results = evaluation.evaluate(model, tokenizer, evaluation.QUICK, log=lambda message: None)
    evaluation.write_outputs(results, evaluation.QUICK, "quick", 0.0, out=tmp_path_factory.mktemp("eval"))
    return results


def test_quest_perplexity_and_recall_at_budget_1024(results):
    rows = {(r["method"], r["budget"]): r for r in results["perplexity"]}
    dense = rows[("dense", 0)]["ppl"]
    assert rows[("quest", 1024)]["ppl"] <= 1.01 * dense
    assert rows[("quest", 1024)]["recall"] >= 0.9
    for budget in (256, 1024):
        assert rows[("streaming", budget)]["recall"] < rows[("quest", budget)]["recall"]
        assert rows[("quest", budget)]["recall"] <= rows[("oracle", budget)]["recall"] + 1e-6


def prompts_dense_solves(rows):
    return {(r["filler"], r["context"], r["depth"]) for r in rows if r["method"] == "dense" and r["correct"]}


def found(rows, method, budget, prompts):
    return [r["correct"] for r in rows if (r["method"], r["budget"]) == (method, budget)
            and (r["filler"], r["context"], r["depth"]) in prompts]


def test_quest_with_pages_of_8_finds_every_passkey_dense_finds_at_budget_256(results):
    rows = results["passkey"]
    prompts = prompts_dense_solves(rows)
    assert prompts, "dense attention found no passkey: the test would prove nothing"
    assert all(found(rows, "quest-p8", 256, prompts))
    streaming = found(rows, "streaming", 256, prompts)
    assert sum(streaming) < len(streaming)  # StreamingLLM loses passkeys at the same budget


@pytest.mark.xfail(strict=True, reason="open (issue 5): SmolLM2-135M (head_dim 64) at 2K tokens; pages of 16 "
                                       "tokens give loose key bounds: Quest at budget 256 misses passkeys dense "
                                       "finds (eval/RESULTS.md)")
def test_quest_with_pages_of_16_finds_every_passkey_dense_finds_at_budget_256(results):
    rows = results["passkey"]
    assert all(found(rows, "quest", 256, prompts_dense_solves(rows)))


@pytest.mark.xfail(strict=True, reason="open (issue 5): at budget 128 Quest, pages of 8, finds 60% of the passkeys "
                                       "dense finds on SmolLM2-135M (target 90%)")
def test_quest_passkey_at_budget_128(results):
    rows = results["passkey"]
    hits = found(rows, "quest-p8", 128, prompts_dense_solves(rows))
    assert sum(hits) >= 0.9 * len(hits)
