"""The pets lesson at the course's settings, timed: its wall time and error rates on a GPU.

The lesson's training stages, as `nbs/lessons/01_pets.ipynb` runs them without quick mode: resnet34 on
`Resize(460)` + `aug_transforms(size=224, min_scale=0.75)`, bs 64, 4 frozen epochs at 3e-3; then unfrozen, 2 epochs
at `slice(1e-6, 1e-4)`; then resnet50 at 299 px (`Resize(343)`), bs 32, 8 epochs at 3e-3. (The lesson's one-epoch
naive unfreeze and its `lr_find` are not part of the timed run.) The wall time runs from making the loaders to the
end of the last epoch, decoding and validation included. The learner runs at its default precision for the device;
`--compare-fp32` runs everything again in float32 (`learn.to_fp32()`) and reports both error rates, for the check
that mixed precision is no worse.

The data: the real pets with `--folder` (the 7,390 images of `untar_data(URLs.PETS) / "images"`), else synthetic
JPEGs of 500x375 whose classes differ by their colour (a signal even a network from random weights learns,
but not the real task: their error rates only check that training works). The error rate
depends on the ImageNet weights: without them offline the models start from random weights (`pretrained: false`
in the output) and the error rates are far above the course's.

    python bench/gpu_lesson_pets.py --folder ~/.coursekit/data/oxford-iiit-pet/images [--compare-fp32]
    python bench/gpu_lesson_pets.py --smoke     # a tiny run on any device, in seconds

Prints one JSON line.
"""
import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from coursekit.core import default_device, set_seed
from coursekit.metrics import error_rate
from coursekit.vision.data import ImageDataLoaders, Normalize, Resize, aug_transforms
from coursekit.vision.learner import backbone_stats, cnn_learner

from gpu_common import device_info, peak_memory_gb, print_result, reset_peak_memory, synchronize, weights_present
from gpu_common import pets_files

PETS_PATTERN = r"^(.*)_\d+\.jpg$"


@dataclass
class Settings:
    "The lesson's settings (the course's, or tiny ones for a smoke run)."
    arch: str = "resnet34"
    size: int = 224
    presize: int = 460
    bs: int = 64
    epochs: int = 4
    unfreeze_epochs: int = 2
    lr: float = 3e-3
    big_arch: str = "resnet50"
    big_size: int = 299
    big_bs: int = 32
    big_epochs: int = 8


SMOKE = Settings(arch="resnet18", size=32, presize=40, bs=8, epochs=1, unfreeze_epochs=1, big_arch="resnet18",
                 big_size=32, big_bs=8, big_epochs=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, help="the pets' images folder (<breed>_<n>.jpg)")
    parser.add_argument("--n", type=int, default=7390, help="synthetic images to generate without --folder")
    parser.add_argument("--cache", default="auto", choices=["auto", "true"],
                        help="the loaders' cache: 'auto' (the lesson's default) or 'true' (always keep the presized images)")
    parser.add_argument("--compare-fp32", action="store_true", help="run again in float32 and report both error rates")
    parser.add_argument("--smoke", action="store_true", help="a tiny run: 40 small images, resnet18, 32 px, 1 epoch per stage")
    args = parser.parse_args(argv)
    args.settings = SMOKE if args.smoke else Settings()
    if args.smoke:
        args.n = 40
    return args


def loaders(files: list, arch: str, size: int, presize: int, bs: int, cache, device):
    "The lesson's loaders: presize, then augment and normalise on the device."
    batch_tfms = [*aug_transforms(size=size, min_scale=0.75), Normalize.from_stats(*backbone_stats(arch))]
    return ImageDataLoaders.from_name_re(files[0].parent, files, PETS_PATTERN, valid_pct=0.2, seed=42,
                                        item_tfms=Resize(presize), batch_tfms=batch_tfms, bs=bs, device=device, cache=cache)


def lesson(files: list, s: Settings, cache, device, fp32: bool) -> dict:
    "The lesson's three training stages: wall time per stage and in all, error rate after each, peak GPU memory."
    set_seed(42)
    reset_peak_memory(device)
    pretrained = weights_present(s.arch) and weights_present(s.big_arch)
    seconds = {}
    start = time.perf_counter()
    dls = loaders(files, s.arch, s.size, s.presize, s.bs, cache, device)
    learn = cnn_learner(dls, s.arch, metrics=error_rate, pretrained=pretrained)
    if fp32:
        learn.to_fp32()
    with learn.no_bar():
        learn.fit_one_cycle(s.epochs, s.lr)
        stage1_error = learn.recorder.last_metrics()["error_rate"]
        synchronize(device)
        seconds["stage1"] = time.perf_counter() - start
        learn.unfreeze()
        learn.fit_one_cycle(s.unfreeze_epochs, slice(1e-6, 1e-4))
        stage2_error = learn.recorder.last_metrics()["error_rate"]
        synchronize(device)
        seconds["stage2"] = time.perf_counter() - start - seconds["stage1"]
    big_start = time.perf_counter()
    dls_big = loaders(files, s.big_arch, s.big_size, int(s.big_size * 1.15), s.big_bs, cache, device)
    learn_big = cnn_learner(dls_big, s.big_arch, metrics=error_rate, pretrained=pretrained)
    if fp32:
        learn_big.to_fp32()
    with learn_big.no_bar():
        learn_big.fit_one_cycle(s.big_epochs, s.lr)
    synchronize(device)
    seconds["big"] = time.perf_counter() - big_start
    return {"seconds": round(time.perf_counter() - start, 2), "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
            "stage1_error_rate": round(float(stage1_error), 4), "stage2_error_rate": round(float(stage2_error), 4),
            "big_error_rate": round(float(learn_big.recorder.last_metrics()["error_rate"]), 4),
            "precision": learn.precision, "cached": dls.train.is_cached, "pretrained": pretrained,
            "peak_gpu_memory_gb": peak_memory_gb(device)}


def main(argv=None):
    args = parse_args(argv)
    device = default_device()
    s = args.settings
    cache = True if args.cache == "true" else "auto"
    result = {"bench": "gpu_lesson_pets", **device_info(device), "smoke": args.smoke, "settings": vars(s)}
    with tempfile.TemporaryDirectory(prefix="coursekit-pets-") as tmp:
        files = pets_files(args.folder, Path(tmp), args.n, args.smoke, result)
        result.update(lesson(files, s, cache, device, fp32=False))
        if args.compare_fp32:
            fp32 = lesson(files, s, cache, device, fp32=True)
            result["fp32"] = {k: fp32[k] for k in ("seconds", "stage1_error_rate", "stage2_error_rate", "big_error_rate")}
    if not result["pretrained"]:
        result["note"] = ("no ImageNet weights offline: the models started from random weights, so the error rates "
                          "are not the course's (the wall time does not depend on the weights)")
    print_result(result)


if __name__ == "__main__":
    main()
