"""Does the unfrozen stage of `fine_tune` help or hurt? Validation loss after each stage, per seed and task.

`cnn_learner(dls, "efficientnet_lite0")` (pretrained, the backbone that works offline; `train_bn=False`)
runs `fine_tune(1, freeze_epochs=1)`: one epoch with the body frozen, then one with everything
trainable. A callback records the validation loss at the end of each stage. Two small tasks from the
offline mirror (`COURSEKIT_MIRROR`):

- `mnist`: MNIST_SAMPLE, handwritten 3 vs 7 (its train and valid folders pooled, every `--mnist-every`-th image),
  20% held out (split by seed 42), at `--mnist-size` px;
- `pets`: Oxford-IIIT Pet (mirror subset), cat vs dog (a capitalised file name is a cat), 20% held out
  (split by seed 42, the same for every run), at `--pets-size` px.

Each run prints one JSON line; then one line per task with the mean change of validation loss over the
seeds (unfrozen minus frozen: negative means the unfrozen stage helped). Run it on two checkouts to
compare them (the `PYTHONPATH` picks which code runs):

    OMP_NUM_THREADS=1 COURSEKIT_MIRROR=/work/shared/datasets PYTHONPATH=/work/main python bench/bench_finetune_bn.py
    OMP_NUM_THREADS=1 COURSEKIT_MIRROR=/work/shared/datasets PYTHONPATH=$PWD python bench/bench_finetune_bn.py

    python bench/bench_finetune_bn.py [--tasks mnist pets] [--seeds 0 1 2] [--train-bn auto|true|false]
"""
import argparse
import json
import statistics
import time

import torch

from coursekit.core import set_seed
from coursekit.data.external import URLs, untar_data
from coursekit.learner import Callback
from coursekit.vision.data import ImageDataLoaders, Resize, get_image_files
from coursekit.vision.learner import cnn_learner


class StageLosses(Callback):
    "Records the validation loss at the end of every fit (each stage of `fine_tune` is one fit)."
    def __init__(self):
        self.valid_losses = []

    def after_fit(self, learn):
        self.valid_losses.append(learn.recorder.last_metrics()["valid_loss"])


def is_cat(fname) -> str:
    "The Oxford-IIIT Pet convention: cat breeds have capitalised file names."
    return "cat" if fname.name[0].isupper() else "dog"


def make_dls(task: str, args):
    "The DataLoaders for `task`, the same for every seed."
    if task == "mnist":
        path = untar_data(URLs.MNIST_SAMPLE)
        files = get_image_files(path, folders=["train", "valid"])[::args.mnist_every]
        return ImageDataLoaders.from_path_re(path, files, pat=r"/(\d)/[^/]+$", valid_pct=0.2, seed=42,
                                             item_tfms=Resize(args.mnist_size), bs=args.bs, device="cpu")
    path = untar_data(URLs.PETS) / "images"
    files = get_image_files(path)[::args.pets_every]
    return ImageDataLoaders.from_name_func(path, files, label_func=is_cat, valid_pct=0.2, seed=42,
                                           item_tfms=Resize(args.pets_size), bs=args.bs, device="cpu")


def run(task: str, dls, seed: int, train_bn) -> dict:
    "One `fine_tune(1, freeze_epochs=1)` from seed `seed`: the validation loss after each stage."
    set_seed(seed)
    learn = cnn_learner(dls, "efficientnet_lite0", train_bn=train_bn)
    stages = StageLosses()
    start = time.process_time()
    with learn.no_bar():
        learn.fine_tune(1, freeze_epochs=1, cbs=[stages])
    frozen, unfrozen = stages.valid_losses
    return {"task": task, "seed": seed, "train_bn": learn.train_bn, "n_train": len(dls.train.dataset),
            "n_valid": len(dls.valid.dataset), "valid_loss_frozen": round(frozen, 4),
            "valid_loss_unfrozen": round(unfrozen, 4), "change": round(unfrozen - frozen, 4),
            "cpu_seconds": round(time.process_time() - start, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["mnist", "pets"], choices=["mnist", "pets"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-bn", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--mnist-size", type=int, default=32)
    parser.add_argument("--mnist-every", type=int, default=1, help="keep every n-th MNIST image")
    parser.add_argument("--pets-size", type=int, default=96)
    parser.add_argument("--pets-every", type=int, default=1, help="keep every n-th pets image")
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_bn = {"auto": None, "true": True, "false": False}[args.train_bn]
    for task in args.tasks:
        dls = make_dls(task, args)
        results = [run(task, dls, seed, train_bn) for seed in args.seeds]
        for result in results:
            print(json.dumps(result), flush=True)
        changes = [result["change"] for result in results]
        print(json.dumps({"task": task, "seeds": args.seeds, "mean_valid_loss_frozen":
                          round(statistics.mean(r["valid_loss_frozen"] for r in results), 4),
                          "mean_valid_loss_unfrozen": round(statistics.mean(r["valid_loss_unfrozen"] for r in results), 4),
                          "mean_change": round(statistics.mean(changes), 4)}), flush=True)


if __name__ == "__main__":
    main()
