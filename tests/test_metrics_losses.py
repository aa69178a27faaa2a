"""Metrics and losses from fastai's course and book (issue 12).

`F1Score`, `Precision`, `Recall`, their `...Multi` versions and the ROC AUC metrics are computed on the whole
validation set, never averaged over batches: on a validation set of several batches each equals scikit-learn's
value on the concatenated predictions, and in a constructed case differs from the average of the batches' values.
The recorder's columns carry fastai's names (`f1_score`, `precision_score`, `recall_score`, `roc_auc_score`,
`perplexity`). `LabelSmoothingCrossEntropy` and the focal losses train a real learner, predict through it, and
come back from `export`/`load_learner` with their arguments. Tiny models on the CPU.
"""

import math

import pytest
import torch
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import TensorDataset

from coursekit.core import exportable_spec
from coursekit.data.core import DataLoaders
from coursekit.learner import Learner, load_learner, simple_mlp
from coursekit.losses import (BCEWithLogitsLossFlat, CrossEntropyLossFlat, FocalLoss, FocalLossFlat,
                              LabelSmoothingCrossEntropy)
from coursekit.metrics import (F1Score, F1ScoreMulti, Perplexity, Precision, PrecisionMulti, Recall, RecallMulti,
                               RocAuc, RocAucBinary, RocAucMulti)

# --- data and learners ----------------------------------------------------------------------------------------


def classification_data(n_classes: int, n_items: int = 160, seed: int = 0) -> tuple:
    "Noisy points in 4 dimensions whose class is the argmax of a random linear map of them."
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n_items, 4, generator=generator)
    scores = inputs @ torch.randn(4, n_classes, generator=generator)
    noise = torch.randn(n_items, n_classes, generator=generator)
    return inputs, (scores + noise).argmax(dim=1)


def loaders(inputs, targets, n_valid: int = 48, bs: int = 16, vocab=None) -> DataLoaders:
    "Training and validation loaders; the validation set is the last `n_valid` items, in batches of `bs`."
    train = TensorDataset(inputs[:-n_valid], targets[:-n_valid])
    valid = TensorDataset(inputs[-n_valid:], targets[-n_valid:])
    return DataLoaders.from_dsets(train, valid, bs=bs, device="cpu", vocab=vocab)


def fitted_learner(dls, n_in: int, n_out: int, loss_func, metrics, path=".", epochs: int = 2) -> Learner:
    "A small MLP fitted for `epochs` epochs (exportable: its model spec is set)."
    torch.manual_seed(0)
    learn = Learner(dls, simple_mlp(n_in, n_out, hidden=[16]), loss_func=loss_func, metrics=metrics, lr=1e-2,
                    path=path, cbs=[])
    learn.model_spec = exportable_spec(simple_mlp, n_in=n_in, n_out=n_out, hidden=[16])
    learn.fit(epochs)
    return learn


def scores_learner(scores, targets, bs: int, loss_func, metrics) -> Learner:
    "A learner whose model outputs its inputs: the validation set's `scores` are the model's predictions."
    n_scores = scores.shape[1]
    model = nn.Linear(n_scores, n_scores)
    with torch.no_grad():
        model.weight.copy_(torch.eye(n_scores))
        model.bias.zero_()
    dls = loaders(torch.cat([scores, scores]), torch.cat([targets, targets]), n_valid=len(scores), bs=bs)
    return Learner(dls, model, loss_func=loss_func, metrics=metrics, cbs=[])


def last_metrics(learn) -> dict:
    "The metric columns of the recorder's last epoch, without the losses."
    values = learn.recorder.last_metrics()
    return {name: value for name, value in values.items() if name not in ("train_loss", "valid_loss")}


# --- classification metrics in a real fit --------------------------------------------------------------------


def test_f1_and_roc_auc_in_a_fit_are_named_as_fastai_and_equal_sklearn_on_get_preds():
    "The issue's case: metrics=[F1Score(), RocAucBinary()] on a 2-class problem, validated in 3 batches."
    inputs, targets = classification_data(2)
    dls = loaders(inputs, targets, vocab=["no", "yes"])
    assert len(dls.valid) == 3
    learn = fitted_learner(dls, 4, 2, CrossEntropyLossFlat(), [F1Score(), RocAucBinary(), Precision(), Recall()])
    assert learn.recorder.metric_names == ["train_loss", "valid_loss", "f1_score", "roc_auc_score",
                                           "precision_score", "recall_score"]
    probs, targs = learn.get_preds()
    predicted = probs.argmax(dim=1).numpy()
    expected = {"f1_score": skm.f1_score(targs.numpy(), predicted),
                "roc_auc_score": skm.roc_auc_score(targs.numpy(), probs[:, 1].numpy()),
                "precision_score": skm.precision_score(targs.numpy(), predicted),
                "recall_score": skm.recall_score(targs.numpy(), predicted)}
    assert last_metrics(learn) == pytest.approx(expected, abs=1e-6)
    assert 0.6 < expected["roc_auc_score"], "the fitted model should rank better than chance"


def test_multi_class_metrics_equal_sklearn_for_every_average():
    inputs, targets = classification_data(3, n_items=240)
    dls = loaders(inputs, targets, n_valid=96, vocab=["a", "b", "c"])
    averages = ("macro", "micro", "weighted")
    metrics = [*(F1Score(average=average) for average in averages), Precision(average="macro"),
               Recall(average="weighted"), RocAuc(), RocAuc(average="weighted")]
    learn = fitted_learner(dls, 4, 3, CrossEntropyLossFlat(), metrics)
    probs, targs = learn.get_preds()
    y_true = targs.numpy()
    predicted = probs.argmax(dim=1).numpy()
    expected = [*(skm.f1_score(y_true, predicted, average=average) for average in averages),
                skm.precision_score(y_true, predicted, average="macro"),
                skm.recall_score(y_true, predicted, average="weighted"),
                skm.roc_auc_score(y_true, probs.numpy(), multi_class="ovr"),
                skm.roc_auc_score(y_true, probs.numpy(), multi_class="ovr", average="weighted")]
    assert learn.recorder.values[-1][2:] == pytest.approx(expected, abs=1e-6)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")  # an item with no label
def test_multi_label_metrics_equal_sklearn():
    "Several labels per item (BCE): thresholded sigmoids for F1/precision/recall, sigmoids for the ROC AUC."
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(200, 4, generator=generator)
    labels = ((inputs @ torch.randn(4, 3, generator=generator) + torch.randn(200, 3, generator=generator)) > 0).float()
    dls = loaders(inputs, labels, n_valid=80)
    metrics = [F1ScoreMulti(), PrecisionMulti(average="micro"), RecallMulti(thresh=0.3, average="samples"),
               RocAucMulti(), RocAucMulti(average="micro")]
    learn = fitted_learner(dls, 4, 3, BCEWithLogitsLossFlat(), metrics)
    assert learn.recorder.metric_names[2:] == ["f1_score", "precision_score", "recall_score", "roc_auc_score",
                                               "roc_auc_score"]
    probs, targs = learn.get_preds()
    y_true = targs.numpy()
    expected = [skm.f1_score(y_true, (probs >= 0.5).numpy(), average="macro"),
                skm.precision_score(y_true, (probs >= 0.5).numpy(), average="micro"),
                skm.recall_score(y_true, (probs >= 0.3).numpy(), average="samples"),
                skm.roc_auc_score(y_true, probs.numpy()),
                skm.roc_auc_score(y_true, probs.numpy(), average="micro")]
    assert learn.recorder.values[-1][2:] == pytest.approx(expected, abs=1e-6)


# --- the whole set, not an average of batches -----------------------------------------------------------------


def test_f1_is_computed_on_the_whole_validation_set_not_averaged_over_batches():
    "Batch 1: no positive predicted, one missed (F1 0); batch 2: 2 right, 1 false alarm (F1 4/5). Whole: F1 2/3."
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0, 1, 1, 1, 0])
    learn = scores_learner(scores, targets, bs=3, loss_func=CrossEntropyLossFlat(), metrics=[F1Score()])
    whole = learn.validate()[1]
    batch_values = [skm.f1_score(targets[i:i + 3].numpy(), scores[i:i + 3].argmax(1).numpy()) for i in (0, 3)]
    assert batch_values == pytest.approx([0.0, 0.8])
    assert whole == pytest.approx(skm.f1_score(targets.numpy(), scores.argmax(1).numpy())) == pytest.approx(2 / 3)
    assert whole != pytest.approx(sum(batch_values) / 2)


def test_roc_auc_is_computed_on_the_whole_validation_set_not_averaged_over_batches():
    "Each batch ranks its positive above its negative (AUC 1), but across batches 0.3 < 0.5: AUC 3/4."
    probabilities = torch.tensor([0.9, 0.5, 0.3, 0.1])
    scores = torch.stack([torch.zeros(4), torch.logit(probabilities)], dim=1)   # softmax's last column: these
    targets = torch.tensor([1, 0, 1, 0])
    learn = scores_learner(scores, targets, bs=2, loss_func=CrossEntropyLossFlat(), metrics=[RocAucBinary()])
    whole = learn.validate()[1]
    batch_values = [skm.roc_auc_score(targets[i:i + 2].numpy(), probabilities[i:i + 2].numpy()) for i in (0, 2)]
    assert batch_values == [1.0, 1.0]
    assert whole == pytest.approx(skm.roc_auc_score(targets.numpy(), probabilities.numpy())) == pytest.approx(0.75)


def test_roc_auc_with_tied_scores_equals_sklearn():
    "Scores rounded to one decimal tie often; a tie between a positive and a negative counts half, as in sklearn."
    generator = torch.Generator().manual_seed(2)
    probabilities = (torch.rand(60, generator=generator) * 10).round() / 10
    targets = (torch.rand(60, generator=generator) < probabilities).long()
    scores = torch.stack([torch.zeros(60), torch.logit(probabilities.clamp(0.01, 0.99))], dim=1)
    learn = scores_learner(scores, targets, bs=16, loss_func=CrossEntropyLossFlat(), metrics=[RocAucBinary()])
    expected = skm.roc_auc_score(targets.numpy(), probabilities.clamp(0.01, 0.99).numpy())
    assert learn.validate()[1] == pytest.approx(expected, abs=1e-6)


def test_roc_auc_without_negatives_says_what_is_missing():
    scores = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 0.5]])
    learn = scores_learner(scores, torch.tensor([1, 1, 1]), bs=2, loss_func=CrossEntropyLossFlat(),
                           metrics=[RocAucBinary()])
    with pytest.raises(ValueError, match="no negative item") as caught:
        learn.validate()
    assert "stratified" in str(caught.value)


def test_binary_average_on_three_classes_names_the_averages_to_use():
    scores = torch.eye(3)
    learn = scores_learner(scores, torch.tensor([0, 1, 2]), bs=2, loss_func=CrossEntropyLossFlat(),
                           metrics=[F1Score()])
    with pytest.raises(ValueError, match="average='binary'.*3 classes.*use average='macro'"):
        learn.validate()


# --- perplexity -----------------------------------------------------------------------------------------------


def test_perplexity_is_exp_of_the_token_mean_cross_entropy():
    "A tiny next-token model: targets of 7 tokens per item; the column is exp of the per-token mean over the set."
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(80, 7, 5, generator=generator)
    targets = (inputs[..., :4].argmax(dim=-1) + (torch.rand(80, 7, generator=generator) < 0.3).long()) % 4
    dls = loaders(inputs, targets, n_valid=30, bs=8)
    learn = fitted_learner(dls, 5, 4, CrossEntropyLossFlat(), [Perplexity()])
    assert learn.recorder.metric_names[-1] == "perplexity"
    probs, targs = learn.get_preds()
    token_losses = -probs.gather(-1, targs.unsqueeze(-1)).log()
    assert learn.recorder.values[-1][-1] == pytest.approx(math.exp(token_losses.mean()), rel=1e-5)
    assert learn.recorder.values[-1][-1] < 4, "better than a uniform guess among the 4 tokens"


# --- losses ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_func", [LabelSmoothingCrossEntropy(eps=0.2), FocalLoss(gamma=1.5),
                                       FocalLossFlat(gamma=2.5)], ids=lambda loss: type(loss).__name__)
def test_new_losses_train_predict_and_come_back_from_export(tmp_path, loss_func):
    inputs, targets = classification_data(2)
    dls = loaders(inputs, targets, vocab=["no", "yes"])
    learn = fitted_learner(dls, 4, 2, loss_func, [F1Score()], path=tmp_path, epochs=3)
    probs, targs = learn.get_preds()
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(probs)))
    assert (probs.argmax(dim=1) == targs).float().mean() > 0.7, "the loss should train a better-than-chance model"
    item = inputs[-1]
    label, decoded, item_probs = learn.predict(item)
    assert label in ("no", "yes") and int(decoded) == int(item_probs.argmax())
    loaded = load_learner(learn.export("model.ck"), device="cpu")
    assert type(loaded.loss_func) is type(loss_func)
    for argument in ("eps", "gamma", "reduction"):
        assert getattr(loaded.loss_func, argument, None) == getattr(loss_func, argument, None), argument
    assert loaded.predict(item)[0] == label
    torch.testing.assert_close(loaded.predict(item)[2], item_probs)


def test_label_smoothing_equals_pytorch_and_focal_with_gamma_zero_equals_cross_entropy():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(32, 6, generator=generator) * 3
    targets = torch.randint(0, 6, (32,), generator=generator)
    for eps in (0.05, 0.1, 0.5):
        expected = nn.CrossEntropyLoss(label_smoothing=eps)(logits, targets)
        torch.testing.assert_close(LabelSmoothingCrossEntropy(eps=eps)(logits, targets), expected)
    cross_entropy = nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, targets), cross_entropy)
    torch.testing.assert_close(FocalLossFlat(gamma=0.0)(logits, targets), cross_entropy)
    assert FocalLoss(gamma=2.0)(logits, targets) < cross_entropy


# --- every average, on random predictions gathered over several batches ---------------------------------------


class BatchLearn:
    "What a metric reads of a learner: the model's outputs and the targets of one batch."
    def __init__(self, pred, target):
        self.pred = pred
        self.yb = (target,)


def gathered_value(metric, preds, targets, bs: int) -> float:
    "The metric's value after accumulating `preds` and `targets` in batches of `bs`."
    metric.reset()
    for start in range(0, len(preds), bs):
        metric.accumulate(BatchLearn(preds[start:start + bs], targets[start:start + bs]))
    return metric.value


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
@pytest.mark.parametrize("seed", range(12))
def test_random_predictions_in_batches_equal_sklearn_for_every_average(seed):
    generator = torch.Generator().manual_seed(seed)
    n_items = int(torch.randint(5, 40, (1,), generator=generator))
    n_classes = int(torch.randint(2, 5, (1,), generator=generator))
    logits = torch.randn(n_items, n_classes, generator=generator)
    classes = torch.randint(0, n_classes, (n_items,), generator=generator)
    labels = torch.randint(0, 2, (n_items, n_classes), generator=generator)
    y_pred = logits.argmax(dim=1).numpy()
    y_labels = (torch.sigmoid(logits) >= 0.5).numpy()
    averages = ("macro", "micro", "weighted") + (("binary",) if n_classes == 2 else ())
    for factory, sklearn_score in ((F1Score, skm.f1_score), (Precision, skm.precision_score),
                                   (Recall, skm.recall_score)):
        for average in averages:
            value = gathered_value(factory(average=average), logits, classes, bs=7)
            assert value == pytest.approx(sklearn_score(classes.numpy(), y_pred, average=average)), (factory, average)
    for factory, sklearn_score in ((F1ScoreMulti, skm.f1_score), (PrecisionMulti, skm.precision_score),
                                   (RecallMulti, skm.recall_score)):
        for average in ("macro", "micro", "weighted", "samples"):
            value = gathered_value(factory(average=average), logits, labels, bs=7)
            assert value == pytest.approx(sklearn_score(labels.numpy(), y_labels, average=average)), (factory, average)


def test_f1_over_pixels_of_a_segmentation_equals_sklearn_on_the_flattened_masks():
    "`axis=1`: a class score per pixel, as a segmentation model outputs; masks of (N, H, W) class indices."
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 3, 4, 5, generator=generator)
    masks = torch.randint(0, 3, (6, 4, 5), generator=generator)
    value = gathered_value(F1Score(axis=1, average="macro"), logits, masks, bs=4)
    expected = skm.f1_score(masks.reshape(-1).numpy(), logits.argmax(dim=1).reshape(-1).numpy(), average="macro")
    assert value == pytest.approx(expected)
