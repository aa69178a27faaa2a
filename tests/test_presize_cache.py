"""The presize cache is built a batch at a time (the JPEG files of a batch in one `decode_jpeg` call, on the GPU when
the loader is on one) and holds exactly what the item-by-item path gives: checked here on the CPU, where both use
the same decoder, so the tolerance is zero."""
import numpy as np
import pytest
import torch
from PIL import Image

import coursekit.vision.data as vision_data
from coursekit.data.core import build_cache
from coursekit.data.external import URLs, untar_data
from coursekit.vision.data import ImageDataLoaders, Resize, get_image_files, load_image

PETS_PATTERN = r"^(.+)_\d+\.jpg$"


@pytest.fixture(scope="module")
def pets_files():
    files = get_image_files(untar_data(URLs.PETS) / "images")
    assert len(files) == 370, "the mirror's pets sample (COURSEKIT_MIRROR) has 370 images"
    return files


def expected_batch(dl, indices) -> torch.Tensor:
    "The validation batch the item-by-item path gives: each file decoded alone, presized, centre-cropped, as floats."
    kinds = dl.kinds
    images = []
    for i in indices:
        sample = dl.dataset[i]
        for tfm in dl.item_tfms:
            sample = tfm(tfm.prepare(sample, kinds), kinds, False)
        images.append(sample[0])
    return torch.stack(images).float() / 255


def check_loader_matches_items(dl):
    start = 0
    for xb, _ in dl:
        assert torch.equal(xb, expected_batch(dl, range(start, start + len(xb))))
        start += len(xb)
    assert start == len(dl.dataset)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_cache_built_in_batches_equals_the_item_path_on_every_pets_image(pets_files, num_workers):
    dls = ImageDataLoaders.from_name_re(pets_files[0].parent, pets_files, PETS_PATTERN, valid_pct=0.5, seed=0,
                                        item_tfms=Resize(96), bs=64, device="cpu", num_workers=num_workers, cache=True)
    valid = build_cache(dls.valid, chunk_size=50)
    assert valid.is_cached
    check_loader_matches_items(valid)


def write_odd_images(folder, photo: np.ndarray) -> list:
    "The same picture as every kind of file the batched path must still get right: EXIF turns, grey, CMYK, PNG, alpha."
    files = []
    for turn in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = turn
        Image.fromarray(photo).save(folder / f"turned_{turn}.jpg", exif=exif.tobytes(), quality=92)
        files.append(folder / f"turned_{turn}.jpg")
    Image.fromarray(photo).convert("L").save(folder / "grey_1.jpg")
    Image.fromarray(photo).convert("CMYK").save(folder / "cmyk_1.jpg")
    Image.fromarray(photo).save(folder / "png_1.png")
    alpha = np.dstack([photo, np.tile(np.arange(photo.shape[1], dtype=np.uint8), (photo.shape[0], 1))])
    Image.fromarray(alpha, mode="RGBA").save(folder / "clear_1.png")
    return files + [folder / "grey_1.jpg", folder / "cmyk_1.jpg", folder / "png_1.png", folder / "clear_1.png"]


def test_exif_grey_cmyk_and_png_come_out_as_the_item_path_gives(pets_files, tmp_path):
    photo = load_image(pets_files[5]).permute(1, 2, 0).numpy()[:150, :200]
    files = write_odd_images(tmp_path, np.ascontiguousarray(photo))
    dls = ImageDataLoaders.from_name_re(tmp_path, files, r"^(.+)_\d+\.\w+$", valid_pct=0.5, seed=0,
                                        item_tfms=Resize(64), bs=5, device="cpu", cache=True)
    for dl in (dls.valid, dls.train.new(training=False)):
        check_loader_matches_items(build_cache(dl))
    assert len(dls.valid.dataset) + len(dls.train.dataset) == len(files)
    upright = {f.name: load_image(f) for f in files}
    assert upright["turned_6.jpg"].shape == (3, 200, 150) and upright["turned_1.jpg"].shape == (3, 150, 200)


def test_a_batch_of_jpeg_files_is_decoded_in_one_call(pets_files, monkeypatch):
    calls = []
    decode_jpeg = vision_data.decode_jpeg

    def counting_decode_jpeg(data, **kwargs):
        calls.append(len(data) if isinstance(data, list) else 1)
        return decode_jpeg(data, **kwargs)

    monkeypatch.setattr(vision_data, "decode_jpeg", counting_decode_jpeg)
    dls = ImageDataLoaders.from_name_re(pets_files[0].parent, pets_files[:40], PETS_PATTERN, valid_pct=0.5, seed=0,
                                        item_tfms=Resize(64), bs=20, device="cpu", cache=False)
    dls.valid.one_batch()
    assert calls == [20]


def test_a_broken_jpeg_in_a_batch_is_named(pets_files, tmp_path):
    whole = pets_files[2].read_bytes()
    cut = tmp_path / "cut_1.jpg"
    cut.write_bytes(whole[:whole.index(b"\xff\xda") + 20])
    files = [tmp_path / f"whole_{i}.jpg" for i in range(3)]
    for f in files:
        f.write_bytes(whole)
    dls = ImageDataLoaders.from_name_re(tmp_path, files + [cut], r"^(.+)_\d+\.jpg$", valid_pct=0.999, seed=0,
                                        item_tfms=Resize(64), bs=4, device="cpu", cache=True)
    with pytest.raises(RuntimeError) as info:
        build_cache(dls.valid)
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "cut_1.jpg" in notes and "verify_images" in notes
