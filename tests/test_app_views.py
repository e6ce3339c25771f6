"""The app's views of a trace, against brute force: passages, the share of reads per page, heatmap cells, payload
sizes, and the headline's numbers. No model, no server."""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from app import figures, handlers, looked, views
from app.sessions import ChatState
from quest_core.session import ContextUsage, DocumentFit, RunStats, Step
from quest_core.trace import StepTrace, mean_pages_read

LAYERS, HEADS, DENSE_LAYERS = 6, 3, 2


def random_trace(rng: random.Random, context_len: int, page_size: int, selected: int) -> StepTrace:
    """A sparse step: DENSE_LAYERS rows of -1, then `selected` distinct pages per (layer, head), current page last."""
    num_pages = -(-context_len // page_size)
    pages = torch.full((LAYERS, HEADS, selected), -1, dtype=torch.int32)
    for layer in range(DENSE_LAYERS, LAYERS):
        for head in range(HEADS):
            chosen = rng.sample(range(num_pages - 1), selected - 1) + [num_pages - 1]
            pages[layer, head] = torch.tensor(chosen, dtype=torch.int32)
    return StepTrace(context_len, 0.01, 1000, 300, pages, attention_s=0.001)


def test_passages_cover_every_page_once_and_break_at_the_conversation():
    rng = random.Random(0)
    words = ["The", " watch", " is", " cold", ".", "\n", " Horatio", " says", ",", " so", "\n\n", " long"]
    texts = ["".join(rng.choice(words) for _ in range(4)) for _ in range(300)]
    groups = looked.passages(texts, breaks=(173,))
    assert "".join(p.text for p in groups) == "".join(texts)
    assert [p.first_page for p in groups[1:]] == [p.end_page for p in groups[:-1]]
    assert groups[0].first_page == 0 and groups[-1].end_page == len(texts)
    assert any(p.first_page == 173 for p in groups)
    assert all(len(p.text) <= 2 * looked.MAX_CHARS + 4 * 6 for p in groups)


def test_page_shares_match_counting_by_hand():
    rng = random.Random(1)
    steps = [random_trace(rng, 400 + i, 4, 8) for i in range(5)] + [None,
                                                                     StepTrace(410, 0.01, 1, 1, None)]  # dense step
    num_pages = 110
    shares = looked.page_shares(steps, num_pages)
    counts, rows = np.zeros(num_pages), 0
    for step in steps:
        if step is None or step.selected_pages is None:
            continue
        for layer in range(LAYERS):
            for head in range(HEADS):
                row = step.selected_pages[layer, head].tolist()
                if row[0] < 0:
                    continue
                rows += 1
                for page in row:
                    counts[page] += 1
    np.testing.assert_allclose(shares, counts / rows)
    assert looked.page_shares([StepTrace(410, 0.01, 1, 1, None)], num_pages) is None  # dense: nothing to shade


def top_p_trace(rng: random.Random, context_len: int, page_size: int, width: int) -> StepTrace:
    """A sparse top-p step: each (sparse layer, head) reads its first count - 1 slots and the last; -1 between."""
    step = random_trace(rng, context_len, page_size, width)
    step.pages_read = torch.full((LAYERS, HEADS), -(-context_len // page_size), dtype=torch.int32)
    for layer in range(DENSE_LAYERS, LAYERS):
        for head in range(HEADS):
            count = rng.randint(2, width)
            step.selected_pages[layer, head, count - 1:-1] = -1
            step.pages_read[layer, head] = count
    return step


def test_top_p_steps_count_only_the_pages_read():
    rng = random.Random(3)
    steps = [top_p_trace(rng, 400 + i, 4, 12) for i in range(4)]
    shares = looked.page_shares(steps, 110)
    counts = np.zeros(110)
    for step in steps:
        for page in step.selected_pages[DENSE_LAYERS:].flatten().tolist():
            counts[page] += page >= 0
    np.testing.assert_allclose(shares, counts / (4 * (LAYERS - DENSE_LAYERS) * HEADS))
    read = steps[-1].pages_read[DENSE_LAYERS + 1]
    figure = figures.pages_read(steps[-1], DENSE_LAYERS + 1, 4, [], {})
    assert figure.layout.title.subtitle.text == f"each head read {read.min()}-{read.max()} of 101 pages"
    assert mean_pages_read(steps) == pytest.approx(torch.stack([s.pages_read[DENSE_LAYERS:] for s in steps]).float()
                                                   .mean().item())


def test_shading_is_the_mean_share_of_a_passages_pages_scaled_to_the_most_read():
    texts = ["aaaa"] * 6
    groups = [looked.Passage(0, 2, "x"), looked.Passage(2, 5, "y"), looked.Passage(5, 6, "z")]
    shares = np.array([0.2, 0.4, 0.0, 0.0, 0.9, 0.0])
    assert looked.shaded(texts, groups, shares) == [("x", 1.0), ("y", 1.0), ("z", None)]
    shares[4] = 0.3
    assert looked.shaded(texts, groups, shares) == [("x", 1.0), ("y", round(0.1 / 0.3, 2)), ("z", None)]
    assert looked.shaded(texts, groups, None) == [("x", None), ("y", None), ("z", None)]


@pytest.mark.parametrize("num_pages", [37, 2000])
def test_heatmap_cells_are_the_share_of_each_columns_pages_read(num_pages):
    rng = random.Random(num_pages)
    page_size = 4
    step = random_trace(rng, num_pages * page_size - 1, page_size, 64 if num_pages > 64 else 9)
    figure = figures.pages_read(step, DENSE_LAYERS + 1, page_size, [], {"question": [num_pages - 3]})
    z = np.array(figure.data[0].z)
    bin_pages = figures.page_bins(num_pages)
    assert z.shape == (HEADS, -(-num_pages // bin_pages)) and z.shape[1] <= figures.MAX_COLUMNS
    for head in range(HEADS):
        read = set(step.selected_pages[DENSE_LAYERS + 1, head].tolist())
        for column in range(z.shape[1]):
            pages = range(column * bin_pages, min(num_pages, (column + 1) * bin_pages))
            share = sum(page in read for page in pages) / len(pages)
            if num_pages - 1 in pages:
                expected = figures.CURRENT
            elif share:
                expected = int(figures.READ_LOW + (figures.READ_HIGH - figures.READ_LOW) * share)
            else:
                expected = figures.NOT_READ
            assert z[head, column] == expected
    names = {trace.name for trace in figure.data}
    assert {"read", "not read", "current page", "question's pages"} <= names
    dense_layer = figures.pages_read(step, 0, page_size, [], {})
    assert (np.array(dense_layer.data[0].z)[:, :-1] == figures.DENSE).all()
    assert np.array(dense_layer.data[0].z).shape == z.shape  # a row per KV head: the plot keeps its size
    assert "dense layer: all read" in {trace.name for trace in dense_layer.data}


def test_an_8k_answer_of_256_steps_plots_in_a_small_payload():
    rng = random.Random(2)
    page_size, context = 4, 7900
    steps = [random_trace(rng, context + i, page_size, 64) for i in range(256)]
    over_time = figures.selection_over_time(steps, DENSE_LAYERS, 0, page_size, {"needle": [900, 901]})
    at_step = figures.pages_read(steps[-1], DENSE_LAYERS, page_size, [f"page {p}: text" for p in range(2100)], {})
    sizes = [len(over_time.to_json()), len(at_step.to_json())]
    assert max(sizes) < 80_000, sizes
    z = np.array(over_time.data[0].z)
    assert z.shape[0] <= figures.MAX_ROWS and z.shape[1] <= figures.MAX_COLUMNS


def test_the_headline_reports_the_ratios_of_the_runs_it_is_given():
    dense = views.Speed(10.0, 0.030, 1.0, 6000, "Compare", ((6000,), (100,)))
    quest = views.Speed(12.5, 0.006, 4.2, 6000, "Compare", ((6000,), (24,)))
    text = views.headline({"dense": dense, "quest": quest})
    assert "**1.25×**" in text and "**5.0×**" in text and "**4.2× fewer**" in text
    assert "Compare: the same question and context" in text and "cannot explain" not in text
    noisy = views.Speed(11.4, 0.0333, 1.0, 6000, "Compare", ((6000,), (100,)))  # slower attention, faster step
    assert "cannot explain" in views.headline({"dense": dense, "quest": noisy})
    assert "Compare" in views.headline({"quest": quest}) and "×" not in views.headline({"quest": quest})
    assert "another session" not in text
    shared = views.Speed(5.0, 0.030, 1.0, 6000, "chat", ((6000,), (100,)), shared=True)
    assert "dense was slower than alone" in views.headline({"dense": shared, "quest": quest})
    assert "dense was slower than alone" in views.headline({"dense": shared})
    short = views.Speed(12.5, 0.006, 0.8, 60, "Compare", ((60,), (125,)))  # a context this short: bounds cost more
    text = views.headline({"dense": dense, "quest": short})
    assert "**1.25× more** than dense" in text and "fewer" not in text and "theoretical" not in text
    bars = json.loads(figures.time_per_token({"dense": (100.0, 30.0), "quest": (80.0, 6.0)}).to_json())
    attention, rest = bars["data"]
    assert attention["x"] == [30.0, 6.0] and rest["x"] == [70.0, 74.0]


def test_compare_names_the_question_it_answers_as_it_starts():
    """Compare answers the question typed, else the last one asked: its panel says which from the start (a browser
    walk pressed Compare on an empty box and learned only from the verdict which question had run)."""
    state = ChatState(question="Who is Francisco?")
    assert "*Who is Francisco?*" in handlers.comparing(None, "", state)["verdict"]
    assert "*And Bernardo?*" in handlers.comparing(None, " And Bernardo? ", state)["verdict"]
    assert "*" not in handlers.comparing(None, "", None)["verdict"]


def test_a_count_of_one_reads_in_the_singular():
    """Counts that can be 1 say "1 token", "1 session" (a browser walk read "1 tokens"); others stay plural."""
    step = Step(0, 42, "Hi", 0.5, 300, None)
    assert "**dense** · 1 token · decode" in views.metrics("dense", [step], RunStats("dense", 256, 16, 2))
    cut = RunStats("dense", 256, 16, 2, new_tokens=1, max_new_tokens=1, stop_reason="max_new_tokens")
    assert views.metrics("dense", [step], cut).endswith("· cut at 1 token")
    assert views.metrics("dense", [step, step], cut).startswith("**dense** · 2 tokens · ")
    assert views.document_note(DocumentFit(1, 8000, True), 8192).startswith("1 token, 0% of the 8,192-token")
    assert "title='document: 1 token'" in views.meter(ContextUsage(8192, 1, 0, 8191))
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path="tiny"), dtype="torch.float32",
                            parameters=lambda: iter([torch.zeros(1)]))
    assert "answers up to 1 token · 1 session at once" in views.header(model, "torch", 8192, 1, 1)
    capped = handlers.turn_notices(RunStats("quest", 256, 16, 2, max_new_tokens=1), 24)
    assert capped[0]["metadata"]["title"] == "⚠️ Answer capped at 1 token"
    assert (views.counted(1, "session"), views.counted(2048, "token")) == ("1 session", "2,048 tokens")


def test_the_legend_names_only_the_marks_the_figure_draws():
    """A mark kind with no pages (a question not found in the cache, a needle cut off) draws nothing and has no legend
    entry (a browser walk saw "question's pages" in the legend with no marker drawn); one with pages has both."""
    rng = random.Random(4)
    steps = [random_trace(rng, 400 + i, 4, 8) for i in range(3)]
    marks = {"question": [], "needle": [20, 21]}
    for figure in (figures.pages_read(steps[-1], DENSE_LAYERS, 4, [], marks),
                   figures.selection_over_time(steps, DENSE_LAYERS, 0, 4, marks)):
        legend = {trace.name: trace for trace in figure.data if trace.showlegend is not False and trace.name}
        assert "question's pages" not in legend
        assert list(legend["needle's pages"].x) == [20, 21]
        assert {"read", "not read", "current page"} <= set(legend)
