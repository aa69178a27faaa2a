"""`path` in the image factories: file names are relative to it, and a learner built on the loaders saves there."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coursekit.vision.data import ImageDataLoaders, Resize, SegmentationDataLoaders
from coursekit.vision.learner import cnn_features, cnn_learner, cnn_model


@pytest.fixture
def folder(tmp_path):
    "A data folder with 8 small images of two classes (`cat_N.png`, `dog_N.png`) and a mask for each."
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(4):
        for name, colour in (("cat", (200, 50, 50)), ("dog", (50, 50, 200))):
            Image.new("RGB", (40, 32), colour).save(images / f"{name}_{i}.png")
            Image.fromarray(np.full((32, 40), i % 2, dtype=np.uint8)).save(masks / f"{name}_{i}.png")
    return tmp_path


def test_relative_names_are_taken_relative_to_path(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)          # nothing of that name in the current folder
    names = [f"images/{kind}_{i}.png" for kind in ("cat", "dog") for i in range(4)]
    dls = ImageDataLoaders.from_name_re(folder, names, pat=r"^([a-z]+)_\d+\.png$", valid_pct=0.25, seed=0,
                                        item_tfms=Resize(32), bs=2, device="cpu")
    assert dls.path == folder
    assert dls.vocab == ["cat", "dog"]
    assert all(Path(item).parent == folder / "images" for item in [*dls.train.items, *dls.valid.items])
    xb, yb = dls.one_batch()
    assert xb.shape == (2, 3, 32, 32)


def test_absolute_names_are_kept(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    names = sorted((folder / "images").glob("*.png"))
    dls = ImageDataLoaders.from_name_func(elsewhere, names, label_func=lambda f: f.name.split("_")[0], valid_pct=0.25,
                                          seed=0, item_tfms=Resize(32), bs=2, device="cpu")
    assert dls.path == elsewhere
    assert sorted(map(Path, [*dls.train.items, *dls.valid.items])) == names


def test_path_re_and_segmentation_names(folder):
    names = [f"images/{kind}_{i}.png" for kind in ("cat", "dog") for i in range(4)]
    by_path = ImageDataLoaders.from_path_re(folder, names, pat=r"/([a-z]+)_\d+\.png$", valid_pct=0.25, seed=0,
                                            item_tfms=Resize(32), bs=2, device="cpu")
    assert by_path.vocab == ["cat", "dog"] and by_path.path == folder
    seg = SegmentationDataLoaders.from_label_func(folder, names, lambda f: f.parent.parent / "masks" / f.name,
                                                  codes=["a", "b"], valid_pct=0.25, seed=0, item_tfms=Resize(32),
                                                  bs=2, device="cpu")
    assert seg.path == folder
    xb, yb = seg.one_batch()
    assert yb.shape == (2, 32, 32)


def test_learner_saves_under_the_data_folder(folder, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    dls = ImageDataLoaders.from_name_re(folder / "images", [f"cat_{i}.png" for i in range(4)] + ["dog_0.png", "dog_1.png"],
                                        pat=r"^([a-z]+)_\d+\.png$", valid_pct=0.34, seed=0, item_tfms=Resize(32), bs=2,
                                        device="cpu")
    learn = cnn_learner(dls, "resnet18", pretrained=False)
    assert learn.path == folder / "images"
    assert learn.save("stage-1") == folder / "images" / "models" / "stage-1.pth"
    other = tmp_path_factory.mktemp("models_here")
    assert cnn_learner(dls, "resnet18", pretrained=False, path=other).save("x").parent.parent == other


def test_cnn_features_are_the_pooled_vectors_before_the_linear_layers():
    model = cnn_model("resnet18", n_out=3).eval()
    xb = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = cnn_features(model, xb)
        assert features.shape == (2, 1024)
        torch.testing.assert_close(model[1][2:](features), model(xb))
    with pytest.raises(TypeError, match="cnn_model or cnn_learner"):
        cnn_features(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), xb)


def test_importing_multilabel_registers_no_standin():
    check = ("import coursekit.data.external as external\n"
             "import coursekit.vision.multilabel as multilabel\n"
             "assert 'PLANET_SAMPLE' not in external._STANDINS, 'registered at import'\n"
             "multilabel.register_planet_standin()\n"
             "assert external._STANDINS['PLANET_SAMPLE'] is multilabel.make_planet_standin\n")
    subprocess.run([sys.executable, "-c", check], check=True)
