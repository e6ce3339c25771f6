"""Where the model looked: page selections turned into shaded passages of the text the model saw.

The cache's pages (their texts come from the engine) are grouped into passages of whole pages that end at a line
break or, in long lines, at a sentence end. A page's share is how often it was read: over the sparse layers, the KV
heads and the decode steps of the last answer (or of one step). A passage's shade is the mean share of its pages,
scaled so the most-read passage is fully shaded.
"""
from dataclasses import dataclass

import numpy as np

MIN_CHARS = 80    # a passage ends at the first line break after this many characters
MAX_CHARS = 320   # ... or at a sentence end (or any page) after this many


@dataclass
class Passage:
    first_page: int
    end_page: int   # one past the last page
    text: str


def passages(page_texts: list[str], breaks: tuple[int, ...] = ()) -> list[Passage]:
    """Consecutive pages grouped into passages; a passage also ends before each page in `breaks` (the start of the
    conversation, say)."""
    found, start, text = [], 0, ""
    for page, page_text in enumerate(page_texts):
        if page in breaks and page > start:
            found.append(Passage(start, page, text))
            start, text = page, ""
        text += page_text
        line_end = "\n" in page_text and len(text) >= MIN_CHARS
        sentence_end = len(text) >= MAX_CHARS and any(mark in page_text for mark in (". ", "? ", "! ", ".\n", ", "))
        if line_end or sentence_end or len(text) >= 2 * MAX_CHARS:
            found.append(Passage(start, page + 1, text))
            start, text = page + 1, ""
    if start < len(page_texts):
        found.append(Passage(start, len(page_texts), text))
    return found


def page_shares(steps, num_pages: int) -> np.ndarray | None:
    """float [num_pages]: the share of (sparse layer, KV head, step) selections that read each page, over `steps`
    (StepTraces); None when no step was sparse (dense mode, or a context within the budget)."""
    reads = np.zeros(num_pages)
    rows = 0
    for step in steps:
        if step is None or step.selected_pages is None:
            continue
        # [layers, Hkv, k], -1 rows for dense layers and, with top-p, -1 in the slots a head did not read
        pages = step.selected_pages.numpy()
        sparse = pages[:, 0, 0] >= 0
        selected = pages[sparse].reshape(-1)
        reads += np.bincount(selected[(selected >= 0) & (selected < num_pages)], minlength=num_pages)[:num_pages]
        rows += int(sparse.sum()) * pages.shape[1]
    return reads / rows if rows else None


def shaded(page_texts: list[str], groups: list[Passage], shares: np.ndarray | None) -> list[tuple[str, float | None]]:
    """(text, shade in (0, 1] or None) per passage, for gr.HighlightedText; no shares: no shading."""
    if shares is None:
        return [(passage.text, None) for passage in groups]
    means = np.array([shares[p.first_page:p.end_page].mean() if p.end_page > p.first_page else 0.0
                      for p in groups])
    top = means.max() if len(means) else 0.0
    return [(passage.text, round(float(mean / top), 2) if top > 0 and mean > 0 else None)
            for passage, mean in zip(groups, means)]


def top_passages(groups: list[Passage], shares: np.ndarray, count: int = 3) -> list[Passage]:
    """The `count` passages with the highest mean share, most read first."""
    means = [shares[p.first_page:p.end_page].mean() for p in groups]
    order = sorted(range(len(groups)), key=lambda i: -means[i])
    return [groups[i] for i in order[:count] if means[i] > 0]
