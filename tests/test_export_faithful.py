"""An export is faithful or refused (issue 11, item 3).

`learn.export()` stores the weights and the *arguments* of the factory that built the model (`learn.model_spec`),
and `load_learner` rebuilds the model from those arguments. A model the user changed after the factory built it
(a module appended, the head replaced, an attribute set) used to be exported without a word, and the loaded
learner predicted different numbers. Now `export` rebuilds what `load_learner` would build, compares it with
`learn.model` (module types, parameter and buffer names and shapes, outputs on a batch of real data) and refuses,
saying what differs and how to export such a model, without leaving a file behind or touching a previous export.

Likewise a transform or block defined outside coursekit (in a notebook: `__main__`) can never be loaded back
(`load_learner` only rebuilds coursekit's own classes), so `export` refuses it with advice instead of writing a
file that cannot load.

Every application's factory model still exports and loads with the same predictions (tiny models, CPU).
"""

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from coursekit.core import exportable, exportable_spec
from coursekit.data.core import DataLoaders, Transform
from coursekit.learner import Learner, load_learner, simple_mlp
from coursekit.persist import UnfaithfulExportError
from coursekit.tabular.collab import CollabDataLoaders, collab_learner
from coursekit.tabular.data import Categorify, Standardize, TabularDataLoaders
from coursekit.tabular.learner import SigmoidRange, tabular_learner
from coursekit.text.data import TextDataLoaders
from coursekit.text.learner import language_model_learner, text_classifier_learner
from coursekit.text.models import awd_lstm_small_clas_config, awd_lstm_small_lm_config
from coursekit.vision.data import ImageDataLoaders, Resize, SegmentationDataLoaders
from coursekit.vision.learner import cnn_learner, create_head
from coursekit.vision.unet import unet_learner

# --- small learners of every application --------------------------------------------------------------------


def mlp_learner(path) -> Learner:
    "A 3-8-2 MLP classifier on 96 synthetic points."
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(96, 3, generator=generator)
    targets = (inputs[:, 0] + inputs[:, 1] - inputs[:, 2] > 0).long()
    dls = DataLoaders.from_dsets(TensorDataset(inputs[:64], targets[:64]), TensorDataset(inputs[64:], targets[64:]),
                                 bs=16, device="cpu", vocab=["neg", "pos"])
    torch.manual_seed(0)
    learn = Learner(dls, simple_mlp(3, 2, hidden=[8]), path=path, cbs=[])
    learn.model_spec = exportable_spec(simple_mlp, n_in=3, n_out=2, hidden=[8])
    return learn


def image_folder(root, n_per_class: int = 6):
    "Tiny RGB images of two colours in `root/{train,valid}/{red,blue}/`."
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        for label, channel in (("red", 0), ("blue", 2)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n_per_class):
                pixels = rng.integers(0, 80, (40, 48, 3), dtype=np.uint8)
                pixels[..., channel] = 200
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def vision_learner(path) -> Learner:
    dls = ImageDataLoaders.from_folder(image_folder(path / "images"), item_tfms=Resize(32), bs=4, device="cpu")
    torch.manual_seed(0)
    return cnn_learner(dls, "resnet18", pretrained=False, path=path)


def segmentation_learner(path) -> Learner:
    rng = np.random.default_rng(0)
    images, masks = path / "images", path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
        Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8)).save(masks / f"{i}.png")
    dls = SegmentationDataLoaders.from_label_func(path, sorted(images.iterdir()), lambda f: masks / f.name,
                                                  codes=["background", "thing"], bs=4, seed=0, device="cpu")
    torch.manual_seed(0)
    return unet_learner(dls, "resnet18", pretrained=False, path=path)


REVIEWS = ["a great film , loved it", "boring and too long", "great acting , great story", "terrible plot , boring"]


def reviews(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame({"text": (REVIEWS * n)[:n], "label": (["pos", "neg"] * n)[:n],
                         "is_valid": [i % 4 == 0 for i in range(n)]})


def tiny(config: dict) -> dict:
    return dict(config, emb_sz=16, n_hid=24, n_layers=2)


def text_learner(path) -> Learner:
    dls = TextDataLoaders.from_df(reviews(), min_freq=1, bs=4, cache_dir=path / "cache", device="cpu")
    torch.manual_seed(0)
    return text_classifier_learner(dls, config=tiny(awd_lstm_small_clas_config), seq_len=8, max_len=64, path=path)


def language_learner(path) -> Learner:
    dls = TextDataLoaders.from_df(reviews(), is_lm=True, min_freq=1, bs=4, seq_len=8, cache_dir=path / "cache",
                                  device="cpu")
    torch.manual_seed(0)
    return language_model_learner(dls, config=tiny(awd_lstm_small_lm_config), pretrained=False, path=path)


def people(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"colour": rng.choice(["red", "blue", "green"], n), "age": rng.uniform(20, 60, n),
                         "income": rng.uniform(10, 90, n)})


def tabular_learner_(path) -> Learner:
    dls = TabularDataLoaders.from_df(people(), y_names="income", cat_names=["colour"], cont_names=["age"],
                                     procs=[Categorify, Standardize], bs=8, seed=0, device="cpu")
    torch.manual_seed(0)
    learn = tabular_learner(dls, layers=[8], y_range=(0, 100), path=path)
    return learn


def collab_learner_(path) -> Learner:
    rng = np.random.default_rng(0)
    pairs = [(u, i) for u in range(10) for i in range(8)]
    ratings = pd.DataFrame({"user": [u for u, _ in pairs], "item": [f"m{i}" for _, i in pairs],
                            "rating": rng.integers(1, 6, len(pairs)).astype(float)})
    dls = CollabDataLoaders.from_df(ratings, bs=8, seed=0, device="cpu")
    torch.manual_seed(0)
    return collab_learner(dls, n_factors=3, y_range=(0, 5.5), path=path)


LEARNERS = {"mlp": mlp_learner, "cnn": vision_learner, "unet": segmentation_learner, "text_classifier": text_learner,
            "language_model": language_learner, "tabular": tabular_learner_, "collab": collab_learner_}


def probe_inputs(learn: Learner) -> tuple:
    "The inputs of the first validation batch."
    return learn.dls.valid.one_batch()[:learn.dls.n_inp]


def outputs(model: nn.Module, inputs: tuple) -> torch.Tensor:
    "The model's first output on `inputs`, in eval mode, from a fresh hidden state."
    model.eval()
    if hasattr(model, "reset"):
        model.reset()
    with torch.no_grad():
        out = model(*inputs)
    return out[0] if isinstance(out, tuple) else out


def refused(learn: Learner, fname: str = "model.ck") -> str:
    "The message of the error `learn.export(fname)` raises; checks that no file was left behind."
    with pytest.raises(UnfaithfulExportError) as caught:
        learn.export(fname)
    assert not (learn.path / fname).exists(), "a refused export left a file behind"
    assert not list(learn.path.glob(f".{fname}*")), "a refused export left a temporary file behind"
    return str(caught.value)


# --- the factory's own model: exported, loaded, same outputs --------------------------------------------------


@pytest.mark.parametrize("name", LEARNERS)
def test_every_application_exports_and_loads_with_the_same_outputs(tmp_path, name):
    learn = LEARNERS[name](tmp_path)
    loaded = load_learner(learn.export("model.ck"), device="cpu")
    inputs = probe_inputs(learn)
    torch.testing.assert_close(outputs(loaded.model, inputs), outputs(learn.model, inputs))


# --- models changed after the factory built them --------------------------------------------------------------


def test_an_appended_module_is_refused(tmp_path):
    "The issue's case: a sigmoid range appended to a cnn_learner's model; load_learner would rebuild it without."
    learn = vision_learner(tmp_path)
    learn.model.append(SigmoidRange(-1.0, 1.0))
    message = refused(learn)
    assert "model.ck" in message and "learn.model has 2 (SigmoidRange), the rebuilt model has not" in message, message
    assert "learn.save" in message and "model_spec" in message, message


def test_an_appended_module_to_an_mlp_is_refused(tmp_path):
    learn = mlp_learner(tmp_path)
    learn.model.append(nn.Softmax(dim=1))
    message = refused(learn)
    assert "Softmax" in message, message


def test_a_replaced_head_is_refused(tmp_path):
    "A head of another shape: the weights would not even fit the model load_learner builds."
    learn = vision_learner(tmp_path)
    learn.model[1] = create_head(512, 2, lin_ftrs=[64], ps=0.25)
    message = refused(learn)
    assert "has shape [64, 1024] in learn.model, [512, 1024] in the rebuilt model" in message, message


def test_a_replaced_layer_of_another_type_is_refused(tmp_path):
    "A ReLU replaced by a Tanh: same weights, same names, another function."
    learn = mlp_learner(tmp_path)
    learn.model[1] = nn.Tanh()
    message = refused(learn)
    assert "Tanh" in message and "ReLU" in message, message


def test_a_changed_attribute_is_caught_by_the_outputs(tmp_path):
    "The y_range of a tabular model widened after training: same modules and weights, other predictions."
    learn = tabular_learner_(tmp_path)
    learn.model.layers[-1].high = 200.0
    message = refused(learn)
    assert "output" in message, message


def test_a_refused_export_leaves_the_previous_export_untouched(tmp_path):
    learn = mlp_learner(tmp_path)
    good = learn.export("model.ck").read_bytes()
    learn.model.append(nn.Softmax(dim=1))
    with pytest.raises(UnfaithfulExportError):
        learn.export("model.ck")
    assert (tmp_path / "model.ck").read_bytes() == good
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.ck"]


def test_a_refused_export_leaves_the_learner_as_it_was(tmp_path):
    learn = vision_learner(tmp_path)
    learn.model.append(SigmoidRange(-1.0, 1.0))
    learn.model.train()
    before = {name: tensor.clone() for name, tensor in learn.model.state_dict().items()}
    with pytest.raises(UnfaithfulExportError):
        learn.export("model.ck")
    assert learn.model.training and all(module.training for module in learn.model.modules())
    after = learn.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


# --- transforms and blocks from outside coursekit -----------------------------------------------------------


class Brighten(Transform):
    "A user's own item transform (not registered)."
    order = 50

    def __call__(self, sample, kinds, training):
        return tuple(x + 1 if kind == "image" else x for x, kind in zip(sample, kinds))


@exportable
class RegisteredBrighten(Brighten):
    "A user's own transform, registered with @exportable outside coursekit."


@pytest.mark.parametrize("transform", [Brighten, RegisteredBrighten])
def test_a_user_transform_is_refused_at_export_time_with_advice(tmp_path, transform):
    learn = vision_learner(tmp_path)
    learn.dls.valid.batch_tfms.append(transform())
    message = refused(learn)
    assert transform.__name__ in message and __name__ in message, message
    assert "coursekit" in message and "learn.save" in message, message


MAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from torch.utils.data import TensorDataset
    from coursekit.core import exportable, exportable_spec
    from coursekit.data.core import DataLoaders, Transform
    from coursekit.learner import Learner, simple_mlp

    @exportable
    class Double(Transform):
        "Defined in __main__, as in a notebook cell."
        def __call__(self, sample, kinds, training):
            return tuple(x * 2 if kind == "tensor" else x for x, kind in zip(sample, kinds))

    inputs, targets = torch.randn(32, 3), torch.randint(0, 2, (32,))
    dls = DataLoaders.from_dsets(TensorDataset(inputs[:24], targets[:24]), TensorDataset(inputs[24:], targets[24:]),
                                 bs=8, device="cpu", vocab=["a", "b"])
    for dl in dls.train, dls.valid:
        dl.batch_tfms.append(Double())
    learn = Learner(dls, simple_mlp(3, 2), path=Path(sys.argv[1]), cbs=[])
    learn.model_spec = exportable_spec(simple_mlp, n_in=3, n_out=2)
    learn.export("model.ck")
    """
)


def test_a_transform_defined_in_main_is_refused_at_export_time(tmp_path):
    "As in a notebook: a transform class defined in __main__ and registered; today's export cannot be loaded."
    run = subprocess.run([sys.executable, "-c", MAIN_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0, "the export of a __main__ transform was written"
    assert "UnfaithfulExportError" in run.stderr and "__main__" in run.stderr and "Double" in run.stderr, run.stderr
    assert not (tmp_path / "model.ck").exists()


@exportable
def users_mlp(n_in: int, n_out: int) -> nn.Sequential:
    "A model builder of the user's own, registered outside coursekit."
    return simple_mlp(n_in, n_out, hidden=[8])


def test_a_model_builder_outside_coursekit_is_refused(tmp_path):
    "load_learner builds only coursekit's registered builders: a spec naming the user's own could never load."
    learn = mlp_learner(tmp_path)
    learn.model_spec = exportable_spec(users_mlp, n_in=3, n_out=2)
    message = refused(learn)
    assert "users_mlp (from" in message and "learn.save" in message, message


def test_a_loaded_learner_exports_again(tmp_path):
    "Loaders without data (as load_learner makes them): no batch to compare, the model and weights are still checked."
    loaded = load_learner(mlp_learner(tmp_path).export("first.ck"), device="cpu")
    loaded.path = tmp_path
    again = load_learner(loaded.export("again.ck"), device="cpu")
    item = torch.tensor([1.0, 1.0, -1.0])
    assert again.predict(item)[2].tolist() == loaded.predict(item)[2].tolist()
    loaded.model.append(nn.Softmax(dim=1))
    assert "Softmax" in refused(loaded, "changed.ck")
