"""`learn.summary()`, `learn.tta()` and `learn.show_results()` on every application, on the mirror's data (issue 12).

The notebook (`nbs/core/06_learner.ipynb`) tests each on stand-ins; here they run on real images with
`aug_transforms`, and `show_results` once per application: each draws (or displays) once and returns None.
"""
import contextlib
import io

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from coursekit.core import set_seed
from coursekit.data.external import URLs, untar_data
from coursekit.tabular.collab import CollabDataLoaders, collab_learner
from coursekit.tabular.data import Categorify, FillMissing, Standardize, TabularDataLoaders
from coursekit.tabular.learner import tabular_learner
from coursekit.text.data import TextDataLoaders
from coursekit.text.learner import language_model_learner, text_classifier_learner
from coursekit.vision.data import ImageDataLoaders, Resize, SegmentationDataLoaders, aug_transforms, get_image_files
from coursekit.vision.learner import cnn_learner
from coursekit.vision.unet import unet_learner

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def mnist_sample(n_per_class: int = 60) -> tuple:
    "The folder and the first `n_per_class` threes and sevens of MNIST_SAMPLE's table."
    path = untar_data(URLs.MNIST_SAMPLE)
    labels = pd.read_csv(path / "labels.csv")
    return path, pd.concat([labels[labels.label == c].head(n_per_class) for c in (0, 1)])


@pytest.fixture(scope="module")
def mnist_learner():
    "A resnet18 trained from scratch for two epochs on 90 images, with the standard augmentations."
    path, table = mnist_sample()
    set_seed(0)
    dls = ImageDataLoaders.from_df(table, path, valid_pct=0.25, seed=0, batch_tfms=aug_transforms(size=28), bs=16,
                                   device="cpu")
    learn = cnn_learner(dls, "resnet18", pretrained=False)
    with learn.no_bar():
        learn.fit_one_cycle(2, 3e-3)
    return learn


def camvid_dls():
    "Twelve CamVid images at 32 px, masks beside them."
    path = untar_data(URLs.CAMVID_TINY)
    codes = np.loadtxt(path / "codes.txt", dtype=str)
    fnames = get_image_files(path / "images")[:12]
    return SegmentationDataLoaders.from_label_func(path, fnames, lambda o: path / "labels" / f"{o.stem}_P{o.suffix}",
                                                   codes=codes, item_tfms=Resize(32), bs=4, device="cpu",
                                                   valid_pct=0.34, seed=0)


def reviews() -> pd.DataFrame:
    "A tiny corpus of labelled reviews, the last quarter for validation."
    texts = ["a great film , loved it", "boring and too long", "great acting , great story", "terrible plot , boring"]
    df = pd.DataFrame({"text": texts * 8, "label": ["pos", "neg", "pos", "neg"] * 8})
    df["is_valid"] = np.arange(len(df)) >= 24
    return df


def adult_learner():
    "A tabular classifier on 200 rows of the adult sample."
    path = untar_data(URLs.ADULT_SAMPLE)
    df = pd.read_csv(path / "adult.csv").head(200)
    dls = TabularDataLoaders.from_df(df, path, procs=[Categorify, FillMissing, Standardize],
                                     cat_names=["workclass", "education"], cont_names=["age", "fnlwgt"],
                                     y_names="salary", valid_idx=list(range(150, 200)), bs=32, device="cpu")
    return tabular_learner(dls)


def ratings_learner():
    "A dot-product collaborative filter on a small ratings table."
    rng = np.random.default_rng(0)
    ratings = pd.DataFrame({"user": np.repeat(np.arange(10), 5), "title": [f"Movie {i % 7}" for i in range(50)],
                            "rating": rng.integers(1, 6, 50).astype(float)}).drop_duplicates(["user", "title"])
    dls = CollabDataLoaders.from_df(ratings, item_name="title", valid_pct=0.2, seed=0, bs=8, device="cpu")
    return collab_learner(dls, n_factors=3, y_range=(0, 5.5))


def text_learners(tmp_path) -> tuple:
    "A language model and a classifier (AWD-LSTM, small configs) on the tiny corpus, sharing one vocabulary."
    dls_lm = TextDataLoaders.from_df(reviews(), is_lm=True, bs=4, seq_len=8, cache_dir=tmp_path, device="cpu")
    dls = TextDataLoaders.from_df(reviews(), text_vocab=dls_lm.vocab, bs=4, cache_dir=tmp_path, device="cpu")
    lm = language_model_learner(dls_lm, config="small_lm", pretrained=False)
    return lm, text_classifier_learner(dls, config="small_clas", pretrained=False)


def printed(show) -> str:
    "What `show()` prints (a table is printed outside a notebook); it must return None."
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert show() is None
    return out.getvalue()


# --- tta ---------------------------------------------------------------------------------------------------------

def test_tta_blends_augmented_passes_into_valid_probabilities(mnist_learner):
    plain, targets = mnist_learner.get_preds()
    set_seed(1)
    preds, tta_targets = mnist_learner.tta()
    torch.testing.assert_close(tta_targets, targets)
    assert preds.shape == plain.shape
    assert (preds - plain).abs().max() > 1e-3, "the augmented passes changed nothing"
    torch.testing.assert_close(preds.sum(1), torch.ones(len(preds)))
    assert (preds >= 0).all() and (preds <= 1).all()


def test_tta_with_beta_one_is_get_preds_and_seeded_runs_repeat(mnist_learner):
    plain, _ = mnist_learner.get_preds()
    torch.testing.assert_close(mnist_learner.tta(beta=1)[0], plain)
    set_seed(3)
    first, _ = mnist_learner.tta(n=2)
    set_seed(3)
    second, _ = mnist_learner.tta(n=2)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_tta_is_about_as_accurate_as_the_plain_pass(mnist_learner):
    plain, targets = mnist_learner.get_preds()
    set_seed(0)
    preds, _ = mnist_learner.tta()
    plain_accuracy = (plain.argmax(1) == targets).float().mean().item()
    tta_accuracy = (preds.argmax(1) == targets).float().mean().item()
    assert tta_accuracy >= plain_accuracy - 0.1, (tta_accuracy, plain_accuracy)


def test_tta_refuses_tables_and_masks_naming_get_preds():
    with pytest.raises(ValueError, match="these inputs are .* use learn.get_preds()"):
        adult_learner().tta()
    with pytest.raises(ValueError, match="cannot average predictions of masks.*use learn.get_preds()"):
        unet_learner(camvid_dls(), "resnet18", pretrained=False).tta()


# --- summary -----------------------------------------------------------------------------------------------------

def test_summary_of_a_cnn_shows_the_real_batch_layer_by_layer(mnist_learner):
    text = mnist_learner.summary()
    lines = text.splitlines()
    assert lines[0] == "Sequential (Input shape: 16 x 3 x 28 x 28)"
    assert lines[2].split() == ["Layer", "(type)", "Output", "Shape", "Param", "#", "Trainable"]
    assert lines[4].split() == ["Conv2d", "16", "x", "64", "x", "14", "x", "14", "9,408", "True"]
    n_params = sum(p.numel() for p in mnist_learner.model.parameters())
    assert f"Total params: {n_params:,}" in text
    assert "Optimizer used: Adam" in text and "Loss function: CrossEntropyLossFlat()" in text
    assert repr(text) == str(text)   # a notebook shows it once, as text


def test_summary_after_freeze_counts_frozen_parameters(mnist_learner):
    mnist_learner.freeze()
    try:
        text = mnist_learner.summary()
    finally:
        mnist_learner.unfreeze()
    trainable = sum(p.numel() for p in mnist_learner.model.parameters())
    n_groups = len(mnist_learner.opt.param_groups)
    assert f"Model frozen up to parameter group #{n_groups - 1} (of {n_groups})" in text
    assert f"Total trainable params: {trainable:,}" not in text


def test_summary_leaves_weights_statistics_modes_and_random_state_alone(mnist_learner):
    model = mnist_learner.model
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    mnist_learner.summary()
    assert torch.equal(torch.rand(4), expected)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_summary_of_the_other_applications(tmp_path):
    lm, clas = text_learners(tmp_path)
    assert lm.summary().startswith("SequentialRNN (Input shape: 4 x ")   # bs x a sequence length near seq_len
    assert "LSTM" in clas.summary()
    assert adult_learner().summary().splitlines()[0] == "TabularModel (Input shape: 32 x 2, 32 x 2)"
    assert "Embedding" in ratings_learner().summary()
    assert "DynamicUnet (Input shape: 4 x 3 x 32 x 32)" in unet_learner(camvid_dls(), "resnet18", pretrained=False).summary()


# --- show_results, every application ------------------------------------------------------------------------------

def test_show_results_single_label_images_draws_each_item_once(mnist_learner):
    plt.close("all")
    assert mnist_learner.show_results(max_n=4) is None
    axes = plt.gcf().axes
    assert len(axes) == 4 and all("/" in ax.get_title() for ax in axes)   # actual/predicted
    plt.close("all")


def test_show_results_multi_label_images():
    path, table = mnist_sample(20)
    table = table.assign(label=[f"{label};{'odd' if i % 2 else 'even'}" for i, label in enumerate(table.label)])
    dls = ImageDataLoaders.from_df(table, path, label_delim=";", valid_pct=0.25, seed=0, bs=8, device="cpu")
    plt.close("all")
    assert cnn_learner(dls, "resnet18", pretrained=False).show_results(max_n=3) is None
    assert len(plt.gcf().axes) == 3
    plt.close("all")


def test_show_results_segmentation_draws_actual_and_predicted_masks():
    plt.close("all")
    assert unet_learner(camvid_dls(), "resnet18", pretrained=False).show_results(max_n=2) is None
    assert [ax.get_title() for ax in plt.gcf().axes] == ["actual", "predicted"] * 2
    plt.close("all")


def test_show_results_text_classifier_and_language_model_print_one_table(tmp_path):
    lm, clas = text_learners(tmp_path)
    shown = printed(lambda: clas.show_results(max_n=2))
    assert shown.count("label_pred") == 1
    shown = printed(lambda: lm.show_results(max_n=2))
    assert shown.count("target_pred") == 1


def test_show_results_tabular_and_collab_print_one_table():
    shown = printed(lambda: adult_learner().show_results(max_n=3))
    assert shown.count("salary_pred") == 1
    shown = printed(lambda: ratings_learner().show_results(max_n=3))
    assert shown.count("rating_pred") == 1
