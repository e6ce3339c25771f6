"""A person's path through the app in a real browser (Debian's Chromium, headless, driven by Playwright):
upload -> load -> ask -> streamed tokens -> heatmap -> toggle mode -> Compare. Saves a screenshot
(to $QUEST_SCREENSHOT if set, which is how assets/screenshot.png is made)."""
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and not os.environ.get("CI"):
    pytest.skip("needs Debian's chromium (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def test_upload_ask_heatmap_toggle_compare(app_url, tmp_path, default_model):
    assert CHROMIUM, "CI must install Debian's chromium"
    _, tokenizer = default_model
    ids = tokenizer(ROOT.joinpath("assets", "hamlet.txt").read_text(), add_special_tokens=False)["input_ids"]
    document = tmp_path / "hamlet_start.txt"
    document.write_text(tokenizer.decode(ids[:1500]))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1800})
        page.goto(app_url)
        page.locator("input[type=file]").set_input_files(str(document))
        page.locator("#doc-info").get_by_text("tokens, ", exact=False).wait_for(timeout=30_000)
        page.get_by_role("button", name="Load document").click()
        page.locator("#load-status").get_by_text("Loaded").wait_for(timeout=120_000)

        page.get_by_placeholder("Ask about the document").fill("Who is Francisco?")
        page.get_by_role("button", name="Send").click()
        chat = page.locator("#chat")
        page.wait_for_function("() => document.querySelector('#chat').innerText.length > 40", timeout=60_000)
        page.locator("#metrics").get_by_text("tok/s").wait_for(timeout=120_000)
        page.locator("#heads-plot .js-plotly-plot").wait_for(timeout=60_000)
        assert page.locator("#heads-plot .heatmaplayer, #heads-plot .hm, #heads-plot image").count() > 0
        assert "Francisco" in chat.inner_text()

        page.locator("#mode").get_by_text("dense").click()
        page.get_by_role("button", name="Compare dense vs Quest").click()
        page.locator("#verdict").get_by_text("answers", exact=False).or_(
            page.locator("#verdict").get_by_text("diverge", exact=False)).first.wait_for(timeout=180_000)
        shot = Path(os.environ.get("QUEST_SCREENSHOT", tmp_path / "screenshot.png"))
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
