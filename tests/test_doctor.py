"""`learn.doctor()` on real short fits with deliberately bad settings (issue 15, part 3).

The chapter (`nbs/core/13_doctor.ipynb`) tests each rule on histories built for its case; here real fits make
the histories. The problem: four well-separated clusters of points in 8 dimensions, classified by a small MLP
(Adam). `lr_find` suggests about 1e-2 for it (steepest 0.02, minimum/10 0.007), so 1e-2 is the healthy rate,
0.1 is ten times too high and 1e-4 a hundred times too low. Each fit takes a second or two on one CPU core.
"""
import contextlib
import io
import math

import pytest
import torch
from IPython.core.formatters import DisplayFormatter
from torch import nn

from coursekit.core import set_seed
from coursekit.data.core import DataLoaders
from coursekit.learner import Learner, NonFiniteLossError
from coursekit.metrics import error_rate

GOOD_LR = 1e-2
PROBLEMS = {"lr_too_high", "lr_too_low", "underfitting", "overfitting", "valid_loss_rising", "lr_at_minimum",
            "valid_too_small", "not_finished"}


@pytest.fixture(autouse=True)
def one_thread():
    "The fits are tiny: one thread is fastest, and leaves the other cores alone."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clusters(n_train: int, n_valid: int, flip: float = 0.0) -> DataLoaders:
    "Points around four random centres in 8 dimensions; `flip`: the share of labels replaced by random ones (noise)."
    generator = torch.Generator().manual_seed(0)
    centres = 1.5 * torch.randn(4, 8, generator=generator)
    n_items = n_train + n_valid
    labels = torch.randint(0, 4, (n_items,), generator=generator)
    points = centres[labels] + torch.randn(n_items, 8, generator=generator)
    flipped = torch.rand(n_items, generator=generator) < flip
    labels = torch.where(flipped, torch.randint(0, 4, (n_items,), generator=generator), labels)
    items = list(zip(points, labels))
    return DataLoaders.from_dsets(items[:n_train], items[n_train:], bs=32, device="cpu", vocab=["a", "b", "c", "d"])


def mlp_learner(n_train: int = 1000, n_valid: int = 1000, hidden: int = 64, flip: float = 0.0) -> Learner:
    "A two-hidden-layer MLP on `clusters`, with the error rate as its metric and no progress display."
    set_seed(0)
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    learn = Learner(clusters(n_train, n_valid, flip), model, metrics=error_rate)
    learn.remove_cb(next(cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"))
    return learn


def problems(report) -> set:
    return set(report.codes) & PROBLEMS


def test_a_healthy_fit_raises_no_alarm():
    learn = mlp_learner()
    learn.lr_find(show_plot=False)
    learn.fit_one_cycle(5, GOOD_LR)
    report = learn.doctor()
    assert report.codes == ["healthy"], report
    assert "error_rate" in report.findings[0].sentence and "1000 items" in report.findings[0].sentence


def test_a_learning_rate_ten_times_too_high():
    learn = mlp_learner()
    learn.lr_find(show_plot=False)
    learn.fit_one_cycle(5, 10 * GOOD_LR)
    report = learn.doctor()
    assert problems(report) == {"lr_too_high", "lr_at_minimum"}, report
    assert "oscillates" in dict(report.findings)["lr_too_high"]
    assert "peak learning rate 0.1" in dict(report.findings)["lr_too_high"]


def test_a_learning_rate_a_hundred_times_too_low():
    learn = mlp_learner()
    learn.fit_one_cycle(5, GOOD_LR / 100)
    report = learn.doctor()
    assert "lr_too_low" in report.codes, report
    assert problems(report) <= {"lr_too_low", "underfitting"}, report
    assert "cannot_tell_lr_choice" in report.codes   # no lr_find on this learner: it says so


def test_a_learning_rate_so_high_the_loss_diverges():
    learn = mlp_learner()
    learn.fit_one_cycle(5, 100 * GOOD_LR)
    report = learn.doctor()
    assert "diverged" in dict(report.findings)["lr_too_high"], report
    assert "underfitting" not in report.codes   # "train longer" is no advice for a loss that exploded


def test_too_many_epochs_on_a_tiny_set_overfit():
    learn = mlp_learner(n_train=64, hidden=256, flip=0.3)
    learn.fit_one_cycle(30, GOOD_LR)
    report = learn.doctor()
    assert "overfitting" in report.codes, report
    assert "Train for fewer epochs" in dict(report.findings)["overfitting"]


def test_the_same_fit_with_a_tiny_validation_set_cannot_tell():
    learn = mlp_learner(n_train=64, n_valid=16, hidden=256, flip=0.3)
    learn.fit_one_cycle(30, GOOD_LR)
    report = learn.doctor(claimed_gap=0.05)
    assert "overfitting" not in report.codes, report
    assert "valid_too_small" in report.codes, report


def test_a_fit_the_guard_stopped():
    learn = mlp_learner()
    learn.opt_func = torch.optim.SGD
    with pytest.raises(NonFiniteLossError):
        learn.fit(2, 1e4)
    report = learn.doctor()
    assert report.codes[0] == "not_finished", report


def test_it_says_when_it_cannot_tell():
    learn = mlp_learner()
    assert learn.doctor().codes == ["no_fit"]
    learn.lr_find(show_plot=False)
    assert learn.doctor().codes == ["lr_find_only"]
    learn.fit_one_cycle(1, GOOD_LR)
    report = learn.doctor()
    assert "cannot_tell_fitting" in report.codes and "one epoch only" in dict(report.findings)["cannot_tell_fitting"]


def test_the_report_shows_once():
    learn = mlp_learner()
    learn.fit_one_cycle(2, GOOD_LR)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = learn.doctor()
    assert printed.getvalue() == ""   # it returns the report, it prints nothing: a notebook shows it once
    shown, _ = DisplayFormatter().format(report)
    assert shown["text/markdown"].startswith("- **") and shown["text/plain"].startswith("- ")
    assert all(isinstance(code, str) and isinstance(sentence, str) for code, sentence in report.findings)
    assert not math.isnan(learn.recorder.values[-1][1])
