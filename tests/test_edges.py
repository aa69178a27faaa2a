"""A practitioner's own small problems off the lesson path (session 4 sweep): the callbacks, the doctor and the
launcher on inputs the chapters do not try. Each test failed before the fix it checks (see /work/wt/edges-log.md)."""
import contextlib
import io
import operator
import os
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import coursekit.callbacks as callbacks
from coursekit.callbacks import CSVLogger, EarlyStoppingCallback, ReduceLROnPlateau, SaveModelCallback, TrackerCallback
from coursekit.core import set_seed
from coursekit.data.core import DataLoaders
from coursekit.distributed import notebook_launcher
from coursekit.doctor import FitHistory, diagnose
from coursekit.learner import Callback, Learner
from coursekit.losses import CrossEntropyLossFlat, MSELossFlat
from coursekit.metrics import F1Score, accuracy, error_rate, mae, rmse


@pytest.fixture(autouse=True)
def one_thread():
    "The fits are tiny: one thread is fastest, and leaves the other cores alone."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet(learn: Learner) -> Learner:
    "The learner without its progress display."
    learn.remove_cb(next(cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"))
    return learn


def classifier(path, metrics=(accuracy,), lr=1e-2, **kwargs) -> Learner:
    "A small MLP on two inputs: is `x₁ + x₂ > 0`?"
    set_seed(0)
    x = torch.randn(260, 2)
    items = list(zip(x, (x.sum(1) > 0).long()))
    dls = DataLoaders.from_dsets(items[:200], items[200:], bs=16, device="cpu", vocab=["neg", "pos"])
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    return quiet(Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=list(metrics), lr=lr, path=path,
                         **kwargs))


def regressor(path, metrics, lr=3e-2) -> Learner:
    "A small MLP fitting `y = 2 x₁ + 1` from four inputs."
    set_seed(0)
    x = torch.randn(260, 4)
    items = list(zip(x, 2 * x[:, :1] + 1))
    dls = DataLoaders.from_dsets(items[:200], items[200:], bs=16, device="cpu")
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    return quiet(Learner(dls, model, loss_func=MSELossFlat(), metrics=list(metrics), lr=lr, path=path))


def silently(fit, *args, **kwargs) -> str:
    "Run `fit`, returning what it printed."
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fit(*args, **kwargs)
    return out.getvalue()


class NanValidation(Callback):
    "Makes every validation loss NaN (a model that breaks on the validation data only)."
    order = 55

    def after_loss(self, learn):
        if not learn.training:
            learn.loss = learn.loss * float("nan")


# --- trackers: which way is better ---------------------------------------------------------------------------

@pytest.mark.parametrize("metric", [rmse, mae], ids=["rmse", "mae"])
def test_save_model_keeps_the_lowest_error_of_a_regression(tmp_path, metric):
    "rmse and mae are errors: lower is better, as for a loss (before: the highest was kept, and loaded at the end)."
    learn = regressor(tmp_path, [metric])
    name = learn.metrics[0].name
    save = SaveModelCallback(monitor=name)
    silently(learn.fit, 4, cbs=[save])
    column = [row[2] for row in learn.recorder.values]
    assert column[-1] < column[0]  # the fit improved, so the highest value is the first epoch's
    assert save.best == pytest.approx(min(column))
    assert learn.validate()[1] == pytest.approx(min(column), rel=1e-5)


def test_tracker_takes_a_comparison_from_operator(tmp_path):
    "`comp=operator.lt` means lower is better, as `np.less` does (before: the best started at -inf, nothing improved)."
    learn = classifier(tmp_path)
    save = SaveModelCallback(comp=operator.lt, min_delta=1e-4)
    silently(learn.fit, 3, cbs=[save])
    losses = [row[1] for row in learn.recorder.values]
    assert save.best == pytest.approx(min(losses))
    assert save.last_saved is not None


def test_tracker_asks_which_way_is_better_for_an_unknown_metric(tmp_path):
    "A metric whose name says nothing about its direction needs `comp` (before: higher was silently assumed)."
    def spread(preds, targs):
        return preds.std()
    learn = classifier(tmp_path, metrics=[spread])
    with pytest.raises(ValueError, match=r"comp=np\.less"):
        learn.fit(1, cbs=[SaveModelCallback(monitor="spread")])
    silently(learn.fit, 1, cbs=[SaveModelCallback(monitor="spread", comp=np.greater)])


def test_tracker_refuses_a_name_two_columns_share(tmp_path):
    "Two metrics named alike: the tracker cannot know which one is meant (before: the first, silently)."
    learn = classifier(tmp_path, metrics=[F1Score(), F1Score(average="macro")])
    with pytest.raises(ValueError, match="2 columns"):
        learn.fit(1, cbs=[TrackerCallback(monitor="f1_score")])


# --- patience, NaN -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [EarlyStoppingCallback, ReduceLROnPlateau], ids=["early", "plateau"])
def test_patience_zero_is_refused(make):
    "patience=0 acted after every epoch, improved or not (stopped a fit that was improving after one epoch)."
    with pytest.raises(ValueError, match="patience=1"):
        make(patience=0)


def test_early_stopping_names_no_epoch_when_nothing_improved(tmp_path):
    "A validation loss NaN from the start: the message said 'since epoch -1'."
    learn = classifier(tmp_path)
    printed = silently(learn.fit, 5, cbs=[EarlyStoppingCallback(patience=2), NanValidation()])
    assert len(learn.recorder.values) == 2
    assert "epoch -1" not in printed
    assert "did not improve in any of the 2 epochs" in printed


def test_save_model_does_not_load_an_older_fits_file(tmp_path):
    "A fit that never improved must keep its weights, not load the model.pth an earlier fit wrote."
    learn = classifier(tmp_path)
    silently(learn.fit, 2, cbs=[SaveModelCallback()])
    assert (tmp_path / "models" / "model.pth").exists()
    for param in learn.model.parameters():
        nn.init.normal_(param)
    fresh = [param.detach().clone() for param in learn.model.parameters()]
    silently(learn.fit, 1, lr=0., cbs=[SaveModelCallback(), NanValidation()])  # lr 0: the weights stay as they are
    assert all(torch.equal(a, b) for a, b in zip(fresh, learn.model.parameters()))


def test_save_model_still_loads_the_best_of_an_earlier_fit_when_asked(tmp_path):
    "`reset_on_fit=False`: the best of the earlier fit stands, and its file is loaded when this fit does not beat it."
    learn = classifier(tmp_path)
    save = SaveModelCallback(reset_on_fit=False)
    silently(learn.fit, 3, cbs=[save])
    best = save.best
    silently(learn.fit, 1, lr=0., cbs=[save, NanValidation()])
    assert learn.validate()[0] == pytest.approx(best, rel=1e-5)


def test_reduce_lr_on_plateau_is_refused_under_a_schedule(tmp_path):
    "Under fit_one_cycle the schedule sets the lr before every batch: the reduction was printed but undone."
    learn = classifier(tmp_path)
    with pytest.raises(ValueError, match=r"learn\.fit\("):
        silently(learn.fit_one_cycle, 2, cbs=[ReduceLROnPlateau()])


# --- CSVLogger -----------------------------------------------------------------------------------------------

def test_csv_logger_refuses_to_append_other_columns(tmp_path):
    "append=True onto a log with other columns wrote rows pandas cannot read; now an error, the file untouched."
    silently(classifier(tmp_path).fit, 1, cbs=[CSVLogger()])
    before = (tmp_path / "history.csv").read_bytes()
    learn = classifier(tmp_path, metrics=[accuracy, error_rate])
    with pytest.raises(ValueError, match="columns"):
        learn.fit(1, cbs=[CSVLogger(append=True)])
    assert (tmp_path / "history.csv").read_bytes() == before
    silently(classifier(tmp_path).fit, 1, cbs=[CSVLogger(append=True)])  # the same columns: appended
    assert (tmp_path / "history.csv").read_text().count("\n") == 3  # the header and two rows


# --- fastai spellings, accumulation --------------------------------------------------------------------------

def test_gradient_accumulation_names_the_learner_argument():
    "fastai's GradientAccumulation(n_acc=...) was a NameError; it names Learner(accum=...), in batches."
    with pytest.raises(TypeError, match="accum="):
        callbacks.GradientAccumulation(n_acc=64)


@pytest.mark.parametrize("accum", [2.5, "2"])
def test_accum_must_be_a_whole_number(tmp_path, accum):
    "accum=2.5 was taken: (iter + 1) % 2.5 is never 0, so the optimizer stepped once per epoch."
    with pytest.raises(ValueError, match="whole number"):
        classifier(tmp_path, accum=accum)


# --- the doctor ----------------------------------------------------------------------------------------------

def smoothed(raw: np.ndarray, beta: float = 0.98) -> list:
    "The recorder's smoothed losses (debiased moving average) for the batch losses `raw`."
    average, result = 0., []
    for step, loss in enumerate(raw, start=1):
        average = beta * average + (1 - beta) * loss
        result.append(average / (1 - beta ** step))
    return result


def noisy(start: float, end: float, n: int = 40, noise: float = 0.01) -> list:
    "Smoothed losses of `n` batches going from `start` to `end` with a little noise."
    generator = np.random.default_rng(0)
    return smoothed(np.linspace(start, end, n) + noise * generator.standard_normal(n))


def test_doctor_is_not_healthy_without_a_validation_loss():
    "No validation set: 'Healthy ... the validation loss nan' beside 'cannot tell' was a guess without numbers."
    history = FitHistory(["train_loss", "valid_loss"], [[0.6, float("nan")], [0.4, float("nan")]],
                         noisy(1.0, 0.3), [1e-2] * 40)
    report = diagnose(history)
    assert "healthy" not in report.codes
    assert "cannot_tell_fitting" in report.codes


def test_doctor_is_not_healthy_when_the_loss_barely_moved():
    "'Healthy: the loss fell' beside 'Cannot tell: the loss barely moved' contradicted itself."
    history = FitHistory(["train_loss", "valid_loss"], [[0.69, 0.70], [0.68, 0.69]],
                         noisy(0.69, 0.69), [1e-3] * 40)
    report = diagnose(history)
    assert "cannot_tell_progress" in report.codes
    assert "healthy" not in report.codes


def test_doctor_does_not_call_a_worse_rmse_over_confidence():
    "rmse worse at the last epoch only: the doctor said 'the rmse shows no worsening beyond its noise' (it rose 40%)."
    values = [[1.0, 0.5, 0.70], [0.6, 0.2, 0.45], [0.4, 0.0855, 0.29], [0.3, 0.165, 0.41]]
    history = FitHistory(["train_loss", "valid_loss", "rmse"], values, noisy(1.0, 0.3), [1e-2] * 40, n_valid=60)
    report = diagnose(history)
    assert "valid_loss_rising" not in report.codes
    sentence = dict(report.findings)["cannot_tell_overfitting"]
    assert "0.29" in sentence and "0.41" in sentence


# --- notebook_launcher ---------------------------------------------------------------------------------------

def exits_early():
    sys.exit(0)


def world_size():
    return int(os.environ["WORLD_SIZE"])


def test_launcher_says_when_rank_0_ended_without_returning():
    "sys.exit(0) in the launched function returned None as if it were the result."
    with pytest.raises(RuntimeError, match="without returning"):
        notebook_launcher(exits_early, num_processes=1)


@pytest.mark.parametrize("kwargs, message", [(dict(num_processes=2.0), "whole number"),
                                             (dict(args=5), "tuple")])
def test_launcher_refuses_bad_arguments_by_name(kwargs, message):
    "num_processes=2.0 and args=5 failed with raw TypeErrors from inside multiprocessing."
    with pytest.raises(TypeError, match=message):
        notebook_launcher(world_size, **kwargs)


def test_launcher_with_spawn_says_the_function_must_be_importable():
    "start_method='spawn' with a lambda: a raw pickling error; now it says where the function must live."
    with pytest.raises(TypeError, match="module"):
        notebook_launcher(lambda: 1, num_processes=1, start_method="spawn")


def nested_contexts():
    learn = classifier(None)
    with learn.distrib_ctx():
        with pytest.raises(RuntimeError, match="already inside"):
            with learn.distrib_ctx():
                pass
        still_distributed = torch.distributed.is_initialized() and any(
            type(cb).__name__ == "DistributedCallback" for cb in learn.cbs)
    return still_distributed


def test_distrib_ctx_refuses_to_nest():
    "A nested distrib_ctx ended the process group and removed the DDP callback on exit: the outer one trained plain."
    assert notebook_launcher(nested_contexts, num_processes=2)


def test_channels_last_names_the_3d_convolution(tmp_path):
    "to_channelslast() on a Conv3d model: a raw 'required rank 4 tensor' error, and learn.channels_last left True."
    x = torch.randn(16, 2, 3, 4, 4)
    items = list(zip(x, (x.mean((1, 2, 3, 4)) > 0).long()))
    dls = DataLoaders.from_dsets(items[:12], items[12:], bs=4, device="cpu", vocab=["a", "b"])
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))
    learn = quiet(Learner(dls, model, path=tmp_path))
    with pytest.raises(ValueError, match="Conv3d"):
        learn.to_channelslast()
    assert learn.channels_last is False
    learn.fit(1)


def test_perplexity_counts_the_tokens_the_loss_counts():
    "Padded targets (ignore_index): the padding weighed in each batch's share, so the perplexity was off."
    from types import SimpleNamespace
    from coursekit.metrics import Perplexity
    torch.manual_seed(0)
    loss_func = CrossEntropyLossFlat(ignore_index=-100)
    perplexity = Perplexity()
    perplexity.reset()
    all_losses = []
    for n_real in (10, 2):
        preds = torch.randn(1, 10, 5)
        targets = torch.randint(0, 5, (1, 10))
        targets[0, n_real:] = -100  # padding
        learn = SimpleNamespace(loss=loss_func(preds, targets), yb=(targets,), loss_func=loss_func)
        perplexity.accumulate(learn)
        all_losses.append(torch.nn.functional.cross_entropy(preds[0, :n_real], targets[0, :n_real], reduction="none"))
    expected = float(torch.cat(all_losses).mean().exp())
    assert perplexity.value == pytest.approx(expected, rel=1e-5)


def test_reduce_lr_on_plateau_refuses_a_factor_that_raises_the_rate(tmp_path):
    "PyTorch's factor=0.5 means halve; fastai's factor divides, so 0.5 doubled the lr at every plateau, silently."
    with pytest.raises(ValueError, match="factor=2"):
        ReduceLROnPlateau(factor=0.5)


@pytest.mark.parametrize("metric, message", [("accuracy", "not the string"), (F1Score, r"F1Score\(\)")],
                         ids=["string", "factory"])
def test_a_metric_that_is_not_one_is_named(tmp_path, metric, message):
    "metrics='accuracy' and metrics=[F1Score] failed after a whole epoch with 'str' is not callable / no 'detach'."
    with pytest.raises(TypeError, match=message):
        learn = classifier(tmp_path, metrics=[metric])
        learn.fit(1)


def test_a_callback_that_is_not_one_is_named(tmp_path):
    "cbs=[a function] failed with \"'function' object has no attribute 'order'\"."
    with pytest.raises(TypeError, match="Callback"):
        classifier(tmp_path).fit(1, cbs=[lambda learn: None])


@pytest.mark.parametrize("n_epoch", [1.5, -1])
def test_fit_takes_a_whole_number_of_epochs(tmp_path, n_epoch):
    "fit(1.5) failed inside range(); fit(-1) silently did nothing."
    with pytest.raises(ValueError, match="whole number of epochs"):
        classifier(tmp_path).fit(n_epoch)


def test_doctor_compares_a_regression_with_the_mean():
    "R² below 0 (worse than predicting the mean): the doctor only said 'under-fitting: train longer or a bigger model'."
    values = [[81.1, 40.6, -4.54], [22.4, 14.2, -0.93], [14.2, 10.3, -0.40], [12.1, 9.95, -0.36], [10.8, 8.29, -0.13],
              [10.5, 8.49, -0.16]]
    history = FitHistory(["train_loss", "valid_loss", "r2_score"], values, noisy(80, 10, noise=1.), [3e-2] * 40)
    report = diagnose(history)
    assert "no_better_than_mean" in report.codes
    assert "healthy" not in report.codes
    assert "-0.16" in dict(report.findings)["no_better_than_mean"]
    good = [row[:2] + [0.8] for row in values]
    assert "no_better_than_mean" not in diagnose(FitHistory(history.metric_names, good, history.losses, history.lrs)).codes


@pytest.mark.parametrize("metric", ["f1_score", "accuracy"])
def test_doctor_skips_an_epoch_whose_metric_is_nan(metric):
    "A NaN metric at epoch 1 then a steady rise was read as 'worsened since epoch 1 (nan -> 0.7)': over-fitting."
    nan = float("nan")
    values = [[1.0, 0.9, nan], [0.8, 0.7, 0.5], [0.6, 0.6, 0.6], [0.4, 0.5, 0.7]]
    report = diagnose(FitHistory(["train_loss", "valid_loss", metric], values, noisy(1.0, 0.4), [1e-2] * 40,
                                 n_valid=100))
    assert not {"overfitting", "valid_too_small"} & set(report.codes), report
    assert "nan" not in repr(report)


@pytest.mark.parametrize("gap, error, message", [(1.5, ValueError, "0.015"), (float("nan"), ValueError, "finite"),
                                                 ("0.01", TypeError, "a number")])
def test_doctor_refuses_a_claimed_gap_it_cannot_mean(gap, error, message):
    "claimed_gap=1.5 (percentage points meant) was 'resolved'; NaN was 'a zero gap'; '0.01' a raw abs() TypeError."
    history = FitHistory(["train_loss", "valid_loss", "error_rate"], [[0.6, 0.5, 0.3], [0.5, 0.45, 0.25]],
                         noisy(0.7, 0.5), [1e-2] * 40, n_valid=60)
    with pytest.raises(error, match=message):
        diagnose(history, claimed_gap=gap)


def test_a_single_callback_works_where_a_list_does(tmp_path):
    "fastai's spelling fit_one_cycle(n, cbs=SaveModelCallback()) failed: 'Value after * must be an iterable'."
    learn = classifier(tmp_path, cbs=CSVLogger())
    silently(learn.fit_one_cycle, 1, cbs=SaveModelCallback())
    silently(learn.fit, 1, cbs=EarlyStoppingCallback())
    silently(learn.fine_tune, 1, cbs=SaveModelCallback(fname="tuned"))
    assert (tmp_path / "history.csv").exists() and (tmp_path / "models" / "tuned.pth").exists()
    with pytest.raises(TypeError, match="a list of callbacks"):
        learn.fit(1, cbs="SaveModelCallback")


def test_csv_logger_appends_to_an_empty_file_with_a_header(tmp_path):
    "append=True onto an empty file (touched beforehand) wrote rows without a header: pandas took row 0 for it."
    (tmp_path / "history.csv").touch()
    learn = classifier(tmp_path)
    silently(learn.fit, 1, cbs=[CSVLogger(append=True)])
    log = pd.read_csv(tmp_path / "history.csv")
    assert list(log.columns) == ["epoch", "train_loss", "valid_loss", "accuracy", "time"]
    assert len(log) == 1


def test_doctor_after_a_fit_that_failed_at_once(tmp_path):
    "A fit that raised at its first batch left the doctor saying 'no fit has run on this learner' after an earlier fit."
    learn = classifier(tmp_path)
    silently(learn.fit, 1)

    class FailAtOnce(Callback):
        def before_batch(self, learn):
            raise RuntimeError("a bad batch")
    with pytest.raises(RuntimeError):
        learn.fit(1, cbs=[FailAtOnce()])
    report = learn.doctor()
    assert report.codes == ["not_finished"]
    assert "no fit has run" not in repr(report)


def test_accuracy_with_targets_of_shape_n_by_1(tmp_path):
    "A Dataset returning tensor([label]) gives (N, 1) targets: accuracy broadcast to (N, N) and showed 0.57 for 0.97."
    preds = torch.tensor([[2., 0.], [0., 2.], [2., 0.], [0., 2.]])
    targets = torch.tensor([[0], [1], [0], [1]])
    assert float(accuracy(preds, targets)) == 1.0
    assert float(error_rate(preds, targets)) == 0.0
    with pytest.raises(ValueError, match="accuracy_multi"):
        accuracy(torch.randn(5, 3), torch.eye(3)[[0, 1, 2, 0, 1]])  # one-hot targets


def test_load_says_when_the_file_has_no_optimizer_state(tmp_path):
    "learn.load(name) (with_opt=True) from a weights-only file kept the optimizer's old state without a word."
    learn = classifier(tmp_path)
    silently(learn.fit, 1)
    learn.save("weights_only", with_opt=False)
    with pytest.warns(UserWarning, match="no optimizer state"):
        learn.load("weights_only")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learn.load("weights_only", with_opt=False)
