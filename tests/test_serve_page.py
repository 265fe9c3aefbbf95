"""attnmt-serve's page in a real headless browser: Playwright driving the system's Chromium (Debian's
``chromium``; ``.ci/run`` installs it). Skipped, saying why, where either is missing.

The screenshot goes to ``$ATTNMT_SCREENSHOT`` when set: README's picture is this test's, run as
``ATTNMT_SERVE_CKPT=runs/quickstart/checkpoints/best.pt ATTNMT_SCREENSHOT=docs/serve.png pytest tests/test_serve_page.py``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from test_serve import FIXTURE_LINES, Server

pytest.importorskip("fastapi", reason="attnmt-serve needs the serve extra: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright: pip install -e '.[dev]'")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, as root in a sandbox, on a machine without a network: no sandbox, no background traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (.ci/run does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_the_page_translates_and_draws_each_layers_attention(browser, trained_checkpoint, tmp_path) -> None:
    import httpx

    ckpt = Path(os.environ.get("ATTNMT_SERVE_CKPT", trained_checkpoint))
    server = Server(ckpt)
    try:
        server.wait_ready()
        info = httpx.get(f"{server.url}/info").json()
        sentence = os.environ.get("ATTNMT_SERVE_SENTENCE", FIXTURE_LINES[4])
        expected = httpx.post(f"{server.url}/translate", json={"text": [sentence], "attention": True}).json()

        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(server.url)
        page.wait_for_function("document.getElementById('model').textContent.includes('engine=native')")
        page.fill("#source", sentence)
        page.click("#translate")
        page.wait_for_selector(".translation")

        assert page.inner_text(".translation") == expected["translations"][0]
        maps = expected["attention"][0]
        tables = page.query_selector_all("table.heatmap")
        assert len(tables) == info["architecture"]["decoder_layers"]
        for table in tables:
            rows = table.query_selector_all("tbody tr")
            assert len(rows) == len(maps["tgt_pieces"])  # one row per target piece, EOS included
            assert {len(row.query_selector_all("td")) for row in rows} == {len(maps["src_pieces"])}
            assert [h.inner_text() for h in table.query_selector_all("thead th")][1:] == maps["src_pieces"]
        # The mean over heads by default; one head's map when chosen.
        first_cell = "document.querySelector('table.heatmap tbody td').title"
        mean = sum(head[0][0] for head in maps["weights"][0]) / len(maps["weights"][0])
        assert page.evaluate(first_cell).endswith(f"{mean:.3f}")
        page.select_option("#head", "0")
        assert page.evaluate(first_cell).endswith(f"{maps['weights'][0][0][0][0]:.3f}")
        page.select_option("#head", "mean")
        page.screenshot(path=os.environ.get("ATTNMT_SCREENSHOT", str(tmp_path / "serve.png")), full_page=True)
        assert page.inner_text("#error") == ""
    finally:
        server.stop()
