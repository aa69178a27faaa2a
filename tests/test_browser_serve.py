"""End to end: `coursekit serve`'s upload page in headless Chromium, driven by Playwright.

Starts `coursekit serve` (a real uvicorn process) on 127.0.0.1 with a small exported pets model, opens the
page, chooses a mirror photo in the file input, and checks that the page shows the label `learn.predict`
gives, the top probabilities and the time taken; then sends a text file and checks the error shown.
Saves `test-artifacts/serve.png`. It never skips: without Chromium or Playwright it fails and says how to
install them."""
import sys
from pathlib import Path

import pytest

from coursekit.learner import load_learner

from serve_model import export_small_model, mirror_photos

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from bench_serve import free_port, start_server, stop  # noqa: E402  (the load benchmark's server helpers)
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
def test_upload_a_photo_on_the_page_and_see_the_label(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"No Chromium at {CHROMIUM}: install Debian's package with `apt-get install -y chromium` "
                    "(.ci/run does this).")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as err:
        pytest.fail(f"Playwright is not installed ({err}): `pip install -e '.[dev]'` installs it.")
    model = export_small_model(tmp_path)
    photo = mirror_photos()[0]
    expected = load_learner(model, device="cpu").predict(photo)[0]
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not a photo")
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    server = start_server(model, port, tmp_path / "serve.log")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--headless", "--no-sandbox", "--disable-gpu",
                                              "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": 900, "height": 900})
                page.set_default_timeout(60_000)
                outside = []
                page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
                    (f"http://127.0.0.1:{port}/", "blob:", "data:")) else None)
                page.goto(f"http://127.0.0.1:{port}/")
                page.set_input_files("#file", str(photo))
                expect(page.locator("#label")).to_have_text(expected, timeout=60_000)
                expect(page.locator("#top li")).to_have_count(2)
                expect(page.locator("#top li").first).to_contain_text(f"{expected}: ")
                expect(page.locator("#seconds")).to_contain_text("The server took")
                page.wait_for_function("() => { const i = document.getElementById('preview');"
                                       " return i.complete && i.naturalWidth > 0; }")
                page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)

                page.set_input_files("#file", str(not_an_image))
                expect(page.locator("#error")).to_contain_text("not an image")
                expect(page.locator("#label")).to_have_text("")
                assert outside == [], f"the page loaded something from elsewhere: {outside}"
            finally:
                browser.close()
    finally:
        stop(server)
    log = (tmp_path / "serve.log").read_text()
    assert "Serving" in log and "127.0.0.1" in log
