"""Overhead of coursekit's training loop (`Learner.fit`) against a bare PyTorch loop.

Both loops train the same model from the same initial weights on the same in-memory batches (created once,
already on the device, so data loading costs nothing in either), with the same optimizer (Adam; fused on CUDA,
as the learner's default there), the same loss function and the same precision, and both run a validation
pass computing the loss and a metric each epoch. The learner runs with its default callbacks (Recorder, the
progress display writing to a discarded stream, the training guard) and the metric. Runs alternate between the
two loops; we report the median of the repeats, and the median of the ratios of the two runs in each repeat
(which cancels slow drifts in the machine's load). On a CPU the clock is this process's CPU time
(`time.process_time`, with a fixed number of threads), which other processes on a shared machine disturb far
less than the wall clock; on a GPU it is the wall clock, after a synchronisation.

Models (`--model`):
- `cnn` (default): a small CNN, a realistic lower end of per-batch work; `linear`: one linear layer, where
  nearly all of the time is the loop itself (the worst case: it shows the absolute cost per batch);
- the three compute-bound tasks of the course: `resnet34` (an image classifier), `awd_lstm` (the AWD-LSTM
  language model, its hidden state carried across batches and reset each epoch, gradients clipped at 0.1)
  and `unet` (coursekit's U-Net on a resnet34 encoder, per-pixel classes).

`--only bare|coursekit` runs one of the loops alone (for timing whole processes against each other).

    python bench/bench_loop.py [--model cnn|linear|resnet34|awd_lstm|unet] [--epochs 3] [--repeats 7]
                               [--threads 1] [--device auto] [--only bare|coursekit]
"""
import argparse
import contextlib
import io
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet34

from coursekit.core import default_device
from coursekit.learner import Learner, learner_defaults, to_memory_format
from coursekit.text.learner import ResetRNNCallback
from coursekit.text.models import awd_lstm_lm_config, get_language_model
from coursekit.vision.unet import unet_model


@dataclass
class Task:
    "A model to train, its batches (inputs, targets), loss and metric, and the settings both loops share."
    make_model: callable
    make_inputs: callable   # (n, generator) -> inputs
    make_targets: callable  # (n, generator) -> targets
    loss: callable
    metric: callable
    n: int
    bs: int
    clip: float | None = None
    recurrent: bool = False  # the model keeps a hidden state across batches: reset it at each train/valid pass


def class_accuracy(pred, targ):
    "The share of items whose highest score is the target class."
    return (pred.argmax(-1) == targ).float().mean()


def pixel_accuracy(pred, targ):
    "The share of pixels whose highest score is the target class."
    return (pred.argmax(1) == targ).float().mean()


def token_loss(pred, targ):
    "Cross-entropy over every token of a (batch, sequence, vocabulary) prediction."
    return F.cross_entropy(pred.flatten(0, 1), targ.flatten())


def token_accuracy(pred, targ):
    "The share of tokens predicted right."
    return (pred.argmax(-1) == targ).float().mean()


VOCAB = 4000
BPTT = 36


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


TASKS = {
    "cnn": Task(small_cnn, lambda n, g: torch.randn(n, 1, 28, 28, generator=g),
                lambda n, g: torch.randint(0, 10, (n,), generator=g), F.cross_entropy, class_accuracy, n=4096, bs=64),
    "linear": Task(lambda: nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)),
                   lambda n, g: torch.randn(n, 1, 28, 28, generator=g),
                   lambda n, g: torch.randint(0, 10, (n,), generator=g), F.cross_entropy, class_accuracy, n=4096, bs=64),
    "resnet34": Task(lambda: resnet34(num_classes=37), lambda n, g: torch.randn(n, 3, 64, 64, generator=g),
                     lambda n, g: torch.randint(0, 37, (n,), generator=g), F.cross_entropy, class_accuracy, n=64, bs=16),
    "awd_lstm": Task(lambda: get_language_model(VOCAB, awd_lstm_lm_config),
                     lambda n, g: torch.randint(0, VOCAB, (n, BPTT), generator=g),
                     lambda n, g: torch.randint(0, VOCAB, (n, BPTT), generator=g), token_loss, token_accuracy,
                     n=64, bs=16, clip=0.1, recurrent=True),
    "unet": Task(lambda: unet_model("resnet34", n_out=8), lambda n, g: torch.randn(n, 3, 64, 64, generator=g),
                 lambda n, g: torch.randint(0, 8, (n, 64, 64), generator=g), F.cross_entropy, pixel_accuracy,
                 n=32, bs=8),
}


class PremadeBatches(list):
    "Batches made once, with what the learner reads of a loader besides its batches: the items (`dataset`)."
    @property
    def dataset(self) -> range:
        return range(sum(len(target) for _, target in self))


def make_batches(task: Task, n: int, device, seed: int) -> PremadeBatches:
    "The task's batches, made once and moved to `device`."
    g = torch.Generator().manual_seed(seed)
    x = task.make_inputs(n, g)
    y = task.make_targets(n, g)
    return PremadeBatches((x[i:i + task.bs].to(device), y[i:i + task.bs].to(device)) for i in range(0, n, task.bs))


def clock(device) -> float:
    "CPU time of this process on a CPU; wall-clock time after a synchronisation on a GPU."
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def bare_loop(task: Task, model, train, valid, epochs: int, lr: float, device) -> float:
    "The plain PyTorch loop: what any training script does, with a loss and metric per epoch, in the learner's settings."
    defaults = learner_defaults(device, model)
    model.to(memory_format=torch.channels_last if defaults.channels_last else torch.contiguous_format)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True if defaults.fused_opt else None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(defaults.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=defaults.precision == "fp16")
    torch.backends.cudnn.benchmark = defaults.cudnn_benchmark
    start = clock(device)
    for epoch in range(epochs):
        model.train()
        if task.recurrent:
            model.reset()
        train_losses = []
        for xb, yb in train:
            xb, = to_memory_format((xb,), defaults.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = task.loss(model(xb), yb)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if task.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), task.clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            train_losses.append(loss.detach())
        model.eval()
        if task.recurrent:
            model.reset()
        total, correct, count = 0., 0., 0
        with torch.no_grad():
            for xb, yb in valid:
                xb, = to_memory_format((xb,), defaults.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    pred = model(xb)
                    total += task.loss(pred, yb).float() * len(yb)
                correct += task.metric(pred, yb) * len(yb)
                count += len(yb)
        _ = (torch.stack(train_losses).mean().item(), float(total / count), float(correct / count))
    return clock(device) - start


def learner_loop(task: Task, model, train, valid, epochs: int, lr: float, device) -> float:
    "The same training through `Learner.fit` with its default callbacks."
    dls = SimpleNamespace(train=train, valid=valid, device=device, n_inp=1, path=".")  # pre-made batches, as above
    cbs = [ResetRNNCallback()] if task.recurrent else []
    learn = Learner(dls, model, loss_func=task.loss, lr=lr, metrics=task.metric, clip=task.clip, cbs=cbs)
    start = clock(device)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        learn.fit(epochs)
    return clock(device) - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=None, help="training items (default: the task's)")
    parser.add_argument("--bs", type=int, default=None, help="batch size (default: the task's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="cnn", choices=sorted(TASKS))
    parser.add_argument("--only", default=None, choices=["bare", "coursekit"], help="run one loop alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = default_device() if args.device == "auto" else torch.device(args.device)
    task = TASKS[args.model]
    task.bs = args.bs or task.bs
    n = args.n or task.n
    train, valid = make_batches(task, n, device, 0), make_batches(task, max(n // 4, task.bs), device, 1)
    torch.manual_seed(0)
    init = task.make_model().state_dict()
    loops = {"bare": bare_loop, "coursekit": learner_loop}
    names = [args.only] if args.only else ["bare", "coursekit"]
    times = {name: [] for name in names}
    for repeat in range(args.repeats + 1):  # the first round warms up (imports, allocator) and is dropped
        for name in names if repeat % 2 else names[::-1]:
            model = task.make_model().to(device)
            model.load_state_dict(init)
            t = loops[name](task, model, train, valid, args.epochs, 1e-3, device)
            if repeat:
                times[name].append(t)
    n_batches = args.epochs * (len(train) + len(valid))
    print(f"model={args.model} device={device} threads={args.threads} epochs={args.epochs} "
          f"batches/epoch={len(train)}+{len(valid)} bs={task.bs} repeats={args.repeats}")
    for name in names:
        label = "bare PyTorch loop" if name == "bare" else "coursekit Learner"
        print(f"{label}: {statistics.median(times[name]):.3f} s (median; all: {', '.join(f'{t:.3f}' for t in times[name])})")
    if args.only:
        return
    bare, ours = statistics.median(times["bare"]), statistics.median(times["coursekit"])
    paired = statistics.median(o / b for o, b in zip(times["coursekit"], times["bare"]))
    print(f"overhead: {100 * (ours - bare) / bare:+.2f}% of the medians ({1e6 * (ours - bare) / n_batches:+.1f} us per batch); "
          f"median of the paired run ratios: {100 * (paired - 1):+.2f}%")


if __name__ == "__main__":
    main()
