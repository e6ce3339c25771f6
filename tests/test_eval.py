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


@pytest.mark.xfail(strict=True, reason="open (issue 5): on SmolLM2-135M at 2K tokens Quest at budget 256 finds "
                                       "fewer passkeys than dense (eval/RESULTS.md)")
def test_quest_passkey_keeps_dense_accuracy_at_budget_256(results):
    rows = results["passkey"]
    for prompt in {(r["filler"], r["context"], r["depth"]) for r in rows}:
        found = {(r["method"], r["budget"]): r["correct"] for r in rows
                 if (r["filler"], r["context"], r["depth"]) == prompt}
        if found[("dense", 0)]:
            assert found[("quest", 256)], f"Quest at budget 256 missed a passkey dense found: {prompt}"
