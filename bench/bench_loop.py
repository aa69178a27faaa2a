"""Overhead of coursekit's training loop (`Learner.fit`) against a bare PyTorch loop.

Both loops train the same small CNN from the same initial weights on the same in-memory batches
(created once, already on the device, so data loading costs nothing in either), with the same
optimizer and the same loss function (`F.cross_entropy`), and both run a validation pass computing
the loss and accuracy each epoch. The learner runs with its default callbacks (Recorder, and the
progress display writing its one line per epoch to a discarded stream) and an accuracy metric.
Runs alternate between the two loops; we report the median of the repeats, and the median of the
ratios of the two runs in each repeat (which cancels slow drifts in the machine's load). On a CPU
the clock is this process's CPU time (`time.process_time`, with a fixed number of threads), which
other processes on a shared machine disturb far less than the wall clock; on a GPU it is the wall
clock, after a synchronisation.

`--model cnn` (default) is a small CNN, a realistic lower end of per-batch work; `--model linear`
is a single linear layer, where nearly all of the time is the loop itself: the worst case, which
shows the absolute cost per batch.

    python bench/bench_loop.py [--model cnn|linear] [--epochs 3] [--repeats 7] [--threads 1] [--device auto]
"""
import argparse
import contextlib
import io
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.core import default_device
from coursekit.learner import Learner
from coursekit.metrics import accuracy


def make_model(kind: str) -> nn.Module:
    "A small CNN (or one linear layer) for 1x28x28 inputs and 10 classes."
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def make_batches(n: int, bs: int, device, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + bs].to(device), y[i:i + bs].to(device)) for i in range(0, n, bs)]


def clock(device) -> float:
    "CPU time of this process on a CPU; wall-clock time after a synchronisation on a GPU."
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def bare_loop(model, train, valid, epochs: int, lr: float, device) -> float:
    "The plain PyTorch loop: what any training script does, with a loss and accuracy per epoch."
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = clock(device)
    for epoch in range(epochs):
        model.train()
        train_losses = []
        for xb, yb in train:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            train_losses.append(loss.detach())
        model.eval()
        total, correct, count = 0., 0., 0
        with torch.no_grad():
            for xb, yb in valid:
                pred = model(xb)
                total += F.cross_entropy(pred, yb) * len(yb)
                correct += (pred.argmax(-1) == yb).float().sum()
                count += len(yb)
        _ = (torch.stack(train_losses).mean().item(), float(total / count), float(correct / count))
    return clock(device) - start


def learner_loop(model, train, valid, epochs: int, lr: float, device) -> float:
    "The same training through `Learner.fit` with its default callbacks."
    dls = SimpleNamespace(train=train, valid=valid, device=device, n_inp=1)  # pre-made batches, as above
    learn = Learner(dls, model, loss_func=F.cross_entropy, lr=lr, metrics=accuracy)
    start = clock(device)
    with contextlib.redirect_stdout(io.StringIO()):
        learn.fit(epochs)
    return clock(device) - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=4096, help="training items")
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="cnn", choices=["cnn", "linear"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = default_device() if args.device == "auto" else torch.device(args.device)
    train, valid = make_batches(args.n, args.bs, device, 0), make_batches(args.n // 4, args.bs, device, 1)
    torch.manual_seed(0)
    init = make_model(args.model).state_dict()
    times = {"bare": [], "coursekit": []}
    for repeat in range(args.repeats + 1):  # the first round warms up (imports, allocator) and is dropped
        order = (("bare", bare_loop), ("coursekit", learner_loop))
        for name, loop in order if repeat % 2 else order[::-1]:
            model = make_model(args.model).to(device)
            model.load_state_dict(init)
            t = loop(model, train, valid, args.epochs, 1e-3, device)
            if repeat:
                times[name].append(t)
    bare, ours = statistics.median(times["bare"]), statistics.median(times["coursekit"])
    n_batches = args.epochs * (len(train) + len(valid))
    print(f"model={args.model} device={device} threads={args.threads} epochs={args.epochs} "
          f"batches/epoch={len(train)}+{len(valid)} bs={args.bs} repeats={args.repeats}")
    print(f"bare PyTorch loop: {bare:.3f} s (median; all: {', '.join(f'{t:.3f}' for t in times['bare'])})")
    print(f"coursekit Learner: {ours:.3f} s (median; all: {', '.join(f'{t:.3f}' for t in times['coursekit'])})")
    paired = statistics.median(o / b for o, b in zip(times["coursekit"], times["bare"]))
    print(f"overhead: {100 * (ours - bare) / bare:+.2f}% of the medians ({1e6 * (ours - bare) / n_batches:+.1f} us per batch); "
          f"median of the paired run ratios: {100 * (paired - 1):+.2f}%")


if __name__ == "__main__":
    main()
