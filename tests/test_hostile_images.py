"""Hostile and broken input for `download_images`, `verify_images` and the cleaner's thumbnails (issue 13).

- only http(s) URLs are fetched: `file://`, `ftp://`, `data:` and plain paths are reported as failed;
- whatever is saved decodes as an image: an HTML page, a truncated file, a decompression bomb and a body
  above the size cap are refused, the cap enforced while streaming (the server stops being read);
- nothing appears in the destination folder unless it passed those checks;
- `verify_images` reports a decompression bomb as too large instead of crashing, and an unreadable file
  as unreadable, without touching its neighbours (as root, mode 000 does not stop a read: the check then
  runs in a forked process that has dropped to the `nobody` user, where it does);
- the cleaner shows a placeholder for a file it cannot read, and a click on that tile acts on that file.
All network tests use a server on 127.0.0.1 in a thread.
"""
import http.server
import io
import multiprocessing
import os
import shutil
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from coursekit.vision.utils import TRASH_FOLDER, download_images, image_problem, url_file_stem, verify_images
from coursekit.vision.widgets import ImageCleaner

FORK = multiprocessing.get_context("fork")


def png_bytes(size=(16, 12), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width=40_000, height=40_000) -> bytes:
    "A PNG of a few hundred bytes that declares width × height pixels."
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


class Hostile(http.server.BaseHTTPRequestHandler):
    "Serves good images and hostile answers; counts the bytes it managed to send per path."
    sent = {}

    def log_message(self, *args): pass

    def send_body(self, body: bytes, content_type="image/png", length=True):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if length: self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        try:
            self.answer()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading, as it should

    def answer(self):
        path = self.path
        if path == "/good.png": return self.send_body(png_bytes())
        if path == "/png-named.jpg": return self.send_body(png_bytes(colour="blue"), content_type="image/jpeg")
        if path == "/page.jpg": return self.send_body(b"<html><body>Please log in</body></html>", "text/html")
        if path == "/truncated.png": return self.send_body(png_bytes((200, 200))[:300])
        if path == "/bomb.png": return self.send_body(bomb_png())
        if path == "/to-file": return self.redirect("file:///etc/passwd")
        if path == "/drip.jpg": return self.drip()
        if path == "/to-ftp": return self.redirect("ftp://127.0.0.1/x.png")
        if path == "/declared-huge.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(200 * 2**20))
            self.end_headers()
            return self.stream(200 * 2**20)
        if path == "/endless.jpg":  # 200 MB with no Content-Length
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            return self.stream(200 * 2**20)
        self.send_error(404)

    def drip(self):
        "A byte every 0.2 s, for ever: each read is quick, the whole never ends."
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        for _ in range(600):
            self.wfile.write(b"\xff")
            self.wfile.flush()
            time.sleep(0.2)

    def redirect(self, where: str):
        self.send_response(302)
        self.send_header("Location", where)
        self.end_headers()

    def stream(self, n: int):
        block = b"\xff" * 65536
        Hostile.sent[self.path] = 0
        while Hostile.sent[self.path] < n:
            self.wfile.write(block)
            Hostile.sent[self.path] += len(block)


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_only_http_urls_are_fetched(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    dest = tmp_path / "dest"
    urls = ["file:///etc/passwd", f"file://{secret}", "ftp://127.0.0.1/x.png", "data:image/png;base64,iVBORw0KGgo=",
            str(secret), "javascript:alert(1)"]
    res = download_images(urls, dest)
    assert res.downloaded == [] and sorted(res.failed) == sorted(urls)
    assert all("only http" in why for why in res.failed.values()), res.failed
    assert list(dest.iterdir()) == []


def test_what_is_saved_decodes_as_an_image(tmp_path, server):
    dest = tmp_path / "dest"
    urls = {name: f"{server}/{name}" for name in ("good.png", "png-named.jpg", "page.jpg", "truncated.png", "bomb.png",
                                                   "to-file", "to-ftp", "missing.png")}
    res = download_images(list(urls.values()), dest, n_workers=4, timeout=5, retries=0)
    assert sorted(p.name for p in res.downloaded) == sorted([url_file_stem(urls["good.png"]) + ".png",
                                                              url_file_stem(urls["png-named.jpg"]) + ".png"])
    why = {name: res.failed.get(url, "") for name, url in urls.items()}
    assert "not an image" in why["page.jpg"], why
    assert "truncated" in why["truncated.png"], why
    assert "too large" in why["bomb.png"], why
    assert why["to-file"] and why["to-ftp"] and "404" in why["missing.png"], why
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in res.downloaded)  # no leftovers
    assert len(verify_images(dest)) == 0


def test_size_cap_is_enforced_while_streaming(tmp_path, server):
    dest = tmp_path / "dest"
    t0 = time.perf_counter()
    res = download_images([f"{server}/endless.jpg", f"{server}/declared-huge.jpg"], dest, n_workers=2, timeout=5,
                          retries=0, max_bytes=2**20)
    assert time.perf_counter() - t0 < 20
    assert res.downloaded == [] and len(res.failed) == 2
    assert all("larger than" in why for why in res.failed.values()), res.failed
    time.sleep(0.5)
    assert Hostile.sent["/endless.jpg"] < 40 * 2**20, "the whole body was read: the cap was not applied while streaming"
    assert list(dest.iterdir()) == []


def test_a_server_that_drips_is_abandoned_at_the_deadline(tmp_path, server):
    t0 = time.perf_counter()
    res = download_images([f"{server}/drip.jpg"], tmp_path / "dest", timeout=2, retries=0, deadline=1.5)
    assert time.perf_counter() - t0 < 10
    assert "deadline" in res.failed[f"{server}/drip.jpg"], res.failed
    assert list((tmp_path / "dest").iterdir()) == []


def test_a_single_non_http_url_string_is_reported_not_read_as_a_file(tmp_path):
    res = download_images("file:///etc/passwd", tmp_path / "dest")
    assert list(res.failed) == ["file:///etc/passwd"] and "only http" in res.failed["file:///etc/passwd"]


def test_decompression_bomb_is_reported_as_too_large(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "good.png").write_bytes(png_bytes())
    assert "too large" in image_problem(folder / "bomb.png")
    check = verify_images(folder)
    assert {p.name: why for p, why in check.bad.items()}.keys() == {"bomb.png"}
    assert "pixels" in check.bad[folder / "bomb.png"]
    check = verify_images(folder, delete=True)
    assert check.moved == {folder / "bomb.png": ".trash/bomb.png"} and (folder / "good.png").is_file()


def test_a_link_to_a_file_elsewhere_is_reported_not_moved(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (tmp_path / "page.html").write_bytes(b"<html>a page outside the dataset</html>")
    (folder / "link.jpg").symlink_to(tmp_path / "page.html")
    (folder / "broken.jpg").write_bytes(b"broken")
    check = verify_images(folder, delete=True)
    assert "not moved" in check.bad[folder / "link.jpg"] and "outside the dataset folder" in check.bad[folder / "link.jpg"]
    assert check.moved == {folder / "broken.jpg": ".trash/broken.jpg"}
    assert (folder / "link.jpg").is_symlink() and (tmp_path / "page.html").is_file()


def unprivileged(target, *args):
    "Run `target(*args)` in a forked process that cannot read mode-000 files (it drops to `nobody` when run as root)."
    parent_conn, child_conn = FORK.Pipe()

    def run():
        try:
            if os.geteuid() == 0:
                os.setegid(65534)
                os.seteuid(65534)
            child_conn.send(("ok", target(*args)))
        except BaseException as err:
            child_conn.send(("error", f"{type(err).__name__}: {err}"))
        finally:
            os._exit(0)

    proc = FORK.Process(target=run)
    proc.start()
    assert parent_conn.poll(60), "the unprivileged process did not answer"
    kind, value = parent_conn.recv()
    proc.join(10)
    assert kind == "ok", value
    return value


@pytest.fixture()
def open_tmp():
    "A temporary folder that the `nobody` user may enter (pytest's own are private to the user running the tests)."
    base = Path(tempfile.mkdtemp(prefix="coursekit-unreadable-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def unreadable_folder(base: Path) -> Path:
    "a.png, b.png (mode 000), c.png and d.png in cats/, in folders an unprivileged process may write to."
    folder = base / "data"
    (folder / "cats").mkdir(parents=True)
    for name, colour in (("a.png", "red"), ("b.png", "green"), ("c.png", "blue"), ("d.png", "white")):
        (folder / "cats" / name).write_bytes(png_bytes(colour=colour))
    (folder / "cats" / "b.png").chmod(0)
    for d in (folder, folder / "cats"):
        d.chmod(0o777)
    return folder


def _verify_unreadable(folder: Path):
    Image.init()
    with open(folder / "cats" / "a.png", "rb"): pass
    try:
        open(folder / "cats" / "b.png", "rb").close()
        return "b.png is readable: the test cannot simulate an unreadable file here"
    except PermissionError:
        pass
    check = verify_images(folder, delete=True)
    return {Path(p).name: why for p, why in check.bad.items()}, {Path(p).name: d for p, d in check.moved.items()}


def test_unreadable_image_is_reported_and_neighbours_are_untouched(open_tmp):
    folder = unreadable_folder(open_tmp)
    before = {p.name: p.read_bytes() for p in (folder / "cats").iterdir() if p.name != "b.png"}
    result = unprivileged(_verify_unreadable, folder)
    assert not isinstance(result, str), result
    bad, moved = result
    assert list(bad) == ["b.png"] and "unreadable" in bad["b.png"], bad
    assert moved == {}, "an unreadable file is reported, not moved: its permissions need fixing, not the trash"
    assert {p.name: p.read_bytes() for p in (folder / "cats").iterdir() if p.name != "b.png"} == before
    assert (folder / "cats" / "b.png").exists() and not (folder / TRASH_FOLDER / "cats" / "a.png").exists()


def _clean_unreadable(folder: Path):
    Image.init()
    cleaner = ImageCleaner.from_folder(folder, page_size=2)
    cleaner.next_button.click()
    cleaner.prev_button.click()
    shown = {cleaner.state.items[t.i].fname: ("cannot" in t.caption.value, len(t.image.value) > 0)
             for t in cleaner.tiles if t.i is not None}
    tile = next(t for t in cleaner.tiles if t.i is not None and cleaner.state.items[t.i].fname == "cats/b.png")
    tile.delete_button.click()
    moved = cleaner.apply()
    cleaner.close()
    return shown, moved


def test_cleaner_shows_an_unreadable_image_and_acts_on_exactly_that_file(open_tmp):
    folder = unreadable_folder(open_tmp)
    shown, moved = unprivileged(_clean_unreadable, folder)
    assert shown == {"cats/a.png": (False, True), "cats/b.png": (True, True)}, shown
    assert moved == {"cats/b.png": ".trash/cats/b.png"}
    assert sorted(p.name for p in (folder / "cats").iterdir()) == ["a.png", "c.png", "d.png"]
