"""Bad and hostile input for the tabular and collaborative-filtering loaders and learners (issues 10 and 13)."""
import numpy as np
import pandas as pd
import pytest
import torch

from coursekit.data.core import RandomSplitter
from coursekit.learner import load_learner
from coursekit.tabular.collab import CollabDataLoaders, collab_learner
from coursekit.tabular.data import Categorify, FillMissing, Standardize, TabularDataLoaders
from coursekit.tabular.learner import tabular_learner

PROCS = [Categorify, FillMissing, Standardize]


def people(n: int = 40) -> pd.DataFrame:
    "A small table with a category, a number (with holes) and a string target."
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 60, n)
    age[::7] = np.nan
    return pd.DataFrame({"colour": rng.choice(["red", "blue", "green"], n), "age": age,
                         "label": np.where(rng.random(n) > 0.5, "yes", "no")})


def ratings(n_users: int = 12, n_items: int = 9) -> pd.DataFrame:
    "Every user rates every item once, 1 to 5 stars."
    rng = np.random.default_rng(0)
    pairs = [(u, i) for u in range(n_users) for i in range(n_items)]
    return pd.DataFrame({"user": [u for u, _ in pairs], "item": [f"m{i}" for _, i in pairs],
                         "rating": rng.integers(1, 6, len(pairs)).astype(float)})


def export_and_load(learn, tmp_path):
    learn.path = tmp_path
    return load_learner(learn.export("model.ck"), device="cpu")


# --- one random splitter (issue 10) ---------------------------------------------------------------------------

def test_tabular_split_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    TabularDataLoaders.from_df(people(), cat_names=["colour"], cont_names=["age"], y_names="label", procs=PROCS,
                               valid_pct=0.2, seed=1, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_collab_split_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    CollabDataLoaders.from_df(ratings(), valid_pct=0.2, seed=1, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_same_seed_same_split_as_random_splitter():
    df, r = people(), ratings()
    dls = TabularDataLoaders.from_df(df, cat_names=["colour"], cont_names=["age"], y_names="label", procs=PROCS,
                                     valid_pct=0.25, seed=3, device="cpu")
    assert sorted(dls.valid.items.index) == RandomSplitter(0.25, seed=3)(df)[1]
    cdls = CollabDataLoaders.from_df(r, valid_pct=0.25, seed=3, device="cpu")
    assert sorted(cdls.valid.items.index) == RandomSplitter(0.25, seed=3)(r)[1]


def test_no_seed_draws_a_fresh_split():
    df = people(200)
    splits = {tuple(sorted(TabularDataLoaders.from_df(df, cat_names=["colour"], cont_names=["age"], y_names="label",
                                                      procs=PROCS, device="cpu")
                           .valid.items.index)) for _ in range(4)}
    assert len(splits) > 1


# --- item 9: column labels that are not strings ---------------------------------------------------------------

def test_tabular_with_integer_column_labels_round_trips(tmp_path):
    df = people()
    df.columns = [0, 1, "label"]                   # the reported case: predict failed with a KeyError
    dls = TabularDataLoaders.from_df(df, cat_names=[0], cont_names=[1], y_names="label", procs=PROCS, valid_pct=0.2,
                                     seed=0, bs=8, device="cpu")
    learn = tabular_learner(dls, layers=[8])
    loaded = export_and_load(learn, tmp_path)
    row = {0: "red", 1: 33.0}
    pd.testing.assert_frame_equal(loaded.predict(row)[0], learn.predict(row)[0])
    torch.testing.assert_close(loaded.get_preds(dl=loaded.dls.test_dl(df))[0], learn.get_preds(dl=dls.test_dl(df))[0])


def test_tabular_with_numpy_integer_column_labels_round_trips(tmp_path):
    df = people()
    df.columns = np.arange(3)                      # labels are numpy int64
    cat, cont, y = list(df.columns)                # and so are the names passed in
    dls = TabularDataLoaders.from_df(df, cat_names=[cat], cont_names=[cont], y_names=y, procs=PROCS, valid_pct=0.2,
                                     seed=0, bs=8, device="cpu")
    loaded = export_and_load(tabular_learner(dls, layers=[8]), tmp_path)
    row, _, probs = loaded.predict({0: "blue", 1: np.nan})
    assert row[2].iloc[0] in ("yes", "no") and probs.shape == (2,)


def test_tabular_with_unexportable_column_labels_is_refused_at_build_time():
    df = people()
    df.columns = pd.MultiIndex.from_tuples([("a", "colour"), ("a", "age"), ("b", "label")])
    with pytest.raises(TypeError, match="column label"):
        TabularDataLoaders.from_df(df, cat_names=[("a", "colour")], cont_names=[("a", "age")], y_names=("b", "label"),
                                   procs=PROCS, device="cpu")


def test_collab_with_int64_column_labels_round_trips(tmp_path):
    r = ratings()
    r.columns = np.arange(3)
    dls = CollabDataLoaders.from_df(r, valid_pct=0.2, seed=0, bs=16, device="cpu")
    learn = collab_learner(dls, n_factors=4)
    loaded = export_and_load(learn, tmp_path)
    assert loaded.predict((3, "m2"))[0] == pytest.approx(learn.predict((3, "m2"))[0], abs=1e-6)
    torch.testing.assert_close(loaded.get_preds(dl=loaded.dls.test_dl(r))[0], learn.get_preds(dl=dls.test_dl(r))[0])


# --- empty and '?'-filled tables --------------------------------------------------------------------------------

def test_empty_dataframe_is_a_clear_error():
    with pytest.raises(ValueError, match="no rows"):
        TabularDataLoaders.from_df(people().iloc[:0], cat_names=["colour"], cont_names=["age"], y_names="label",
                                   procs=PROCS, device="cpu")


def test_dataframe_without_columns_is_a_clear_error():
    with pytest.raises((ValueError, KeyError), match="no rows|Missing column"):
        TabularDataLoaders.from_df(pd.DataFrame(), cat_names=["colour"], cont_names=["age"], y_names="label",
                                   procs=PROCS, device="cpu")


def test_question_marks_everywhere_suggest_na_values():
    df = pd.DataFrame({"colour": ["?"] * 10, "age": ["?"] * 10, "label": ["?"] * 10})
    with pytest.raises(ValueError, match=r"na_values='\?'"):
        TabularDataLoaders.from_df(df, cat_names=["colour"], cont_names=["age"], y_names="label", procs=PROCS,
                                   device="cpu")


def test_question_marks_in_a_continuous_column_suggest_na_values():
    df = people().astype({"age": object})
    df.loc[::3, "age"] = "?"
    with pytest.raises(ValueError, match=r"'age'.*na_values='\?'"):
        TabularDataLoaders.from_df(df, cat_names=["colour"], cont_names=["age"], y_names="label", procs=PROCS,
                                   device="cpu")


def test_text_in_a_continuous_column_names_the_column():
    df = people().astype({"age": object})
    df.loc[2, "age"] = "forty"
    with pytest.raises(ValueError, match=r"'age'.*'forty'"):
        TabularDataLoaders.from_df(df, cat_names=["colour"], cont_names=["age"], y_names="label", procs=PROCS,
                                   device="cpu")


def test_no_training_rows_left_is_a_clear_error():
    with pytest.raises(ValueError, match="no rows"):
        TabularDataLoaders.from_df(people(3), cat_names=["colour"], cont_names=["age"], y_names="label", procs=PROCS,
                                   valid_idx=[0, 1, 2], device="cpu")


# --- collab: ratings outside y_range, duplicated pairs ---------------------------------------------------------

def test_ratings_above_y_range_are_a_clear_error():
    r = ratings()
    r["rating"] = r["rating"] * 2                  # 2 to 10 stars
    dls = CollabDataLoaders.from_df(r, valid_pct=0.2, seed=0, device="cpu")
    with pytest.raises(ValueError, match=r"2\.0 to 10\.0.*y_range=\(0\.0, 5\.5\)"):
        collab_learner(dls, n_factors=4, y_range=(0, 5.5))
    collab_learner(dls, n_factors=4, y_range=(0, 10.5))            # a range that holds them is fine
    collab_learner(dls, n_factors=4, y_range=None)                 # and so is no range at all


def test_ratings_below_y_range_are_a_clear_error_for_the_neural_model_too():
    r = ratings()
    r["rating"] = r["rating"] - 3                  # -2 to 2
    dls = CollabDataLoaders.from_df(r, valid_pct=0.2, seed=0, device="cpu")
    with pytest.raises(ValueError, match="y_range"):
        collab_learner(dls, use_nn=True, layers=[4])


def test_duplicated_user_item_pairs_are_a_clear_error():
    r = ratings()
    doubled = pd.concat([r, r.assign(rating=3.0)], ignore_index=True)
    with pytest.raises(ValueError, match=r"108 .*duplicate.*drop_duplicates"):
        CollabDataLoaders.from_df(doubled, valid_pct=0.2, seed=0, device="cpu")
    aggregated = doubled.groupby(["user", "item"], as_index=False)["rating"].mean()
    assert len(CollabDataLoaders.from_df(aggregated, valid_pct=0.2, seed=0, device="cpu").train.items) == 87


def test_empty_ratings_are_a_clear_error():
    with pytest.raises(ValueError, match="no rows"):
        CollabDataLoaders.from_df(ratings().iloc[:0], device="cpu")


# --- beyond the list: inputs that trained on garbage silently or failed deep inside pandas/torch ---------

def test_infinite_values_in_a_continuous_column_are_a_clear_error():
    df = people()
    df.loc[3, "age"] = np.inf                      # trained to NaN losses before
    with pytest.raises(ValueError, match=r"'age'.*infinite"):
        TabularDataLoaders.from_df(df, cat_names=["colour"], cont_names=["age"], y_names="label", procs=PROCS, seed=0,
                                   device="cpu")


def test_duplicated_column_names_are_a_clear_error():
    df = pd.concat([people(), people()[["age"]]], axis=1)
    with pytest.raises(ValueError, match=r"'age'.*2 columns"):
        TabularDataLoaders.from_df(df, cat_names=["colour"], cont_names=["age"], y_names="label", procs=PROCS,
                                   device="cpu")


@pytest.mark.parametrize("cats, conts", [(["colour", "label"], ["age"]), (["colour"], ["age", "label"]),
                                         (["colour"], ["age", "age"]), (["colour", "age"], ["age"])])
def test_a_column_listed_twice_is_a_clear_error(cats, conts):
    with pytest.raises(ValueError, match="listed more than once"):
        TabularDataLoaders.from_df(people(), cat_names=cats, cont_names=conts, y_names="label", procs=PROCS,
                                   device="cpu")


def test_no_input_columns_is_a_clear_error():
    with pytest.raises(ValueError, match="no input columns"):
        TabularDataLoaders.from_df(people(), cat_names=[], cont_names=[], y_names="label", procs=PROCS, device="cpu")


def test_missing_ratings_are_a_clear_error():
    r = ratings()
    r.loc[[4, 9], "rating"] = np.nan               # trained to a NaN validation loss before
    with pytest.raises(ValueError, match=r"2 ratings are missing.*dropna"):
        CollabDataLoaders.from_df(r, device="cpu")


def test_ratings_that_are_not_numbers_are_a_clear_error():
    r = ratings().astype({"rating": object})
    r.loc[5, "rating"] = "five"
    with pytest.raises(ValueError, match=r"'rating'.*'five'"):
        CollabDataLoaders.from_df(r, device="cpu")


def test_missing_user_or_item_ids_are_a_clear_error():
    r = ratings().astype({"user": float})
    r.loc[0, "user"] = np.nan                      # became a user called nan before
    with pytest.raises(ValueError, match=r"1 rating.*no 'user'"):
        CollabDataLoaders.from_df(r, device="cpu")


def test_a_ratings_table_needs_three_columns():
    with pytest.raises(ValueError, match="user, item and rating"):
        CollabDataLoaders.from_df(ratings()[["user", "item"]], device="cpu")
