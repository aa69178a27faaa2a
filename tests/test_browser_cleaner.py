"""End to end: the image cleaner in a real JupyterLab, driven by headless Chromium through Playwright.

Starts JupyterLab on 127.0.0.1 with a token in a temporary folder that holds a small notebook and eight
real pet photos in two class folders (copied from the dataset mirror), then, in the browser: runs the
notebook, waits for the thumbnails, deletes one image, relabels another, switches the class filter away
and back (the decisions must still show), checks `cleaned.csv` on disk, runs `apply()` from a cell and
checks the trash and the journal, then clicks Undo. Saves `test-artifacts/cleaner.png`.

It never skips: without Chromium or Playwright it fails and says how to install them.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CLASSES = ("Abyssinian", "beagle")
TOKEN = "coursekit-browser-test"


def mirror_images() -> Path:
    mirror = Path(os.environ.get("COURSEKIT_MIRROR", REPO.parent / "shared" / "datasets"))
    images = mirror / "oxford-iiit-pet" / "images"
    if not images.is_dir():
        pytest.fail(f"The pets images are not at {images}: set COURSEKIT_MIRROR to the dataset mirror.")
    return images


def make_notebook(folder: Path):
    cells = ["from coursekit.vision.widgets import ImageCleaner\n"
             "cleaner = ImageCleaner.from_folder('pets', page_size=8, thumb_size=140)\n"
             "cleaner",
             "moved = cleaner.apply()\nprint('APPLIED', len(moved))"]
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": c}
                    for c in cells],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    (folder / "cleaner.ipynb").write_text(json.dumps(nb))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(folder: Path, port: int) -> subprocess.Popen:
    jupyter = Path(sys.executable).parent / "jupyter"
    settings = folder / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(folder / ".runtime"), JUPYTER_CONFIG_DIR=str(folder / ".config"),
               JUPYTERLAB_SETTINGS_DIR=str(folder / ".settings"))
    cmd = [str(jupyter), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={folder}",
           f"--LabApp.workspaces_dir={folder / '.workspaces'}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0: cmd.append("--allow-root")  # CI containers run as root
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=open(folder / "lab.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{(folder / 'lab.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={TOKEN}", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"JupyterLab did not answer within 90 s:\n{(folder / 'lab.log').read_text()[-3000:]}")


def stop(proc: subprocess.Popen):
    proc.terminate()
    try: proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill(); proc.wait(timeout=15)


def run_cell(page, n: int):
    "Select cell `n` of the notebook and run it with Shift+Enter, until its prompt shows it ran or is running."
    cell = page.locator(".jp-Notebook .jp-Cell").nth(n)
    prompt = cell.locator(".jp-InputArea-prompt")
    for _ in range(5):
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        try:
            page.wait_for_function("p => /\\[(\\*|\\d+)\\]/.test(p.textContent)", arg=prompt.element_handle(), timeout=10_000)
            return
        except Exception:
            continue  # the kernel was not connected yet: try again
    raise AssertionError(f"cell {n} did not start running after 5 tries")


TILE_STATE = """() => [...document.querySelectorAll('.ck-tile')]
    .filter(t => t.offsetParent !== null)
    .map(t => [t.querySelector('.ck-fname').textContent, t.querySelector('.ck-status').textContent,
               t.querySelector('.ck-label input').value])"""


def tile_state(page) -> list:
    "[file name, status, label box value] of each visible tile."
    return page.evaluate(TILE_STATE)


@pytest.mark.browser
def test_image_cleaner_in_jupyterlab():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"No Chromium at {CHROMIUM}: install Debian's package with `apt-get install -y chromium` "
                    "(.ci/run does this).")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as err:
        pytest.fail(f"Playwright is not installed ({err}): `pip install -e '.[dev]'` installs it.")

    work = Path(tempfile.mkdtemp(prefix="coursekit-browser-"))
    images = mirror_images()
    for cls in CLASSES:
        (work / "pets" / cls).mkdir(parents=True)
        for f in sorted(images.glob(f"{cls}_*.jpg"))[:4]: shutil.copy(f, work / "pets" / cls / f.name)
    make_notebook(work)
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    lab = start_lab(work, port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--headless", "--no-sandbox", "--disable-gpu",
                                              "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/lab/tree/cleaner.ipynb?token={TOKEN}")
                page.locator(".jp-Notebook .jp-Cell").first.wait_for()
                expect(page.locator(".jp-StatusBar-Widget", has_text="Idle").first).to_be_visible(timeout=90_000)
                run_cell(page, 0)

                # the thumbnails render: 8 tiles, every image decoded by the browser
                tiles = page.locator(".ck-tile:visible")
                expect(tiles).to_have_count(8, timeout=40_000)
                page.wait_for_function("""() => { const imgs = [...document.querySelectorAll('.ck-tile img')]
                    .filter(i => i.offsetParent !== null);
                    return imgs.length == 8 && imgs.every(i => i.complete && i.naturalWidth > 0); }""")
                before = tile_state(page)
                assert [s for _, s, _ in before] == ["todo"] * 8, before
                assert page.locator(".ck-counter").inner_text() == "0 of 8 reviewed"
                (f0, _, label0), (f1, _, label1) = before[0], before[1]
                new_label = next(c for c in CLASSES if c != label1)

                # delete one, relabel another
                tiles.nth(0).locator("button.ck-delete").click()
                page.wait_for_function("() => document.querySelectorAll('.ck-tile')[0].classList.contains('ck-deleted')")
                box = tiles.nth(1).locator(".ck-label input")
                box.fill(new_label)
                box.press("Enter")
                page.wait_for_function("() => document.querySelectorAll('.ck-tile')[1].classList.contains('ck-relabelled')")
                expect(page.locator(".ck-counter")).to_have_text("2 of 8 reviewed")

                # switch the class filter to the other class and back: the decisions are still shown
                other = next(c for c in CLASSES if c != label0)
                page.locator(".ck-class-filter select").select_option(label=other)
                page.wait_for_function(f"""() => [...document.querySelectorAll('.ck-tile')]
                    .filter(t => t.offsetParent !== null)
                    .every(t => t.querySelector('.ck-fname').textContent.startsWith('{other}/'))""")
                page.locator(".ck-class-filter select").select_option(label="all classes")
                expected = [[f0, "deleted", label0], [f1, "relabelled", new_label]]
                expected += [[f, "todo", lbl] for f, _, lbl in before[2:]]
                try:  # the page is redrawn by many small widget updates: wait until all of them arrived
                    want = json.dumps(json.dumps(expected, separators=(",", ":")))
                    page.wait_for_function(f"() => JSON.stringify(({TILE_STATE})()) == {want}", timeout=30_000)
                except Exception as err:
                    raise AssertionError(f"after switching the filter back the tiles show {tile_state(page)}, "
                                         f"expected {expected}") from err
                page.screenshot(path=str(ARTIFACTS / "cleaner.png"), full_page=True)

                # cleaned.csv on disk holds both decisions
                df = pd.read_csv(work / "pets" / "cleaned.csv").set_index("fname")
                assert len(df) == 8 and int(df.reviewed.sum()) == 2
                assert bool(df.loc[f0, "deleted"]) and df.loc[f1, "label"] == new_label and not bool(df.loc[f1, "deleted"])

                # apply() from a cell: the deleted file goes to the trash, the relabelled one to its class folder
                run_cell(page, 1)
                expect(page.locator(".jp-OutputArea-output", has_text="APPLIED 2")).to_be_visible(timeout=60_000)
                name1 = Path(f1).name
                assert (work / "pets" / ".trash" / f0).is_file() and not (work / "pets" / f0).exists()
                assert (work / "pets" / new_label / name1).is_file() and not (work / "pets" / f1).exists()
                journal = [json.loads(line) for line in (work / "pets" / ".trash" / "journal.jsonl").read_text().splitlines()]
                journal = [e for e in journal if e["op"] == "move"]  # the other lines: "saved" notes of cleaned.csv
                assert [(e["src"], e["dst"]) for e in journal] == [(f0, f".trash/{f0}"), (f1, f"{new_label}/{name1}")]
                assert all(e["time"] and e["reason"] for e in journal)
                df = pd.read_csv(work / "pets" / "cleaned.csv")
                assert set(df.fname) == {f for f, _, _ in before} - {f0, f1} | {f".trash/{f0}", f"{new_label}/{name1}"}

                # Undo in the widget puts both files back
                page.locator("button.ck-undo").click()
                expect(page.locator(".ck-message")).to_contain_text("moved 2 files back")
                assert (work / "pets" / f0).is_file() and (work / "pets" / f1).is_file()
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "cleaner-failure.png"), full_page=True)
                shutil.copy(work / "lab.log", ARTIFACTS / "cleaner-failure-lab.log")
                raise
            finally:
                browser.close()
    finally:
        stop(lab)
        shutil.rmtree(work, ignore_errors=True)
