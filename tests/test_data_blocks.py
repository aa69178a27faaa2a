"""Data pieces a fastai user reaches for (issue 12): grey images and a backbone that reads them, `dls.vocab`
on every classification loader, `DataBlock.new`, factories that check everything before changing anything,
and `predict` errors that say what was expected. Grey images are checked on the MNIST sample of the mirror."""
import dataclasses
import os
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from coursekit.core import set_seed
from coursekit.data.core import (CategoryBlock, DataBlock, GrandparentSplitter, RandomSplitter, Transform,
                                 TransformBlock, parent_label)
from coursekit.data.external import URLs, untar_data
from coursekit.learner import load_learner
from coursekit.metrics import error_rate
from coursekit.tabular.collab import CollabDataLoaders
from coursekit.tabular.data import Categorify, FillMissing, Standardize, TabularDataLoaders
from coursekit.text.data import TextDataLoaders
from coursekit.vision.data import ImageBlock, ImageDataLoaders, Normalize, Resize, get_image_files
from coursekit.vision.learner import BACKBONES, cnn_learner, efficientnet_lite_stats, first_conv

matplotlib.use("Agg")


def mnist_files(step: int = 2) -> list:
    "Every `step`-th file of the MNIST sample (1,200 3s and 7s in train/ and valid/ folders) from the mirror."
    os.environ.setdefault("COURSEKIT_MIRROR", str(Path(__file__).resolve().parents[3] / "shared" / "datasets"))
    path = untar_data(URLs.MNIST_SAMPLE)
    files = get_image_files(path)
    assert len(files) >= 1000, f"The MNIST sample in {path} has too few images ({len(files)}): check COURSEKIT_MIRROR."
    return files[::step]


def grey_block(**changes) -> DataBlock:
    "The MNIST sample as grey images, labelled by folder, split by grandparent folder."
    recipe = DataBlock(blocks=(ImageBlock(channels=1), CategoryBlock), get_y=parent_label, splitter=GrandparentSplitter(),
                       item_tfms=Resize(32))
    return recipe.new(**changes) if changes else recipe


@pytest.fixture(scope="module")
def grey_learner():
    set_seed(0)
    dls = grey_block().dataloaders(mnist_files(), bs=32, device="cpu")
    learn = cnn_learner(dls, "efficientnet_lite0", metrics=error_rate)
    with learn.no_bar():
        learn.fit_one_cycle(1, 1e-2)
    return learn


# --- 1. grey images -----------------------------------------------------------------------------------------------

def test_grey_loaders_give_one_channel_batches():
    dls = grey_block().dataloaders(mnist_files(), bs=16, device="cpu")
    xb, yb = dls.one_batch()
    assert xb.shape == (16, 1, 32, 32)
    assert dls.vocab == ["3", "7"]


def test_grey_learner_reads_one_channel_and_beats_chance(grey_learner):
    assert grey_learner.model_spec["kwargs"]["n_in"] == 1
    assert first_conv(grey_learner.model[0]).in_channels == 1
    norms = [t for t in grey_learner.dls.valid.batch_tfms if isinstance(t, Normalize)]
    assert [(t.mean, t.std) for t in norms] == [([0.498], [0.502])]            # the backbone's stats, one channel
    error = grey_learner.validate()[1]
    assert error < 0.25, f"error rate {error:.3f}: no better than guessing between 3 and 7"


def test_grey_learner_exports_loads_and_predicts_a_pil_image_without_warnings(grey_learner, tmp_path):
    fname = grey_learner.export(tmp_path / "grey.ck")
    loaded = load_learner(fname, device="cpu")
    picture = Image.open(grey_learner.dls.valid.items[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                        # no NumPy "not writable" warning
        label, index, probs = loaded.predict(picture)
        rgb_label, _, rgb_probs = loaded.predict(picture.convert("RGB"))     # an RGB picture is made grey
    assert label == grey_learner.predict(picture)[0]
    assert probs.shape == (2,) and label == rgb_label
    torch.testing.assert_close(probs, rgb_probs)


def test_n_in_that_disagrees_with_the_data_names_the_right_one():
    dls = grey_block().dataloaders(mnist_files(step=60), bs=8, device="cpu")
    with pytest.raises(ValueError, match=r"images with 1 channel\(s\): pass n_in=1"):
        cnn_learner(dls, "resnet18", pretrained=False, n_in=3)
    assert cnn_learner(dls, "resnet18", pretrained=False, n_in=1).model_spec["kwargs"]["n_in"] == 1


def test_rgb_normalisation_on_grey_images_names_channel_stats():
    dls = grey_block(batch_tfms=[Normalize.from_stats(*efficientnet_lite_stats)]).dataloaders(mnist_files(step=60), bs=8,
                                                                                              device="cpu")
    with pytest.raises(ValueError, match="n_in=1"):
        cnn_learner(dls, "efficientnet_lite0")


# --- 2. dls.vocab on every classification loader -------------------------------------------------------------------

def test_every_classification_loader_has_its_class_names_as_vocab(tmp_path):
    images = grey_block().dataloaders(mnist_files(step=60), bs=8, device="cpu")
    assert images.vocab == ["3", "7"]
    tags = pd.DataFrame({"fname": [str(f) for f in mnist_files(step=60)]})
    tags["labels"] = [f"digit {parent_label(f)}" for f in tags["fname"]]
    multi = ImageDataLoaders.from_df(tags, fn_col="fname", label_col="labels", label_delim=" ", item_tfms=Resize(16),
                                     bs=8, device="cpu")
    assert multi.vocab == ["3", "7", "digit"]
    reviews = pd.DataFrame({"text": ["great film", "boring film", "great story", "boring plot"] * 6,
                            "label": ["pos", "neg", "pos", "neg"] * 6, "is_valid": [False] * 16 + [True] * 8})
    assert TextDataLoaders.from_df(reviews, bs=4, cache_dir=tmp_path, device="cpu").vocab == ["neg", "pos"]
    table = pd.DataFrame({"colour": ["red", "blue"] * 10, "age": np.arange(20.0), "salary": ["<50k", ">=50k"] * 10})
    tabular = TabularDataLoaders.from_df(table, procs=[Categorify, FillMissing, Standardize], cat_names=["colour"],
                                         cont_names=["age"], y_names="salary", device="cpu")
    assert tabular.vocab == ["<50k", ">=50k"]
    ratings = pd.DataFrame({"user": [1, 1, 2, 2, 3], "movie": ["a", "b", "a", "c", "b"], "rating": [1.0, 2, 3, 4, 5]})
    collab = CollabDataLoaders.from_df(ratings, bs=2, device="cpu")
    assert list(collab.classes) == ["user", "movie"]                 # fastai's dls.classes: the id lists by column
    for dls in (images, multi, tabular):
        with pytest.raises(AttributeError):
            dls.vocab = ["a", "b"]                                      # read-only: one place defines the classes


# --- 3. DataBlock.new -----------------------------------------------------------------------------------------------

class AddTen(Transform):
    "Test transform: adds 10 to the inputs."
    def __call__(self, sample, kinds, training):
        return (sample[0] + 10, *sample[1:])


def test_data_block_new_replaces_pieces_and_leaves_the_original_unchanged():
    letters = [f"{letter}{i}" for i, letter in enumerate("abcabcabcabc")]
    original = DataBlock(blocks=(TransformBlock, CategoryBlock), get_x=lambda s: float(s[1:]), get_y=lambda s: s[0],
                         splitter=RandomSplitter(0.25, seed=0))
    changed = original.new(batch_tfms=[AddTen()], splitter=RandomSplitter(0.5, seed=0))
    plain_batch = original.dataloaders(letters, bs=3, device="cpu", shuffle=False).train.one_batch()[0]
    assert original.batch_tfms == [] and original.recipe["batch_tfms"] is None
    assert len(original.datasets(letters).valid) == 3 and len(changed.datasets(letters).valid) == 6
    assert all(isinstance(t, AddTen) for t in changed.batch_tfms)
    first = changed.dataloaders(letters, bs=3, device="cpu", shuffle=False).train.one_batch()[0]
    assert (first >= 10).all() and (plain_batch < 10).all()


def test_data_block_new_with_an_unknown_keyword_names_the_valid_ones():
    recipe = grey_block()
    with pytest.raises(TypeError, match="unknown keyword.*item_tfm.*item_tfms, batch_tfms"):
        recipe.new(item_tfm=[Resize(64)])


def test_data_block_new_gives_bigger_images_as_in_the_book():
    small = grey_block()
    big = small.new(item_tfms=Resize(64))
    files = mnist_files(step=60)
    assert big.dataloaders(files, bs=4, device="cpu").one_batch()[0].shape == (4, 1, 64, 64)
    assert small.dataloaders(files, bs=4, device="cpu").one_batch()[0].shape == (4, 1, 32, 32)


# --- 4. a factory that fails changes nothing ------------------------------------------------------------------------

def test_failed_cnn_learner_leaves_the_loaders_and_the_advised_arch_works(monkeypatch):
    def weights_unavailable(pretrained):
        raise RuntimeError("Could not load the ImageNet weights for resnet18 (offline?): use arch='efficientnet_lite0'")

    monkeypatch.setitem(BACKBONES, "resnet18", dataclasses.replace(BACKBONES["resnet18"], make_stages=weights_unavailable))
    dls = grey_block().dataloaders(mnist_files(step=60), bs=8, device="cpu")
    before = [list(dl.batch_tfms) for dl in dls]
    with pytest.raises(RuntimeError, match="efficientnet_lite0"):
        cnn_learner(dls, "resnet18")
    assert [list(dl.batch_tfms) for dl in dls] == before
    learn = cnn_learner(dls, "efficientnet_lite0")
    assert learn.model(dls.one_batch()[0]).shape == (8, 2)


def test_cnn_learner_with_a_bad_keyword_changes_nothing():
    dls = grey_block().dataloaders(mnist_files(step=60), bs=8, device="cpu")
    before = [list(dl.batch_tfms) for dl in dls]
    with pytest.raises(ValueError, match="y_range"):
        cnn_learner(dls, "efficientnet_lite0", y_range=(1, 0))
    assert [list(dl.batch_tfms) for dl in dls] == before


# --- 5. predicting on a wrong input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("item,error,expected", [
    ("no-such-folder/seven.png", FileNotFoundError, "There is no image file at no-such-folder/seven.png"),
    (torch.zeros(5, 32, 32), ValueError, r"1 \(grey\), 2 \(grey, alpha\), 3 \(RGB\) or 4 \(RGBA\) channels, got 5"),
    (torch.zeros(4, 3, 32, 32), ValueError, r"one image at a time \(several: learn.get_preds"),
    (pd.DataFrame({"pixels": [1]}), TypeError, "Cannot make an image from DataFrame: use a path, PIL image, array or tensor"),
])
def test_predict_on_a_wrong_input_names_what_was_expected(grey_learner, item, error, expected):
    with pytest.raises(error, match=expected) as caught:
        grey_learner.predict(item)
    assert all(len(note) < 400 for note in getattr(caught.value, "__notes__", []))   # the item is described, not dumped
