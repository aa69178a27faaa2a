"""Fastbook-style flows on the mirror data (issue 12, "Done when"): what a new user types from the course and the
book, from `from coursekit.all import *` on, adapted only where coursekit spells something differently (each such
place is marked `# book:` with fastai's spelling, and is a row of `nbs/core/11_from_fastai.ipynb`).

Each flow trains on real data and checks that the numbers are sensible: better than a trivial baseline (the
majority class, the mean), not just that the cells run. Sizes are cut for two CPU cores: tiny images,
subsets, one or two epochs, `efficientnet_lite0` (the ImageNet weights that are available offline).
"""
# The flows are written as a notebook user writes them, on top of the star import.
# ruff: noqa: F403, F405
import os
import shutil

import matplotlib
import pytest

from coursekit.all import *

matplotlib.use("Agg")

ARCH = "efficientnet_lite0"
BREEDS = ["Abyssinian", "beagle", "pug", "Sphynx"]   # the chapter 2 "bears": four breeds easy to tell apart


@pytest.fixture(autouse=True)
def mirror_and_threads():
    "Read the data from the offline mirror; one CPU thread (on a shared two-core machine, two threads ran 10x slower)."
    if "COURSEKIT_MIRROR" not in os.environ:
        pytest.fail("These flows read the dataset mirror: set COURSEKIT_MIRROR (e.g. to /work/shared/datasets).")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    set_seed(42)
    yield
    torch.set_num_threads(threads)
    plt.close("all")


def majority_accuracy(train_labels, valid_labels) -> float:
    "Accuracy of always answering the most common training label."
    most_common = pd.Series(list(train_labels)).value_counts().index[0]
    return float(np.mean([label == most_common for label in valid_labels]))


def labels_of(dls, dl) -> list:
    "The class name of every item of the classification loader `dl` (one of `dls`), in order."
    return [dls.vocab[int(y)] for _, y in dl.new(shuffle=False, training=False) for y in y.reshape(-1)]


# --- chapter 2: from a folder of downloaded pictures to an app ------------------------------------------------

def copy_breeds(dest: Path, per_breed: int = 10) -> Path:
    "One folder per class, as `download_images` leaves them, plus a file that only pretends to be a picture."
    pets = untar_data(URLs.PETS) / "images"
    for breed in BREEDS:
        (dest / breed).mkdir(parents=True)
        for f in sorted(pets.glob(f"{breed}_*.jpg"))[:per_breed]:
            shutil.copy(f, dest / breed / f.name)
    (dest / BREEDS[0] / "error_page.jpg").write_bytes(b"<html><body>403 Forbidden</body></html>")
    return dest


def test_chapter2_cleaning_flow(tmp_path):
    path = copy_breeds(tmp_path / "pets")
    fns = get_image_files(path)
    assert len(fns) == 41
    failed = verify_images(path, delete=True)   # book: failed = verify_images(fns); failed.map(Path.unlink)
    assert len(failed) == 1
    assert len(get_image_files(path)) == 40     # the bad file went to path/.trash, which get_image_files skips

    pets = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files,
                     splitter=RandomSplitter(valid_pct=0.2, seed=42), get_y=parent_label,
                     item_tfms=RandomResizedCrop(64, min_scale=0.5), batch_tfms=aug_transforms())
    dls = pets.dataloaders(path, bs=8)
    assert list(dls.vocab) == sorted(BREEDS)
    learn = cnn_learner(dls, ARCH, metrics=error_rate, path=path)   # the book exports to the working folder '.'
    learn.fine_tune(2, base_lr=3e-3)

    error = learn.recorder.last_metrics()["error_rate"]
    baseline = 1 - majority_accuracy(labels_of(dls, dls.train), labels_of(dls, dls.valid))
    print(f"chapter 2: error rate {error:.1%}, majority-class baseline {baseline:.1%}")
    assert error <= baseline - 0.3

    interp = ClassificationInterpretation.from_learner(learn)
    interp.plot_confusion_matrix()
    matrix = interp.confusion_matrix()
    assert int(matrix.sum()) == len(dls.valid.dataset)
    assert float(matrix.trace() / matrix.sum()) == pytest.approx(1 - error)
    interp.plot_top_losses(5, nrows=1)          # as the book spells it: one row of five
    losses, idxs = interp.top_losses(5)
    assert bool((losses[:-1] >= losses[1:]).all())

    cleaner = ImageCleaner.from_toplosses(learn)   # book: cleaner = ImageClassifierCleaner(learn)
    with pytest.raises(TypeError, match=r"ImageCleaner\.from_toplosses\(learn\)"):
        ImageClassifierCleaner(learn)              # the book's name says which to use
    assert len(cleaner.state.items) == len(dls.train.dataset) + len(dls.valid.dataset)

    exported = learn.export()
    assert exported == path / "export.ck"       # book: export.pkl (coursekit's export is a zip, never a pickle)
    learn_inf = load_learner(exported)
    breed, breed_idx, probs = learn_inf.predict(fns[-1])
    assert breed in BREEDS
    assert learn_inf.dls.vocab[int(breed_idx)] == breed
    assert float(probs.sum()) == pytest.approx(1, abs=1e-5)
    assert list(learn_inf.dls.vocab) == list(dls.vocab)


# --- chapter 5: pet breeds with a hand-written DataBlock --------------------------------------------------------

def test_chapter5_pets_datablock():
    path = untar_data(URLs.PETS)
    pets = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files,
                     splitter=RandomSplitter(seed=42),
                     get_y=RegexLabeller(r"([^/]+)_\d+.jpg$"),   # book: using_attr(RegexLabeller(r'(.+)_\d+.jpg$'), 'name')
                     item_tfms=Resize(96),                        # book: Resize(460)
                     batch_tfms=aug_transforms(size=64, min_scale=0.75))   # book: size=224
    dls = pets.dataloaders(path / "images", bs=32)
    assert len(dls.vocab) == 37
    learn = cnn_learner(dls, ARCH, metrics=error_rate)
    suggestions = learn.lr_find(num_it=20, show_plot=False)
    assert 1e-7 < suggestions.minimum < 10
    learn.fit_one_cycle(2, 3e-3)
    frozen_error = learn.recorder.last_metrics()["error_rate"]
    learn.unfreeze()
    learn.fit_one_cycle(1, lr_max=slice(1e-6, 1e-4))
    error = learn.recorder.last_metrics()["error_rate"]

    baseline = 1 - majority_accuracy(labels_of(dls, dls.train), labels_of(dls, dls.valid))
    print(f"chapter 5: error rate {frozen_error:.1%} frozen, {error:.1%} after unfreezing; "
          f"majority-class baseline {baseline:.1%}")
    assert error <= baseline - 0.2
    assert all(p.requires_grad for p in learn.model.parameters())


# --- chapter 6: multi-label classification and regression ------------------------------------------------------

def camvid_tags(path: Path) -> pd.DataFrame:
    "CamVid frames tagged with the classes that cover at least 5% of each (a Planet-style `fname, labels` table)."
    codes = np.loadtxt(path / "codes.txt", dtype=str).tolist()
    tags = tags_from_masks(sorted((path / "labels").glob("*_P.png")), codes, min_share=0.05)
    valid_names = set((path / "valid.txt").read_text().split())
    return pd.DataFrame({"fname": tags.image_name + ".png", "labels": tags.tags,
                         "is_valid": (tags.image_name + ".png").isin(valid_names)})


def constant_tag_accuracy(train_targets: torch.Tensor, valid_targets: torch.Tensor) -> float:
    "accuracy_multi of the best constant answer: each tag on when most training items have it."
    always = (train_targets.float().mean(0) > 0.5).float()
    return float((always == valid_targets.float()).float().mean())


def test_chapter6_multi_label():
    path = untar_data(URLs.CAMVID_TINY)
    df = camvid_tags(path)

    def get_x(r):
        return path / "images" / r["fname"]

    def get_y(r):
        return r["labels"].split(" ")

    dblock = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), splitter=ColSplitter(), get_x=get_x, get_y=get_y,
                       item_tfms=Resize((72, 96), method="squish"))   # book: RandomResizedCrop(128, min_scale=0.35)
    dls = dblock.dataloaders(df, bs=8)   # 15 batches an epoch: with bs=16, accuracy_multi went from 0.85 to 0.94 by seed
    learn = cnn_learner(dls, ARCH, metrics=partial(accuracy_multi, thresh=0.2))
    learn.fine_tune(1, base_lr=3e-3, freeze_epochs=4)   # book: fine_tune(3, ...)
    assert learn.recorder.metric_names[-1] == "accuracy_multi"

    preds, targs = learn.get_preds()
    train_targets = torch.cat([y for _, y in dls.train.new(shuffle=False, training=False)]).cpu()
    baseline = constant_tag_accuracy(train_targets, targs)
    xs = torch.linspace(0.05, 0.95, 29)
    accs = [float(accuracy_multi(preds, targs, thresh=i, sigmoid=False)) for i in xs]
    best = max(accs)
    at_half = float(accuracy_multi(preds, targs, thresh=0.5, sigmoid=False))
    print(f"chapter 6 multi-label: accuracy_multi {at_half:.3f} at 0.5, best {best:.3f} at "
          f"{float(xs[accs.index(best)]):.2f}; constant-answer baseline {baseline:.3f}")
    assert at_half >= baseline + 0.01   # 0.90 to 0.92 over seeds 0, 1 and 42; the baseline is 0.87
    assert best >= at_half


def test_chapter6_point_regression():
    # book: BIWI head pose (not in the offline mirror). The same task shape: find a thing's centre in a picture.
    # CamVid's building centres were tried first: on 119 frames the result depended on the seed (0.2x to 1.5x
    # the mean point's error), so the flow finds MNIST digits placed at random on a canvas (tests/test_regression.py).
    from test_regression import CANVAS, placed_digits
    digits = placed_digits()
    biwi = DataBlock(blocks=(ImageBlock, PointBlock), get_x=lambda d: d[0], get_y=lambda d: d[1],
                     splitter=FuncSplitter(lambda d: d[2]),
                     batch_tfms=aug_transforms(max_rotate=0, max_warp=0))   # book: aug_transforms(size=(240, 320))
    dls = biwi.dataloaders(digits, bs=32)
    learn = cnn_learner(dls, ARCH, y_range=(-1, 1), metrics=rmse)
    learn.fine_tune(4, 3e-3)   # book: lr_find, then fine_tune(3, lr)

    preds, targs = learn.get_preds()
    train_points = torch.cat([y for _, y in dls.train.new(shuffle=False, training=False)]).cpu()
    model_mse = float(F.mse_loss(preds.reshape(targs.shape), targs))
    baseline_mse = float(F.mse_loss(train_points.mean(0).expand_as(targs), targs))
    print(f"chapter 6 points: valid MSE {model_mse:.4f} (rmse {learn.recorder.last_metrics()['rmse']:.3f}), "
          f"mean-point baseline {baseline_mse:.4f} (canvas {CANVAS} px)")
    assert learn.recorder.last_metrics()["rmse"] == pytest.approx(model_mse ** 0.5, rel=1e-3)
    assert model_mse < 0.5 * baseline_mse   # 0.07 to 0.09 of the baseline over seeds 0, 1 and 2
    assert preds.abs().max() < 1


# --- chapter 8: collaborative filtering ------------------------------------------------------------------------

def test_chapter8_collab():
    path = untar_data(URLs.ML_100k)
    ratings = pd.read_csv(path / "u.data", delimiter="\t", header=None, names=["user", "movie", "rating", "timestamp"])
    movies = pd.read_csv(path / "u.item", delimiter="|", encoding="latin-1", usecols=(0, 1), names=("movie", "title"),
                         header=None)
    ratings = ratings.merge(movies)
    ratings = ratings.groupby(["user", "title"], as_index=False)["rating"].mean()   # the book keeps duplicates
    dls = CollabDataLoaders.from_df(ratings, item_name="title", bs=64)
    learn = collab_learner(dls, n_factors=50, y_range=(0, 5.5))
    learn.fit_one_cycle(2, 5e-3, wd=0.1)
    valid_mse = learn.validate()[0]

    train_mean = dls.train.items["rating"].mean()
    valid_ratings = torch.tensor(dls.valid.items["rating"].to_numpy(), dtype=torch.float32)
    baseline_mse = float((valid_ratings - train_mean).pow(2).mean())
    print(f"chapter 8: valid MSE {valid_mse:.3f}, mean-rating baseline {baseline_mse:.3f}")
    assert valid_mse < baseline_mse - 0.25

    g = ratings.groupby("title")["rating"].count()
    top_movies = g.sort_values(ascending=False).index.values[:1000]
    top_idxs = learn.model.bias(top_movies, is_item=True)   # book: learn.model.bias(top_movies, is_item=True)
    assert top_idxs.shape == (1000,)
    mean_rating = ratings.groupby("title")["rating"].mean()[top_movies]
    correlation = np.corrcoef(top_idxs.detach().cpu().numpy(), mean_rating.to_numpy())[0, 1]
    print(f"chapter 8: correlation of the movie bias with the mean rating {correlation:.2f}")
    assert correlation > 0.6
    movie_w = learn.model.weight(top_movies, is_item=True)
    movie_pca = pca(movie_w, 3)   # book: movie_w.pca(3)
    assert movie_pca.shape == (1000, 3)


# --- chapter 9 / the course's tabular lesson ---------------------------------------------------------------------

def test_tabular_from_df():
    path = untar_data(URLs.ADULT_SAMPLE)
    df = pd.read_csv(path / "adult.csv", na_values="?", skipinitialspace=True)
    cat_names = ["workclass", "education", "marital-status", "occupation", "relationship", "race"]
    cont_names = ["age", "fnlwgt", "education-num"]
    procs = [Categorify, FillMissing, Standardize]   # book: Normalize (here the image transform; the error names this)
    valid_idx = list(range(len(df) - 2000, len(df)))
    dls = TabularDataLoaders.from_df(df, path, procs=procs, cat_names=cat_names, cont_names=cont_names,
                                     y_names="salary", valid_idx=valid_idx, bs=64)
    assert dls.path == path
    learn = tabular_learner(dls, layers=[200, 100], metrics=accuracy)
    learn.fit_one_cycle(1, 1e-2)
    valid_accuracy = learn.recorder.last_metrics()["accuracy"]

    baseline = majority_accuracy(df["salary"].drop(index=valid_idx), df["salary"].iloc[valid_idx])
    print(f"tabular: accuracy {valid_accuracy:.3f}, majority-class baseline {baseline:.3f}")
    assert valid_accuracy > baseline + 0.04
    row, clas, probs = learn.predict(df.iloc[0])            # as the book spells it
    assert list(row.index) == [0] and row["workclass"].iloc[0] == df["workclass"].iloc[0]
    assert row["salary"].iloc[0] == dls.vocab[int(clas)]      # the row carries the prediction in the target column
    assert float(probs.sum()) == pytest.approx(1, abs=1e-5)
