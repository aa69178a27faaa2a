"""Decompression bombs: an image whose header declares more pixels than the limit is refused before decoding."""
import struct
import zlib

import pytest
from PIL import Image

import coursekit.vision.data as vision_data
from coursekit.vision.data import load_image, load_mask


def _chunk(kind: bytes, data: bytes) -> bytes:
    "One PNG chunk: length, type, data, CRC."
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(path, width: int, height: int):
    "A tiny PNG whose header declares `width` x `height` one-bit grey pixels (its data is a single row)."
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    body = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(row)) + _chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_header_bomb_is_refused_before_decoding(tmp_path):
    bomb = _png_declaring(tmp_path / "bomb.png", 40000, 40000)
    assert bomb.stat().st_size < 1000
    for load in (load_image, load_mask):
        with pytest.raises(vision_data.ImageTooLargeError) as info:
            load(bomb)
        message = str(info.value)
        assert "bomb.png" in message and "1,600,000,000 pixels" in message
        assert f"{vision_data.MAX_IMAGE_PIXELS:,}" in message and "MAX_IMAGE_PIXELS" in message


def test_limit_is_configurable(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("L", (1200, 1000)).save(big)
    assert load_image(big).shape == (3, 1000, 1200)
    monkeypatch.setattr(vision_data, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ValueError, match=r"big\.png.*1,200,000 pixels.*1,000,000"):
        load_image(big)
    with pytest.raises(ValueError, match="1,000,000"):
        load_mask(big)
    assert load_image(big, max_pixels=2_000_000).shape == (3, 1000, 1200)
    assert load_mask(big, max_pixels=None).shape == (1000, 1200)


def test_limit_applies_to_jpeg(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (300, 200), "red").save(photo)
    with pytest.raises(vision_data.ImageTooLargeError, match="photo.jpg"):
        load_image(photo, max_pixels=50_000)
    assert load_image(photo, max_pixels=60_000).shape == (3, 200, 300)
