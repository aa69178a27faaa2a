"""Training throughput (rows/s) of the tabular and collaborative-filtering models, data already in memory.

For each dataset the loaders are built first (reading the CSV, fitting the procs and encoding every
row happen before the clock starts); then the learner trains one epoch with `fit_one_cycle(1)` and
we time the training part of the epoch only (from `before_train` to `after_train`, validation
excluded), with the progress bar off. Reported: rows/s = training rows seen / seconds, the median
of `--repeats` epochs, with both the wall clock and this process's CPU time (`time.process_time`,
which other processes on a shared machine disturb far less).

    COURSEKIT_MIRROR=../shared/datasets python bench/bench_tabular.py [--repeats 3] [--threads 1] [--bs 64] [--device auto]

Adult: 14 columns (8 categorical, 6 continuous), the lesson's model ([200, 100]); 80% of adult.csv
for training. ML-100k: the dot-product model with 50 factors, 90% of u.data for training.
"""
import argparse
import os
import statistics
import time

import pandas as pd
import torch

from coursekit.core import default_device, set_cpu_threads, set_seed
from coursekit.data.external import URLs, untar_data
from coursekit.learner import Callback
from coursekit.tabular.collab import CollabDataLoaders, collab_learner
from coursekit.tabular.data import Categorify, FillMissing, Standardize, TabularDataLoaders
from coursekit.tabular.learner import tabular_learner


class TrainTimer(Callback):
    "Times the training batches of each epoch (validation excluded) with the wall clock and the CPU clock."
    def __init__(self):
        self.wall, self.cpu = [], []

    def before_train(self, learn):
        if learn.device.type == "cuda":
            torch.cuda.synchronize()
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def after_train(self, learn):
        if learn.device.type == "cuda":
            torch.cuda.synchronize()
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.process_time() - self._cpu)


def adult_learner(bs: int, device):
    path = untar_data(URLs.ADULT_SAMPLE)
    df = pd.read_csv(path / "adult.csv", na_values="?", skipinitialspace=True)
    cats = ["workclass", "education", "marital-status", "occupation", "relationship", "race", "sex", "native-country"]
    conts = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
    dls = TabularDataLoaders.from_df(df, cat_names=cats, cont_names=conts, y_names="salary",
                                     procs=[Categorify, FillMissing, Standardize], valid_pct=0.2, seed=42, bs=bs,
                                     device=device)
    return tabular_learner(dls, layers=[200, 100]), 1e-2


def movielens_learner(bs: int, device):
    path = untar_data(URLs.ML_100k)
    ratings = pd.read_csv(path / "u.data", sep="\t", header=None, names=["user", "movie", "rating", "timestamp"])
    dls = CollabDataLoaders.from_df(ratings, valid_pct=0.1, seed=42, bs=bs, device=device)
    return collab_learner(dls, n_factors=50, y_range=(0, 5.5)), 5e-3


def bench(name: str, make, bs: int, repeats: int, device) -> dict:
    set_seed(42)
    learn, lr = make(bs, device)
    rows = len(learn.dls.train) * learn.dls.train.bs  # drop_last: every batch is full
    timer = TrainTimer()
    with learn.no_bar():
        for _ in range(repeats):
            learn.fit_one_cycle(1, lr, wd=0.1, cbs=[timer])
    wall, cpu = statistics.median(timer.wall), statistics.median(timer.cpu)
    res = {"dataset": name, "rows": rows, "bs": bs, "wall_s": round(wall, 3), "rows_per_s": round(rows / wall),
           "cpu_s": round(cpu, 3), "rows_per_cpu_s": round(rows / cpu)}
    print(f"{name:10s} {rows:7d} training rows, bs {bs}: {res['rows_per_s']:8d} rows/s (wall, {wall:.2f} s/epoch), "
          f"{res['rows_per_cpu_s']:8d} rows per CPU-second")
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads (1 is fastest for these small models)")
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = default_device() if args.device == "auto" else torch.device(args.device)
    set_cpu_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, load average {load:.1f}")
    for name, make in (("adult", adult_learner), ("ml-100k", movielens_learner)):
        bench(name, make, args.bs, args.repeats, device)


if __name__ == "__main__":
    main()
