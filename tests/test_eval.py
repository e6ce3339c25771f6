"""The evaluation's quick mode on the default model stays within the accuracy bounds Quest is meant to keep."""
import pytest

from eval import run as evaluation


@pytest.fixture(scope="module")
def results(default_model, tmp_path_factory):
    model, tokenizer = default_model
    results = evaluation.evaluate(model, tokenizer, evaluation.QUICK, log=lambda message: None)
    evaluation.write_outputs(results, evaluation.QUICK, "quick", 0.0, out=tmp_path_factory.mktemp("eval"))
    return results


def test_quest_passkey_keeps_dense_accuracy_and_beats_streaming(results):
    rows = results["passkey"]
    prompts = {(r["filler"], r["context"], r["depth"]) for r in rows}
    for prompt in prompts:
        by_method = {(r["method"], r["budget"]): r["correct"] for r in rows if (r["filler"], r["context"], r["depth"]) == prompt}
        if by_method[("dense", 0)]:
            assert by_method[("quest", 256)], f"Quest at budget 256 missed a passkey dense found: {prompt}"
    accuracy = evaluation.accuracy_table(rows)
    assert accuracy[("quest", 128)] >= 0.9 * accuracy[("dense", 0)]
    assert accuracy[("streaming", 128)] < accuracy[("quest", 128)]


def test_quest_perplexity_and_recall_at_budget_1024(results):
    rows = {(r["method"], r["budget"]): r for r in results["perplexity"]}
    dense = rows[("dense", 0)]["ppl"]
    assert rows[("quest", 1024)]["ppl"] <= 1.01 * dense
    assert rows[("quest", 1024)]["recall"] >= 0.9
    assert rows[("streaming", 256)]["recall"] < rows[("quest", 256)]["recall"]
