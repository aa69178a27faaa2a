"""Images reach the model in the right range and the right way up (issue 11, item 4).

- every PIL mode (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, I;16, I;16B, I, F) in every format PIL writes
  it to decodes as the RGB picture a viewer shows: uint8 in [0, 255], grey repeated on three channels,
  16-bit and 32-bit integer pixels keeping the top 8 of 16 bits, float pixels read as [0, 1], transparent
  pixels composited on white;
- a file, the same file opened by PIL, and its pixels as an array give the same tensor;
- 16-bit PNGs (grey and RGB) reach a batch in [0, 1];
- the eight EXIF orientations are applied, in JPEG, PNG, WebP and TIFF;
- `verify_images(max_size=...)` stores a shrunk photo that loads as the same picture, the right way up.
"""
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from coursekit.vision.data import ImageDataLoaders, Resize, can_decode, keep_decodable, load_image, open_image
from coursekit.vision.utils import verify_images

RNG = np.random.default_rng(0)
HEIGHT, WIDTH = 6, 10

# How a viewer shows each EXIF orientation: the transpose that turns the stored pixels upright.
UPRIGHT = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
# ... and its inverse: how a camera stores an upright picture under that tag.
STORED = {**UPRIGHT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def chw(array: np.ndarray) -> torch.Tensor:
    "An (H, W, 3) or (H, W) uint8 array as a (3, H, W) tensor."
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    "Colours `rgb` (H, W, 3) seen through `alpha` (H, W) on a white page, rounded."
    a = alpha.astype(np.int64)[..., None]
    return ((rgb.astype(np.int64) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def png16(values: np.ndarray) -> bytes:
    "A 16-bit PNG (grey for (H, W), RGB for (H, W, 3)) written by hand: PIL cannot write 16-bit RGB."
    height, width = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + values[i].astype(">u2").tobytes() for i in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# Each mode: a PIL image of random pixels and the tensor a viewer would show, computed with numpy.
def grey_1():
    bits = RNG.integers(0, 2, (HEIGHT, WIDTH)).astype(bool)
    return Image.fromarray(bits), chw(bits.astype(np.uint8) * 255)


def grey_8():
    grey = RNG.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    return Image.fromarray(grey), chw(grey)


def grey_alpha():
    pixels = RNG.integers(0, 256, (HEIGHT, WIDTH, 2), dtype=np.uint8)
    grey = np.repeat(pixels[..., :1], 3, axis=2)
    return Image.fromarray(pixels, "LA"), chw(on_white(grey, pixels[..., 1]))


def rgb():
    pixels = RNG.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return Image.fromarray(pixels), chw(pixels)


def rgba():
    pixels = RNG.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    return Image.fromarray(pixels), chw(on_white(pixels[..., :3], pixels[..., 3]))


def palette():
    image = Image.fromarray(RNG.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).quantize(16)
    return image, chw(np.asarray(image.convert("RGB")))


def palette_transparent():
    image = Image.fromarray(RNG.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).quantize(16)
    image.info["transparency"] = 3
    colours = np.asarray(image.convert("RGB"))
    alpha = np.where(np.asarray(image) == 3, 0, 255)
    return image, chw(on_white(colours, alpha))


def palette_alpha():
    pixels = RNG.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    image = Image.fromarray(pixels[..., :3]).quantize(16).convert("PA")
    image.putalpha(Image.fromarray(pixels[..., 3]))
    rgba_pixels = np.asarray(image.convert("RGBA"))
    return image, chw(on_white(rgba_pixels[..., :3], rgba_pixels[..., 3]))


def cmyk():
    image = Image.fromarray(RNG.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).convert("CMYK")
    return image, chw(np.asarray(image.convert("RGB")))


def ycbcr():
    image = Image.fromarray(RNG.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).convert("YCbCr")
    return image, chw(np.asarray(image.convert("RGB")))


def grey_16():
    values = RNG.integers(0, 65536, (HEIGHT, WIDTH)).astype(np.uint16)
    values[0, 0] = 65535
    return Image.fromarray(values), chw((values >> 8).astype(np.uint8))


def grey_16_big_endian():
    values = RNG.integers(0, 65536, (HEIGHT, WIDTH)).astype(np.uint16)
    image = Image.frombytes("I;16B", (WIDTH, HEIGHT), values.astype(">u2").tobytes())
    return image, chw((values >> 8).astype(np.uint8))


def grey_32():
    values = RNG.integers(-1000, 70000, (HEIGHT, WIDTH)).astype(np.int32)
    return Image.fromarray(values), chw((np.clip(values, 0, 65535) >> 8).astype(np.uint8))


def grey_float():
    values = RNG.uniform(-0.2, 1.2, (HEIGHT, WIDTH)).astype(np.float32)
    return Image.fromarray(values), chw(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8))


MODES = {"1": grey_1, "L": grey_8, "LA": grey_alpha, "RGB": rgb, "RGBA": rgba, "P": palette,
         "P+transparency": palette_transparent, "PA": palette_alpha, "CMYK": cmyk, "YCbCr": ycbcr,
         "I;16": grey_16, "I;16B": grey_16_big_endian, "I": grey_32, "F": grey_float}
LOSSLESS = ("PNG", "TIFF", "BMP", "WEBP")


def saved(image: Image.Image, fmt: str, folder: Path | None, **params) -> Path | io.BytesIO:
    "`image` written as `fmt` into `folder` (into memory when `folder` is None)."
    path = io.BytesIO() if folder is None else folder / f"image.{fmt.lower()}"
    extra = {"WEBP": {"lossless": True}, "JPEG": {"quality": 95}}.get(fmt, {})
    if "transparency" in image.info:
        extra["transparency"] = image.info["transparency"]
    image.save(path, format=fmt, **extra, **params)
    return path


@pytest.mark.parametrize("mode", MODES)
def test_pil_images_of_every_mode(mode):
    image, expected = MODES[mode]()
    loaded = load_image(image)
    assert loaded.dtype == torch.uint8 and loaded.shape == (3, HEIGHT, WIDTH)
    assert torch.equal(loaded, expected)


def writable(mode: str, fmt: str) -> bool:
    "Whether PIL writes an image of `mode` in format `fmt`."
    try:
        saved(MODES[mode]()[0], fmt, None)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


FILE_CASES = [(mode, fmt) for mode in MODES for fmt in ("PNG", "TIFF", "BMP", "GIF", "WEBP", "JPEG") if writable(mode, fmt)]


@pytest.mark.parametrize("mode, fmt", FILE_CASES)
def test_files_of_every_mode(mode, fmt, tmp_path):
    image, expected = MODES[mode]()
    path = saved(image, fmt, tmp_path)
    loaded = load_image(path)
    assert loaded.dtype == torch.uint8 and loaded.shape == (3, HEIGHT, WIDTH)
    with Image.open(path) as reopened:
        as_pil = load_image(reopened)
        writer_kept_mode = reopened.mode == image.mode and ("transparency" in reopened.info) == ("transparency" in image.info)
    assert torch.equal(loaded, as_pil), "the file and the same file opened by PIL give different pixels"
    if writer_kept_mode and fmt in LOSSLESS:
        assert torch.equal(loaded, expected)
    elif writer_kept_mode:  # JPEG (of noise: far from each pixel), or GIF's own palette: the same range
        assert abs(loaded.float().mean() - expected.float().mean()) < 12, (mode, fmt)


def test_transparent_palette_png_is_composited_on_white(tmp_path):
    image, expected = palette_transparent()
    path = saved(image, "PNG", tmp_path)
    assert torch.equal(load_image(path), expected)


@pytest.mark.parametrize("shape", [(HEIGHT, WIDTH), (HEIGHT, WIDTH, 3)])
def test_sixteen_bit_png_in_range(shape, tmp_path):
    values = RNG.integers(0, 65536, shape).astype(np.uint16)
    values.flat[0] = 65535
    path = tmp_path / "deep.png"
    path.write_bytes(png16(values))
    loaded = load_image(path)
    assert loaded.dtype == torch.uint8
    assert torch.equal(loaded, chw((values >> 8).astype(np.uint8)))


def test_sixteen_bit_pngs_reach_the_batch_in_range(tmp_path):
    for i in range(4):
        values = np.full((HEIGHT, WIDTH), 65535, dtype=np.uint16)
        values[:, : WIDTH // 2] = 257 * 128
        Image.fromarray(values).save(tmp_path / f"{'cat' if i % 2 else 'dog'}_{i}.png")
    files = sorted(tmp_path.glob("*.png"))
    dls = ImageDataLoaders.from_name_func(tmp_path, files, lambda f: f.name[:3], valid_pct=0.5, seed=0,
                                          item_tfms=Resize(8), bs=2)
    images, _ = dls.train.one_batch()
    assert images.max().item() == pytest.approx(1.0)
    assert images.min().item() == pytest.approx(128 / 255)


@pytest.mark.parametrize("dtype, scale, expected", [(np.uint16, 65535, 255), (np.float32, 1.0, 255),
                                                     (bool, True, 255), (np.int64, 200, 200)])
def test_arrays_and_tensors_in_range(dtype, scale, expected):
    array = np.full((4, 5), scale, dtype=dtype)
    assert load_image(array).max().item() == expected
    assert load_image(torch.from_numpy(array)[None]).max().item() == expected


def test_integer_pixels_out_of_range_are_refused():
    with pytest.raises(ValueError, match="0 to 255"):
        load_image(torch.full((3, 4, 5), 300, dtype=torch.int64))


def test_rgba_and_grey_alpha_tensors_are_composited_on_white():
    transparent_black = torch.zeros(4, 2, 3, dtype=torch.uint8)
    assert torch.equal(load_image(transparent_black), torch.full((3, 2, 3), 255, dtype=torch.uint8))
    assert torch.equal(load_image(torch.zeros(2, 2, 3, dtype=torch.uint8)), torch.full((3, 2, 3), 255, dtype=torch.uint8))


def upright_picture() -> np.ndarray:
    "An RGB picture whose every pixel differs from its mirror images: a gradient per channel."
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([rows * 40, cols * 25, 255 - rows * 20 - cols * 10], axis=2).astype(np.uint8)


def with_orientation(picture: np.ndarray, orientation: int) -> tuple:
    "(stored image, EXIF bytes): what a camera writes for `picture` held with that `orientation`."
    stored = Image.fromarray(picture)
    if STORED[orientation] is not None:
        stored = stored.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return stored, exif.tobytes()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation, fmt, tmp_path):
    picture = upright_picture()
    stored, exif = with_orientation(picture, orientation)
    path = saved(stored, fmt, tmp_path, exif=exif)
    with Image.open(path) as check:
        assert check.getexif().get(0x0112) == orientation, "the test file should carry the tag"
    loaded = load_image(path)
    assert loaded.shape == (3, HEIGHT, WIDTH), f"orientation {orientation} loaded sideways"
    tolerance = 6 if fmt == "JPEG" else 0
    assert (loaded.int() - chw(picture).int()).abs().float().mean() <= tolerance
    with Image.open(path) as opened:
        assert torch.equal(load_image(opened), loaded)


def test_rotate_90_means_the_top_left_pixel_goes_top_right(tmp_path):
    stored = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    stored[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif.tobytes())
    loaded = load_image(tmp_path / "photo.png")
    assert loaded.shape == (3, WIDTH, HEIGHT)
    assert loaded[:, 0, -1].tolist() == [255, 255, 255]


def downscaled(picture: torch.Tensor, size: tuple) -> torch.Tensor:
    return F.interpolate(picture[None].float(), size=size, mode="area")[0]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_verify_images_shrinks_a_rotated_photo_the_right_way_up(fmt, tmp_path):
    rows, cols = np.mgrid[0:200, 0:300]
    picture = np.stack([rows, cols * 0.8, 255 - rows], axis=2).astype(np.uint8)
    stored = Image.fromarray(picture).transpose(Image.Transpose.ROTATE_90)   # held sideways: tag 6
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "coursekit test camera"   # other metadata should survive
    path = saved(stored, fmt, tmp_path, exif=exif.tobytes())
    original = load_image(path)
    assert original.shape == (3, 200, 300)
    check = verify_images(tmp_path, max_size=100)
    assert check.resized == [path]
    shrunk = load_image(path)
    assert shrunk.shape == (3, 67, 100), "the shrunk photo is stored rotated"
    difference = (shrunk.float() - downscaled(original, (67, 100))).abs().mean()
    assert difference < 4, difference
    with Image.open(path) as resaved:
        assert resaved.format == fmt
        assert resaved.getexif().get(0x0112, 1) == 1
        if fmt in ("JPEG", "PNG", "WEBP"):
            assert resaved.getexif().get(0x010F) == "coursekit test camera"


def test_verify_images_keeps_a_shrunk_jpeg_sharp(tmp_path):
    rows, cols = np.mgrid[0:400, 0:600]
    picture = ((rows // 8 + cols // 8) % 2 * 255).astype(np.uint8)   # a checkerboard: JPEG's hardest case
    Image.fromarray(picture).convert("RGB").save(tmp_path / "board.jpg", quality=95)
    with Image.open(tmp_path / "board.jpg") as original:
        original.thumbnail((300, 300))
        thumbnail = load_image(original)   # the shrunk picture before it is compressed again
    verify_images(tmp_path, max_size=300)
    difference = (load_image(tmp_path / "board.jpg").float() - thumbnail.float()).abs().mean()
    assert difference < 2.5, f"the shrunk JPEG was saved at a low quality (mean error {difference:.1f})"


def test_verify_images_shrinks_a_sixteen_bit_png_in_range(tmp_path):
    rows, cols = np.mgrid[0:200, 0:300]
    values = (rows * 300 + cols * 10).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    original = load_image(tmp_path / "deep.png")
    verify_images(tmp_path, max_size=150)
    shrunk = load_image(tmp_path / "deep.png")
    assert shrunk.dtype == torch.uint8 and shrunk.shape == (3, 100, 150)
    assert (shrunk.float() - downscaled(original, (100, 150))).abs().mean() < 2


def test_pixel_values_of_a_photo_on_the_fast_path_are_unchanged(tmp_path):
    "An opaque 8-bit JPEG without a tag decodes exactly as PIL decodes it (the speed path, kept as it was)."
    picture = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "photo.jpg", quality=90)
    with Image.open(tmp_path / "photo.jpg") as opened:
        reference = torch.from_numpy(np.asarray(ImageOps.exif_transpose(opened).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(load_image(tmp_path / "photo.jpg"), reference)


def test_reading_an_image_never_changes_its_file(tmp_path):
    stored, exif = with_orientation(upright_picture(), 6)
    stored.save(tmp_path / "photo.jpg", exif=exif)
    before = (tmp_path / "photo.jpg").read_bytes()
    load_image(tmp_path / "photo.jpg")
    with Image.open(tmp_path / "photo.jpg") as opened:
        load_image(opened)
        assert opened.getexif().get(0x0112) == 6, "loading a PIL image changed the caller's image"
    assert (tmp_path / "photo.jpg").read_bytes() == before


def test_open_image_shows_what_the_model_sees(tmp_path):
    stored, exif = with_orientation(upright_picture(), 8)
    stored.save(tmp_path / "photo.png", exif=exif)
    Image.fromarray(np.full((HEIGHT, WIDTH), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    shown = open_image(tmp_path / "photo.png")
    assert shown.mode == "RGB" and shown.size == (WIDTH, HEIGHT)
    assert np.array_equal(np.asarray(shown), upright_picture())
    assert np.asarray(open_image(tmp_path / "deep.png")).min() == 255


def test_formats_only_pil_reads_are_kept_and_their_damage_reported(tmp_path):
    "BMP and TIFF (which verify_images accepts) decode too; a truncated one fails with the note naming the file."
    image, _ = rgb()
    for fmt in ("BMP", "TIFF"):
        image.save(tmp_path / f"good.{fmt.lower()}", format=fmt)
    good = sorted(tmp_path.iterdir())
    assert keep_decodable(good) == good
    data = (tmp_path / "good.tiff").read_bytes()
    (tmp_path / "cut.tiff").write_bytes(data[: len(data) // 2])
    assert not can_decode(tmp_path / "cut.tiff")
    with pytest.raises(OSError, match="truncated") as caught:
        load_image(tmp_path / "cut.tiff")
    assert "cut.tiff" in caught.value.__notes__[0] and "verify_images" in caught.value.__notes__[0]
