"""A person's path through the app in a real browser (Debian's Chromium, headless, driven by Playwright, 1440x1000):
a refused upload, a document that fills the context, questions until old turns must go, live metrics, the
heatmap's legend, the plots' titles clear of Plotly's toolbar (also at a phone's 400 px), Compare beside the chat,
"where the model looked", and the chat's trash icon. No element may show Gradio's error state at any point. Saves a
screenshot of the two-column app after Compare (to $QUEST_SCREENSHOT if set, which is how assets/screenshot.png is
made)."""
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from app import views
from app.documents import sample_text
from quest_core.config import default_config
from quest_core.session import Session, cut_document, measure_document

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and not os.environ.get("CI"):
    pytest.skip("needs Debian's chromium (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ERROR_STATE = '[data-testid="status-tracker"] .error'  # Gradio's red "Error" on a component
WHOLE_PLAY = "Hamlet, the whole play (~53K tokens: longer than the context)"
MILTON = "Milton, Areopagitica (~24K tokens: longer than the context)"
MAX_NEW_TOKENS = 24  # conftest.app_url's build_app(max_new_tokens=24)


def assert_no_error_state(page):
    assert page.locator(ERROR_STATE).count() == 0, "a component shows Gradio's error state"


def question(turn: int) -> str:
    return f"Question {turn}: what does Horatio say next?"


def answer_line(metrics: str) -> str:
    """The metrics' first line ("quest · 24 tokens · decode ..."), without the progress timer shown over it."""
    found = re.search(r"(quest|dense) · .*", metrics)
    return found.group(0) if found else ""


def tokens_in(metrics: str) -> int | None:
    found = re.search(r"· (\d+) tokens? · decode", metrics)
    return int(found.group(1)) if found else None


def words(text):
    """The words and numbers of a text: what survives the chat's markdown rendering and its line breaks."""
    return re.findall(r"[^\W_]+", text)


def shades(page) -> list[str]:
    """The background of every passage of "where the model looked"."""
    return page.locator("#looked .token").evaluate_all("nodes => nodes.map(n => n.style.backgroundColor)")


def assert_reads_in_order(page):
    """Each passage of "where the model looked" starts on the line where the one before it ends, or below: the text
    reads in order (Gradio's flex layout once set passages of several lines side by side, in columns)."""
    boxes = page.locator("#looked .token").evaluate_all(
        "nodes => nodes.map(n => { const r = n.getBoundingClientRect(); return [r.top, r.bottom]; })")
    line = page.locator("#looked .token").first.evaluate("n => parseFloat(getComputedStyle(n).lineHeight) || 20")
    for (_, bottom), (top, _) in zip(boxes, boxes[1:]):
        assert top >= bottom - 1.5 * line, (top, bottom, line)


def assert_passages_meet(page):
    """Where one passage of "where the model looked" ends and the next goes on in the same line, nothing is drawn
    between them (Gradio's markup has a space between its spans: a browser walk read "Claud ius")."""
    ends = page.locator("#looked .text").evaluate_all(
        "nodes => nodes.map(n => Array.from(n.getClientRects())).filter(r => r.length)"
        ".map(r => [r[0].left, r[0].top, r[r.length - 1].right, r[r.length - 1].top])")
    gaps = [left - right for (_, _, right, end_top), (left, top, _, _) in zip(ends, ends[1:]) if abs(top - end_top) < 2]
    assert gaps and max(abs(gap) for gap in gaps) < 1, gaps


def assert_titles_clear_of_the_mode_bar(page):
    """Each plot's title and subtitle lie within the figure and off Plotly's mode bar (its toolbar, shown on hover or
    touch; a browser walk at a phone's 400 px found it over the titles)."""
    for plot in ("speed-plot", "heads-plot", "time-plot"):
        boxes = page.locator(f"#{plot}").evaluate(
            "plot => { const box = e => e.getBoundingClientRect().toJSON(); return {bar: box(plot.querySelector("
            "'.modebar')), figure: box(plot.querySelector('.main-svg')), titles: Array.from(plot.querySelectorAll("
            "'.gtitle, .gtitle-subtitle')).map(box)}; }")
        bar, figure = boxes["bar"], boxes["figure"]
        assert boxes["titles"] and bar["width"] > 0, plot
        for title in boxes["titles"]:
            apart = (title["top"] >= bar["bottom"] or title["bottom"] <= bar["top"] or title["right"] <= bar["left"]
                     or title["left"] >= bar["right"])
            assert apart, (plot, title, bar)
            assert figure["left"] <= title["left"] and title["right"] <= figure["right"], (plot, title, figure)


def ask_and_watch(page, question: str) -> set[int]:
    """Send `question` and wait for its answer to end (the metrics say how it ended); returns the token counts the
    metrics showed on the way."""
    before = answer_line(page.locator("#metrics").inner_text())  # the last answer's: its context is shorter
    page.locator("#question textarea").fill(question)
    page.get_by_role("button", name="Send", exact=True).click()
    seen, deadline = set(), time.monotonic() + 300
    while time.monotonic() < deadline:
        line = answer_line(page.locator("#metrics").inner_text())
        if line != before and (count := tokens_in(line)) is not None:
            seen.add(count)
            if re.search(r"· (complete|cut at \d+ tokens?|stopped)$", line):
                return seen
        time.sleep(0.1)
    raise TimeoutError(f"no answer to {question!r}")


def test_fill_the_context_compare_and_see_where_the_model_looked(app_url, tmp_path, default_model):
    assert CHROMIUM, "CI must install Debian's chromium"
    model, tokenizer = default_model
    session = Session(model, tokenizer, default_config(model.config))  # the oracle: the app's settings, no app
    session.ingest(cut_document(tokenizer, model.config, sample_text(WHOLE_PLAY), "head"))
    first_answer = session.answer(question(0), max_new_tokens=MAX_NEW_TOKENS).text
    assert words(first_answer), "the engine gave an empty answer: the check below would prove nothing"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(app_url)

        empty = tmp_path / "empty.txt"
        empty.write_text("")
        page.locator("input[type=file]").set_input_files(str(empty))
        page.locator("#doc-info").get_by_text("Not loaded").wait_for(timeout=30_000)
        page.locator('[data-testid="toast-text"]').get_by_text("empty.txt is empty").wait_for(timeout=10_000)
        assert page.get_by_text("empty.txt", exact=True).count() == 0  # the file box let go of the refused file
        assert_no_error_state(page)

        page.get_by_role("tab", name="Sample").click()
        page.get_by_label("Sample").click()
        page.get_by_role("option", name=WHOLE_PLAY).click()
        page.locator("#doc-info").get_by_text("longer than the context", exact=False).wait_for(timeout=60_000)
        page.get_by_label("keep the head").check()
        page.locator("#doc-info").get_by_text("keeps its first").wait_for(timeout=60_000)  # the server has the choice
        for name in (MILTON, WHOLE_PLAY):  # another long document: the end chosen stays, and the note says so
            tokens = measure_document(tokenizer, model.config, sample_text(name)).tokens
            page.get_by_label("Sample").click()
            page.get_by_role("option", name=name).click()
            note = re.compile(f"{tokens:,} tokens: .* keeps its first")
            page.locator("#doc-info").get_by_text(note).wait_for(timeout=60_000)
        page.get_by_role("button", name="Load document").click()
        loaded = page.locator("#document").get_by_text("Document · ")  # loaded: the box folds and says so
        loaded.or_(page.locator("#doc-info").get_by_text("Not loaded")).wait_for(timeout=600_000)
        assert loaded.count(), page.locator("#doc-info").inner_text()  # a refusal says why
        assert_no_error_state(page)

        live = set()
        for turn in range(30):
            seen = ask_and_watch(page, question(turn))
            final = max(seen)
            live |= {count for count in seen if count < final}
            answer = page.locator('#chat [data-testid="bot"]').last
            expect(answer).to_have_text(re.compile(r"\w"))  # answers keep coming
            if turn == 0:  # the streamed answer is the engine's, word for word, under the attention it ran with
                assert words(answer.inner_text()) == words(views.attention_used(session.config)) + words(first_answer)
            assert_no_error_state(page)
            if page.locator("#chat").get_by_text("Context full").count():
                break
        assert page.locator("#chat").get_by_text("Context full").count(), "the context never filled"
        assert live, "the metrics did not change while an answer streamed"

        legend = page.locator("#heads-plot .legend").text_content()
        assert all(name in legend for name in ("read", "not read", "current page", "question's pages"))
        assert_titles_clear_of_the_mode_bar(page)
        page.set_viewport_size({"width": 400, "height": 800})  # a phone
        page.wait_for_timeout(1500)  # the plots follow the width
        assert_titles_clear_of_the_mode_bar(page)
        page.set_viewport_size({"width": 1440, "height": 1000})
        page.wait_for_timeout(1500)

        page.get_by_role("button", name="Compare dense vs Quest").click()
        page.locator("#verdict").get_by_text("Question:", exact=False).wait_for(timeout=600_000)
        assert_no_error_state(page)
        chat, dense, quest = (page.locator(f"#{name}").bounding_box() for name in ("chat", "dense-answer",
                                                                                    "quest-answer"))
        assert abs(dense["y"] - quest["y"]) < 2 and dense["x"] < quest["x"]  # side by side
        assert chat["x"] <= dense["x"] and quest["x"] + quest["width"] <= chat["x"] + chat["width"] + 1  # its column
        assert 0 < dense["y"] - (chat["y"] + chat["height"]) < 200 and dense["y"] < 1000  # right below it, on screen
        page.evaluate("window.scrollTo(0, 0)")
        shot = Path(os.environ.get("QUEST_SCREENSHOT", tmp_path / "screenshot.png"))
        page.screenshot(path=str(shot))

        page.get_by_role("tab", name="Where the model looked").click()
        page.locator("#looked .token").first.wait_for(timeout=10_000)
        whole_answer = shades(page)
        assert_reads_in_order(page)
        assert_passages_meet(page)
        assert sum(shade not in ("", "transparent", "rgba(0, 0, 0, 0)") for shade in whole_answer) >= 3
        page.locator("#answer-tokens .token").nth(2).click()
        page.locator("#looked-note").get_by_text("picked token", exact=False).wait_for(timeout=30_000)
        assert shades(page) != whole_answer  # one step's reads, not the whole answer's
        assert_no_error_state(page)

        page.locator("#chat").get_by_role("button", name="Clear").click()
        page.locator("#meter").get_by_text("conversation 0", exact=False).wait_for(timeout=60_000)
        assert_no_error_state(page)
        browser.close()
    assert shot.stat().st_size > 10_000


def test_load_takes_the_paste_box_edited_after_a_sample(app_url):
    """A sample picked, then the paste box edited and Load clicked at once: the edited text loads, not the sample
    (a browser walk loaded the sample over the edit: the server's reply that let go of the sample came after Load)."""
    own = "My own notes. The locker code is 4242. Nothing else is in this note."
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(app_url)
        page.get_by_role("tab", name="Sample").click()
        page.get_by_label("Sample").click()
        page.get_by_role("option", name="Hamlet, the opening (~6K tokens)").click()
        page.locator("#doc-info").get_by_text(re.compile(r"\d+% of the")).wait_for(timeout=60_000)
        page.get_by_role("tab", name="Paste").click()
        page.locator("#pasted textarea").fill(own)
        page.get_by_role("button", name="Load document").click()
        loaded = page.locator("#document").get_by_text("Document · ")
        loaded.or_(page.locator("#doc-info").get_by_text("Not loaded")).wait_for(timeout=120_000)
        assert "pasted text" in loaded.inner_text()
        assert_no_error_state(page)
        browser.close()


def test_the_note_follows_the_paste_box_while_typing(app_url, default_model):
    """The note under the paste box counts the text as it is typed, before the box loses focus (it was written on
    blur only: while someone typed, it described the text before)."""
    model, tokenizer = default_model
    first, more = "The locker code is 4242.", " Nothing else is in this note, which goes on a little longer."
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(app_url)
        page.get_by_role("tab", name="Paste").click()
        box = page.locator("#pasted textarea")
        for typed, text in ((first, first), (more, first + more)):
            box.press_sequentially(typed, delay=20)
            tokens = measure_document(tokenizer, model.config, text).tokens
            note = re.compile(rf"^{views.counted(tokens, 'token')}, \d+% of the")
            page.locator("#doc-info").get_by_text(note).wait_for(timeout=30_000)
            assert box.evaluate("box => box === document.activeElement")  # still typing: no blur
        assert_no_error_state(page)
        browser.close()
