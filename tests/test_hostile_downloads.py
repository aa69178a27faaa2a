"""Hostile archives, hostile servers and hostile names against `untar_data`, `safe_extract` and the CLI.

Everything is served from 127.0.0.1 (a threaded HTTP server, or a raw socket for misbehaving servers) or
built in `tmp_path`; each server stops by itself. Nothing may land outside the data folder, no failure may
be cached, and every refusal is a clear coursekit error (never a raw `EOFError`, `ReadError` or
`FileNotFoundError`).
"""
import gzip
import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pytest

from coursekit import cli
from coursekit.data import external
from coursekit.data.external import (ChecksumError, DownloadError, UnreadableArchiveError,
                                     UnsafeArchiveError, download_url, safe_extract, untar_data)
from local_http import serving
from toy_catalogue import pin


# ---------------------------------------------------------------- servers and archives
class _Handler(SimpleHTTPRequestHandler):
    "Serves files from a folder and records requests; `/nolength/NAME` sends half of NAME with no Content-Length."
    requests: list
    delay: float = 0.0

    def do_GET(self):
        self.requests.append(self.path)
        time.sleep(self.delay)
        if self.path.startswith("/nolength/"):
            data = Path(self.directory, self.path.removeprefix("/nolength/")).read_bytes()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    "A threaded HTTP server on 127.0.0.1 serving `tmp_path/served`; yields (base URL, served folder, handler class)."
    served = tmp_path / "served"
    served.mkdir()
    handler = type("Handler", (_Handler,), {"requests": []})
    with serving(served, handler) as base:
        yield base, served, handler


def trickle_server(head: bytes, body_bytes: int, every: float, trickle_head: bool):
    "A raw server for one connection: sends `head` (byte by byte if `trickle_head`), then body bytes one at a time."
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    sock.settimeout(10)

    def serve():
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            try:
                pieces = [head[i: i + 1] for i in range(len(head))] if trickle_head else [head]
                for piece in pieces:
                    conn.sendall(piece)
                    time.sleep(every)
                for _ in range(body_bytes):
                    conn.sendall(b"x")
                    time.sleep(every)
            except OSError:
                pass   # the client gave up: what we want

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}", sock, thread


@pytest.fixture(autouse=True)
def data_env(tmp_path, monkeypatch):
    "Every test downloads into `tmp_path/data`, with no mirror, no stand-ins and no limits set from outside."
    monkeypatch.setenv("COURSEKIT_DATA", str(tmp_path / "data"))
    for var in ("COURSEKIT_MIRROR", "COURSEKIT_ALLOW_STANDIN", "COURSEKIT_DOWNLOAD_DEADLINE",
                "COURSEKIT_MAX_UNPACKED_BYTES", "COURSEKIT_MAX_ARCHIVE_MEMBERS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "data"


def tar_member(name, kind=tarfile.REGTYPE, data=b"", linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (data if kind == tarfile.REGTYPE else None)


def make_tar(path: Path, members, mode="w:gz") -> Path:
    "An archive of `members`, each (TarInfo, bytes or None), in that order."
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return path


GOOD = [tar_member("toyset/labels.csv", data=b"name,label\na.png,cat\n"), tar_member("toyset/a.png", data=b"PNG")]


def everything_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ---------------------------------------------------------------- 1. archive extraction
def path_max_chain(path: Path) -> Path:
    "Symlinks through 247-character folders whose real path passes PATH_MAX, ending in a link out of the folder."
    comp, steps, members, folder = "d" * 247, "abcdefghijklmnop", [], ""
    for step in steps:
        members.append(tar_member(os.path.join(folder, comp), tarfile.DIRTYPE))
        members.append(tar_member(os.path.join(folder, step), tarfile.SYMTYPE, linkname=comp))
        folder = os.path.join(folder, comp)
    deep_link = os.path.join(*steps, "l" * 254)
    members.append(tar_member(deep_link, tarfile.SYMTYPE, linkname="../" * len(steps)))
    members.append(tar_member("escape", tarfile.SYMTYPE, linkname=deep_link + "/../.."))
    members.append(tar_member("escape/evil.txt", data=b"pwned"))
    return make_tar(path, members)


def test_symlink_chain_past_path_max_is_refused(tmp_path, data_env):
    archive = path_max_chain(tmp_path / "chain.tgz")
    with pytest.raises(UnsafeArchiveError, match="link"):
        safe_extract(archive, data_env / "chain")
    assert not (tmp_path / "evil.txt").exists() and not (data_env / "evil.txt").exists()
    assert not data_env.exists() or everything_under(data_env) == []


def test_link_to_dot_then_dotdot_is_refused_by_coursekit(tmp_path, data_env):
    archive = make_tar(tmp_path / "dot.tgz", [tar_member("toyset/l", tarfile.SYMTYPE, linkname="."),
                                              tar_member("toyset/l/../x", data=b"x")])
    with pytest.raises(UnsafeArchiveError, match="Refusing to extract"):
        safe_extract(archive, data_env / "toyset")
    assert not data_env.exists() or everything_under(data_env) == []


INNOCENT_LOOKING = {
    "symlink_inside": [GOOD[0], tar_member("toyset/link.csv", tarfile.SYMTYPE, linkname="labels.csv")],
    "hardlink_inside": [GOOD[0], tar_member("toyset/copy.csv", tarfile.LNKTYPE, linkname="toyset/labels.csv")],
    "fifo": [GOOD[0], tar_member("toyset/pipe", tarfile.FIFOTYPE)],
    "char_device": [GOOD[0], tar_member("toyset/null", tarfile.CHRTYPE)],
    "dotdot_inside": [GOOD[0], tar_member("toyset/sub/../other.csv", data=b"x")],
    "absolute": [GOOD[0], tar_member("/tmp/coursekit-absolute-evil.txt", data=b"x")],
    "duplicate": [GOOD[0], tar_member("toyset/labels.csv", data=b"overwritten")],
    "file_then_folder": [tar_member("toyset/x", data=b"a file"), tar_member("toyset/x/y", data=b"in it")],
}


@pytest.mark.parametrize("kind", sorted(INNOCENT_LOOKING))
def test_links_special_files_and_odd_names_are_refused(kind, tmp_path, data_env):
    archive = make_tar(tmp_path / f"{kind}.tgz", INNOCENT_LOOKING[kind])
    with pytest.raises(UnsafeArchiveError, match="Refusing to extract .*Nothing was extracted"):
        safe_extract(archive, data_env / "toyset")
    assert not data_env.exists() or everything_under(data_env) == []
    assert not Path("/tmp/coursekit-absolute-evil.txt").exists()


class _Zeros(io.RawIOBase):
    "A file of `n` zero bytes that never exists in memory."
    def __init__(self, n):
        self.left = n

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def size_bomb(path: Path, inflated: int) -> Path:
    info = tarfile.TarInfo("toyset/zeros.bin")
    info.size = inflated
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        tar.addfile(info, io.BufferedReader(_Zeros(inflated), 1 << 20))
    return path


def count_bomb(path: Path, members: int) -> Path:
    return make_tar(path, [tar_member(f"toyset/{i}") for i in range(members)])


def test_a_small_archive_that_inflates_enormously_is_refused_before_writing(server, monkeypatch, data_env):
    base, served, _ = server
    archive = size_bomb(served / "toyset.tgz", 200 * 2**20)     # about 200 KB that inflates to 200 MiB
    assert archive.stat().st_size < 2**20
    pin(monkeypatch, archive, f"{base}/toyset.tgz")
    monkeypatch.setattr(external, "_write_members", lambda *args: pytest.fail("wrote before checking the headers"))
    with pytest.raises(UnsafeArchiveError, match="(?s)unpacks to .* more than the limit"):
        untar_data("TOY")
    assert everything_under(data_env) == ["toyset.tgz"]


def test_an_archive_of_many_empty_files_is_refused(server, monkeypatch, data_env):
    base, served, _ = server
    archive = count_bomb(served / "toyset.tgz", 12_000)
    pin(monkeypatch, archive, f"{base}/toyset.tgz")
    monkeypatch.setattr(external, "_write_members", lambda *args: pytest.fail("wrote before checking the headers"))
    with pytest.raises(UnsafeArchiveError, match="more than 10,000 members"):
        untar_data("TOY")
    assert everything_under(data_env) == ["toyset.tgz"]


def test_a_huge_pax_header_is_refused_before_it_is_read_into_memory(tmp_path, data_env):
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 100 * 2**20
    archive = tmp_path / "pax.tgz"
    with gzip.open(archive, "wb", compresslevel=9) as out:
        out.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        for _ in range(100):
            out.write(bytes(2**20))
        member, data = tar_member("toyset/a.txt", data=b"a")
        out.write(member.tobuf(format=tarfile.USTAR_FORMAT) + data.ljust(512, b"\0") + bytes(1024))
    assert archive.stat().st_size < 2**20
    with pytest.raises(UnsafeArchiveError, match="at once"):
        safe_extract(archive, data_env / "toyset")
    assert not data_env.exists() or everything_under(data_env) == []


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz", "w"])
def test_other_tar_compressions_still_extract(mode, tmp_path, data_env):
    archive = make_tar(tmp_path / "toyset.tar", GOOD, mode=mode)
    assert (safe_extract(archive, data_env / "toyset") / "labels.csv").read_bytes() == b"name,label\na.png,cat\n"


def test_the_limits_can_be_raised_for_one_call_or_by_environment(tmp_path, data_env, monkeypatch):
    archive = count_bomb(tmp_path / "many.tgz", 300)
    with pytest.raises(UnsafeArchiveError, match="more than 100 members"):
        safe_extract(archive, data_env / "many", max_members=100)
    assert len(list(safe_extract(archive, data_env / "many", max_members=300).iterdir())) == 300
    monkeypatch.setenv("COURSEKIT_MAX_ARCHIVE_MEMBERS", "100")
    with pytest.raises(UnsafeArchiveError, match="COURSEKIT_MAX_ARCHIVE_MEMBERS"):
        safe_extract(archive, data_env / "again")
    monkeypatch.setenv("COURSEKIT_MAX_ARCHIVE_MEMBERS", "300")
    assert len(list(safe_extract(archive, data_env / "again").iterdir())) == 300
    monkeypatch.setenv("COURSEKIT_MAX_UNPACKED_BYTES", "10")
    with pytest.raises(UnsafeArchiveError, match="COURSEKIT_MAX_UNPACKED_BYTES"):
        safe_extract(make_tar(tmp_path / "small.tgz", GOOD), data_env / "small")
    monkeypatch.setenv("COURSEKIT_MAX_UNPACKED_BYTES", "lots")
    with pytest.raises(ValueError, match="COURSEKIT_MAX_UNPACKED_BYTES='lots'"):
        safe_extract(make_tar(tmp_path / "small.tgz", GOOD), data_env / "small")


def test_a_zip_member_that_lies_about_its_size_is_stopped_while_writing(tmp_path, data_env):
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("toyset/a.txt", b"small")
        zf.writestr("toyset/zeros.bin", bytes(50 * 2**20))
    raw = bytearray(archive.read_bytes())
    declared = (50 * 2**20).to_bytes(4, "little")
    assert raw.count(declared) == 2                   # the local header and the central directory
    archive.write_bytes(bytes(raw).replace(declared, (10).to_bytes(4, "little")))
    with pytest.raises((UnsafeArchiveError, UnreadableArchiveError), match="Refusing to extract|cannot be extracted"):
        safe_extract(archive, data_env / "toyset", max_bytes=2**20)
    assert not data_env.exists() or everything_under(data_env) == []


@pytest.mark.parametrize("bad_name", ["../evil.txt", "toyset/../../evil.txt", "/tmp/coursekit-zip-evil.txt"])
def test_zip_links_and_escapes_are_refused(bad_name, tmp_path, data_env):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("toyset/ok.txt", b"ok")
        zf.writestr(bad_name, b"pwned")
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, data_env / "toyset")
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/coursekit-zip-evil.txt").exists()


def test_a_zip_symlink_is_refused(tmp_path, data_env):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("toyset/ok.txt", b"ok")
        link = zipfile.ZipInfo("toyset/link")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "../../../etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="link"):
        safe_extract(archive, data_env / "toyset")


def test_good_archives_still_extract_with_their_top_folder(tmp_path, data_env):
    out = safe_extract(make_tar(tmp_path / "good.tgz", GOOD + [tar_member("toyset/sub", tarfile.DIRTYPE)]),
                       data_env / "toyset")
    assert everything_under(out) == ["a.png", "labels.csv", "sub"]
    assert (out / "labels.csv").read_bytes() == b"name,label\na.png,cat\n"
    plain = make_tar(tmp_path / "plain.tar", [tar_member("./x/y.txt", data=b"y")], mode="w")
    assert (safe_extract(plain, data_env / "x") / "y.txt").read_bytes() == b"y"


# ---------------------------------------------------------------- 4. names that are not folders
@pytest.mark.parametrize("name", ["...tgz", ".tgz", "..tgz", "..tar.gz", "%2e%2e.tgz", "..%2F..%2Fevil.tgz",
                                  ".hidden.zip", "x" * 300 + ".tgz"])
def test_urls_whose_file_name_is_not_a_folder_name_are_refused(name, data_env, tmp_path, monkeypatch):
    data_env.mkdir(parents=True)
    url = f"http://127.0.0.1:9/{name}"
    with pytest.raises(ValueError, match="folder name"):
        untar_data(url)
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("COURSEKIT_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(ValueError, match="folder name"):
        untar_data(url)


def test_a_query_string_is_not_part_of_the_folder_name(server, data_env):
    base, served, handler = server
    make_tar(served / "toyset.tgz", GOOD)
    assert untar_data(f"{base}/toyset.tgz?download=1") == data_env / "toyset"
    assert (data_env / "toyset" / "labels.csv").is_file()


# ---------------------------------------------------------------- 10. caches that remember failures
def test_a_truncated_download_without_content_length_is_not_cached(server, data_env, capsys):
    base, served, handler = server
    make_tar(served / "toyset.tgz", [tar_member("toyset/big.bin", data=os.urandom(300_000))])
    url = f"{base}/nolength/toyset.tgz"
    with pytest.raises(DownloadError, match="not a complete"):
        untar_data(url)
    assert not data_env.exists() or everything_under(data_env) == []
    with pytest.raises(DownloadError, match="not a complete"):   # asks again: the failure was not remembered
        untar_data(url)
    assert len(handler.requests) == 2


def test_an_html_page_served_as_an_archive_is_not_cached(server, data_env):
    base, served, handler = server
    (served / "toyset.tgz").write_text("<!DOCTYPE html><html><body>Please log in</body></html>")
    with pytest.raises(DownloadError, match="HTML"):
        untar_data(f"{base}/toyset.tgz")
    assert not data_env.exists() or everything_under(data_env) == []
    make_tar(served / "toyset.tgz", GOOD)             # the server is fixed: the next call works
    assert (untar_data(f"{base}/toyset.tgz") / "labels.csv").is_file()


def test_a_poisoned_cached_archive_is_removed_and_fetched_again_once(server, data_env, capsys):
    base, served, handler = server
    make_tar(served / "toyset.tgz", GOOD)
    data_env.mkdir(parents=True)
    (data_env / "toyset.tgz").write_bytes((served / "toyset.tgz").read_bytes()[:40])   # an older, truncated copy
    assert (untar_data(f"{base}/toyset.tgz") / "labels.csv").is_file()
    assert "toyset.tgz" in capsys.readouterr().err and handler.requests == ["/toyset.tgz"]
    # a server that keeps sending junk: one new try, then a clear error
    shutil.rmtree(data_env / "toyset")
    (data_env / "toyset.tgz").unlink()
    (data_env / "toyset.tgz").write_bytes(b"junk")
    (served / "toyset.tgz").write_bytes(b"more junk")
    with pytest.raises(DownloadError):
        untar_data(f"{base}/toyset.tgz")
    assert len(handler.requests) == 2 and everything_under(data_env) == []


def test_a_checksum_failure_is_not_kept(server, monkeypatch, data_env):
    base, served, _ = server
    make_tar(served / "toyset.tgz", GOOD)
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz", sha256="0" * 64)
    with pytest.raises(ChecksumError, match="0" * 64):
        untar_data("TOY")
    assert everything_under(data_env) == []


def test_a_server_that_sends_more_than_the_catalogue_size_is_stopped(server, monkeypatch, data_env):
    base, served, _ = server
    make_tar(served / "toyset.tgz", [tar_member("toyset/big.bin", data=os.urandom(3_000_000))])
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz", size=1000, sha256=None, md5_first_mib=None)
    with pytest.raises(DownloadError, match="more than the 1,000 bytes"):
        untar_data("TOY")
    assert everything_under(data_env) == []


def test_an_empty_archive_is_not_a_dataset(server, data_env):
    base, served, _ = server
    make_tar(served / "toyset.tgz", [])
    with pytest.raises(DownloadError, match="holds no files"):
        untar_data(f"{base}/toyset.tgz")
    assert everything_under(data_env) == []


def test_leftovers_of_a_killed_download_or_extraction_are_cleaned(server, monkeypatch, data_env):
    base, served, _ = server
    make_tar(served / "toyset.tgz", GOOD)
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz")
    (data_env / ".toyset.extracting-abc123" / "toyset").mkdir(parents=True)
    (data_env / "toyset.tgz.k1ll3d.part").write_bytes(b"half a download")
    (data_env / "unrelated.part").write_bytes(b"not ours")
    assert (untar_data("TOY") / "labels.csv").is_file()
    assert everything_under(data_env) == ["toyset", "toyset.tgz", "toyset/a.png", "toyset/labels.csv",
                                          "unrelated.part"]


def test_a_data_folder_that_is_a_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "data-file").write_text("x")
    monkeypatch.setenv("COURSEKIT_DATA", str(tmp_path / "data-file"))
    with pytest.raises(NotADirectoryError, match="COURSEKIT_DATA"):
        untar_data("http://127.0.0.1:9/toyset.tgz")
    assert (tmp_path / "data-file").read_text() == "x"


def test_a_file_where_the_dataset_folder_goes_is_left_alone(server, monkeypatch, data_env):
    base, served, _ = server
    make_tar(served / "toyset.tgz", GOOD)
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz")
    data_env.mkdir(parents=True)
    (data_env / "toyset").write_text("my notes")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="in the way"):
            untar_data("TOY", force_download=force)
        assert (data_env / "toyset").read_text() == "my notes"


def test_https_addresses_go_through_the_same_guarded_transfer(server, tmp_path):
    base, served, _ = server
    make_tar(served / "toyset.tgz", GOOD)
    with pytest.raises(DownloadError, match="SSL|ssl|wrong version"):   # the local server speaks plain HTTP
        download_url(base.replace("http://", "https://") + "/toyset.tgz", tmp_path / "x.tgz", timeout=5,
                     show_progress=False)
    assert not list(tmp_path.glob("x.tgz*"))


def test_two_concurrent_calls_download_once_and_both_get_the_folder(server, monkeypatch, data_env):
    base, served, handler = server
    handler.delay = 0.5
    make_tar(served / "toyset.tgz", [tar_member("toyset/big.bin", data=os.urandom(2_000_000))])
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz")
    results, errors = [], []

    def call():
        try:
            results.append(untar_data("TOY"))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == [data_env / "toyset"] * 3
    assert handler.requests == ["/toyset.tgz"]
    assert everything_under(data_env) == ["toyset", "toyset.tgz", "toyset/big.bin"]


def test_two_processes_download_once(server, monkeypatch, data_env, tmp_path):
    base, served, handler = server
    handler.delay = 1.0
    make_tar(served / "toyset.tgz", [tar_member("toyset/big.bin", data=os.urandom(1_000_000))])
    script = "import sys; from coursekit.data.external import untar_data; print(untar_data(sys.argv[1]))"
    env = dict(os.environ, COURSEKIT_DATA=str(data_env))
    calls = [subprocess.Popen([sys.executable, "-c", script, f"{base}/toyset.tgz"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [call.communicate(timeout=120) for call in calls]
    assert [call.returncode for call in calls] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(data_env / "toyset")] * 2
    assert handler.requests == ["/toyset.tgz"]
    assert everything_under(data_env) == ["toyset", "toyset.tgz", "toyset/big.bin"]


def test_a_lock_left_by_a_dead_process_is_recovered(server, monkeypatch, data_env):
    base, served, _ = server
    make_tar(served / "toyset.tgz", GOOD)
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz")
    data_env.mkdir(parents=True)
    script = ("import sys; from coursekit.data import external; "
              "external._acquire_lock(external.Path(sys.argv[1])); import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", script, str(data_env / ".toyset.lock")], check=True, timeout=60)
    assert (data_env / ".toyset.lock").exists()        # killed while holding it: the file stays behind
    start = time.monotonic()
    assert (untar_data("TOY") / "labels.csv").is_file()
    assert time.monotonic() - start < 10
    assert everything_under(data_env) == ["toyset", "toyset.tgz", "toyset/a.png", "toyset/labels.csv"]


def test_a_server_that_trickles_the_body_hits_the_deadline(tmp_path):
    head = b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n"
    url, sock, thread = trickle_server(head, body_bytes=40, every=0.2, trickle_head=False)   # 8 s for 40 bytes
    with sock:
        start = time.monotonic()
        with pytest.raises(DownloadError, match="deadline"):
            download_url(url + "/toyset.tgz", tmp_path / "x.tgz", timeout=5, deadline=1.5, show_progress=False)
        assert time.monotonic() - start < 4
        thread.join(30)
    assert not (tmp_path / "x.tgz").exists() and list(tmp_path.glob("*.part")) == []


def test_a_server_that_trickles_its_headers_hits_the_deadline_from_the_environment(tmp_path, monkeypatch, data_env):
    head = b"HTTP/1.0 200 OK\r\n" + b"X-Slow: " + b"y" * 200 + b"\r\n\r\n"
    url, sock, thread = trickle_server(head, body_bytes=0, every=0.1, trickle_head=True)
    monkeypatch.setenv("COURSEKIT_DOWNLOAD_DEADLINE", "1")
    with sock:
        start = time.monotonic()
        with pytest.raises(DownloadError, match="COURSEKIT_DOWNLOAD_DEADLINE"):
            untar_data(url + "/toyset.tgz")
        assert time.monotonic() - start < 4
        thread.join(30)
    assert not data_env.exists() or everything_under(data_env) == []


@pytest.mark.parametrize("value", ["soon", "0", "-1", "inf", "nan"])
def test_a_bad_deadline_setting_is_named(value, monkeypatch, tmp_path):
    monkeypatch.setenv("COURSEKIT_DOWNLOAD_DEADLINE", value)
    with pytest.raises(ValueError, match="COURSEKIT_DOWNLOAD_DEADLINE"):
        download_url("http://127.0.0.1:9/x.tgz", tmp_path / "x.tgz", show_progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- COURSEKIT_MIRROR pointing nowhere
def test_a_missing_mirror_is_named_instead_of_downloading(server, monkeypatch, tmp_path):
    base, served, handler = server
    make_tar(served / "toyset.tgz", GOOD)
    pin(monkeypatch, served / "toyset.tgz", f"{base}/toyset.tgz")
    monkeypatch.setenv("COURSEKIT_MIRROR", str(tmp_path / "no-such-mirror"))
    with pytest.raises(FileNotFoundError, match="COURSEKIT_MIRROR.*no-such-mirror"):
        untar_data("TOY")
    assert handler.requests == []
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("COURSEKIT_MIRROR", str(tmp_path / "a-file"))
    with pytest.raises(NotADirectoryError, match="COURSEKIT_MIRROR"):
        untar_data("TOY")
    with pytest.raises(FileNotFoundError, match="COURSEKIT_MIRROR"):
        monkeypatch.setenv("COURSEKIT_MIRROR", str(tmp_path / "no-such-mirror"))
        external.seed_weights_cache("resnet34-b627a593.pth")


def test_a_weights_name_with_folders_cannot_copy_outside_the_caches(tmp_path, monkeypatch):
    (tmp_path / "mirror" / "weights").mkdir(parents=True)
    (tmp_path / "mirror" / "secret.pth").write_bytes(b"not a weights file")
    monkeypatch.setenv("COURSEKIT_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ValueError, match="plain file name"):
        external.seed_weights_cache("../secret.pth")
    assert not (tmp_path / "torch").exists()


# ---------------------------------------------------------------- coursekit lesson --out
@pytest.mark.parametrize("where", ["under_a_file", "dev_null", "is_a_file"])
def test_lesson_out_that_cannot_be_written_is_refused_before_running(where, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("a file")
    out = {"under_a_file": tmp_path / "file" / "x", "dev_null": Path("/dev/null/x"), "is_a_file": tmp_path / "file"}
    started = []
    monkeypatch.setattr(cli, "_execute", lambda *args, **kwargs: started.append(args))
    with pytest.raises(SystemExit) as info:
        cli.main(["lesson", "pets", "--out", str(out[where])])
    assert info.value.code != 0 and started == []
    err = capsys.readouterr().err
    assert "--out" in err and str(out[where]) in err and "nothing was run" in err.lower()
    assert "executed notebook is in" not in err and "saved" not in err.lower()
    assert (tmp_path / "file").read_text() == "a file"


def test_lesson_out_holding_a_folder_where_the_notebook_goes_is_refused_before_running(tmp_path, capsys,
                                                                                         monkeypatch):
    import nbformat
    lessons = tmp_path / "lessons"
    lessons.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")]), lessons / "01_pets.ipynb")
    monkeypatch.setenv("COURSEKIT_LESSONS", str(lessons))
    started = []
    monkeypatch.setattr(cli, "_execute", lambda *args, **kwargs: started.append(args))
    (tmp_path / "out" / "01_pets.ipynb").mkdir(parents=True)
    with pytest.raises(SystemExit) as info:
        cli.main(["lesson", "pets", "--out", str(tmp_path / "out")])
    assert info.value.code != 0 and started == []
    err = capsys.readouterr().err
    assert "01_pets.ipynb is a folder" in err and "nothing was run" in err


def test_lesson_out_in_the_lessons_folder_is_refused_before_overwriting_the_lesson(tmp_path, capsys, monkeypatch):
    import nbformat
    lessons = tmp_path / "lessons"
    lessons.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('hi')")]),
                   lessons / "01_pets.ipynb")
    source = (lessons / "01_pets.ipynb").read_bytes()
    monkeypatch.setenv("COURSEKIT_LESSONS", str(lessons))
    with pytest.raises(SystemExit) as info:
        cli.main(["lesson", "pets", "--out", str(lessons)])
    assert info.value.code != 0 and "would overwrite the lesson" in capsys.readouterr().err
    assert (lessons / "01_pets.ipynb").read_bytes() == source


def test_python_dash_m_runs_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "coursekit.cli", "lesson", "pets", "--out", "/dev/null/x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nothing was run" in done.stderr, (done.returncode, done.stderr)


def test_a_failing_lesson_names_the_saved_notebook(tmp_path, capsys, monkeypatch):
    import nbformat
    lessons = tmp_path / "lessons"
    lessons.mkdir()
    cell = nbformat.v4.new_code_cell("raise RuntimeError('boom from the lesson')")
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), lessons / "01_pets.ipynb")
    monkeypatch.setenv("COURSEKIT_LESSONS", str(lessons))
    with pytest.raises(SystemExit):
        cli.main(["lesson", "pets", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "boom from the lesson" in err and str(tmp_path / "out" / "01_pets.ipynb") in err
    assert (tmp_path / "out" / "01_pets.ipynb").is_file()
