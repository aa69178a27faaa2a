"""The GPU speed paths of the training step, checked on the CPU: what runs here runs the same code as on CUDA.

On CUDA a learner trains by default in bfloat16 autocast (float16 with a gradient scaler on GPUs without native
bfloat16), keeps convolutional models and image batches in channels_last layout, steps a fused Adam and lets
cuDNN autotune. bfloat16 autocast, channels_last and fused Adam all run on a CPU too, so each is compared here
with the plain float32 / contiguous / per-tensor path: the results must agree within mixed-precision tolerance.
The choice of defaults is a pure function of the device's abilities, tested with fake devices; `learn.compile()`
is tested with a compiler made to fail (the one-line fallback) and, when the CPU compiler works, for real.
What needs a GPU itself (cuDNN's kernels, fp16 on tensor cores, pinned-memory transfers) cannot run here.
"""
import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

import coursekit.learner
from coursekit.core import prefetch, set_seed
from coursekit.data.core import DataLoaders
from coursekit.learner import (Callback, Learner, LRFinder, TrainingDefaults, bf16_native, device_defaults,
                               fused_adam, learner_defaults)
from coursekit.losses import CrossEntropyLossFlat


def small_convnet() -> nn.Sequential:
    "A convnet with batch norm for 3x16x16 images and 4 classes: the layers the GPU paths change."
    set_seed(0)  # no bias before batch norm: its gradient would be rounding noise, which Adam's step magnifies
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def image_dls(n: int = 96, bs: int = 16) -> DataLoaders:
    "Images whose class is the brightest of four quadrants, on the CPU."
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, 16, 16, generator=generator)
    quadrants = images.mean(1).unfold(1, 8, 8).unfold(2, 8, 8).mean((-1, -2)).reshape(n, 4)
    labels = quadrants.argmax(1)
    samples = list(zip(images, labels))
    return DataLoaders.from_dsets(samples[:64], samples[64:], bs=bs, device="cpu", vocab=["a", "b", "c", "d"])


class KeepLosses(Callback):
    "Keeps the loss of every training batch, as computed (before any smoothing)."
    def __init__(self):
        self.losses = []

    def after_loss(self, learn):
        if learn.training:
            self.losses.append(learn.loss.detach().float())


def trained(**learner_kwargs) -> Learner:
    "A small convnet trained for two epochs from the same weights on the same shuffled batches."
    learn = Learner(image_dls(), small_convnet(), loss_func=CrossEntropyLossFlat(), lr=1e-2, cbs=[KeepLosses()],
                    **learner_kwargs)
    set_seed(3)
    with learn.no_bar():
        learn.fit(2)
    return learn


def predictions(learn: Learner) -> torch.Tensor:
    "The learner's validation probabilities."
    preds, _ = learn.get_preds()
    return preds


def batch_losses(learn: Learner) -> torch.Tensor:
    "The loss of every training batch, as `KeepLosses` kept them."
    keeper = next(cb for cb in learn.cbs if isinstance(cb, KeepLosses))
    return torch.stack(keeper.losses)


def parameters(learn: Learner) -> list:
    "The learner's parameters, detached."
    return [param.detach().clone() for param in learn.model.parameters()]


@pytest.fixture(scope="module")
def fp32_learner() -> Learner:
    return trained(precision="fp32", channels_last=False, opt_func=torch.optim.Adam)


def test_bf16_autocast_matches_fp32(fp32_learner):
    "bfloat16 autocast (the CUDA default) trains to the same losses and predictions as float32, within its precision."
    bf16 = trained(precision="bf16")
    assert bf16.model[0].weight.dtype == torch.float32  # autocast computes in bf16, the weights stay float32
    losses_fp32 = batch_losses(fp32_learner)
    losses_bf16 = batch_losses(bf16)
    assert len(losses_bf16) == len(losses_fp32) == 8
    torch.testing.assert_close(losses_bf16, losses_fp32, rtol=3e-2, atol=3e-2)
    preds_bf16 = predictions(bf16)
    assert preds_bf16.dtype == torch.float32
    torch.testing.assert_close(preds_bf16, predictions(fp32_learner), rtol=0, atol=3e-2)
    assert not torch.equal(losses_bf16, losses_fp32)  # it did run in bfloat16


def test_channels_last_matches_contiguous(fp32_learner):
    "channels_last weights and batches give the contiguous layout's results (float rounding apart)."
    seen = []

    class InputLayout(Callback):
        def after_pred(self, learn):
            seen.append(learn.xb[0].is_contiguous(memory_format=torch.channels_last))

    learn = Learner(image_dls(), small_convnet(), loss_func=CrossEntropyLossFlat(), lr=1e-2,
                    cbs=[KeepLosses(), InputLayout()], channels_last=True)
    assert learn.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    set_seed(3)
    with learn.no_bar():
        learn.fit(2)
    assert seen and all(seen)  # every batch reached the model in channels_last layout
    torch.testing.assert_close(batch_losses(learn), batch_losses(fp32_learner), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(predictions(learn), predictions(fp32_learner), rtol=1e-4, atol=1e-5)
    assert learn.model[0].weight.is_contiguous(memory_format=torch.channels_last)  # training kept the layout


def test_fused_adam_matches_plain_adam(fp32_learner):
    "The fused Adam the learner uses on CUDA (it runs on the CPU too) takes the same steps as the per-tensor one."
    fused = trained(opt_func=fused_adam, wd=0.1)
    plain = trained(opt_func=torch.optim.Adam, wd=0.1)
    assert fused.opt.defaults["fused"] and not plain.opt.defaults["fused"]
    foreach = trained(opt_func=lambda params, lr: torch.optim.Adam(params, lr=lr, foreach=True), wd=0.1)
    # the kernels round differently (about 1e-8); Adam's step, about lr in size whatever the gradient's size,
    # magnifies that for weights whose gradient is near zero: after 8 steps at lr 1e-2 they differ by < 1e-3
    for other in (fused, foreach):
        torch.testing.assert_close(batch_losses(other), batch_losses(plain), rtol=1e-5, atol=1e-6)
        for param, plain_param in zip(parameters(other), parameters(plain)):
            torch.testing.assert_close(param, plain_param, rtol=0, atol=1e-3)
    assert not all(torch.equal(a, b) for a, b in zip(parameters(plain), parameters(fp32_learner)))  # wd did act


def test_fused_adam_steps_as_plain_adam():
    "Given the same gradients, the fused Adam's steps equal the per-tensor Adam's (float rounding apart)."
    set_seed(0)
    weights = [nn.Parameter(torch.randn(50, 20)), nn.Parameter(torch.randn(20))]
    twins = [nn.Parameter(weight.detach().clone()) for weight in weights]
    fused = fused_adam(weights, lr=1e-2)
    plain = torch.optim.Adam(twins, lr=1e-2)
    for _ in range(5):
        for weight, twin in zip(weights, twins):
            weight.grad = torch.randn_like(weight)
            twin.grad = weight.grad.clone()
        fused.step()
        plain.step()
    for weight, twin in zip(weights, twins):
        torch.testing.assert_close(weight.detach(), twin.detach(), rtol=1e-5, atol=1e-6)


def test_decoupled_decay_with_adam_is_adamw_maths():
    "Adam after the learner's decoupled decay takes AdamW's step (for the weights the decay applies to)."
    set_seed(0)
    weight = nn.Parameter(torch.randn(4, 3))
    twin = nn.Parameter(weight.detach().clone())
    adam = fused_adam([weight], lr=0.1)
    adamw = torch.optim.AdamW([twin], lr=0.1, weight_decay=0.5)
    adam.param_groups[0]["wd"] = 0.5
    for _ in range(3):
        gradient = torch.randn(4, 3)
        weight.grad = gradient.clone()
        twin.grad = gradient.clone()
        coursekit.learner.decay_weights(adam, [[weight]])
        adam.step()
        adamw.step()
    torch.testing.assert_close(weight.detach(), twin.detach(), rtol=1e-5, atol=1e-6)


def test_device_defaults_for_fake_devices():
    "The pure choice: CUDA with and without native bfloat16, convolutional or not; anything else float32."
    assert device_defaults("cuda", bf16_native=True, convolutional=True) == TrainingDefaults("bf16", True, True, True)
    assert device_defaults("cuda", bf16_native=True, convolutional=False) == TrainingDefaults("bf16", False, True, True)
    assert device_defaults("cuda", bf16_native=False, convolutional=True) == TrainingDefaults("fp16", True, True, True)
    for device_type in ("cpu", "mps"):
        assert device_defaults(device_type, bf16_native=False, convolutional=True) == \
            TrainingDefaults("fp32", False, False, False)


@pytest.mark.parametrize("capable, precision", [(True, "bf16"), (False, "fp16")])
def test_learner_defaults_asks_the_cuda_device(monkeypatch, capable, precision):
    "On CUDA the precision follows `torch.cuda.is_bf16_supported` without emulation (Ampere and later: bf16)."
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return capable

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda")
    assert bf16_native(cuda) is capable and asked == [False]
    assert learner_defaults(cuda, small_convnet()) == TrainingDefaults(precision, True, True, True)
    assert learner_defaults(cuda, nn.Linear(2, 2)) == TrainingDefaults(precision, False, True, True)


def test_cuda_defaults_train_on_the_cpu(monkeypatch, fp32_learner):
    "A learner given the CUDA defaults (faked on this CPU) trains with each; cuDNN autotuning is on only while fitting."
    monkeypatch.setattr(coursekit.learner, "learner_defaults",
                        lambda device, model: device_defaults("cuda", True, coursekit.learner.is_convolutional(model)))
    benchmark = []

    class WatchBenchmark(Callback):
        def before_batch(self, learn):
            benchmark.append(torch.backends.cudnn.benchmark)

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        learn = Learner(image_dls(), small_convnet(), loss_func=CrossEntropyLossFlat(), lr=1e-2, cbs=[WatchBenchmark()])
        assert (learn.precision, learn.channels_last, learn.opt_func, learn.cudnn_benchmark) == \
            ("bf16", True, fused_adam, True)
        set_seed(3)
        with learn.no_bar():
            learn.fit(2)
        assert benchmark and all(benchmark) and torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before
    torch.testing.assert_close(predictions(learn), predictions(fp32_learner), rtol=0, atol=3e-2)
    plain = Learner(image_dls(), small_convnet(), loss_func=CrossEntropyLossFlat(), precision="fp32",
                    channels_last=False, opt_func=torch.optim.Adam)
    assert (plain.precision, plain.channels_last, plain.opt_func) == ("fp32", False, torch.optim.Adam)
    assert learn.to_fp32().to_contiguous().model[0].weight.is_contiguous()


def test_compile_falls_back_with_one_line(monkeypatch, capsys):
    "When compiling fails (here: a compiler made to fail), compile() says why in one line and training goes on eagerly."
    def unavailable_compile(function, **options):
        def fails(*args, **kwargs):
            raise RuntimeError("Compiler: cc is not found\nmore lines of a compiler's log")
        return fails

    monkeypatch.setattr(torch, "compile", unavailable_compile)
    learn = Learner(image_dls(), small_convnet(), loss_func=CrossEntropyLossFlat(), cbs=[])
    state_before = {name: tensor.clone() for name, tensor in learn.model.state_dict().items()}
    draws = torch.random.get_rng_state()
    assert learn.compile() is learn
    message = capsys.readouterr().out
    assert message.count("\n") == 1
    assert "torch.compile is not available here" in message and "RuntimeError: Compiler: cc is not found" in message
    assert learn.compiled is False and learn.model.training  # a new learner's model is in training mode
    assert torch.equal(torch.random.get_rng_state(), draws)  # the trial batch drew nothing from the generator
    for name, tensor in learn.model.state_dict().items():
        assert torch.equal(tensor, state_before[name])  # eval mode: batch norm statistics untouched
    with learn.no_bar():
        learn.fit(1)
    assert learn.recorder.values


def test_compile_raises_the_models_own_errors(monkeypatch):
    "An error the model raises without compiling too is the model's: compile() lets it propagate."
    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("this model is broken")

    def unavailable_compile(function, **options):
        def fails(*args, **kwargs):
            raise RuntimeError("cannot compile")
        return fails

    monkeypatch.setattr(torch, "compile", unavailable_compile)
    learn = Learner(image_dls(), Broken(), loss_func=CrossEntropyLossFlat(), cbs=[])
    with pytest.raises(ValueError, match="this model is broken"):
        learn.compile()


def test_real_compile_on_the_cpu(tmp_path, capsys):
    "torch.compile on this CPU (inductor, a C++ compiler): the learner trains, and saves the plain model's weights."
    learn = Learner(image_dls(), small_convnet(), loss_func=CrossEntropyLossFlat(), lr=1e-2, cbs=[], path=tmp_path)
    learn.compile()
    message = capsys.readouterr().out
    assert learn.compiled, f"torch.compile does not work on this machine: {message}"
    set_seed(3)
    with learn.no_bar():
        learn.fit(1)
    saved = torch.load(learn.save("compiled"), weights_only=True)
    assert not any("_orig_mod" in name for name in saved["model"])
    assert set(saved["model"]) == set(small_convnet().state_dict())
    plain = Learner(image_dls(), small_convnet(), loss_func=CrossEntropyLossFlat(), cbs=[], path=tmp_path)
    plain.load("compiled")
    torch.testing.assert_close(predictions(plain), predictions(learn), rtol=1e-4, atol=1e-5)


def tensor_bytes(value) -> int:
    "The bytes of every tensor in `value` (tensors, and dicts, lists and tuples of them)."
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(tensor_bytes(part) for part in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(part) for part in value)
    return 0


def test_lr_find_keeps_no_copy_in_memory():
    "While it runs, the finder holds no copy of the weights or of the optimizer's state (it waits in a file)."
    held = []

    class Measure(Callback):
        order = 20

        def after_batch(self, learn):
            finders = [cb for cb in learn.cbs if isinstance(cb, LRFinder)]
            held.append(sum(tensor_bytes(vars(finder)) for finder in finders))

    model = nn.Sequential(small_convnet(), nn.Linear(4, 2**16), nn.Linear(2**16, 4))  # 2 MB of weights
    learn = Learner(image_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[Measure()])
    with learn.no_bar():
        learn.fit(1)
    model_bytes = tensor_bytes(learn.model.state_dict())
    learn.lr_find(num_it=10, show_plot=False)
    assert held and max(held) < model_bytes / 50, (max(held), model_bytes)  # the random generators' states only


def test_lr_find_leaves_weights_optimizer_and_random_state():
    "After lr_find the weights, the optimizer state and every random generator are as they were."
    learn = Learner(image_dls(), nn.Sequential(small_convnet(), nn.Dropout(0.5)), loss_func=CrossEntropyLossFlat(),
                    cbs=[])
    with learn.no_bar():
        learn.fit(1)
    weights = {name: tensor.clone() for name, tensor in learn.model.state_dict().items()}
    opt_state = {index: {key: value.clone() for key, value in state.items()}
                 for index, state in learn.opt.state_dict()["state"].items()}
    set_seed(11)
    expected = (torch.rand(4), np.random.rand(2), random.random())
    set_seed(11)
    learn.lr_find(num_it=12, show_plot=False)
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1]) and random.random() == expected[2]
    for name, tensor in learn.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    restored = learn.opt.state_dict()["state"]
    assert restored.keys() == opt_state.keys()
    for index, state in opt_state.items():
        for key, value in state.items():
            assert torch.equal(restored[index][key], value), (index, key)
    parameters_in_opt = [param for group in learn.opt.param_groups for param in group["params"]]
    assert all(a is b for a, b in zip(parameters_in_opt, learn.model.parameters()))


def test_prefetched_batches_are_the_loaders_batches():
    "A CUDA loader's path (collate in a background thread, then the transfer) gives the batches of the plain path, in order."
    dls = image_dls(n=96, bs=16)
    loader = dls.train
    set_seed(5)
    plain = list(loader)
    set_seed(5)
    order = loader._index_batches()  # drawn in this thread, as __iter__ does, before the thread starts
    prefetched = [loader._to_device(batch) for batch in prefetch(loader._cpu_batches(*order), ahead=2)]
    assert len(prefetched) == len(plain) == 4
    for (images, labels), (plain_images, plain_labels) in zip(prefetched, plain):
        assert torch.equal(images, plain_images) and torch.equal(labels, plain_labels)


class CountingLearner(Learner):
    "A learner that counts the lines of Python executed inside each training step (`sys.settrace`)."
    def one_batch(self, batch):
        lines = [0]

        def count(frame, event, arg):
            lines[0] += event == "line"
            return count

        sys.settrace(count)
        try:
            super().one_batch(batch)
        finally:
            sys.settrace(None)
        if self.training:
            self.step_lines.append(lines[0])


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_step_has_no_per_item_python(channels_last):
    "The step runs as many lines of Python for a batch of 32 items as for a batch of 8: nothing runs once per item."
    counts = {}
    for bs in (8, 32):
        learn = CountingLearner(image_dls(n=160, bs=bs), small_convnet(), loss_func=CrossEntropyLossFlat(), cbs=[],
                                channels_last=channels_last, precision="bf16")
        learn.step_lines = []
        set_seed(0)
        with learn.no_bar():
            learn.fit(2)
        counts[bs] = learn.step_lines[len(learn.step_lines) // 2:]  # the second epoch: caches and lazy set-up are done
    assert len(set(counts[8])) == 1 and set(counts[8]) == set(counts[32]), counts
