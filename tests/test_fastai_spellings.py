"""The spellings a fastai course or book user types (issue 12): each one works with fastai's meaning, or fails
with a message that names coursekit's spelling. The table itself is in `nbs/core/11_from_fastai.ipynb`."""
import dataclasses
import pickle
import subprocess
import sys
import types
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from coursekit.core import exportable_spec, set_seed
from coursekit.data.core import CategoryBlock, DataBlock, DataLoaders, FuncSplitter, RegexLabeller
from coursekit.data.external import URLs, untar_data
from coursekit.interpret import ClassificationInterpretation, MultiLabelClassificationInterpretation
from coursekit.learner import Learner, load_learner, minimum, simple_mlp
from coursekit.metrics import accuracy
from coursekit.tabular.collab import CollabDataLoaders, CollabInterpretation, collab_learner, pca
from coursekit.tabular.data import Categorify, FillMissing, Standardize, TabularDataLoaders
from coursekit.tabular.learner import tabular_learner
from coursekit.text.data import TextDataLoaders
from coursekit.text.learner import language_model_learner, text_classifier_learner
from coursekit.text.models import AWD_CONFIGS, get_language_model
from coursekit.vision.data import (ImageBlock, ImageDataLoaders, Normalize, PointBlock, Resize, SegmentationDataLoaders,
                                   get_image_files)
from coursekit.vision.learner import BACKBONES, cnn_learner
from coursekit.vision.unet import unet_learner

ADULT_CATS = ["workclass", "education", "marital-status", "occupation", "relationship", "race"]
ADULT_CONTS = ["age", "fnlwgt", "education-num"]


def ratings() -> pd.DataFrame:
    "Every user rates every movie once, 1 to 5 stars; users are numbers and movies titles, as in MovieLens."
    rng = np.random.default_rng(0)
    pairs = [(u, m) for u in range(10) for m in range(8)]
    return pd.DataFrame({"user": [u for u, _ in pairs], "title": [f"Movie {m} (199{m})" for _, m in pairs],
                         "rating": rng.integers(1, 6, len(pairs)).astype(float)})


def people(n: int = 40) -> pd.DataFrame:
    "A small table with a category, a number with holes and a string target."
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 60, n)
    age[::7] = np.nan
    return pd.DataFrame({"colour": rng.choice(["red", "blue", "green"], n), "age": age,
                         "salary": np.where(rng.random(n) > 0.5, ">=50k", "<50k")})


def reviews() -> pd.DataFrame:
    "A tiny corpus of labelled reviews, the last quarter for validation."
    texts = ["a great film , loved it", "boring and too long", "great acting , great story", "terrible plot , boring"]
    df = pd.DataFrame({"text": texts * 8, "label": ["pos", "neg", "pos", "neg"] * 8})
    df["is_valid"] = np.arange(len(df)) >= 24
    return df


# --- collab: learn.model.bias(items) / learn.model.weight(items), pca(x, k) ---------------------------------------

@pytest.fixture
def collab():
    dls = CollabDataLoaders.from_df(ratings(), item_name="title", valid_pct=0.2, seed=0, bs=16, device="cpu")
    learn = collab_learner(dls, n_factors=4, y_range=(0, 5.5))
    with learn.no_bar():
        learn.fit_one_cycle(1, 5e-3)
    return learn


def test_model_bias_takes_the_course_item_ids(collab):
    top_movies = ["Movie 3 (1993)", "Movie 0 (1990)"]
    movie_bias = collab.model.bias(top_movies, is_item=True)
    assert movie_bias.shape == (2,)
    expected = collab.model.i_bias.weight[[3, 0], 0].detach()
    torch.testing.assert_close(movie_bias, expected)


def test_model_bias_and_weight_default_to_items_and_read_users_with_is_item_false(collab):
    torch.testing.assert_close(collab.model.bias(["Movie 1 (1991)"]), collab.model.i_bias.weight[[1], 0].detach())
    torch.testing.assert_close(collab.model.weight([7, 2], is_item=False), collab.model.u_weight.weight[[7, 2]].detach())


def test_model_weight_and_pca_as_the_course_spells_them(collab):
    top_movies = [f"Movie {m} (199{m})" for m in range(8)]
    movie_w = collab.model.weight(top_movies, is_item=True)
    assert movie_w.shape == (8, 4)
    movie_pca = pca(movie_w, 3)
    assert movie_pca.shape == (8, 3)
    variances = movie_pca.var(0)
    assert variances[0] >= variances[1] >= variances[2]


def test_model_bias_names_an_unknown_item(collab):
    with pytest.raises(KeyError, match="Movie 99"):
        collab.model.bias(["Movie 99 (2099)"])


def test_interpretation_reads_the_same_numbers_as_the_model(collab):
    interp = CollabInterpretation.from_learner(collab)
    titles = ["Movie 5 (1995)", "Movie 2 (1992)"]
    np.testing.assert_allclose(interp.bias(titles).to_numpy(), collab.model.bias(titles).numpy())
    np.testing.assert_allclose(interp.weight(titles).to_numpy(), collab.model.weight(titles).numpy())


def test_after_export_the_interpretation_joins_the_weights_and_the_ids(collab, tmp_path):
    collab.path = tmp_path
    loaded = load_learner(collab.export("movies.ck"), device="cpu")
    titles = ["Movie 4 (1994)", "Movie 6 (1996)"]
    with pytest.raises(ValueError, match=r"CollabInterpretation\.from_learner\(learn\)"):
        loaded.model.bias(titles)
    interp = CollabInterpretation.from_learner(loaded)
    np.testing.assert_allclose(interp.bias(titles).to_numpy(), collab.model.bias(titles).numpy())


# --- text: text_vocab=dls_lm.vocab, text_classifier_learner(pretrained=...) ------------------------------------------

@pytest.fixture
def dls_lm(tmp_path):
    return TextDataLoaders.from_df(reviews(), is_lm=True, bs=4, seq_len=8, cache_dir=tmp_path, device="cpu")


def test_text_vocab_takes_the_language_model_vocab(dls_lm, tmp_path):
    dls_clas = TextDataLoaders.from_df(reviews(), text_vocab=dls_lm.vocab, bs=8, cache_dir=tmp_path, device="cpu")
    assert dls_clas.text_vocab == dls_lm.text_vocab


def test_text_vocab_of_class_names_names_the_language_model_vocab(dls_lm, tmp_path):
    dls_clas = TextDataLoaders.from_df(reviews(), text_vocab=dls_lm.vocab, bs=8, cache_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match=r"dls_lm\.vocab"):
        TextDataLoaders.from_df(reviews(), text_vocab=dls_clas.vocab, bs=8, cache_dir=tmp_path, device="cpu")


def wikitext_files(folder, itos: list) -> tuple:
    "A checkpoint in fastai's WikiText-103 format (key names and pickled vocabulary) for the small configuration."
    state = get_language_model(len(itos), AWD_CONFIGS["small_lm"]).state_dict()
    torch.save(state, folder / "lstm_fwd.pth")
    with open(folder / "itos_wt103.pkl", "wb") as f:
        pickle.dump(itos, f)
    return (folder / "lstm_fwd.pth", folder / "itos_wt103.pkl"), state


def test_text_classifier_pretrained_loads_the_encoder_and_freezes_it(dls_lm, tmp_path):
    dls_clas = TextDataLoaders.from_df(reviews(), text_vocab=dls_lm.vocab, bs=8, cache_dir=tmp_path, device="cpu")
    itos = ["xxunk", "xxpad", "great", "film"] + [f"w{i}" for i in range(12)]
    fnames, state = wikitext_files(tmp_path, itos)
    learn = text_classifier_learner(dls_clas, config="small_clas", pretrained=True, pretrained_fnames=fnames)
    encoder = learn.model[0].module
    row = dls_clas.text_vocab.stoi["great"]
    torch.testing.assert_close(encoder.encoder.weight[row].detach(), state["0.encoder.weight"][2])
    torch.testing.assert_close(encoder.rnns[0].weight_hh_l0_raw.detach(), state["0.rnns.0.weight_hh_l0_raw"])
    assert not any(p.requires_grad for p in encoder.parameters())
    assert all(p.requires_grad for p in learn.model[1].parameters())


def test_text_classifier_without_pretrained_trains_everything(dls_lm, tmp_path):
    dls_clas = TextDataLoaders.from_df(reviews(), text_vocab=dls_lm.vocab, bs=8, cache_dir=tmp_path, device="cpu")
    learn = text_classifier_learner(dls_clas, config="small_clas", pretrained=False)
    assert all(p.requires_grad for p in learn.model.parameters())


# --- tabular: from_df(df, path, procs=..., ...), procs=[Categorify, FillMissing, Normalize] ---------------------------

def test_tabular_from_df_takes_the_course_positional_path(tmp_path):
    df = people()
    dls = TabularDataLoaders.from_df(df, tmp_path, procs=[Categorify, FillMissing, Standardize], cat_names=["colour"],
                                     cont_names=["age"], y_names="salary", valid_idx=list(range(30, 40)), bs=8,
                                     device="cpu")
    assert dls.path == tmp_path
    assert len(dls.valid.items) == 10
    assert sorted(dls.valid.items.index) == list(range(30, 40))


def test_tabular_from_csv_takes_path_as_the_course_does(tmp_path):
    people().to_csv(tmp_path / "adult.csv", index=False)
    dls = TabularDataLoaders.from_csv(tmp_path / "adult.csv", path=tmp_path, y_names="salary", cat_names=["colour"],
                                      cont_names=["age"], procs=[Categorify, FillMissing, Standardize], device="cpu")
    assert dls.path == tmp_path


def test_tabular_columns_in_the_old_positional_order_name_the_keywords(tmp_path):
    with pytest.raises(TypeError, match="cat_names="):
        TabularDataLoaders.from_df(people(), ["colour"], ["age"], "salary", device="cpu")


def test_the_course_normalize_proc_names_standardize():
    with pytest.raises(TypeError, match="Standardize"):
        TabularDataLoaders.from_df(people(), procs=[Categorify, FillMissing, Normalize], cat_names=["colour"],
                                   cont_names=["age"], y_names="salary", device="cpu")


# --- the notebook star import ------------------------------------------------------------------------------------------

def star_import() -> dict:
    namespace = {}
    exec("from coursekit.all import *", namespace)
    return namespace


def test_star_import_gives_what_a_fastai_notebook_has():
    names = star_import()
    for name in ("np", "pd", "torch", "nn", "F", "partial", "Path", "plt"):
        assert name in names, f"from coursekit.all import * does not give {name}"
    assert names["nn"] is torch.nn and names["F"] is torch.nn.functional


def test_star_import_gives_the_torchvision_architectures_by_name():
    names = star_import()
    for arch in ("resnet18", "resnet34", "resnet50"):
        assert names[arch] is getattr(torchvision.models, arch)


def test_star_import_gives_no_module_under_a_fastai_function_name():
    vision_learner = star_import()["vision_learner"]
    with pytest.raises(TypeError, match="coursekit calls it cnn_learner"):
        vision_learner(None, torchvision.models.resnet34)


@pytest.mark.parametrize("name,ours", [("ImageDataBunch", "ImageDataLoaders"), ("get_transforms", "aug_transforms"),
                                       ("DataBunch", "DataLoaders"), ("create_cnn", "cnn_learner"),
                                       ("TabularPandas", "TabularDataLoaders.from_df"),
                                       ("TextClasDataBunch", "TextDataLoaders"), ("CollabDataBunch", "CollabDataLoaders")])
def test_fastai_names_name_coursekit_ones(name, ours):
    signpost = star_import()[name]
    with pytest.raises(TypeError, match=f"coursekit calls it {ours}"):
        signpost()
    with pytest.raises(AttributeError, match=f"coursekit calls it {ours}"):
        signpost.from_folder


@pytest.mark.parametrize("make", ["tabular", "collab", "text"])
def test_show_batch_rows_names_max_n(make, tmp_path):
    if make == "tabular":
        dls = TabularDataLoaders.from_df(people(), procs=[Categorify, FillMissing, Standardize], cat_names=["colour"],
                                         cont_names=["age"], y_names="salary", device="cpu")
    elif make == "collab":
        dls = CollabDataLoaders.from_df(ratings(), item_name="title", device="cpu")
    else:
        dls = TextDataLoaders.from_df(reviews(), bs=8, cache_dir=tmp_path, device="cpu")
    with pytest.raises(TypeError, match="takes max_n=, not fastai's rows="):
        dls.show_batch(rows=3)


def test_star_import_patches_no_other_library():
    check = ("import pathlib, torch\nfrom coursekit.all import *\n"
             "assert not hasattr(pathlib.Path, 'ls'), 'Path.ls'\nassert not hasattr(torch.Tensor, 'pca'), 'Tensor.pca'")
    subprocess.run([sys.executable, "-c", check], check=True)


# --- the course's flows on the mirror data, judged against a trivial baseline ------------------------------------------

def test_tabular_as_the_course_spells_it_beats_the_majority_class():
    path = untar_data(URLs.ADULT_SAMPLE)
    with pytest.raises(TypeError, match="Standardize"):                 # the course's procs name ours
        TabularDataLoaders.from_csv(path / "adult.csv", path=path, y_names="salary", cat_names=ADULT_CATS,
                                    cont_names=ADULT_CONTS, procs=[Categorify, FillMissing, Normalize])
    set_seed(0)
    dls = TabularDataLoaders.from_csv(path / "adult.csv", path=path, y_names="salary", cat_names=ADULT_CATS,
                                      cont_names=ADULT_CONTS, procs=[Categorify, FillMissing, Standardize], seed=42,
                                      bs=256, device="cpu")
    learn = tabular_learner(dls, metrics=accuracy)
    with learn.no_bar():
        learn.fit_one_cycle(1, 1e-2)
    majority = dls.valid.items["salary"].value_counts(normalize=True).max()
    assert learn.validate()[1] > majority + 0.03


def test_collab_as_the_course_spells_it_beats_the_mean_rating():
    path = untar_data(URLs.ML_100k)
    ratings = pd.read_csv(path / "u.data", delimiter="\t", header=None, names=["user", "movie", "rating", "timestamp"])
    movies = pd.read_csv(path / "u.item", delimiter="|", encoding="latin-1", usecols=(0, 1), names=("movie", "title"),
                         header=None)
    ratings = ratings.merge(movies)
    with pytest.raises(ValueError, match="groupby"):       # two movies share a title: the error says how to merge them
        CollabDataLoaders.from_df(ratings, item_name="title", bs=64)
    ratings = ratings.groupby(["user", "title"], as_index=False)["rating"].mean()
    set_seed(0)
    dls = CollabDataLoaders.from_df(ratings, item_name="title", bs=256, seed=42, device="cpu")
    learn = collab_learner(dls, n_factors=50, y_range=(0, 5.5))
    with learn.no_bar():
        learn.fit_one_cycle(2, 5e-3, wd=0.1)
    train_mean = dls.train.items["rating"].mean()
    baseline = ((dls.valid.items["rating"] - train_mean) ** 2).mean()
    assert learn.validate()[0] < baseline - 0.15
    g = ratings.groupby("title")["rating"].count()
    top_movies = g.sort_values(ascending=False).index.values[:100]
    movie_bias = learn.model.bias(top_movies, is_item=True)
    movie_pca = pca(learn.model.weight(top_movies, is_item=True), 3)
    assert movie_bias.shape == (100,) and movie_pca.shape == (100, 3)


# --- the learner: fit_one_cycle(max_lr=), fine_tune(max_lr=), lr_find(suggestions=), show_results(rows=), ------------
# --- recorder.plot() ---------------------------------------------------------------------------------------------------

def small_learner():
    "A linear classifier on two blobs (no data files needed)."
    from coursekit.data.core import DataLoaders
    from coursekit.learner import Learner, simple_mlp
    set_seed(0)
    x = torch.randn(64, 2)
    items = list(zip(x, (x.sum(1) > 0).long()))
    dls = DataLoaders.from_dsets(items[:48], items[48:], bs=16, device="cpu", vocab=["neg", "pos"])
    return Learner(dls, simple_mlp(2, 2), cbs=[])


@pytest.mark.parametrize("call, ours, theirs", [
    (lambda learn: learn.fit_one_cycle(1, max_lr=slice(1e-6, 1e-4)), "lr_max", "max_lr"),
    (lambda learn: learn.fit_one_cycle(1, 1e-3, div_factor=10.), "div", "div_factor"),
    (lambda learn: learn.fit_one_cycle(1, 1e-3, final_div=1e4), "div_final", "final_div"),
    (lambda learn: learn.fit_one_cycle(1, 1e-3, callbacks=[]), "cbs", "callbacks"),
    (lambda learn: learn.fine_tune(1, max_lr=1e-3), "base_lr", "max_lr"),
    (lambda learn: learn.lr_find(suggestions=True), "suggest_funcs", "suggestions"),
    (lambda learn: learn.show_results(rows=3), "max_n", "rows"),
], ids=["fit_one_cycle-max_lr", "fit_one_cycle-div_factor", "fit_one_cycle-final_div", "fit_one_cycle-callbacks",
        "fine_tune-max_lr", "lr_find-suggestions", "show_results-rows"])
def test_learner_keywords_from_fastai_name_ours(call, ours, theirs):
    learn = small_learner()
    with pytest.raises(TypeError, match=f"takes {ours}=, not fastai's {theirs}="):
        call(learn)
    assert learn.recorder.values == [] and learn.opt is None   # refused before anything ran


def test_recorder_plot_names_the_lr_finder_plot_and_plot_loss():
    learn = small_learner()
    with pytest.raises(TypeError, match=r"learn.lr_find\(\) \(it draws the LR finder's plot\) or learn.recorder.plot_loss\(\)"):
        learn.recorder.plot()
    with pytest.raises(AttributeError, match="coursekit calls it learn.lr_find()"):
        learn.recorder.plot.suggestion   # fastai v1: learn.recorder.plot(suggestion=True) and friends


@pytest.mark.parametrize("v1, ours", [("plot_losses", "plot_loss"), ("plot_lr", "plot_sched")])
def test_recorder_v1_plot_names_name_the_v2_ones(v1, ours):
    recorder = small_learner().recorder
    with pytest.raises(TypeError, match=f"recorder.{v1} is fastai's name; coursekit calls it recorder.{ours}"):
        getattr(recorder, v1)()
    assert callable(getattr(recorder, ours))


def test_the_course_keywords_work(tmp_path):
    learn = small_learner()
    learn.path = tmp_path
    with learn.no_bar():
        learn.fit_one_cycle(1, lr_max=slice(1e-4, 1e-2))
        learn.fine_tune(1, base_lr=1e-3)
    assert len(learn.recorder.values) == 1   # fine_tune's last fit: one epoch
    suggestion = learn.lr_find(num_it=10, show_plot=False, suggest_funcs=(minimum,))
    assert suggestion.minimum > 0


# --- vision spellings: show_batch(rows=), data.normalize, v1 factory keywords and path regexes, torchvision archs ----

def mnist_loaders(**kwargs):
    "The MNIST sample's 3s and 7s from the mirror, by folder, at 16 px."
    return ImageDataLoaders.from_folder(untar_data(URLs.MNIST_SAMPLE), item_tfms=Resize(16), bs=8, device="cpu", **kwargs)


def pet_names() -> tuple:
    "The pets images folder and twenty file names relative to it (two breeds)."
    folder = untar_data(URLs.PETS) / "images"
    return folder, [f.name for f in get_image_files(folder)[:20]]


def test_image_show_batch_and_show_results_rows_name_max_n():
    dls = mnist_loaders()
    with pytest.raises(TypeError, match="takes max_n=, not fastai's rows="):
        dls.show_batch(rows=3)
    xb, yb = dls.valid.one_batch()
    with pytest.raises(TypeError, match="takes max_n=, not fastai's rows="):
        dls.show_results((xb, yb), yb, rows=3)


def test_v1_data_normalize_names_a_normalize_batch_transform():
    names = star_import()
    with pytest.raises(TypeError, match=r"batch_tfms=\[\*aug_transforms\(size=224\), Normalize.from_stats\(\*imagenet_stats\)\]"):
        mnist_loaders().normalize(names["imagenet_stats"])


def test_v1_factory_keywords_name_item_and_batch_transforms():
    folder, names = pet_names()
    pat = r"^(.+)_\d+\.jpg$"
    with pytest.raises(TypeError, match="from_name_re\\(\\) takes batch_tfms=, not fastai's ds_tfms="):
        ImageDataLoaders.from_name_re(folder, names, pat, ds_tfms=star_import()["aug_transforms"](), size=224)
    with pytest.raises(TypeError, match="takes item_tfms=, not fastai's size="):
        ImageDataLoaders.from_name_re(folder, names, pat, size=224)
    with pytest.raises(TypeError, match="takes item_tfms=, not fastai's size="):
        ImageDataLoaders.from_folder(untar_data(URLs.MNIST_SAMPLE), size=28)


def test_a_v1_path_regex_in_from_name_re_names_from_path_re():
    folder, names = pet_names()
    v1_pattern = r"/([^/]+)_\d+.jpg$"
    with pytest.raises(ValueError, match="matches no file name .* Use ImageDataLoaders.from_path_re"):
        ImageDataLoaders.from_name_re(folder, names, v1_pattern)
    by_path = ImageDataLoaders.from_path_re(folder, names, v1_pattern, item_tfms=Resize(16), device="cpu")
    assert by_path.vocab == sorted({name.rsplit("_", 1)[0] for name in names})


def test_cnn_learner_takes_torchvision_functions_as_the_string_names(tmp_path):
    resnet34 = star_import()["resnet34"]
    dls = mnist_loaders()
    by_function = cnn_learner(dls, resnet34, pretrained=False, path=tmp_path)
    by_name = cnn_learner(dls, "resnet34", pretrained=False, path=tmp_path)
    assert by_function.model_spec == by_name.model_spec                  # the spec records the name: JSON, exportable
    loaded = load_learner(by_function.export("by_function.ck"), device="cpu")
    assert loaded.predict(dls.valid.items[0])[0] in ("3", "7")


def test_image_block_cls_pil_image_bw_names_channels():
    names = star_import()
    with pytest.raises(TypeError, match="takes channels=, not fastai's cls="):
        names["ImageBlock"](cls=names["PILImageBW"])
    with pytest.raises(TypeError, match=r"coursekit calls it ImageBlock\(channels=1\)"):
        names["PILImageBW"]()
    assert ImageBlock(channels=1).channels == 1



# --- unet_learner: checks everything first, changes the loaders last, takes torchvision's functions -----------------

def camvid_loaders(**kwargs):
    "Eight CamVid frames at 64x96 from the mirror, with their masks."
    camvid = untar_data(URLs.CAMVID_TINY)
    codes = (camvid / "codes.txt").read_text().split()
    frames = get_image_files(camvid / "images")[:8]
    return SegmentationDataLoaders.from_label_func(camvid, frames, lambda f: camvid / "labels" / f"{f.stem}_P{f.suffix}",
                                                   codes=codes, valid_pct=0.25, seed=0, item_tfms=Resize((64, 96)),
                                                   bs=4, device="cpu", **kwargs)


def test_failed_unet_learner_leaves_the_loaders_and_the_advised_arch_works(monkeypatch):
    def weights_unavailable(pretrained):
        raise RuntimeError("Could not load the ImageNet weights for resnet18 (offline?): use arch='efficientnet_lite0'")

    monkeypatch.setitem(BACKBONES, "resnet18", dataclasses.replace(BACKBONES["resnet18"], make_stages=weights_unavailable))
    dls = camvid_loaders()
    before = [list(dl.batch_tfms) for dl in dls]
    with pytest.raises(RuntimeError, match="efficientnet_lite0"):
        unet_learner(dls, "resnet18")
    assert [list(dl.batch_tfms) for dl in dls] == before
    learn = unet_learner(dls, "efficientnet_lite0")
    assert learn.model.eval()(dls.one_batch()[0]).shape == (4, len(dls.vocab), 64, 96)


def test_unet_learner_with_a_wrong_n_in_changes_nothing():
    dls = camvid_loaders()
    before = [list(dl.batch_tfms) for dl in dls]
    with pytest.raises(ValueError, match="n_in=1, but the DataLoaders give images with 3 channel"):
        unet_learner(dls, "efficientnet_lite0", n_in=1)
    assert [list(dl.batch_tfms) for dl in dls] == before


def test_unet_learner_takes_torchvision_functions_as_the_string_names(tmp_path):
    resnet34 = star_import()["resnet34"]
    dls = camvid_loaders()
    by_function = unet_learner(dls, resnet34, pretrained=False, path=tmp_path)
    by_name = unet_learner(dls, "resnet34", pretrained=False, path=tmp_path)
    assert by_function.model_spec == by_name.model_spec                  # the spec records the name: JSON, exportable
    assert by_function.model_spec["kwargs"]["arch"] == "resnet34"
    loaded = load_learner(by_function.export("unet_by_function.ck"), device="cpu")
    assert type(loaded.model).__name__ == "DynamicUnet"


# --- tabular: dls.classes is fastai's {categorical column: its Categorify vocab}; dls.vocab the target's ------------

def test_tabular_classes_are_the_categorify_vocabs_as_in_fastai():
    dls = TabularDataLoaders.from_df(people(), procs=[Categorify, FillMissing, Standardize], cat_names=["colour"],
                                     cont_names=["age"], y_names="salary", valid_idx=list(range(30, 40)), device="cpu")
    assert dls.classes == {"colour": ["#na#", "blue", "green", "red"], "age_na": ["#na#", False, True]}
    assert dls.vocab == ["<50k", ">=50k"]                                # the target's classes, as before
    dls.classes["colour"].append("purple")                              # a copy: the model's vocab is unchanged
    assert dls.processor.categorify.vocab["colour"] == ["#na#", "blue", "green", "red"]


def test_tabular_classes_without_categorify_says_to_add_it():
    dls = TabularDataLoaders.from_df(people().dropna(), procs=[Standardize], cont_names=["age"], y_names="salary",
                                     device="cpu")
    with pytest.raises(AttributeError, match="add Categorify to procs"):
        dls.classes


# --- tabular learn.predict: fastai's (row, clas, probs); many rows or a tensor name get_preds ----------------------

def people_learner():
    "A small tabular classifier on `people()`, untrained (predict's shape does not depend on training)."
    dls = TabularDataLoaders.from_df(people(), procs=[Categorify, FillMissing, Standardize], cat_names=["colour"],
                                     cont_names=["age"], y_names="salary", valid_idx=list(range(30, 40)), bs=8,
                                     device="cpu")
    return tabular_learner(dls, layers=[8])


def test_tabular_predict_returns_fastai_row_clas_probs(tmp_path):
    learn = people_learner()
    df = people()
    row, clas, probs = learn.predict(df.iloc[1])                       # book: row, clas, probs = learn.predict(df.iloc[0])
    assert isinstance(row, pd.DataFrame) and list(row.index) == [1]
    assert list(row.columns) == ["colour", "age_na", "age", "salary"]    # decoded inputs, then the predicted target
    assert row["colour"].iloc[0] == df["colour"].iloc[1]
    assert row["age"].iloc[0] == pytest.approx(df["age"].iloc[1], rel=1e-4)
    assert row["salary"].iloc[0] == learn.dls.vocab[int(clas)]
    assert clas.ndim == 0 and int(clas) == int(probs.argmax())
    assert probs.shape == (2,) and float(probs.sum()) == pytest.approx(1, abs=1e-5)
    learn.path = tmp_path
    loaded = load_learner(learn.export("people.ck"), device="cpu")
    loaded_row, loaded_clas, loaded_probs = loaded.predict(df.iloc[1])
    pd.testing.assert_frame_equal(loaded_row, row)
    torch.testing.assert_close(loaded_probs, probs)


def test_tabular_predict_takes_a_one_row_dataframe_and_a_dict():
    learn = people_learner()
    df = people()
    by_series = learn.predict(df.iloc[1])
    by_frame = learn.predict(df.iloc[[1]])
    by_dict = learn.predict(df.iloc[1].to_dict())
    torch.testing.assert_close(by_frame[2], by_series[2])
    torch.testing.assert_close(by_dict[2], by_series[2])


@pytest.mark.parametrize("many", [lambda df: df.iloc[:3], lambda df: torch.zeros(2)])
def test_tabular_predict_on_many_rows_or_a_tensor_names_get_preds(many):
    learn = people_learner()
    with pytest.raises(TypeError, match=r"learn\.get_preds\(dl=learn\.dls\.test_dl\(df\)\)"):
        learn.predict(many(people()))


# --- text learn.predict: one text, as a string; anything else says what to pass ---------------------------------------

@pytest.fixture
def review_classifier(tmp_path):
    dls = TextDataLoaders.from_df(reviews(), bs=8, cache_dir=tmp_path, device="cpu")
    return text_classifier_learner(dls, config="small_clas", pretrained=False)


def test_text_predict_takes_a_string(review_classifier):
    label, clas, probs = review_classifier.predict("a great film")
    assert label in ("neg", "pos") and probs.shape == (2,)


@pytest.mark.parametrize("item,expected", [
    (["a", "great", "film"], r"got a list of 3 strings.*learn\.get_preds\(dl=learn\.dls\.test_dl\(texts\)\)"),
    (3, r"got an int \(3\).*learn\.predict\('a great film'\)"),
    (None, r"got None.*learn\.predict\('a great film'\)"),
    (pd.Series(["a great film", "boring"]),
     r"got a pandas Series of 2 strings.*learn\.get_preds\(dl=learn\.dls\.test_dl\(texts\)\)"),
])
def test_text_predict_on_a_non_string_says_what_to_pass(review_classifier, item, expected):
    with pytest.raises(TypeError, match=expected):
        review_classifier.predict(item)


def test_text_test_dl_refuses_a_non_string_among_the_texts(review_classifier):
    with pytest.raises(TypeError, match=r"got None"):
        review_classifier.dls.test_dl(["a great film", None])


def test_language_model_predict_on_a_non_string_says_what_to_pass(dls_lm):
    learn = language_model_learner(dls_lm, config="small_lm", pretrained=False)
    assert learn.predict("a great", n_words=2, temperature=0).startswith("a great ")
    with pytest.raises(TypeError, match=r"got a list of 2 strings.*' '\.join\(tokens\)"):
        learn.predict(["a", "great"], n_words=2)
    with pytest.raises(TypeError, match=r"got None"):
        learn.predict(None)


# --- the rows that did not give directions yet: ImageClassifierCleaner, nrows=, using_attr, export.pkl, path=, tensor, L

def test_image_classifier_cleaner_names_image_cleaner_from_toplosses():
    names = star_import()
    expected = r"coursekit calls it ImageCleaner\.from_toplosses, e\.g\. ImageCleaner\.from_toplosses\(learn\)"
    with pytest.raises(TypeError, match=expected):
        names["ImageClassifierCleaner"](None)


def pictures_interpretation(n: int = 6) -> ClassificationInterpretation:
    "An interpretation of `n` small random pictures, two classes, without a model: what plot_top_losses draws."
    loader = types.SimpleNamespace(items=list(range(n)), dataset=[(torch.rand(3, 8, 8), 0)] * n)
    preds = torch.softmax(torch.randn(n, 2), 1)
    targs = torch.zeros(n, dtype=torch.long)
    return ClassificationInterpretation(loader, ["cat", "dog"], preds, targs, preds.argmax(1), -preds[:, 0].log())


def grid_shape(axes) -> tuple:
    "(rows, columns) of the figure's grid of pictures."
    return axes[0].get_subplotspec().get_gridspec().get_geometry()


def test_plot_top_losses_takes_fastai_nrows():
    interp = pictures_interpretation()
    plt.close("all")
    assert interp.plot_top_losses(5, nrows=1) is None                  # the book: plot_top_losses(5, nrows=1)
    assert len(plt.gcf().axes) == 5 and grid_shape(plt.gcf().axes) == (1, 5)
    plt.close("all")
    interp.plot_top_losses(6, nrows=2)
    assert grid_shape(plt.gcf().axes) == (2, 3)
    plt.close("all")
    interp.plot_top_losses(4, ncols=4)
    assert grid_shape(plt.gcf().axes) == (1, 4)
    plt.close("all")
    with pytest.raises(ValueError, match=r"nrows=1 and ncols=2 make room for 2 pictures, not 5"):
        interp.plot_top_losses(5, nrows=1, ncols=2)


def test_multilabel_plot_top_losses_takes_fastai_nrows():
    n = 4
    loader = types.SimpleNamespace(items=list(range(n)), dataset=[(torch.rand(3, 8, 8), 0)] * n)
    preds = torch.rand(n, 3)
    targs = (torch.rand(n, 3) > 0.5).float()
    interp = MultiLabelClassificationInterpretation(loader, ["a", "b", "c"], preds, targs, torch.rand(n))
    plt.close("all")
    interp.plot_top_losses(4, nrows=1)
    assert grid_shape(plt.gcf().axes) == (1, 4)
    plt.close("all")


def test_using_attr_labels_by_an_attribute_of_the_item():
    using_attr = star_import()["using_attr"]
    by_name = using_attr(RegexLabeller(r"^(.+)_\d+.jpg$"), "name")   # the book's pets labeller, anchored on the name
    assert by_name(Path("/data/pets/images/great_pyrenees_173.jpg")) == "great_pyrenees"
    folder, names = pet_names()
    recipe = DataBlock(blocks=(ImageBlock, CategoryBlock), get_y=by_name, item_tfms=Resize(16))
    dls = recipe.dataloaders([folder / name for name in names], bs=4, device="cpu")
    assert dls.vocab == sorted({name.rsplit("_", 1)[0] for name in names})
    with pytest.raises(AttributeError, match="stem"):
        using_attr(str.upper, "stem")("not a path")


def test_tensor_makes_tensors_as_fastai_does():
    tensor = star_import()["tensor"]
    assert tensor(1, 2, 3).tolist() == [1, 2, 3]
    assert tensor([1.0, 2.0]).dtype == torch.float32
    assert tensor(np.array([0.5, 1.5])).dtype == torch.float32           # float64 arrays become float32, as in fastai
    picture = tensor(Image.new("L", (4, 3), 7))
    assert picture.shape == (3, 4) and picture.dtype == torch.uint8 and int(picture[0, 0]) == 7
    already = torch.ones(2)
    assert tensor(already) is already
    assert tensor(pd.Series([1, 2])).tolist() == [1, 2]


def test_fastcore_l_names_a_plain_list():
    with pytest.raises(TypeError, match=r"L is fastai's name; coursekit calls it a plain list"):
        star_import()["L"]([1, 2])


def small_exported_learner(folder) -> Path:
    "Export a tiny classifier to `folder/export.ck`, as `learn.export()` does by default."
    x = torch.randn(32, 2)
    y = (x.sum(1) > 0).long()
    dls = DataLoaders.from_dsets(list(zip(x[:24], y[:24])), list(zip(x[24:], y[24:])), bs=8, device="cpu", vocab=["neg", "pos"])
    learn = Learner(dls, simple_mlp(2, 2), cbs=[], path=folder)
    learn.model_spec = exportable_spec(simple_mlp, n_in=2, n_out=2)
    return learn.export()


def test_load_learner_of_fastai_export_pkl_names_export_ck(tmp_path):
    exported = small_exported_learner(tmp_path)
    assert exported == tmp_path / "export.ck"
    with pytest.raises(FileNotFoundError, match=r"export\.pkl.*writes export\.ck, a zip .* never unpickled.*load_learner\("):
        load_learner(tmp_path / "export.pkl")
    with pytest.raises(FileNotFoundError, match=r"No export at .*model\.ck$"):
        load_learner(tmp_path / "model.ck")                              # not a .pkl: the plain message


def test_dblock_dataloaders_takes_fastai_path(tmp_path):
    folder, names = pet_names()
    recipe = DataBlock(blocks=(ImageBlock, CategoryBlock), get_y=RegexLabeller(r"([^/]+)_\d+.jpg$"), item_tfms=Resize(16))
    dls = recipe.dataloaders([folder / name for name in names], path=tmp_path, bs=4, device="cpu")
    assert dls.path == tmp_path
    assert cnn_learner(dls, "resnet18", pretrained=False).path == tmp_path   # where the learner saves and exports
    assert recipe.dataloaders([folder / name for name in names], bs=4, device="cpu").path == Path(".")


# --- PointBlock: show_batch and show_results draw the points on the picture ------------------------------------------

def dot_loaders():
    "Ten 32x32 black pictures (tensors) each with a white dot; the target is the dot's (x, y) in pixels; two to validate."
    items = []
    for i in range(10):
        picture = torch.zeros(3, 32, 32, dtype=torch.uint8)
        x, y = 4 + 2 * i, 26 - 2 * i
        picture[:, y, x] = 255
        items.append((picture, [[x + 0.5, y + 0.5]], i >= 8))
    recipe = DataBlock(blocks=(ImageBlock, PointBlock), get_x=lambda item: item[0], get_y=lambda item: item[1],
                       splitter=FuncSplitter(lambda item: item[2]))
    return recipe.dataloaders(items, bs=4, device="cpu")


def drawn_colour(collection) -> tuple:
    "The colour a scatter of unfilled markers is drawn in."
    colours = collection.get_facecolor() if len(collection.get_facecolor()) else collection.get_edgecolor()
    return tuple(np.round(colours[0], 3))


def test_point_show_results_draws_actual_and_predicted_points_on_one_picture_in_two_colours():
    dls = dot_loaders()
    xb, yb = dls.valid.one_batch()
    plt.close("all")
    assert dls.show_results((xb, yb), yb + 0.25, max_n=2) is None        # drawn once, nothing returned
    axes = plt.gcf().axes
    assert len(axes) == 2                                              # one picture per item
    for ax, points in zip(axes, yb):
        assert len(ax.images) == 1 and len(ax.collections) == 2        # the picture, the actual and the predicted points
        actual, predicted = ax.collections
        assert drawn_colour(actual) != drawn_colour(predicted)
        assert "actual" in ax.get_title() and "predicted" in ax.get_title()
        expected = (points[0] + 1) / 2 * 32 - 0.5                       # back to pixel positions
        np.testing.assert_allclose(actual.get_offsets()[0], expected.numpy(), atol=1e-4)
    plt.close("all")


def test_point_show_batch_draws_the_points_once_on_each_picture():
    dls = dot_loaders()
    plt.close("all")
    assert dls.show_batch(dls.valid.one_batch(), max_n=2) is None
    axes = plt.gcf().axes
    assert len(axes) == 2 and all(len(ax.images) == 1 and len(ax.collections) == 1 for ax in axes)
    plt.close("all")
