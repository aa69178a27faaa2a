"""Downloads, checksums and safe extraction of `coursekit.data.external`, against a local HTTP server.

Every test builds its own archives in `tmp_path`, serves them from 127.0.0.1 on a random port, and
points `COURSEKIT_DATA` at `tmp_path`; nothing touches the network or the real data folder.
"""
import io
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pytest

from coursekit.data import external
from coursekit.data.external import (CATALOGUE, CatalogueEntry, ChecksumError, DownloadError, UnsafeArchiveError,
                                     download_url, file_hashes, untar_data)
from local_http import serving
from toy_catalogue import pin


class _Handler(SimpleHTTPRequestHandler):
    "Serves files from a folder, records each requested path, and can send a truncated body on `/short/...`."
    requests: list

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.startswith("/short/"):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"only a few bytes")
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args): pass


@pytest.fixture
def server(tmp_path):
    "A threaded HTTP server on 127.0.0.1 serving `tmp_path/served`; yields (base URL, served folder, request log)."
    served = tmp_path / "served"
    served.mkdir()
    requests = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    with serving(served, handler) as base:
        yield base, served, requests


@pytest.fixture(autouse=True)
def data_env(tmp_path, monkeypatch):
    "Every test downloads into `tmp_path/data`, with no mirror and no stand-ins."
    monkeypatch.setenv("COURSEKIT_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("COURSEKIT_MIRROR", raising=False)
    monkeypatch.delenv("COURSEKIT_ALLOW_STANDIN", raising=False)
    return tmp_path / "data"


def make_tgz(path: Path, files=(), symlinks=(), hardlinks=()) -> Path:
    "A gzipped tar with `symlinks`, then `files` (name, bytes), then `hardlinks` (name, target), in that order."
    def add_links(tar, kind, links):
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    with tarfile.open(path, "w:gz") as tar:
        add_links(tar, tarfile.SYMTYPE, symlinks)   # first, so that a later file could be written through a link
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add_links(tar, tarfile.LNKTYPE, hardlinks)
    return path


def make_zip(path: Path, files) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files: zf.writestr(name, data)
    return path


GOOD_FILES = [("toyset/labels.csv", b"name,label\na.png,cat\n"), ("toyset/images/a.png", b"\x89PNG fake")]


def test_good_archive_downloads_verifies_extracts_then_is_reused(server, monkeypatch, data_env):
    base, served, requests = server
    make_tgz(served / "toyset.tgz", GOOD_FILES)
    entry = pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz", "toyset")
    path = untar_data("TOY")
    assert path == data_env / "toyset"
    assert (path / "labels.csv").read_bytes() == GOOD_FILES[0][1]
    assert (path / "images" / "a.png").read_bytes() == GOOD_FILES[1][1]
    assert requests == ["/toyset.tgz"]
    assert (data_env / "toyset.tgz").is_file() and not (data_env / "toyset.tgz.part").exists()
    assert sorted(p.name for p in data_env.iterdir()) == ["toyset", "toyset.tgz"]  # no temporary folders left
    assert untar_data(entry.url) == path                                             # by URL too
    assert requests == ["/toyset.tgz"], "a second call must reuse the folder without a request"


def test_force_download_fetches_again_and_replaces_the_folder(server, monkeypatch, data_env):
    base, served, requests = server
    make_tgz(served / "toyset.tgz", GOOD_FILES)
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz", "toyset")
    path = untar_data("TOY")
    (path / "stale.txt").write_text("from an older version")
    assert untar_data("TOY", force_download=True) == path
    assert len(requests) == 2
    assert not (path / "stale.txt").exists() and (path / "labels.csv").is_file()
    assert sorted(p.name for p in data_env.iterdir()) == ["toyset", "toyset.tgz"]


def test_bad_checksum_names_both_hashes_and_extracts_nothing(server, monkeypatch, data_env):
    base, served, _ = server
    make_tgz(served / "toyset.tgz", GOOD_FILES)
    wrong = "0" * 64
    entry = pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz", "toyset", sha256=wrong)
    with pytest.raises(ChecksumError) as info:
        untar_data("TOY")
    message = str(info.value)
    assert wrong in message and file_hashes(served / "toyset.tgz")["sha256"] in message
    assert entry.url in message and "deleted" in message
    assert sorted(p.name for p in data_env.iterdir()) == []   # a failed download is never kept, nor extracted


def test_wrong_size_or_fastai_md5_is_refused(server, monkeypatch, data_env):
    base, served, _ = server
    make_tgz(served / "toyset.tgz", GOOD_FILES)
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz", "toyset", sha256=None, md5_first_mib="f" * 32)
    with pytest.raises(ChecksumError, match="md5_first_mib: expected f{32}"):
        untar_data("TOY")
    assert not (data_env / "toyset").exists()


def test_archive_already_in_data_folder_is_checked_and_never_deleted(server, monkeypatch, data_env):
    base, served, requests = server
    make_tgz(served / "toyset.tgz", GOOD_FILES)
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz", "toyset")
    data_env.mkdir(parents=True)
    (data_env / "toyset.tgz").write_bytes(b"a damaged copy")
    with pytest.raises(ChecksumError, match="left untouched|does not match"):
        untar_data("TOY")
    assert (data_env / "toyset.tgz").read_bytes() == b"a damaged copy"
    assert requests == [] and not (data_env / "toyset").exists()
    # a good copy put there by hand is used without any request
    (data_env / "toyset.tgz").write_bytes((served / "toyset.tgz").read_bytes())
    assert (untar_data("TOY") / "labels.csv").is_file() and requests == []


UNSAFE = {
    "dotdot": dict(files=[("toyset/ok.txt", b"ok"), ("toyset/../../evil.txt", b"pwned")]),
    "absolute": dict(files=[("toyset/ok.txt", b"ok"), ("ABSOLUTE", b"pwned")]),
    "symlink_out": dict(files=[("toyset/ok.txt", b"ok")], symlinks=[("toyset/escape", "../../..")]),
    "symlink_then_write": dict(symlinks=[("toyset/escape", "../..")], files=[("toyset/escape/evil.txt", b"pwned")]),
    "absolute_symlink": dict(symlinks=[("toyset/escape", "ABSOLUTE_DIR")]),
    "hardlink_out": dict(files=[("toyset/ok.txt", b"ok")], hardlinks=[("toyset/h", "../evil.txt")]),
}


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_tar_members_are_refused_and_nothing_is_written(kind, server, monkeypatch, data_env, tmp_path):
    base, served, _ = server
    outside = tmp_path / "evil.txt"
    members = {key: [(n.replace("ABSOLUTE_DIR", str(tmp_path)).replace("ABSOLUTE", str(outside)),
                      t.replace("ABSOLUTE_DIR", str(tmp_path)) if isinstance(t, str) else t) for n, t in value]
               for key, value in UNSAFE[kind].items()}
    make_tgz(served / "toyset.tgz", **members)
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz", "toyset")
    with pytest.raises(UnsafeArchiveError, match="Refusing to extract"):
        untar_data("TOY")
    assert not outside.exists()
    assert not (data_env / "toyset").exists()
    assert sorted(p.name for p in data_env.iterdir()) == ["toyset.tgz"]  # the verified archive, nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "served"]


def test_zip_archives_extract(server, monkeypatch, data_env):
    base, served, _ = server
    make_zip(served / "ml-toy.zip", [("ml-toy/u.data", b"1\t2\t5\t0\n"), ("ml-toy/README", b"toy")])
    pin(monkeypatch, served / "ml-toy.zip", f"{base}/ml-toy.zip", "ml-toy")
    path = untar_data("TOY")
    assert path == data_env / "ml-toy" and (path / "u.data").read_bytes() == b"1\t2\t5\t0\n"


@pytest.mark.parametrize("bad_name", ["../evil.txt", "ABSOLUTE", "ml-toy/../../evil.txt"])
def test_unsafe_zip_members_are_refused(bad_name, server, monkeypatch, data_env, tmp_path):
    base, served, _ = server
    bad_name = bad_name.replace("ABSOLUTE", str(tmp_path / "evil.txt"))
    make_zip(served / "ml-toy.zip", [("ml-toy/u.data", b"x"), (bad_name, b"pwned")])
    pin(monkeypatch, served / "ml-toy.zip", f"{base}/ml-toy.zip", "ml-toy")
    with pytest.raises(UnsafeArchiveError):
        untar_data("TOY")
    assert not (tmp_path / "evil.txt").exists() and not (data_env / "ml-toy").exists()


def test_http_404_is_a_clear_download_error(server, monkeypatch, data_env):
    base, served, _ = server
    make_tgz(served / "toyset.tgz", GOOD_FILES)
    entry = pin(monkeypatch, served / "toyset.tgz", f"{base}/missing.tgz", "toyset")
    with pytest.raises(DownloadError) as info:
        untar_data("TOY")
    text = str(info.value) + "\n".join(getattr(info.value, "__notes__", []))
    assert "404" in text and entry.url in text
    assert "COURSEKIT_MIRROR" in text and "missing.tgz" in text
    assert not data_env.exists() or not any(data_env.iterdir())


def test_server_down_is_a_clear_download_error(monkeypatch, data_env):
    with socket.socket() as s:   # a port that nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/toyset.tgz"
    monkeypatch.setitem(CATALOGUE, "TOY", CatalogueEntry(name="TOY", url=url, folder="toyset", size=10, sha256="0" * 64))
    with pytest.raises(DownloadError) as info:
        untar_data("TOY")
    text = str(info.value) + "\n".join(getattr(info.value, "__notes__", []))
    assert url in text and "COURSEKIT_MIRROR" in text and str(data_env) in text
    assert not (data_env / "toyset.tgz.part").exists()


def test_truncated_transfer_is_a_download_error(server, tmp_path):
    base, _, _ = server
    with pytest.raises(DownloadError, match="received 16 of 100000 bytes"):
        download_url(f"{base}/short/toyset.tgz", tmp_path / "x.tgz", show_progress=False)
    assert not (tmp_path / "x.tgz").exists() and not (tmp_path / "x.tgz.part").exists()


def test_a_silent_server_times_out(tmp_path):
    with socket.socket() as s:   # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/toyset.tgz"
        with pytest.raises(DownloadError, match="toyset.tgz"):
            download_url(url, tmp_path / "x.tgz", timeout=0.5, show_progress=False)


def test_mirror_is_used_without_any_request(server, monkeypatch, tmp_path):
    base, served, requests = server
    make_tgz(served / "toyset.tgz", GOOD_FILES)
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz", "toyset")
    (tmp_path / "mirror" / "toyset").mkdir(parents=True)
    monkeypatch.setenv("COURSEKIT_MIRROR", str(tmp_path / "mirror"))
    assert untar_data("TOY") == tmp_path / "mirror" / "toyset"
    assert requests == []


def test_standin_only_when_allowed_and_unreachable(server, monkeypatch, data_env, capsys):
    base, served, requests = server
    pin(monkeypatch, make_tgz(served / "real.tgz", GOOD_FILES), f"{base}/gone.tgz", "toyset")
    monkeypatch.setattr(external, "_STANDINS", {})
    external.register_standin("TOY", lambda folder: (folder / "labels.csv").write_text("name,label\nfake,cat\n"))
    with pytest.raises(DownloadError):
        untar_data("TOY")                               # not allowed: the real error
    monkeypatch.setenv("COURSEKIT_ALLOW_STANDIN", "1")
    path = untar_data("TOY")
    assert path == data_env / "toyset-standin" and (path / "labels.csv").read_text().endswith("fake,cat\n")
    assert "MEANINGLESS" in capsys.readouterr().err
    # once the real archive is reachable, it is used instead of the stand-in
    (served / "gone.tgz").write_bytes((served / "real.tgz").read_bytes())
    assert untar_data("TOY") == data_env / "toyset"
    assert (data_env / "toyset" / "labels.csv").read_bytes() == GOOD_FILES[0][1]


def test_progress_bar_works_without_a_terminal(server, tmp_path):
    base, served, _ = server
    archive = make_tgz(served / "toyset.tgz", [("toyset/big.bin", os.urandom(600_000))])
    h = file_hashes(archive)
    script = textwrap.dedent(f"""
        from coursekit.data.external import download_url
        out = download_url({base + '/toyset.tgz'!r}, {str(tmp_path / 'got.tgz')!r}, {h['size']}, {h['sha256']!r})
        print("saved", out)
    """)
    done = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "saved" in done.stdout and "100%" in done.stderr
    assert file_hashes(tmp_path / "got.tgz")["sha256"] == h["sha256"]
