"""Interpretation and plots (issue 11, item 6): a multi-label learner has its own interpretation, every
plot helper shows its figure once in a notebook (and leaves no value behind), and every picture title
names the actual label first, then the predicted one."""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from nbclient import NotebookClient  # noqa: E402
from torch import nn  # noqa: E402

from coursekit.data.core import result_title  # noqa: E402
from coursekit.data.external import URLs, untar_data  # noqa: E402
from coursekit.interpret import ClassificationInterpretation, MultiLabelClassificationInterpretation  # noqa: E402
from coursekit.learner import Learner  # noqa: E402
from coursekit.vision.data import ImageDataLoaders, Resize, SegmentationDataLoaders, get_image_files  # noqa: E402
from coursekit.vision.multilabel import make_planet_standin, tags_from_masks  # noqa: E402
from coursekit.vision.segmentation import SegmentationInterpretation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("COURSEKIT_MIRROR", str(ROOT.parent / "shared" / "datasets"))


def tiny_cnn(n_out: int) -> nn.Module:
    "A small untrained CNN: interpretation needs predictions, not good ones."
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, n_out))


def camvid_tags_learner() -> Learner:
    "A multi-label learner on CamVid street scenes tagged from their masks (real photos, as in lesson 2)."
    camvid = untar_data(URLs.CAMVID_TINY)
    codes = np.loadtxt(camvid / "codes.txt", dtype=str)
    tags = tags_from_masks(get_image_files(camvid / "labels")[:40], codes)
    dls = ImageDataLoaders.from_df(tags, camvid, folder="images", suff=".png", label_delim=" ", item_tfms=Resize(32),
                                   bs=8, seed=0, device="cpu")
    torch.manual_seed(0)
    return Learner(dls, tiny_cnn(dls.c), cbs=[])


def planet_standin_learner(folder: Path) -> Learner:
    "A multi-label learner on the generated Planet stand-in, in Planet's layout."
    planet = make_planet_standin(folder, n_images=40, size=32, seed=0)
    dls = ImageDataLoaders.from_csv(planet, "labels.csv", folder="train", suff=".jpg", label_delim=" ", valid_pct=0.25,
                                    seed=0, item_tfms=Resize(32), bs=8, device="cpu")
    torch.manual_seed(0)
    return Learner(dls, tiny_cnn(dls.c), cbs=[])


def mnist_learner() -> Learner:
    "A single-label learner on 60 MNIST digits (3 or 7)."
    mnist = untar_data(URLs.MNIST_SAMPLE)
    table = pd.read_csv(mnist / "labels.csv").iloc[::20].reset_index(drop=True)
    dls = ImageDataLoaders.from_df(table, mnist, item_tfms=Resize(28), bs=16, seed=0, device="cpu")
    torch.manual_seed(0)
    return Learner(dls, tiny_cnn(dls.c), cbs=[])


def camvid_segmentation_learner() -> Learner:
    "A segmentation learner on 12 CamVid scenes with a one-layer model (its masks are poor, and that is fine here)."
    camvid = untar_data(URLs.CAMVID_TINY)
    codes = np.loadtxt(camvid / "codes.txt", dtype=str)
    files = get_image_files(camvid / "images")[:12]
    dls = SegmentationDataLoaders.from_label_func(camvid, files, lambda f: camvid / "labels" / f"{f.stem}_P{f.suffix}",
                                                  codes=codes, item_tfms=Resize((24, 32)), bs=4, seed=0, device="cpu")
    torch.manual_seed(0)
    return Learner(dls, nn.Conv2d(3, len(codes), 3, padding=1), cbs=[])


@pytest.fixture(scope="module")
def camvid_learn():
    return camvid_tags_learner()


def test_classification_interpretation_names_the_multilabel_one(camvid_learn):
    with pytest.raises(TypeError, match="MultiLabelClassificationInterpretation"):
        ClassificationInterpretation.from_learner(camvid_learn)


def test_multilabel_interpretation_refuses_a_single_label_learner():
    with pytest.raises(TypeError, match="ClassificationInterpretation.from_learner"):
        MultiLabelClassificationInterpretation.from_learner(mnist_learner())


def check_per_label_confusion(learn: Learner, thresh: float):
    "The per-label TP/FP/FN/TN of the interpretation agree with a direct count over the validation set."
    interp = MultiLabelClassificationInterpretation.from_learner(learn, thresh=thresh)
    probs, targs = learn.get_preds(ds_idx=1)[:2]
    predicted, actual = probs > thresh, targs.bool()
    table = interp.confusion_table()
    assert list(table.index) == [str(v) for v in learn.dls.vocab]
    assert table["TP"].tolist() == (predicted & actual).sum(0).tolist()
    assert table["FP"].tolist() == (predicted & ~actual).sum(0).tolist()
    assert table["FN"].tolist() == (~predicted & actual).sum(0).tolist()
    assert table["TN"].tolist() == (~predicted & ~actual).sum(0).tolist()
    assert (table[["TP", "FP", "FN", "TN"]].sum(1) == len(targs)).all()
    matrices = interp.confusion_matrix()
    assert matrices.shape == (len(learn.dls.vocab), 2, 2)
    assert matrices[:, 1, 1].tolist() == table["TP"].tolist()  # sklearn's layout: [[TN, FP], [FN, TP]]
    assert matrices[:, 0, 1].tolist() == table["FP"].tolist()
    return interp


def test_multilabel_confusion_on_camvid_tags(camvid_learn):
    interp = check_per_label_confusion(camvid_learn, thresh=0.5)
    losses, idxs = interp.top_losses(3)
    assert losses.tolist() == sorted(interp.losses.tolist(), reverse=True)[:3]
    assert interp.actual_labels(int(idxs[0])) == camvid_learn.dls.decode_target(interp.targs[idxs[0]])


def test_multilabel_confusion_on_the_planet_standin(tmp_path):
    check_per_label_confusion(planet_standin_learner(tmp_path / "planet"), thresh=0.2)


def test_multilabel_plots_draw_tags(camvid_learn):
    interp = MultiLabelClassificationInterpretation.from_learner(camvid_learn, thresh=0.3)
    assert interp.plot_top_losses(2) is None
    axs = [ax for ax in plt.gcf().axes if ax.images]
    losses, idxs = interp.top_losses(2)
    first = int(idxs[0])
    actual, predicted = ";".join(interp.actual_labels(first)), ";".join(interp.predicted_labels(first))
    assert axs[0].get_title() == f"{result_title(actual, predicted)}\n{losses[0]:.2f}"
    assert interp.plot_confusion_matrix() is None
    assert [t.get_text() for t in plt.gcf().axes[0].get_xticklabels()] == ["TP", "FP", "FN", "TN"]
    plt.close("all")


def test_titles_read_actual_then_predicted_everywhere():
    learn = mnist_learner()
    interp = ClassificationInterpretation.from_learner(learn)
    losses, idxs = interp.top_losses(1)
    worst = int(idxs[0])
    actual, predicted = learn.dls.vocab[int(interp.targs[worst])], learn.dls.vocab[int(interp.decoded[worst])]
    interp.plot_top_losses(1)
    top_title = plt.gcf().axes[0].get_title()
    assert top_title.startswith(f"{actual}/{predicted}\n"), top_title
    plt.close("all")
    xb, yb = learn.dls.valid.one_batch()
    learn.dls.show_results((xb, yb), 1 - yb, max_n=1)
    result_title = plt.gcf().axes[0].get_title()
    assert result_title == f"{learn.dls.vocab[int(yb[0])]}/{learn.dls.vocab[int(1 - yb[0])]}", result_title
    plt.close("all")


def test_segmentation_titles_read_actual_then_predicted():
    learn = camvid_segmentation_learner()
    learn.show_results(max_n=2)
    assert [ax.get_title() for ax in plt.gcf().axes] == ["actual", "predicted"] * 2
    plt.close("all")
    interp = SegmentationInterpretation.from_learner(learn)
    assert interp.plot_top_losses(2) is None
    losses = interp.top_losses(2)[0].tolist()
    assert [ax.get_title() for ax in plt.gcf().axes] == [f"actual (loss {losses[0]:.2f})", "predicted",
                                                          f"actual (loss {losses[1]:.2f})", "predicted"]
    plt.close("all")
    interp.plot_top_losses(2, nrows=2)  # fastai's nrows=: one pair a row
    assert {ax.get_subplotspec().rowspan.start for ax in plt.gcf().axes} == {0, 1}
    plt.close("all")
    interp.plot_top_losses(2)  # two pairs a row by default
    assert {ax.get_subplotspec().rowspan.start for ax in plt.gcf().axes} == {0}
    plt.close("all")
    assert len(interp.top_losses(10_000)[0]) == len(interp.losses)  # more than there are: all of them


DISPLAY_SETUP = """
import sys
sys.path.insert(0, {tests!r})
from test_interpret_plots import camvid_segmentation_learner, camvid_tags_learner, mnist_learner
%matplotlib inline
from coursekit.interpret import ClassificationInterpretation, MultiLabelClassificationInterpretation
from coursekit.vision.segmentation import SegmentationInterpretation
learn = mnist_learner()
learn.fit(1, 1e-2)
interp = ClassificationInterpretation.from_learner(learn)
ml_learn = camvid_tags_learner()
ml_interp = MultiLabelClassificationInterpretation.from_learner(ml_learn)
seg_learn = camvid_segmentation_learner()
seg_interp = SegmentationInterpretation.from_learner(seg_learn)
"""

PLOT_CELLS = ["learn.dls.show_batch(max_n=4)", "learn.show_results(max_n=4)", "interp.plot_confusion_matrix()",
              "interp.plot_top_losses(4)", "ml_learn.dls.show_batch(max_n=4)", "ml_learn.show_results(max_n=4)",
              "ml_interp.plot_confusion_matrix()", "ml_interp.plot_top_losses(4)", "seg_learn.dls.show_batch(max_n=4)",
              "seg_learn.show_results(max_n=2)", "seg_interp.plot_top_losses(2)", "learn.recorder.plot_loss(skip_start=0)",
              "learn.recorder.plot_sched()"]


def test_each_plot_shows_once_in_a_notebook(tmp_path, monkeypatch):
    "Run the plot helpers in a real kernel with the inline backend: one image per cell and no cell value."
    cells = [nbformat.v4.new_code_cell(DISPLAY_SETUP.format(tests=str(ROOT / "tests")))]
    cells += [nbformat.v4.new_code_cell(source) for source in PLOT_CELLS]
    nb = nbformat.v4.new_notebook(cells=cells)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    problems = []
    for cell in nb.cells[1:]:
        images = [out for out in cell.outputs if "image/png" in out.get("data", {})]
        values = [out["data"].get("text/plain") for out in cell.outputs if out.output_type == "execute_result"]
        if len(images) != 1:
            problems.append(f"{cell.source}: {len(images)} images")
        if values:
            problems.append(f"{cell.source}: left a value {values}")
    assert problems == []
