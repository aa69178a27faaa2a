"""Throughput of coursekit's image pipeline: decode + presize + augment, in images per second.

The pets images (from the datasets mirror, `$COURSEKIT_MIRROR/oxford-iiit-pet/images`, or any folder
of JPEGs given with `--images`, or `--synthetic N` generated 500x375 JPEGs) go through the training
loader that lesson 1 uses: torchvision decoding and `Resize(presize)` on the CPU in `num_workers`
worker processes, then `aug_transforms(size, min_scale=0.75)` and `Normalize` on the device, bs 64.
`presize` is size * 8/7 (256 px for 224). No model runs: this is the rate at which the pipeline can
feed one.

For each size and number of workers we time the first epoch (cold: every file decoded and presized,
results kept in the in-memory cache) and then the best of `--warm-epochs` further epochs (warm: read
from the cache; only the crop and the device augmentation run). Rates use the wall clock, with a
CUDA synchronisation at the end of an epoch on a GPU. On a shared CPU machine the wall clock mostly
measures the other users, so we also print the rate per second of this process's CPU time (which
leaves out the workers' decoding: compare it across sizes, and with 0 workers).

    python bench/bench_pipeline.py [--sizes 128 224] [--workers 0 1 2] [--bs 64] [--warm-epochs 2]
                                   [--images FOLDER | --synthetic N] [--device auto]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from coursekit.core import default_device
from coursekit.vision.data import (ImageDataLoaders, Normalize, Resize, aug_transforms, get_image_files,
                                   imagenet_stats)


def pets_images() -> Path:
    "The pets images folder in the datasets mirror (through untar_data when the catalogue module is there)."
    try:
        from coursekit.data.external import URLs, untar_data
        folder = untar_data(URLs.PETS) / "images"
    except ImportError:
        folder = Path(os.environ.get("COURSEKIT_MIRROR", "../shared/datasets")) / "oxford-iiit-pet" / "images"
    if not folder.is_dir(): raise SystemExit(f"No images at {folder}: set COURSEKIT_MIRROR, or use --images / --synthetic.")
    return folder


def synthetic_images(n: int, folder: Path) -> Path:
    "Write `n` random-ish 500x375 JPEGs (smooth gradients plus noise, so they compress like photos)."
    from torchvision.io import encode_jpeg
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        base = torch.linspace(0, 1, 500)[None, None] * torch.rand(3, 1, 1, generator=g) * 200
        img = (base.expand(3, 375, 500) + torch.rand(3, 375, 500, generator=g) * 55).to(torch.uint8)
        (folder / f"{'Cat' if i % 2 else 'dog'}_{i}.jpg").write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
    return folder


def epoch_rate(dl, device) -> tuple:
    "Images per second of wall clock and of this process's CPU time, for one pass over `dl`."
    start, cpu, n = time.perf_counter(), time.process_time(), 0
    for xb, yb in dl: n += len(xb)
    if device.type == "cuda": torch.cuda.synchronize()
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def run(files, size: int, workers: int, bs: int, warm_epochs: int, device) -> tuple:
    "(cold, warm) (wall, cpu) images/s for one configuration; a fresh loader: the first epoch starts with an empty cache."
    dls = ImageDataLoaders.from_name_func(files[0].parent, files, lambda f: f.name[0].isupper(), valid_pct=0.0,
                                          item_tfms=Resize(round(size * 8 / 7)),
                                          batch_tfms=[*aug_transforms(size=size, min_scale=0.75),
                                                      Normalize.from_stats(*imagenet_stats)],
                                          bs=bs, device=device, num_workers=workers)
    cold = epoch_rate(dls.train, device)
    assert dls.train.is_cached, "the presized images should be cached after one epoch"
    warm = max((epoch_rate(dls.train, device) for _ in range(warm_epochs)), key=lambda r: r[0])
    return cold, warm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--warm-epochs", type=int, default=2)
    parser.add_argument("--images", type=Path, default=None, help="a folder of images (default: the pets in the mirror)")
    parser.add_argument("--synthetic", type=int, default=0, help="generate this many JPEGs instead")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = default_device() if args.device == "auto" else torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthetic_images(args.synthetic, Path(tmp)) if args.synthetic else (args.images or pets_images())
        files = get_image_files(folder)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        print(f"{len(files)} images from {folder}, bs {args.bs}, device {name}")
        print(f"{'size':>5} {'workers':>8} {'cold img/s':>11} {'warm img/s':>11} {'cold img/cpu-s':>15} {'warm img/cpu-s':>15}")
        for size in args.sizes:
            for workers in args.workers:
                cold, warm = run(files, size, workers, args.bs, args.warm_epochs, device)
                print(f"{size:>5} {workers:>8} {cold[0]:>11.0f} {warm[0]:>11.0f} {cold[1]:>15.0f} {warm[1]:>15.0f}", flush=True)


if __name__ == "__main__":
    main()
