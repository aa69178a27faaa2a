"""Unfreezing must not change the function the model computes (issue 11, item 1).

`freeze()`, `freeze_to(n)` and `unfreeze()` only decide which parameters the optimizer may change. The
loss of a fixed batch, computed the way the training loop computes it (the modes `fit` sets before its
first batch), must be the same just before and just after them, for every backbone and both `train_bn`
values. And on real data the unfrozen stage of `fine_tune` must not make validation loss worse on average.
"""
import statistics

import pytest
import torch

from coursekit.core import set_seed
from coursekit.data.external import URLs, untar_data
from coursekit.learner import BN_TYPES, CancelFitException, Callback
from coursekit.vision.data import ImageDataLoaders, Resize, get_image_files
from coursekit.vision.learner import cnn_learner

ARCHS = [("efficientnet_lite0", True), ("resnet18", False)]  # (arch, pretrained): no ResNet weights offline


class TrainingModeLoss(Callback):
    "Computes the loss of one fixed batch in the modes the loop sets for training, then stops the fit."
    def __init__(self, xb, yb):
        self.xb = xb
        self.yb = yb
        self.loss = None

    def before_train(self, learn):
        state = weights_and_buffers(learn.model)
        torch.manual_seed(0)  # the same dropout masks every time
        with torch.no_grad():
            self.loss = learn.loss_func(learn.model(self.xb), self.yb).item()
        learn.model.load_state_dict(state)  # a forward pass in training mode moves running statistics: undo it
        raise CancelFitException()


def training_mode_loss(learn, batch) -> float:
    "The loss of `batch` as the first training batch of a `fit` would see it (no step is taken)."
    probe = TrainingModeLoss(*batch)
    with learn.no_bar():
        learn.fit(1, cbs=[probe])
    return probe.loss


def weights_and_buffers(model) -> dict:
    "A copy of every parameter and buffer (running statistics included)."
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_tensors(before: dict, after: dict):
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"changed: {changed[:5]}"


@pytest.fixture(scope="module")
def mnist_dls():
    "MNIST 3 vs 7 from the mirror, a few hundred images at 32 px."
    path = untar_data(URLs.MNIST_SAMPLE)
    files = get_image_files(path, folders=["train", "valid"])[::4]
    return ImageDataLoaders.from_path_re(path, files, pat=r"/(\d)/[^/]+$", valid_pct=0.2, seed=42,
                                         item_tfms=Resize(32), bs=16, device="cpu")


def frozen_learner(dls, arch: str, pretrained: bool, train_bn: bool):
    "A `cnn_learner` with its body frozen, trained one short epoch so that its batch-norm statistics moved."
    set_seed(0)
    learn = cnn_learner(dls, arch, pretrained=pretrained, train_bn=train_bn)
    learn.freeze()
    with learn.no_bar():
        learn.fit(1, lr=1e-3)
    return learn


@pytest.mark.parametrize("train_bn", [False, True])
@pytest.mark.parametrize("arch,pretrained", ARCHS)
def test_unfreezing_keeps_the_training_function(mnist_dls, arch, pretrained, train_bn):
    learn = frozen_learner(mnist_dls, arch, pretrained, train_bn)
    batch = mnist_dls.train.one_batch()
    frozen = training_mode_loss(learn, batch)
    state = weights_and_buffers(learn.model)
    for change in (lambda: learn.freeze_to(1), learn.unfreeze, learn.freeze, learn.unfreeze):
        change()
        assert training_mode_loss(learn, batch) == pytest.approx(frozen, rel=1e-6, abs=1e-7)
    assert_same_tensors(state, weights_and_buffers(learn.model))  # same weights, same statistics


def body_batchnorm(learn) -> list:
    "The batch-norm layers of the body of a `cnn_learner`'s model."
    return [module for module in learn.model[0].modules() if isinstance(module, BN_TYPES)]


def test_held_batchnorm_trains_its_affine_parameters_but_keeps_its_statistics(mnist_dls):
    learn = frozen_learner(mnist_dls, "efficientnet_lite0", True, train_bn=False)
    layer = body_batchnorm(learn)[-1]
    weight, running_mean = layer.weight.detach().clone(), layer.running_mean.clone()
    learn.unfreeze()
    with learn.no_bar():
        learn.fit(1, lr=1e-3)
    assert layer.weight.requires_grad
    assert not torch.equal(layer.weight, weight)         # its scale learns, once unfrozen
    assert torch.equal(layer.running_mean, running_mean)  # its statistics stay the pretrained ones


def test_with_train_bn_batchnorm_trains_throughout(mnist_dls):
    learn = frozen_learner(mnist_dls, "resnet18", False, train_bn=True)
    layer = body_batchnorm(learn)[0]
    conv = learn.model[0][0][0]
    weight, running_mean, conv_weight = layer.weight.detach().clone(), layer.running_mean.clone(), conv.weight.clone()
    with learn.no_bar():
        learn.fit(1, lr=1e-3)
    assert not torch.equal(layer.weight, weight)
    assert not torch.equal(layer.running_mean, running_mean)
    assert torch.equal(conv.weight, conv_weight)  # the rest of the frozen body does not move


class StageLosses(Callback):
    "Records the validation loss at the end of each fit (each stage of `fine_tune` is one fit)."
    def __init__(self):
        self.valid_losses = []

    def after_fit(self, learn):
        self.valid_losses.append(learn.recorder.last_metrics()["valid_loss"])


def test_the_unfrozen_stage_does_not_hurt_on_mnist():
    "bench/bench_finetune_bn.py's MNIST task: 3 seeds, efficientnet_lite0, fine_tune(1, freeze_epochs=1)."
    path = untar_data(URLs.MNIST_SAMPLE)
    files = get_image_files(path, folders=["train", "valid"])
    dls = ImageDataLoaders.from_path_re(path, files, pat=r"/(\d)/[^/]+$", valid_pct=0.2, seed=42,
                                        item_tfms=Resize(32), bs=32, device="cpu")
    changes = []
    for seed in (0, 1, 2):
        set_seed(seed)
        learn = cnn_learner(dls, "efficientnet_lite0")
        stages = StageLosses()
        with learn.no_bar():
            learn.fine_tune(1, freeze_epochs=1, cbs=[stages])
        frozen, unfrozen = stages.valid_losses
        changes.append(unfrozen - frozen)
    assert statistics.mean(changes) <= 0, f"the unfrozen stage raised validation loss by {changes} (seeds 0, 1, 2)"
