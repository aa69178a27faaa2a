"""Training on garbage stops, or says so (issue 11, item 5).

- A learning rate that is not a finite number >= 0 is refused before anything changes.
- The first NaN or infinite loss (or gradient) stops the fit with an error naming the epoch, the batch and
  the learning rates and saying what to do; the model keeps the weights (and batch-norm statistics) of the
  last finite step, so `predict` never answers with NaN probabilities.
- `lr_find`, which drives the loss to explode on purpose, and fp16's skipped steps are left alone.
- An empty validation set and a classifier with a single class give a warning, not a crash or a silent NaN.

The errors are caught as `FloatingPointError` (the base class of `coursekit.learner.NonFiniteLossError`), so
that each test fails on its own on a learner without the guard.
"""
import math
import os
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from coursekit.core import set_seed
from coursekit.data.core import DataLoaders
from coursekit.learner import Callback, Learner, simple_mlp
from coursekit.losses import MSELossFlat


# --- tiny data and learners ----------------------------------------------------------------------

def regression_dls(bs: int = 32) -> DataLoaders:
    "y = 2 x0 - 3 x1 + 1 on 256 points: 200 to train (6 full batches), 56 to validate."
    set_seed(0)
    x = torch.randn(256, 2)
    y = (x @ torch.tensor([2., -3.]) + 1).unsqueeze(1)
    return DataLoaders.from_dsets(TensorDataset(x[:200], y[:200]), TensorDataset(x[200:], y[200:]), bs=bs, device="cpu")


def classification_dls(x: torch.Tensor, y: torch.Tensor, n_train: int, bs: int = 8) -> DataLoaders:
    return DataLoaders.from_dsets(TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]),
                                  bs=bs, device="cpu", vocab=["neg", "pos"])


def diverging_learner(**kwargs) -> Learner:
    "Plain SGD at lr 10,000 on the regression problem: the loss overflows within a few batches."
    torch.manual_seed(0)
    return Learner(regression_dls(), nn.Linear(2, 1), loss_func=MSELossFlat(), opt_func=torch.optim.SGD, lr=1e4,
                   cbs=[], **kwargs)


class StateBeforeBatch(Callback):
    "Keeps the model's state (weights and batch-norm statistics) at the start of each training batch."
    def before_batch(self, learn):
        if learn.training:
            self.state = {name: tensor.clone() for name, tensor in learn.model.state_dict().items()}


def weight_and_bias(model: nn.Linear) -> list:
    "Two parameter groups, so that a list of two learning rates is valid."
    return [[model.weight], [model.bias]]


class MeanOfEmbeddings(nn.Module):
    "A tiny text classifier: the mean of the token embeddings, then a linear layer."
    def __init__(self, n_tokens: int, n_classes: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, 8)
        self.linear = nn.Linear(8, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embedding(tokens).mean(1))


def state_of(model: nn.Module) -> dict:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_state(model: nn.Module, expected: dict):
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{name} changed"


def fit_error(learn: Learner, n_epoch: int, **kwargs) -> FloatingPointError:
    "The error that stops `learn.fit`; fails the test when the fit runs to its end."
    with pytest.raises(FloatingPointError) as caught, learn.no_bar():
        learn.fit(n_epoch, **kwargs)
    return caught.value


def warning_messages(action) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(warning.message) for warning in caught]


# --- 1. learning rates refused up front ----------------------------------------------------------

@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -1e-3, [1e-3, float("nan")]])
@pytest.mark.parametrize("method", ["fit", "fit_one_cycle"])
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused_before_training(method, lr):
    learn = Learner(regression_dls(), nn.Linear(2, 1), loss_func=MSELossFlat(), splitter=weight_and_bias, cbs=[])
    before = state_of(learn.model)
    with pytest.raises(ValueError, match="Learning rates must be finite numbers >= 0") as caught, learn.no_bar():
        getattr(learn, method)(1, lr)
    assert "lr_find" in str(caught.value)
    assert_same_state(learn.model, before)
    assert not learn.opt.state, "the optimizer took a step"


def test_a_learning_rate_of_zero_is_allowed():
    learn = Learner(regression_dls(), nn.Linear(2, 1), loss_func=MSELossFlat(), cbs=[])
    before = state_of(learn.model)
    with learn.no_bar():
        learn.fit(1, lr=0.)
    assert_same_state(learn.model, before)


# --- 2. the first non-finite loss stops the fit ---------------------------------------------------

def test_a_diverging_fit_stops_at_the_first_non_finite_loss_with_the_last_finite_weights():
    learn = diverging_learner()
    keeper = StateBeforeBatch()
    error = fit_error(learn, 3, cbs=[keeper])
    message = str(error)
    assert type(error).__name__ == "NonFiniteLossError"
    assert "the loss became" in message and f"epoch {error.epoch + 1}/3, batch {error.batch + 1}/6" in message, message
    assert "learning rate 1e+04" in message and "lr_find" in message and "Lower the learning rate" in message
    assert error.lrs == [1e4]
    assert_same_state(learn.model, keeper.state)
    assert all(torch.isfinite(param).all() for param in learn.model.parameters())
    assert not learn.model.training and all(param.grad is None for param in learn.model.parameters())
    assert len(learn.recorder.losses) == 6 * error.epoch + error.batch, "the batches before the bad one are recorded"


class NanLossAt(Callback):
    "Makes the loss of one training batch NaN, as a NaN in the data would."
    def __init__(self, batch: int):
        self.batch = batch

    def after_loss(self, learn):
        if learn.training and learn.iter == self.batch:
            learn.loss = learn.loss * float("nan")


def test_the_learner_trains_again_after_the_error():
    learn = Learner(regression_dls(), nn.Linear(2, 1), loss_func=MSELossFlat(), lr=0.1, cbs=[])
    fit_error(learn, 1, cbs=[NanLossAt(batch=4)])
    with learn.no_bar():
        learn.fit(3)
    assert math.isfinite(learn.recorder.values[-1][1])
    assert learn.recorder.values[-1][1] < learn.recorder.values[0][1]


def test_nan_inputs_stop_the_fit_say_so_and_leave_batchnorm_statistics_finite():
    set_seed(0)
    x = torch.randn(64, 2)
    y = (x[:, 0] > 0).long()
    x[37, 1] = float("nan")  # in the training set
    learn = Learner(classification_dls(x, y, n_train=48), simple_mlp(2, 2, hidden=[8], bn=True), cbs=[])
    keeper = StateBeforeBatch()
    error = fit_error(learn, 2, cbs=[keeper])
    assert "inputs or targets of this batch contain NaN or infinite values" in str(error), str(error)
    assert "clean the data" in str(error)
    assert_same_state(learn.model, keeper.state)  # the running statistics the bad batch changed are put back
    label, _, probs = learn.predict(torch.tensor([1., 1.]))
    assert torch.isfinite(probs).all() and label in ("neg", "pos")


def test_non_finite_gradients_with_a_finite_loss_stop_the_fit_before_the_step():
    class InfGradient(Callback):
        def after_backward(self, learn):
            if learn.iter == 3:
                learn.model.weight.grad[0, 0] = float("inf")
    learn = Learner(regression_dls(), nn.Linear(2, 1), loss_func=MSELossFlat(), lr=1e-2, cbs=[])
    keeper = StateBeforeBatch()
    error = fit_error(learn, 1, cbs=[InfGradient(), keeper])
    assert "the gradients became NaN or infinite (the loss was finite)" in str(error)
    assert error.batch == 3 and "batch 4/6" in str(error)
    assert_same_state(learn.model, keeper.state)


def test_huge_but_finite_gradients_are_not_mistaken_for_infinite_ones():
    "The guard's fast check is a norm, which overflows above ~1e19; it must not stop a fit for that alone."
    class HugeGradient(Callback):
        def after_backward(self, learn):
            learn.model.weight.grad[0, 0] = 1e30
    learn = Learner(regression_dls(), nn.Linear(2, 1), loss_func=MSELossFlat(), opt_func=torch.optim.SGD, lr=0.,
                    cbs=[HugeGradient()])
    with learn.no_bar():
        learn.fit(1)
    assert len(learn.recorder.values) == 1


def test_with_gradient_accumulation_the_error_names_the_batch_whose_loss_was_not_finite():
    learn = Learner(regression_dls(), nn.Linear(2, 1), loss_func=MSELossFlat(), lr=1e-2, accum=2, cbs=[])
    error = fit_error(learn, 1, cbs=[NanLossAt(batch=2)])
    assert error.batch == 2 and "batch 3/6" in str(error) and "the loss became NaN" in str(error), str(error)


def test_a_callback_that_sets_a_nan_learning_rate_is_caught_before_the_step():
    class NanSchedule(Callback):
        def before_batch(self, learn):
            if learn.training and learn.iter == 1:
                learn.set_hyper("lr", float("nan"))
    learn = Learner(regression_dls(), nn.Linear(2, 1), loss_func=MSELossFlat(), lr=1e-2, cbs=[])
    keeper = StateBeforeBatch()
    error = fit_error(learn, 1, cbs=[NanSchedule(), keeper])
    assert "learning rate nan is not a finite number >= 0" in str(error), str(error)
    assert_same_state(learn.model, keeper.state)


def test_the_guard_is_on_with_the_default_callbacks_and_with_cbs():
    for cbs in (None, [], [StateBeforeBatch()]):
        learn = Learner(regression_dls(), nn.Linear(2, 1), loss_func=MSELossFlat(), opt_func=torch.optim.SGD,
                        lr=1e4, cbs=cbs)
        fit_error(learn, 2)


def test_fit_one_cycle_and_fine_tune_stop_too():
    learn = diverging_learner()
    with pytest.raises(FloatingPointError), learn.no_bar():
        learn.fit_one_cycle(3, lr_max=1e5)
    learn = diverging_learner()
    with pytest.raises(FloatingPointError), learn.no_bar():
        learn.fine_tune(2, base_lr=1e5, freeze_epochs=1)
    assert all(torch.isfinite(param).all() for param in learn.model.parameters())


# --- 3. what must keep working -------------------------------------------------------------------

@pytest.mark.parametrize("stop_div", [True, False])
def test_lr_find_still_runs_into_divergence_and_restores_the_model(stop_div):
    learn = diverging_learner()
    before = state_of(learn.model)
    learn.lr_find(end_lr=1e10, num_it=100, stop_div=stop_div, show_plot=False)
    losses = learn.lr_finder.losses
    if stop_div:
        assert len(losses) < 100 and (losses[-1] > 4 * min(losses) or math.isnan(losses[-1]))
    else:
        assert len(losses) == 100 and not math.isfinite(losses[-1])
    assert_same_state(learn.model, before)


def test_a_skipped_fp16_step_is_not_an_error():
    class InfGradient(Callback):
        def after_backward(self, learn):
            if learn.iter == 0:
                learn.model.weight.grad[0, 0] = float("inf")
    learn = Learner(regression_dls(), nn.Linear(2, 1), loss_func=MSELossFlat(), lr=1e-2, cbs=[InfGradient()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16 on a CPU is slow
        learn.to_fp16()
    scale = learn.scaler.get_scale()
    with learn.no_bar():
        learn.fit(2)
    assert learn.scaler.get_scale() < scale, "the scaler did not skip the step"
    assert all(torch.isfinite(param).all() for param in learn.model.parameters())


def test_a_healthy_fit_gives_no_warning_and_trains():
    set_seed(0)
    x = torch.randn(64, 2)
    learn = Learner(classification_dls(x, (x.sum(1) > 0).long(), n_train=48), simple_mlp(2, 2), lr=3e-2, cbs=[])
    with learn.no_bar():
        assert warning_messages(lambda: learn.fit(2)) == []
    assert learn.recorder.values[-1][1] < learn.recorder.values[0][1]


# --- 4. empty validation sets and single classes -------------------------------------------------

def mirror(name: str) -> Path:
    root = os.environ.get("COURSEKIT_MIRROR")
    assert root, "These tests read the offline mirror: set COURSEKIT_MIRROR (e.g. to ../shared/datasets)."
    folder = Path(root) / name
    assert folder.is_dir(), f"{folder} is missing from the mirror COURSEKIT_MIRROR={root}"
    return folder


def mnist_dls(rows: pd.DataFrame) -> DataLoaders:
    from coursekit.vision.data import ImageDataLoaders, Resize
    return ImageDataLoaders.from_df(rows, mirror("mnist_sample"), valid_col="is_valid", item_tfms=Resize(28), bs=16,
                                    device="cpu")


def image_learner(dls: DataLoaders) -> Learner:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, len(dls.vocab)))
    return Learner(dls, model, metrics=[], lr=1e-3, cbs=[])


def test_an_empty_image_validation_set_warns_and_trains_without_validation():
    "Before: a raw IndexError from collation after a whole training epoch."
    rows = pd.read_csv(mirror("mnist_sample") / "labels.csv").groupby("label").head(32).reset_index(drop=True)
    rows["is_valid"] = False
    learn = image_learner(mnist_dls(rows))
    with learn.no_bar():
        messages = warning_messages(lambda: learn.fit(2))
    assert any("The validation set is empty (64 training items" in message for message in messages), messages
    assert len(learn.recorder.values) == 2
    assert all(math.isnan(row[1]) for row in learn.recorder.values)
    assert all(math.isfinite(row[0]) for row in learn.recorder.values)
    assert math.isnan(learn.validate()[0])
    with pytest.raises(ValueError, match="DataLoader is empty"):
        learn.get_preds()


def test_an_empty_loader_yields_no_batch():
    "Before: one empty batch, which failed in collation with a raw IndexError."
    rows = pd.read_csv(mirror("mnist_sample") / "labels.csv").head(8).reset_index(drop=True)
    rows["is_valid"] = False
    dls = mnist_dls(rows)
    assert len(dls.valid) == 0
    assert list(dls.valid) == []


def test_an_empty_text_validation_set_warns():
    "Before: a silent NaN valid_loss."
    from coursekit.text.data import TextDataLoaders
    texts = [f"review {i} says the film was {'good' if i % 2 else 'bad'}" for i in range(40)]
    df = pd.DataFrame({"text": texts, "label": ["pos" if i % 2 else "neg" for i in range(40)], "is_valid": False})
    dls = TextDataLoaders.from_df(df, valid_col="is_valid", bs=8, device="cpu", n_workers=1)
    torch.manual_seed(0)
    learn = Learner(dls, MeanOfEmbeddings(len(dls.text_vocab.itos), 2), cbs=[])
    with learn.no_bar():
        messages = warning_messages(lambda: learn.fit(1))
    assert any("The validation set is empty" in message for message in messages), messages
    assert math.isnan(learn.recorder.values[-1][1])


def test_a_classifier_with_a_single_class_warns_at_the_start():
    rows = pd.read_csv(mirror("mnist_sample") / "labels.csv")
    rows = rows[rows["label"] == rows["label"].iloc[0]].head(48).reset_index(drop=True)
    rows["is_valid"] = [False] * 32 + [True] * 16
    learn = image_learner(mnist_dls(rows))
    with learn.no_bar():
        messages = warning_messages(lambda: learn.fit(1))
    single = [message for message in messages if "single class" in message]
    assert len(single) == 1 and "training needs at least two classes" in single[0], messages


def test_a_training_split_with_a_single_class_warns_after_the_first_epoch():
    "The vocabulary has two classes, but the split left only one in the training set."
    set_seed(0)
    x = torch.randn(64, 2)
    y = (x.sum(1) > 0).long()
    order = y.argsort()
    n_neg = int((y == 0).sum())
    learn = Learner(classification_dls(x[order], y[order], n_train=n_neg), simple_mlp(2, 2), cbs=[])
    with learn.no_bar():
        messages = warning_messages(lambda: learn.fit(3))
    same = [message for message in messages if "Every training target of this epoch is the same class ('neg')" in message]
    assert len(same) == 1, messages
