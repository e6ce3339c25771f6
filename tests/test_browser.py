"""A person's path through the app in a real browser (Debian's Chromium, headless, driven by Playwright):
upload -> load -> ask -> streamed tokens -> heatmap -> toggle mode -> Compare. Saves a screenshot
(to $QUEST_SCREENSHOT if set, which is how assets/screenshot.png is made)."""
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from quest_core.config import default_config
from quest_core.session import Session

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and not os.environ.get("CI"):
    pytest.skip("needs Debian's chromium (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
QUESTION = "Who is Francisco?"
MAX_NEW_TOKENS = 24  # conftest.app_url's build_app(max_new_tokens=24)


def words(text):
    """The words and numbers of a text: what survives the chat's markdown rendering and its line breaks."""
    return re.findall(r"[^\W_]+", text)


def last_answer_shown(page, expected, timeout_s=120):
    """The text of the chat's last assistant message, once it is `expected` (read again until then: it streams)
    or `timeout_s` has passed."""
    message = page.locator("#chat [data-testid=bot]").last
    deadline = time.monotonic() + timeout_s
    while True:
        shown = message.inner_text() if message.count() else ""
        if words(shown) == words(expected) or time.monotonic() > deadline:
            return shown
        time.sleep(0.5)


def test_upload_ask_heatmap_toggle_compare(app_url, tmp_path, default_model):
    assert CHROMIUM, "CI must install Debian's chromium"
    model, tokenizer = default_model
    ids = tokenizer(ROOT.joinpath("assets", "hamlet.txt").read_text(), add_special_tokens=False)["input_ids"]
    document = tmp_path / "hamlet_start.txt"
    document.write_text(tokenizer.decode(ids[:1500]))
    session = Session(model, tokenizer, default_config(model.config))  # the oracle: the app's settings, no app
    session.ingest(document.read_text())
    expected = session.answer(QUESTION, max_new_tokens=MAX_NEW_TOKENS).text
    assert words(expected), "the engine gave an empty answer: the check below would prove nothing"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1800})
        page.goto(app_url)
        page.locator("input[type=file]").set_input_files(str(document))
        page.locator("#doc-info").get_by_text("tokens, ", exact=False).wait_for(timeout=30_000)
        page.get_by_role("button", name="Load document").click()
        page.locator("#load-status").get_by_text("Loaded").wait_for(timeout=120_000)

        page.get_by_placeholder("Ask about the document").fill(QUESTION)
        page.get_by_role("button", name="Send").click()
        shown = last_answer_shown(page, expected)
        assert words(shown) == words(expected), (shown, expected)  # the streamed answer is the engine's
        page.locator("#metrics").get_by_text("tok/s").wait_for(timeout=120_000)
        page.locator("#heads-plot .js-plotly-plot").wait_for(timeout=60_000)
        assert page.locator("#heads-plot .heatmaplayer, #heads-plot .hm, #heads-plot image").count() > 0

        page.locator("#mode").get_by_text("dense").click()
        page.get_by_role("button", name="Compare dense vs Quest").click()
        page.locator("#verdict").get_by_text("answers", exact=False).or_(
            page.locator("#verdict").get_by_text("diverge", exact=False)).first.wait_for(timeout=180_000)
        shot = Path(os.environ.get("QUEST_SCREENSHOT", tmp_path / "screenshot.png"))
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
