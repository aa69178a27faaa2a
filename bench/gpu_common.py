"""What the GPU benchmarks share: a callback that times training steps and the time spent waiting for batches,
pets-sized synthetic JPEGs, the device's description and peak memory, and the one JSON line each prints."""
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from coursekit.data.external import seed_weights_cache
from coursekit.learner import Callback
from coursekit.vision.data import get_image_files


def synchronize(device: torch.device):
    "Wait for the GPU's queued work (nothing to wait for on a CPU)."
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    "Times the training batches after the first `warmup`: items per second, and the share of that time spent waiting for batches."
    order = 1000  # last: every other callback's work on a batch counts as step time, not as waiting

    def __init__(self, warmup: int = 3):
        self.warmup = warmup

    def before_train(self, learn):
        self.seen = 0
        self.items = 0
        self.waiting = 0.0
        self.start = None
        self.last_end = None

    def before_batch(self, learn):
        if learn.training and self.start is not None:
            self.waiting += time.perf_counter() - self.last_end  # from the end of the last step to this batch's arrival

    def after_batch(self, learn):
        if not learn.training:
            return
        self.seen += 1
        if self.seen == self.warmup:
            synchronize(learn.device)
            self.start = time.perf_counter()
        elif self.seen > self.warmup:
            self.items += learn.xb[0].numel() if learn.xb[0].dtype == torch.int64 else len(learn.xb[0])
        self.last_end = time.perf_counter()

    def after_train(self, learn):
        synchronize(learn.device)
        self.seconds = time.perf_counter() - self.start if self.start is not None else float("nan")

    def result(self) -> dict:
        "Items (images, or tokens for token batches) per second and the waiting share, over the timed batches."
        if self.start is None or self.items == 0:
            raise RuntimeError(f"Only {self.seen} training batches ran, not more than the {self.warmup} warm-up ones: "
                               "give the benchmark more data or a smaller batch size.")
        return {"per_s": round(self.items / self.seconds, 1), "data_wait_share": round(self.waiting / self.seconds, 4),
                "timed_batches": self.seen - self.warmup}


def device_info(device: torch.device) -> dict:
    "The device a benchmark ran on, in words."
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "torchvision": torchvision.__version__}


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    "The most GPU memory allocated since the last reset, in GB (None on a CPU)."
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None


def weights_present(arch: str) -> bool:
    "True when torchvision's ImageNet weights for `arch` are in the hub cache or the mirror (nothing is downloaded)."
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    fname = weights.url.rsplit("/", 1)[-1]
    if (Path(torch.hub.get_dir()) / "checkpoints" / fname).is_file():
        return True
    return bool(os.environ.get("COURSEKIT_MIRROR")) and seed_weights_cache(fname)


def synthetic_photo(seed: int, width: int, height: int, label: int = 0) -> np.ndarray:
    "A photo-like picture: smooth colour fields around its class's own colour, with a little noise (JPEG sizes like photos')."
    base = np.random.default_rng(1000 + label).integers(40, 216, 3)          # the class's colour: a signal to learn
    rng = np.random.default_rng(seed)
    grid = np.clip(base + rng.normal(0, 40, (6, 8, 3)), 0, 255).astype(np.uint8)
    coarse = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 8, (height, width, 3))
    return np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8)


def _write_photo(args):
    path, seed, width, height, label = args
    Image.fromarray(synthetic_photo(seed, width, height, label)).save(path, quality=90)


def write_synthetic_pets(folder: Path, n: int, classes: int = 37, width: int = 500, height: int = 375) -> list:
    "`n` synthetic JPEGs named like the pets (`breed<class>_<i>.jpg`), `classes` classes, written in parallel; their paths."
    jobs = [(folder / f"breed{i % classes:02d}_{i}.jpg", i, width, height, i % classes) for i in range(n)]
    with ProcessPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1))) as pool:
        list(pool.map(_write_photo, jobs, chunksize=64))
    return [path for path, *_ in jobs]


def pets_files(folder, tmp: Path, n: int, smoke: bool, result: dict) -> list:
    "The images to train on: a folder's (the real pets), else `n` synthetic pets-sized JPEGs written to `tmp`; noted in `result`."
    if folder is not None:
        files = get_image_files(folder)
        if not files:
            raise SystemExit(f"No images in {folder}: give the folder of the pets' images (<breed>_<n>.jpg).")
        result["data"] = str(folder)
    else:
        width, height = (80, 60) if smoke else (500, 375)
        files = write_synthetic_pets(tmp, n, width=width, height=height)
        result["data"] = f"synthetic {len(files)} JPEGs {width}x{height}, 37 classes told apart by colour"
    result["images"] = len(files)
    return files


def print_result(result: dict):
    "The benchmark's one JSON line."
    print(json.dumps(result), flush=True)
