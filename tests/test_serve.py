"""`coursekit serve`'s app through HTTP: a good upload gets `learn.predict`'s answer; every bad upload gets a 4xx
with a message; the upload cap is checked while the body streams in; the server binds 127.0.0.1 unless told
otherwise; serving writes no file and unpickles nothing; concurrent requests are batched with the same answers."""
import asyncio
import io
import json
import socket
import struct
import sys
import threading
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from coursekit import cli
from coursekit.learner import load_learner
from coursekit.vision import serve as serving
from coursekit.vision.serve import BackgroundServer, ModelServer

from serve_model import export_small_model, mirror_photos


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return export_small_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def learn(model_file):
    return load_learner(model_file, device="cpu")


@pytest.fixture(scope="module")
def client(learn):
    with TestClient(ModelServer(learn, max_bytes=200_000).app) as test_client:
        yield test_client


def png_declaring(width: int, height: int) -> bytes:
    "A one-pixel PNG whose header says width x height: a decompression bomb in 69 bytes."
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def as_png(photo) -> bytes:
    buffer = io.BytesIO()
    Image.open(photo).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_same_answer(answer: dict, learn, item):
    label, _, probs = learn.predict(item)
    assert answer["label"] == label
    served = torch.tensor([answer["probabilities"][str(c)] for c in learn.dls.vocab])
    assert torch.allclose(served, probs, atol=1e-5), (served, probs)
    assert answer["top"][0] == {"label": label, "probability": answer["probabilities"][label]}


def test_a_good_upload_gets_the_answer_of_predict(client, learn):
    for photo in mirror_photos()[::3]:
        response = client.post("/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert_same_answer(answer, learn, photo)
        assert set(answer) == {"label", "probabilities", "top", "seconds"} and answer["seconds"] > 0


def test_a_png_upload_gets_the_answer_of_predict_on_its_pixels(client, learn):
    photo = mirror_photos()[1]
    response = client.post("/predict", files={"file": ("photo.png", as_png(photo), "image/png")})
    assert response.status_code == 200, response.text
    assert_same_answer(response.json(), learn, Image.open(photo))


BAD_UPLOADS = {
    "empty": ({"files": {"file": ("a.jpg", b"", "image/jpeg")}}, 400, "empty"),
    "not an image": ({"files": {"file": ("a.jpg", b"GIF89 no, just text", "image/jpeg")}}, 415, "not an image"),
    "a pdf": ({"files": {"file": ("a.pdf", b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n", "application/pdf")}}, 415, "not an image"),
    "cut short": ({"files": {"file": ("a.jpg", mirror_photos()[0].read_bytes()[:3000], "image/jpeg")}}, 400,
                  "could not be decoded"),
    "wrong field": ({"files": {"image": ("a.jpg", mirror_photos()[0].read_bytes(), "image/jpeg")}}, 400,
                    'no field "file"'),
    "no file, a text field": ({"files": {"name": (None, b"cat")}}, 400, 'no field "file"'),
    "a url-encoded form": ({"data": {"file": "cat.jpg"}}, 415, "not a multipart form"),
    "bomb": ({"files": {"file": ("bomb.png", png_declaring(30_000, 30_000), "image/png")}}, 413, "decompression bomb"),
    "huge": ({"files": {"file": ("big.jpg", b"\xff\xd8" + b"0" * 300_000, "image/jpeg")}}, 413, "larger than"),
    "not a form": ({"content": b"\xff\xd8\xff", "headers": {"content-type": "image/jpeg"}}, 415,
                   "not a multipart form"),
    "no content type": ({"content": b"hello"}, 415, "not a multipart form"),
    "a form cut short": ({"content": b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                          "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "ended before"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_upload_gets_a_4xx_with_a_message(client, case):
    request, status, message = BAD_UPLOADS[case]
    response = client.post("/predict", **request)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_the_server_still_answers_after_bad_uploads(client, learn):
    for request, _, _ in BAD_UPLOADS.values():
        client.post("/predict", **request)
    photo = mirror_photos()[2]
    assert_same_answer(client.post("/predict", files={"file": ("p.jpg", photo.read_bytes())}).json(), learn, photo)


def test_health_and_page(client):
    assert client.get("/health").json() == {"status": "ok", "classes": ["Abyssinian", "beagle"]}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http" not in page.text.replace("http://HOST", ""), "the page loads nothing from elsewhere (no CDN)"


def stream_to_app(app, chunks: int, chunk_size: int, content_length: int | None = None) -> tuple:
    "POST a multipart body of `chunks` chunks straight to the ASGI app; (status, error, chunks the app asked for)."
    asked = 0
    sent = []
    head = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n\r\n"
    headers = [(b"content-type", b"multipart/form-data; boundary=xyz")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000)}

    async def receive():
        nonlocal asked
        asked += 1
        body = head if asked == 1 else b"\0" * chunk_size
        return {"type": "http.request", "body": body, "more_body": asked < chunks}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)["error"], asked


def test_the_size_cap_is_checked_while_the_body_streams_in(learn):
    "A 1 GB upload without Content-Length is refused after the first bytes over the cap, not after reading it all."
    app = ModelServer(learn, max_bytes=1_000_000).app
    status, error, asked = stream_to_app(app, chunks=16_384, chunk_size=65_536)
    assert status == 413 and "larger than this server's limit of 1,000,000 bytes" in error
    assert asked <= 1 + 1_000_000 // 65_536 + 1, f"the app read {asked} chunks of 64 kB for a 1 MB cap"


def test_a_declared_content_length_over_the_cap_is_refused_before_reading(learn):
    app = ModelServer(learn, max_bytes=1_000_000).app
    status, error, asked = stream_to_app(app, chunks=16_384, chunk_size=65_536, content_length=2 ** 30)
    assert status == 413 and asked == 0


def test_a_huge_upload_to_a_real_server_is_refused(learn):
    "Through uvicorn on 127.0.0.1: a 40 MB body (cap 1 MB) gets 413 and the server keeps answering."
    with BackgroundServer(ModelServer(learn, max_bytes=1_000_000).app) as running:
        response = httpx.post(running.url + "/predict", files={"file": ("big.jpg", b"\0" * 40_000_000)}, timeout=60)
        assert response.status_code == 413 and "larger than" in response.json()["error"]
        assert httpx.get(running.url + "/health", timeout=30).json()["status"] == "ok"


def test_it_binds_127_0_0_1_by_default(model_file, learn, monkeypatch):
    calls = []
    monkeypatch.setattr(serving.uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    cli.main(["serve", str(model_file)])
    assert calls[0]["host"] == "127.0.0.1" and calls[0]["port"] == 8000
    cli.main(["serve", str(model_file), "--host", "0.0.0.0", "--port", "9000"])
    assert (calls[1]["host"], calls[1]["port"]) == ("0.0.0.0", 9000)
    with BackgroundServer(ModelServer(learn).app) as running:
        assert running.server.servers[0].sockets[0].getsockname()[0] == "127.0.0.1"
        for address in other_addresses():  # not reachable on this machine's other addresses
            with pytest.raises(OSError):
                socket.create_connection((address, running.port), timeout=2).close()


def other_addresses() -> set:
    "This machine's IPv4 addresses outside the loopback network 127.0.0.0/8."
    found = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the interface of the default route
            found.add(probe.getsockname()[0])
        except OSError:
            pass  # no default route: the addresses from the host name are all there is
    return {address for address in found if not address.startswith("127.")}


def test_serve_help_says_how_to_go_behind_a_real_server(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    assert all(word in text for word in ("127.0.0.1", "reverse proxy", "TLS", "--max-bytes", "processes"))


def test_a_missing_or_damaged_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", str(tmp_path / "nothing.ck")])
    assert exit_.value.code == 2 and "no model file" in capsys.readouterr().err
    damaged = tmp_path / "damaged.ck"
    damaged.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", str(damaged)])
    assert exit_.value.code == 2 and "damaged.ck" in capsys.readouterr().err


class Watcher:
    "An audit hook (they cannot be removed: this one is switched on and off) recording writes and unpickling."
    def __init__(self):
        self.on = False
        self.events = []
        sys.addaudithook(self.hook)

    def hook(self, event, args):
        if not self.on:
            return
        if event == "pickle.find_class":
            self.events.append((event, args))
        if event == "open" and len(args) >= 3 and self.writes(args[1], args[2]):
            self.events.append((event, args))

    @staticmethod
    def writes(mode, flags) -> bool:
        if isinstance(mode, str):
            return any(c in mode for c in "wax+")
        return bool(flags & 0o3) or bool(flags & 0o100)  # O_WRONLY / O_RDWR, O_CREAT


def test_serving_writes_no_file_and_unpickles_nothing(model_file):
    watcher = Watcher()
    photo = mirror_photos()[0].read_bytes()
    watcher.on = True
    try:
        learn = load_learner(model_file, device="cpu")
        with TestClient(ModelServer(learn, max_bytes=20_000_000).app) as test_client:
            big = b"\xff\xd8" + b"\0" * 3_000_000  # over the 1 MB at which Starlette's own form parser spools to disk
            responses = [test_client.post("/predict", files={"file": ("p.jpg", photo)}),
                         test_client.post("/predict", files={"file": ("big.jpg", big)}),
                         test_client.post("/predict", files={"file": ("b.png", png_declaring(30_000, 30_000))})]
    finally:
        watcher.on = False
    assert [r.status_code for r in responses] == [200, 415, 413]
    assert watcher.events == [], f"files opened for writing or classes unpickled while serving: {watcher.events}"


def test_the_watcher_sees_writes_and_unpickling(tmp_path):
    "The check above would see a write or an unpickle (here on purpose)."
    import pickle
    watcher = Watcher()
    watcher.on = True
    try:
        (tmp_path / "x.txt").write_text("x")
        pickle.loads(pickle.dumps(ModelServer))
    finally:
        watcher.on = False
    assert {event for event, _ in watcher.events} == {"open", "pickle.find_class"}


def test_concurrent_requests_are_batched_with_predicts_answers(learn):
    photos = mirror_photos()
    server = ModelServer(learn, max_batch=8, max_wait=0.02)
    with BackgroundServer(server.app) as running:
        def ask(photo):
            request = urllib.request.Request(running.url + "/predict", method="POST")
            content_type, body = encode_form(photo.read_bytes())
            request.add_header("content-type", content_type)
            with urllib.request.urlopen(request, data=body, timeout=120) as reply:
                return json.loads(reply.read())
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, photos * 2))
    for photo, answer in zip(photos * 2, answers):
        assert_same_answer(answer, learn, photo)
    assert sum(server.predictor.batch_sizes) == 2 * len(photos)
    assert max(server.predictor.batch_sizes) > 1, f"no two requests were batched: {server.predictor.batch_sizes}"


def encode_form(data: bytes) -> tuple:
    request = httpx.Request("POST", "http://x/predict", files={"file": ("p.jpg", data, "image/jpeg")})
    return request.headers["content-type"], request.read()


def test_requests_running_or_waiting_when_the_server_stops_get_an_error(learn, monkeypatch):
    "Stopping the worker answers the batch in flight and the queue with an error: no request waits for ever."
    started = threading.Event()
    predict_images = serving.predict_images

    def slow_predict_images(*args):
        started.set()
        time.sleep(0.5)
        return predict_images(*args)

    monkeypatch.setattr(serving, "predict_images", slow_predict_images)
    predictor = serving.BatchPredictor(learn, max_batch=1)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)

    async def stop_while_busy():
        await predictor.start()
        running = asyncio.ensure_future(predictor.predict(image))
        waiting = asyncio.ensure_future(predictor.predict(image))
        while not started.is_set():
            await asyncio.sleep(0.01)
        await predictor.stop()
        return await asyncio.wait_for(asyncio.gather(running, waiting, return_exceptions=True), timeout=10)

    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(asyncio.run, stop_while_busy()).result()
    assert [type(r) for r in results] == [RuntimeError, RuntimeError], results
    assert all("stopped before this image was predicted" in str(r) for r in results)


def test_a_failing_model_is_a_500_with_a_message(learn, monkeypatch):
    def broken_predict_images(*args):
        raise RuntimeError("the model broke")

    monkeypatch.setattr(serving, "predict_images", broken_predict_images)
    photo = mirror_photos()[0].read_bytes()
    with TestClient(ModelServer(learn).app, raise_server_exceptions=False) as test_client:
        response = test_client.post("/predict", files={"file": ("p.jpg", photo)})
        assert response.status_code == 500
        assert response.json() == {"error": "The server failed on this request: RuntimeError: the model broke"}
        monkeypatch.undo()
        assert test_client.post("/predict", files={"file": ("p.jpg", photo)}).status_code == 200
