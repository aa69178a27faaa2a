"""Exports written before the reorganisation into rooms name builders by their old modules
(`coursekit.tabular:TabularModel`, `coursekit.collab:EmbeddingDotBias`, ...). They must still load."""
import json
import zipfile

import pandas as pd
import pytest
import torch

from coursekit.core import EXPORTABLE, MOVED_BUILDERS, build_exportable
from coursekit.learner import load_learner
from coursekit.tabular.collab import CollabDataLoaders, collab_learner
from coursekit.tabular.data import Categorify, Standardize, TabularDataLoaders
from coursekit.tabular.learner import tabular_learner


def with_old_builder_names(file, out):
    "A copy of the export `file` whose JSON members name builders as coursekit did before the move."
    new_to_old = {new: old for old, new in MOVED_BUILDERS.items()}
    renamed = 0
    with zipfile.ZipFile(file) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(".json"):
                text = data.decode()
                for new, old in new_to_old.items():
                    renamed += text.count(json.dumps(new))
                    text = text.replace(json.dumps(new), json.dumps(old))
                data = text.encode()
            dst.writestr(info, data)
    assert renamed >= 2, "the export should name a moved model builder and a moved data builder"
    return out


def test_every_moved_builder_points_to_a_registered_one():
    import coursekit.all  # noqa: F401  (registers every builder)
    for old, new in MOVED_BUILDERS.items():
        assert old not in EXPORTABLE, f"{old} is still registered under its old name"
        assert new in EXPORTABLE, f"{old} moved to {new}, which is not a registered builder"


def test_a_moved_builder_builds_what_the_new_name_builds():
    spec = {"builder": "coursekit.collab:EmbeddingDotBias", "kwargs": {"n_factors": 2, "n_users": 3, "n_items": 4,
                                                                       "y_range": [0, 5]}}
    model = build_exportable(spec)
    assert type(model).__module__ == "coursekit.tabular.collab"


def test_an_old_tabular_export_still_loads_and_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    df = pd.DataFrame({"colour": ["red", "blue", "green", "red"] * 25, "size": [float(i % 7) for i in range(100)],
                       "y": ["a", "b"] * 50})
    dls = TabularDataLoaders.from_df(df, y_names="y", cat_names=["colour"], cont_names=["size"],
                                     procs=[Categorify, Standardize], bs=16, seed=0)
    learn = tabular_learner(dls, layers=[8])
    new = learn.export(tmp_path / "new.ck")
    old = with_old_builder_names(new, tmp_path / "old.ck")
    row = df.iloc[3]
    assert load_learner(old, device="cpu").predict(row)[2].tolist() == pytest.approx(
        load_learner(new, device="cpu").predict(row)[2].tolist())


def test_an_old_collab_export_still_loads(tmp_path):
    ratings = pd.DataFrame({"user": [1, 1, 2, 2, 3, 3, 4, 4] * 4, "item": [10, 11, 10, 12, 11, 12, 10, 13] * 4,
                            "rating": [4.0, 3.0, 5.0, 2.0, 3.5, 4.5, 1.0, 2.5] * 4})
    ratings = ratings.drop_duplicates(["user", "item"])
    dls = CollabDataLoaders.from_df(ratings, bs=4, seed=0)
    learn = collab_learner(dls, n_factors=3, y_range=(0, 5.5))
    new = learn.export(tmp_path / "new.ck")
    old = with_old_builder_names(new, tmp_path / "old.ck")
    pair = pd.DataFrame({"user": [1], "item": [10]})
    loaded_old, loaded_new = load_learner(old, device="cpu"), load_learner(new, device="cpu")
    assert loaded_old.get_preds(dl=loaded_old.dls.test_dl(pair))[0].tolist() == pytest.approx(
        loaded_new.get_preds(dl=loaded_new.dls.test_dl(pair))[0].tolist())
