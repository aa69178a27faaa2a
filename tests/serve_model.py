"""A small exported image classifier for the serving tests and the serving benchmark.

Two pet breeds from the dataset mirror, EfficientNet-Lite0 with a new head at 64 pixels, exported as
`learn.export` writes it. Its answers are not good, but they are the model's answers: what serving must
reproduce exactly."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BREEDS = ("Abyssinian", "beagle")


def mirror_photos(n: int = 12) -> list:
    "`n` photos of two breeds from the pets in `$COURSEKIT_MIRROR` (a clear failure when the mirror is missing)."
    mirror = Path(os.environ.get("COURSEKIT_MIRROR", REPO.parent / "shared" / "datasets"))
    images = mirror / "oxford-iiit-pet" / "images"
    if not images.is_dir():
        pytest.fail(f"The pets images are not at {images}: set COURSEKIT_MIRROR to the dataset mirror.")
    photos = sorted(f for f in images.glob("*.jpg") if f.name.startswith(BREEDS))
    return photos[:n // 2] + photos[-(n - n // 2):]


def export_small_model(folder: Path) -> Path:
    "Export the small two-breed classifier into `folder`; returns the file."
    from coursekit.core import set_seed
    from coursekit.vision.data import ImageDataLoaders, Normalize, Resize
    from coursekit.vision.learner import backbone_stats, cnn_learner
    set_seed(0)
    photos = mirror_photos()
    dls = ImageDataLoaders.from_name_re(photos[0].parent, photos, pat=r"^(.*)_\d+\.jpg$", valid_pct=0.25, seed=0,
                                        item_tfms=Resize(64), bs=4,
                                        batch_tfms=[Normalize.from_stats(*backbone_stats("efficientnet_lite0"))])
    return cnn_learner(dls, "efficientnet_lite0", path=folder).export(Path(folder) / "pets.ck")
