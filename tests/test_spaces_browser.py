"""The classification demo in a real browser (Debian chromium driven by Playwright): upload an image, read the label.

Needs `apt-get install -y chromium`; skipped where /usr/bin/chromium is missing. The screenshot is kept as a test
artefact in the test's tmp folder; HFTL_UPDATE_SCREENSHOT=1 also copies it to docs/space-screenshot.png.
"""

import os
import shutil
from pathlib import Path

import pytest
from gradio_client import handle_file
from PIL import Image

from tests.test_spaces import serving

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_upload_in_the_browser_shows_the_predicted_label(browser, tiny_vit_dir, tmp_path):
    upload = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(upload)
    with serving(tiny_vit_dir, "image-classification") as client:
        expected = client.predict(handle_file(upload), api_name="/predict")[0]["label"]
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(client.src, wait_until="networkidle")
        page.locator("#input-image input[type=file]").set_input_files(upload)
        page.locator("#input-image img").first.wait_for(timeout=15_000)
        page.locator("#predict").click()
        shown = page.locator("#labels [data-testid=label-output-value]")
        shown.wait_for(timeout=15_000)
        assert shown.inner_text().strip() == expected
        assert "Model:" in page.locator("body").inner_text()
        screenshot = tmp_path / "space-screenshot.png"
        page.screenshot(path=screenshot, full_page=True)
        assert screenshot.stat().st_size > 10_000
        if os.environ.get("HFTL_UPDATE_SCREENSHOT") == "1":
            shutil.copy(screenshot, Path(__file__).resolve().parents[1] / "docs" / "space-screenshot.png")

        not_an_image = tmp_path / "notes.txt"
        not_an_image.write_text("not pixels")
        page.locator("#input-image input[type=file]").set_input_files(not_an_image)
        page.get_by_text("Invalid file type: notes.txt").first.wait_for(timeout=15_000)
        page.locator("#predict").click()  # the earlier image is kept and still served
        page.wait_for_load_state("networkidle")
        assert shown.inner_text().strip() == expected
        page.close()
