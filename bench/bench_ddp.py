"""Data-parallel scaling on this machine: one process against two (torchrun, gloo on the CPU, one thread each).

Every process trains the same small CNN on synthetic 1x28x28 images in memory, with the same batch size per
process, for the same number of epochs over the same training set, inside `learn.distrib_ctx()` (two processes
share each epoch, so each does half the batches). Rank 0 times `fit` (wall clock, after a barrier: process start-up
and imports are not counted) and reports items per second over the whole job; the scaling is the ratio. On a CPU
shared with other work two processes cannot reach 2x: the gradient all-reduce and the shared cores cost. Ideal is 2.

With CUDA (`--gpu`), it also measures the single-GPU cost of the context: one process (torchrun, world size 1)
trains outside `distrib_ctx`, then inside it (DDP wrapper, sampler, gathered validation), alternating, and reports
the ratio of throughputs (the target is a cost of at most 3%). Without a GPU this part is reported as not measured.

    python bench/bench_ddp.py [--epochs 2] [--items 4096] [--bs 64] [--repeats 3] [--gpu]
"""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from coursekit.core import set_seed
from coursekit.data.core import DataLoaders
from coursekit.distributed import distrib_barrier, rank_distrib
from coursekit.learner import Learner
from coursekit.metrics import accuracy

ROOT = Path(__file__).resolve().parent.parent


def make_model() -> nn.Module:
    "A small CNN for 1x28x28 inputs and 10 classes."
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def make_learner(items: int, bs: int, device):
    "The same learner in every process: synthetic images of 10 classes, a fifth of them for validation."
    set_seed(0)
    x = torch.randn(items, 1, 28, 28)
    y = torch.randint(0, 10, (items,))
    samples = list(zip(x, y))
    n_valid = items // 5
    dls = DataLoaders.from_dsets(samples[n_valid:], samples[:n_valid], bs=bs, device=device,
                                 vocab=[str(i) for i in range(10)])
    return Learner(dls, make_model(), metrics=accuracy)


def timed_fit(learn, epochs: int) -> float:
    "Seconds `fit` takes, from a barrier to the end (with CUDA, after a synchronisation)."
    distrib_barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        learn.fit(epochs, 1e-3)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def worker(options):
    "Run by torchrun: time the fits, rank 0 prints one JSON line."
    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    learn = make_learner(options.items, options.bs, device)
    n_items = (len(learn.dls.train.dataset) + len(learn.dls.valid.dataset)) * options.epochs
    report = {"world_size": int(os.environ["WORLD_SIZE"])}
    if options.mode == "outside-inside":
        outside, inside = [], []
        for _ in range(options.repeats):
            outside.append(timed_fit(learn, options.epochs))
            with contextlib.redirect_stdout(io.StringIO()), learn.distrib_ctx():
                inside.append(timed_fit(learn, options.epochs))
        report.update(outside_items_per_s=n_items / min(outside), inside_items_per_s=n_items / min(inside))
    else:
        with contextlib.redirect_stdout(io.StringIO()), learn.distrib_ctx():
            timed_fit(learn, 1)  # warm-up: caches, first DDP construction
            seconds = min(timed_fit(learn, options.epochs) for _ in range(options.repeats))
        report.update(items_per_s=n_items / seconds)
    if rank_distrib() == 0:
        print("RESULT " + json.dumps(report), flush=True)


def launch(n_processes: int, options, mode: str) -> dict:
    "Run this script's worker under torchrun with `n_processes` processes; rank 0's report."
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_processes),
               __file__, "--worker", "--mode", mode, "--epochs", str(options.epochs), "--items", str(options.items),
               "--bs", str(options.bs), "--repeats", str(options.repeats)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stderr[-4000:]}")
    line = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--items", type=int, default=4096)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="also measure the context's cost on one GPU")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="scaling", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options)
        return
    one = launch(1, options, "scaling")
    two = launch(2, options, "scaling")
    print(f"CPU, gloo, 1 thread per process, batch {options.bs} per process, {options.items} items x {options.epochs} epochs")
    print(f"  1 process : {one['items_per_s']:8.0f} items/s")
    print(f"  2 processes: {two['items_per_s']:8.0f} items/s   scaling {two['items_per_s'] / one['items_per_s']:.2f}x "
          "(ideal 2.00x)")
    if not options.gpu:
        print("Single-GPU cost of distrib_ctx: not measured (run with --gpu on a machine with CUDA).")
        return
    if not torch.cuda.is_available():
        print("Single-GPU cost of distrib_ctx: not measured, CUDA is not available here.")
        return
    gpu = launch(1, options, "outside-inside")
    cost = 1 - gpu["inside_items_per_s"] / gpu["outside_items_per_s"]
    print(f"One GPU: outside {gpu['outside_items_per_s']:.0f} items/s, inside distrib_ctx "
          f"{gpu['inside_items_per_s']:.0f} items/s: the context costs {100 * cost:.1f}% (target <= 3%)")


if __name__ == "__main__":
    main()
