"""Hostile and odd input for `coursekit serve` (issue 15 follow-up): what a stranger can send the server.

- A photo in any odd encoding the server reads (progressive, CMYK, 16-bit, palette with transparency, 1x1, EXIF
  orientations 1-8, animated GIF and WEBP, a many-page TIFF, trailing garbage, a 5 MB ICC profile) gets exactly
  `learn.predict`'s answer for the same file.
- A thin strip (1 x 100,000 pixels, a PNG of a few hundred bytes) is not scaled up to gigabytes to cover the
  model's input: `Resize` cuts it to its centre first.
- What waits for a batch is the presized picture, not the full-size decode, and at most `max_decoding` uploads are
  decoded at once: memory stays bounded under many large uploads.
- A boundary the multipart parser refuses, a client that disconnects mid-upload, a client that trickles its body,
  a form with thousands of fields, a wrong method or path: each is a short 4xx with a message, never a 500 or a hang.
- A batch in which one image makes the model fail answers the other images.
"""
import asyncio
import io
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from coursekit.learner import load_learner
from coursekit.vision import data as vision_data
from coursekit.vision import serve as serving
from coursekit.vision.serve import BackgroundServer, ModelServer

from serve_model import export_small_model, mirror_photos


@pytest.fixture(scope="module")
def learn(tmp_path_factory):
    return load_learner(export_small_model(tmp_path_factory.mktemp("serve-model")), device="cpu")


@pytest.fixture(scope="module")
def client(learn):
    with TestClient(ModelServer(learn).app, raise_server_exceptions=False) as test_client:
        yield test_client


def saved(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **kwargs)
    return buffer.getvalue()


def photo() -> Image.Image:
    return Image.open(mirror_photos()[0]).convert("RGB")


def with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return saved(photo(), format="JPEG", exif=exif.tobytes())


def frames(n: int, size: int = 32) -> list:
    "`n` different palette frames (PIL would merge equal ones)."
    made = []
    for i in range(n):
        frame = Image.new("P", (size, size), 0)
        frame.putpixel((i % size, (i // size) % size), 1 + i % 200)
        made.append(frame)
    return made


def odd_files() -> dict:
    "Odd but valid encodings of a photo (and a few odd pictures): {name: bytes}."
    rgb = photo()
    palette = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    animation = frames(300)
    pages = [Image.new("RGB", (16, 16), (i, 0, 0)) for i in range(200)]
    turning = [rgb.resize((64, 64)).rotate(angle) for angle in range(0, 360, 60)]
    files = {"progressive.jpg": saved(rgb, format="JPEG", progressive=True, quality=90),
             "cmyk.jpg": saved(rgb.convert("CMYK"), format="JPEG"),
             "grey16.png": saved(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), format="PNG"),
             "palette-transparent.png": saved(palette, format="PNG", transparency=0),
             "one-pixel.png": saved(Image.new("RGB", (1, 1), (200, 10, 10)), format="PNG"),
             "animated.gif": saved(animation[0], format="GIF", save_all=True, append_images=animation[1:]),
             "pages.tif": saved(pages[0], format="TIFF", save_all=True, append_images=pages[1:]),
             "animated.webp": saved(turning[0], format="WEBP", save_all=True, append_images=turning[1:]),
             "trailing-garbage.jpg": mirror_photos()[0].read_bytes() + b"GARBAGE" * 10_000,
             "huge-icc.jpg": saved(rgb, format="JPEG", icc_profile=b"\0" * 5_000_000),
             "rgba.png": saved(rgb.convert("RGBA"), format="PNG"),
             "float.tif": saved(rgb.convert("F"), format="TIFF")}
    files.update({f"exif-{o}.jpg": with_orientation(o) for o in range(1, 9)})
    return files


ODD_FILES = odd_files()


def assert_same_answer(answer: dict, learn, item):
    label, _, probs = learn.predict(item)
    assert answer["label"] == label
    served = torch.tensor([answer["probabilities"][str(c)] for c in learn.dls.vocab])
    assert torch.allclose(served, probs, atol=1e-5), (served, probs)


@pytest.mark.parametrize("name", list(ODD_FILES))
def test_an_odd_encoding_gets_the_answer_of_predict_on_the_file(client, learn, name, tmp_path):
    response = client.post("/predict", files={"file": (name, ODD_FILES[name], "image/jpeg")})
    assert response.status_code == 200, response.text
    file = tmp_path / name
    file.write_bytes(ODD_FILES[name])
    assert_same_answer(response.json(), learn, file)


def test_a_thin_strip_is_not_scaled_up_to_gigabytes(client, learn, monkeypatch, tmp_path):
    "A 1 x 100,000 PNG (a few hundred bytes) covering 64 x 64 px: on main, 64 x 6,400,000 x 3 bytes, twice."
    largest = []
    resize = vision_data._resize

    def measured_resize(x, kind, hw):
        largest.append(hw[0] * hw[1])
        return resize(x, kind, hw)

    monkeypatch.setattr(vision_data, "_resize", measured_resize)
    strip = saved(Image.new("RGB", (100_000, 1), (200, 10, 10)), format="PNG")
    assert len(strip) < 1000
    response = client.post("/predict", files={"file": ("strip.png", strip)})
    assert response.status_code == 200, response.text
    file = tmp_path / "strip.png"
    file.write_bytes(strip)
    assert_same_answer(response.json(), learn, file)
    assert max(largest) <= 64 * 64 * 8, f"resized to {max(largest):,} pixels"   # 8: MAX_COVER_RATIO


def test_what_waits_for_a_batch_is_the_presized_picture(learn, monkeypatch):
    "A 1500 x 1000 upload waits for its batch as the 96 x 64 picture the model's Resize(64) makes, not 4.5 MB."
    waiting = []
    predict = serving.BatchPredictor.predict

    async def recorded_predict(self, image):
        waiting.append(tuple(image.shape))
        return await predict(self, image)

    monkeypatch.setattr(serving.BatchPredictor, "predict", recorded_predict)
    big = photo().resize((1500, 1000))
    with TestClient(ModelServer(learn).app) as test_client:
        response = test_client.post("/predict", files={"file": ("big.png", saved(big, format="PNG"))})
    assert response.status_code == 200, response.text
    assert_same_answer(response.json(), learn, big)
    assert waiting == [(3, 64, 96)]


def test_at_most_max_decoding_uploads_are_decoded_at_once(learn, monkeypatch):
    "Eight uploads at once: full-size decodes are limited to `max_decoding` (2 by default) at a time, and all answered."
    busy = []
    running = [0]
    lock = threading.Lock()
    decode_upload = serving.decode_upload

    def slow_decode_upload(*args):
        with lock:
            running[0] += 1
            busy.append(running[0])
        time.sleep(0.2)
        try:
            return decode_upload(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(serving, "decode_upload", slow_decode_upload)
    upload = saved(photo(), format="PNG")
    with BackgroundServer(ModelServer(learn).app) as server:   # max_decoding=2 by default
        def ask(_):
            return httpx.post(server.url + "/predict", files={"file": ("p.png", upload)}, timeout=120).status_code
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(ask, range(8)))
    assert statuses == [200] * 8
    assert max(busy) <= 2, f"{max(busy)} uploads were decoded at once"


def test_a_boundary_longer_than_the_parser_takes_is_a_400(client):
    boundary = "b" * 300
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--{boundary}--\r\n").encode()
    response = client.post("/predict", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 400, response.text
    assert "boundary" in response.json()["error"] and "Traceback" not in response.text


def test_a_form_of_many_fields_names_a_few(client):
    fields = {f"field{i}": (None, b"") for i in range(5000)}
    response = client.post("/predict", files=fields)
    assert response.status_code == 400
    error = response.json()["error"]
    assert "'field0'" in error and "and 4,995 more" in error and len(error) < 400, error


def call_app(app, receive, max_seconds: float) -> tuple:
    "Send one POST /predict to the ASGI app with the given `receive`: (status, error text) of its answer."
    sent = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=xyz")],
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000)}

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), max_seconds))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)["error"]


FORM_HEAD = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.jpg\"\r\n\r\n"


def test_a_client_that_disconnects_mid_upload_is_answered_quietly(learn):
    "On main the disconnect escaped the app as ClientDisconnect: a traceback in the log for every dropped upload."
    messages = iter([{"type": "http.request", "body": FORM_HEAD + b"\xff\xd8", "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    status, error = call_app(ModelServer(learn).app, receive, max_seconds=10)
    assert status == 400 and "closed the connection" in error


def test_a_client_that_trickles_its_upload_is_cut_off(learn):
    "A slowloris body (a byte every 0.1 s, for ever) gets a 408 once `max_seconds` have passed, not a connection held for ever."
    chunks = iter([FORM_HEAD])

    async def receive():
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": next(chunks, b"x"), "more_body": True}

    started = time.monotonic()
    status, error = call_app(ModelServer(learn, max_seconds=1).app, receive, max_seconds=20)
    assert status == 408 and "within this server's limit of 1 seconds" in error
    assert time.monotonic() - started < 5


def test_a_real_server_cuts_off_a_body_that_stops_half_way(learn):
    "Through uvicorn: a client sends half its declared body and waits; the server answers 408 and goes on serving."
    body = FORM_HEAD + mirror_photos()[0].read_bytes() + b"\r\n--xyz--\r\n"
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with BackgroundServer(ModelServer(learn, max_seconds=1).app) as server:
        with socket.create_connection((server.host, server.port), timeout=20) as stalled:
            stalled.sendall(head + body[:len(body) // 2])
            reply = b"".join(iter(lambda: stalled.recv(4096), b""))   # until the server closes the connection
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert b"within this server's limit" in reply
        assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"


def test_one_image_that_fails_the_model_does_not_fail_its_batch(learn, monkeypatch):
    "Three requests batched together, one of which breaks the model: the other two get their answers."
    predict_images = serving.predict_images

    def fragile_predict_images(learn, images, top_k):
        if any(int(image.max()) == 0 for image in images):
            raise RuntimeError("the model broke on a black picture")
        return predict_images(learn, images, top_k)

    monkeypatch.setattr(serving, "predict_images", fragile_predict_images)
    black = saved(Image.new("RGB", (80, 80)), format="PNG")
    photos = [mirror_photos()[0], mirror_photos()[-1]]
    uploads = [photos[0].read_bytes(), black, photos[1].read_bytes()]
    server = ModelServer(learn, max_batch=8, max_wait=1.0)
    with BackgroundServer(server.app) as running:
        def ask(data):
            return httpx.post(running.url + "/predict", files={"file": ("p", data)}, timeout=120)
        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(ask, uploads))
    assert max(server.predictor.batch_sizes) == 3, server.predictor.batch_sizes
    assert [r.status_code for r in responses] == [200, 500, 200]
    assert "black picture" in responses[1].json()["error"]
    assert_same_answer(responses[0].json(), learn, photos[0])
    assert_same_answer(responses[2].json(), learn, photos[1])


@pytest.mark.parametrize("method,path,status", [("GET", "/predict", 405), ("PUT", "/predict", 405),
                                                ("DELETE", "/", 405), ("GET", "/nothing", 404),
                                                ("POST", "/predict/../../etc/passwd", 404)])
def test_a_wrong_method_or_path_is_a_json_error_naming_the_routes(client, method, path, status):
    response = client.request(method, path)
    assert response.status_code == status
    assert "POST /predict" in response.json()["error"] and "curl -F" in response.json()["error"]


def test_the_405_still_says_which_methods_are_allowed(client):
    assert client.get("/predict").headers["allow"] == "POST"


NOT_IMAGES = {"empty.jpg": (b"", "is empty"),
              "page.jpg": (b"<html><body>Not found</body></html>", "is not an image that PIL or torchvision recognises"),
              "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                              "is not an image that PIL or torchvision recognises")}


@pytest.mark.parametrize("name", list(NOT_IMAGES))
def test_predict_on_a_file_that_is_no_image_says_so_as_the_server_does(client, learn, name, tmp_path):
    "On main `learn.predict` led with torchvision's C++ source line ('Unsupported image file. Only jpeg, png, webp and gif')."
    content, message = NOT_IMAGES[name]
    file = tmp_path / name
    file.write_bytes(content)
    with pytest.raises(RuntimeError) as info:
        learn.predict(file)
    assert str(info.value).startswith(f"The file {file} {message}"), str(info.value)
    response = client.post("/predict", files={"file": (name, content)})
    error = response.json()["error"]
    assert response.status_code in (400, 415) and ("empty" in error or "not an image" in error), error


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunk_bomb(kind: bytes) -> bytes:
    "A small photo as PNG with a compressed text (zTXt) or colour profile (iCCP) chunk that inflates to 200 MB."
    png = saved(photo().resize((64, 48)), format="PNG")
    bomb = png_chunk(kind, b"k\0\0" + zlib.compress(b"\0" * 200_000_000, 9))
    return png[:33] + bomb + png[33:]   # after the 8-byte signature and the 25-byte IHDR chunk


@pytest.mark.parametrize("kind", [b"zTXt", b"iCCP"])
def test_a_png_with_a_chunk_bomb_gets_the_answer_of_predict_on_the_file(client, learn, kind, tmp_path):
    "On main PIL's text-chunk limit made the server answer 400 'damaged or cut short' where learn.predict decodes the pixels."
    data = png_with_chunk_bomb(kind)
    assert len(data) < 300_000
    response = client.post("/predict", files={"file": ("bomb.png", data)})
    assert response.status_code == 200, response.text
    file = tmp_path / "bomb.png"
    file.write_bytes(data)
    assert_same_answer(response.json(), learn, file)


def test_serve_passes_the_upload_deadline_and_decoding_limit_to_the_app(learn, monkeypatch, tmp_path):
    made = []

    class RecordedServer(ModelServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(serving, "ModelServer", RecordedServer)
    monkeypatch.setattr(serving.uvicorn, "run", lambda app, **kwargs: None)
    model = learn.export(tmp_path / "model.ck")
    serving.serve(model, max_seconds=7, max_decoding=3)
    assert (made[0].max_seconds, made[0].max_decoding) == (7, 3)
