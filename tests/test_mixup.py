"""MixUp and CutMix (issue 12) on real pictures, the MNIST 3-vs-7 mirror: a short fit trains and exports; the model
trains on mixed pictures; validation, predictions and the loss function are those of the learner without mixing,
also after an error in the fit. The chapter (nbs/core/10_callbacks.ipynb) tests the pieces on small tensors."""
import pytest
import torch

from coursekit.callbacks import CutMix, MixHandler, MixUp
from coursekit.core import set_seed
from coursekit.data.external import URLs, untar_data
from coursekit.learner import Callback, CancelFitException, load_learner
from coursekit.metrics import error_rate
from coursekit.vision.data import ImageDataLoaders, Resize, get_image_files
from coursekit.vision.learner import cnn_learner

MIXERS = [MixUp, CutMix]


@pytest.fixture(scope="module")
def mnist_dls():
    "MNIST 3 vs 7 from the mirror: 600 images at 16 px."
    path = untar_data(URLs.MNIST_SAMPLE)
    files = get_image_files(path, folders=["train", "valid"])[::2]
    return ImageDataLoaders.from_path_re(path, files, pat=r"/(\d)/[^/]+$", valid_pct=0.2, seed=42,
                                         item_tfms=Resize(16), bs=32, device="cpu")


def new_learner(dls, cbs=(), path=None):
    "A resnet18 from scratch (no ResNet weights offline): the same weights at every call."
    set_seed(0)
    return cnn_learner(dls, "resnet18", pretrained=False, metrics=error_rate, cbs=list(cbs), path=path)


@pytest.fixture(scope="module", params=MIXERS, ids=lambda mixer: mixer.__name__)
def mixed_fit(request, mnist_dls, tmp_path_factory):
    "A learner, its untrained validation loss and its loss function, after two epochs with MixUp or CutMix."
    learn = new_learner(mnist_dls, cbs=[request.param()], path=tmp_path_factory.mktemp("mixed"))
    untrained_loss = learn.validate()[0]
    loss_func = learn.loss_func
    with learn.no_bar():
        learn.fit_one_cycle(2, 1e-2)
    return learn, untrained_loss, loss_func


def test_a_short_mixed_fit_trains(mixed_fit):
    learn, untrained_loss, _ = mixed_fit
    losses = learn.recorder.losses
    assert sum(losses[-5:]) < sum(losses[:5]), f"the training loss did not fall: {losses}"
    valid_loss, error = learn.validate()
    assert valid_loss < untrained_loss
    assert error < 0.25, f"error rate {error:.3f}: not much better than guessing between two digits (0.5)"


def test_after_a_mixed_fit_the_loss_is_the_learners_own(mixed_fit):
    learn, _, loss_func = mixed_fit
    assert learn.loss_func is loss_func


def test_an_export_after_a_mixed_fit_loads(mixed_fit, mnist_dls):
    learn, _, _ = mixed_fit
    file = learn.export("mixed.pkl")
    loaded = load_learner(file, device="cpu")
    item = mnist_dls.valid.items[0]
    label, _, probs = loaded.predict(item)
    expected_label, _, expected_probs = learn.predict(item)
    assert label == expected_label
    torch.testing.assert_close(probs, expected_probs)


def test_validation_and_predictions_are_not_mixed(mixed_fit, mnist_dls):
    learn, _, _ = mixed_fit
    plain = new_learner(mnist_dls)
    plain.model.load_state_dict(learn.model.state_dict())
    assert learn.validate() == plain.validate()
    assert learn.recorder.values[-1][1] == plain.validate()[0]
    torch.testing.assert_close(learn.get_preds()[0], plain.get_preds()[0], rtol=0, atol=0)


class FirstTrainingBatch(Callback):
    "Keeps the first training batch as it came (`xb`) and as the model saw it (`seen_xb`), then stops the fit."
    order = MixHandler.order - 1

    def before_batch(self, learn):
        if learn.training:
            # MNIST's black background is the same in every picture: a little noise tells each pixel's picture
            learn.xb = (learn.xb[0] + 0.01 * torch.randn_like(learn.xb[0]),)
            self.xb = learn.xb[0]

    def after_batch(self, learn):
        if learn.training:
            self.seen_xb = learn.xb[0]
            raise CancelFitException()


def seen_batch(dls, mix):
    "The first training batch of a fit with `mix`, before and after mixing."
    batch = FirstTrainingBatch()
    learn = new_learner(dls, cbs=[mix, batch])
    with learn.no_bar():
        learn.fit(1)
    return batch


def test_mixup_trains_on_blends_of_two_pictures_of_the_batch(mnist_dls):
    mix = MixUp()
    batch = seen_batch(mnist_dls, mix)
    assert 0.5 <= mix.lam < 1
    assert not torch.equal(batch.seen_xb, batch.xb)
    rest = (batch.seen_xb - mix.lam * batch.xb) / (1 - mix.lam)  # should be another picture of the batch
    other = torch.cdist(rest.flatten(1), batch.xb.flatten(1)).argmin(dim=1)
    torch.testing.assert_close(batch.seen_xb, mix.lam * batch.xb + (1 - mix.lam) * batch.xb[other])


def test_cutmix_trains_on_pictures_with_a_box_of_another_one(mnist_dls):
    mix = CutMix()
    batch = seen_batch(mnist_dls, mix)
    box = (batch.seen_xb != batch.xb).any(dim=1).any(dim=0)
    assert 0 < mix.lam < 1
    assert abs((1 - box.float().mean().item()) - mix.lam) < 1e-6
    pasted = batch.seen_xb[:, :, box].flatten(1)
    sources = batch.xb[:, :, box].flatten(1)
    other = torch.cdist(pasted, sources).argmin(dim=1)
    torch.testing.assert_close(pasted, sources[other], rtol=0, atol=0)
    torch.testing.assert_close(batch.seen_xb[:, :, ~box], batch.xb[:, :, ~box], rtol=0, atol=0)


class FailAt(Callback):
    "Raises an error after the loss of the `n`th training batch, as a bug in a model or a callback would."
    def __init__(self, n: int):
        self.n = n
        self.seen = 0

    def after_loss(self, learn):
        if learn.training:
            self.seen += 1
            if self.seen == self.n:
                raise RuntimeError("a failure in the middle of the fit")


@pytest.mark.parametrize("mixer", MIXERS, ids=lambda mixer: mixer.__name__)
def test_after_an_error_in_a_mixed_fit_the_learner_is_as_without_mixing(mnist_dls, mixer):
    learn = new_learner(mnist_dls, cbs=[mixer()])
    loss_func = learn.loss_func
    with pytest.raises(RuntimeError, match="a failure in the middle"), learn.no_bar():
        learn.fit(1, cbs=[FailAt(3)])
    assert learn.loss_func is loss_func
    plain = new_learner(mnist_dls)
    plain.model.load_state_dict(learn.model.state_dict())
    assert learn.validate() == plain.validate()
