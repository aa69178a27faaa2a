"""Pets-sized image training throughput: resnet34 at 224 px with random-resized-crop + flip, from a presized uint8 cache.

The data: 7,400 synthetic JPEGs of 500x375 in 37 classes, written to a temporary folder (or the images in `--folder`,
labelled by the pets' file-name pattern). The loaders presize each image once (`Resize(presize)`, its cacheable
part), and `build_cache` decodes them a batch at a time (nvJPEG on a GPU) into the in-memory uint8 cache: that is
the cache build time. Training batches are then crop-and-flipped (`AffineAugment(min_scale=0.35)`: a random resized
crop as one matrix per image) and normalised on the device. One frozen epoch and one unfrozen epoch are timed
after `--warmup` batches each: images per second, and the share of that time spent waiting for the next batch
(from the end of one step to the arrival of the next batch, on the host). The learner runs at its default
precision for the device. Throughput does not depend on the weights, so without ImageNet weights offline the
model starts from random ones (`pretrained: false` in the output).

The decoding difference: the first `--check` training images decoded by the batched path on the device and by
`load_image` on the CPU, largest and mean absolute difference in pixel levels (0 on a CPU: the same decoder).

    python bench/gpu_pets.py [--folder DIR] [--n 7400] [--bs 256] [--size 224] [--presize 256] [--arch resnet34]
    python bench/gpu_pets.py --smoke     # a tiny run on any device, in seconds

Prints one JSON line.
"""
import argparse
import tempfile
import time
from pathlib import Path

from coursekit.core import default_device, set_seed
from coursekit.data.core import build_cache
from coursekit.metrics import error_rate
from coursekit.vision.data import (AffineAugment, ImageDataLoaders, Normalize, Resize, imagenet_stats,
                                   load_image, load_images)
from coursekit.vision.learner import cnn_learner

from gpu_common import (StepTimer, device_info, peak_memory_gb, print_result, reset_peak_memory, synchronize,
                        weights_present, pets_files)

PETS_PATTERN = r"^(.+)_\d+\.\w+$"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, help="real images named <class>_<n>.jpg (the pets' images folder)")
    parser.add_argument("--n", type=int, default=7400, help="synthetic images to generate")
    parser.add_argument("--bs", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--presize", type=int, default=256)
    parser.add_argument("--arch", default="resnet34")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches at the start of each epoch")
    parser.add_argument("--check", type=int, default=64, help="images on which to measure the decoding difference")
    parser.add_argument("--smoke", action="store_true", help="a tiny run: 48 small images, resnet18, 32 px")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.bs, args.size, args.presize, args.arch, args.warmup, args.check = 48, 8, 32, 40, "resnet18", 1, 8
    return args


def make_loaders(files: list, args, device):
    "Presized, cached loaders: crop + flip + normalise on the device, per batch."
    batch_tfms = [AffineAugment(size=args.size, min_scale=0.35, max_rotate=0.0, max_zoom=1.0, max_warp=0.0),
                  Normalize.from_stats(*imagenet_stats)]
    return ImageDataLoaders.from_name_re(files[0].parent, files, PETS_PATTERN, valid_pct=0.2, seed=42,
                                        item_tfms=Resize(args.presize), batch_tfms=batch_tfms, bs=args.bs,
                                        device=device, cache=True)


def decoding_difference(files: list, device) -> dict:
    "Largest and mean absolute difference between the batched decoder on `device` and `load_image` on the CPU."
    batched = load_images(files, device)
    diffs = [(b.cpu().int() - load_image(f).int()).abs() for b, f in zip(batched, files)]
    return {"decode_max_diff": int(max(d.max() for d in diffs)),
            "decode_mean_diff": round(float(sum(d.float().mean() for d in diffs) / len(diffs)), 4)}


def timed_epoch(learn, lr, warmup: int) -> dict:
    "One epoch of `fit_one_cycle` without the progress display, its training batches after `warmup` timed."
    timer = StepTimer(warmup)
    with learn.no_bar():
        learn.fit_one_cycle(1, lr, cbs=[timer])
    return timer.result()


def run(files: list, args, device) -> dict:
    set_seed(42)
    dls = make_loaders(files, args, device)
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    build_cache(dls.train)
    build_cache(dls.valid)
    synchronize(device)
    cache_seconds = time.perf_counter() - start
    pretrained = weights_present(args.arch)
    learn = cnn_learner(dls, args.arch, metrics=error_rate, pretrained=pretrained)
    frozen = timed_epoch(learn, 1e-3, args.warmup)
    learn.unfreeze()
    unfrozen = timed_epoch(learn, slice(1e-6, 1e-4), args.warmup)
    return {"cache_build_seconds": round(cache_seconds, 3), "cache_images": len(dls.train.dataset) + len(dls.valid.dataset),
            "cached": dls.train.is_cached and dls.valid.is_cached,
            "img_per_s_frozen": frozen["per_s"], "img_per_s_unfrozen": unfrozen["per_s"],
            "data_wait_share_frozen": frozen["data_wait_share"], "data_wait_share_unfrozen": unfrozen["data_wait_share"],
            "timed_batches": frozen["timed_batches"], "peak_gpu_memory_gb": peak_memory_gb(device),
            "precision": learn.precision, "pretrained": pretrained,
            **decoding_difference([dls.train.items[i] for i in range(min(args.check, len(dls.train.dataset)))], device)}


def main(argv=None):
    args = parse_args(argv)
    device = default_device()
    result = {"bench": "gpu_pets", **device_info(device), "smoke": args.smoke, "arch": args.arch, "size": args.size,
              "presize": args.presize, "bs": args.bs}
    with tempfile.TemporaryDirectory(prefix="coursekit-pets-") as tmp:
        files = pets_files(args.folder, Path(tmp), args.n, args.smoke, result)
        result.update(run(files, args, device))
    print_result(result)


if __name__ == "__main__":
    main()
