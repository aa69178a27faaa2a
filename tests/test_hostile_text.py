"""Bad input for the text loaders: other encodings, lone surrogates, validation flags, random splits (issues 10, 13)."""
import numpy as np
import pandas as pd
import pytest
import torch

from coursekit.data.core import RandomSplitter
from coursekit.text.core import tokenize_texts
from coursekit.text.data import TextDataLoaders, folder_to_df

REVIEWS = ["a great film , loved it", "boring and too long", "great acting , great story", "terrible plot , boring"]


def reviews(n: int = 40, is_valid=None) -> pd.DataFrame:
    df = pd.DataFrame({"text": (REVIEWS * n)[:n], "label": (["pos", "neg"] * n)[:n]})
    if is_valid is not None:
        df["is_valid"] = is_valid
    return df


def imdb_folder(root):
    "The fastai IMDB layout with one file per class and split."
    for split in ("train", "test"):
        for label in ("neg", "pos"):
            (root / split / label).mkdir(parents=True)
            (root / split / label / "0.txt").write_text(f"a {label} review", encoding="utf-8")
    return root


# --- encodings -------------------------------------------------------------------------------------------------

def test_latin1_file_in_a_folder_names_the_file_and_the_encoding(tmp_path):
    root = imdb_folder(tmp_path / "imdb")
    bad = root / "train" / "pos" / "1.txt"
    bad.write_bytes("un film très réussi".encode("latin-1"))
    with pytest.raises(ValueError, match=r"1\.txt.*utf-8.*encoding="):
        folder_to_df(root)
    with pytest.raises(ValueError, match=r"1\.txt"):
        TextDataLoaders.from_folder(root, cache_dir=tmp_path / "cache", device="cpu")


def test_latin1_folder_reads_with_the_encoding_it_asks_for(tmp_path):
    root = imdb_folder(tmp_path / "imdb")
    (root / "train" / "pos" / "1.txt").write_bytes("un film très réussi".encode("latin-1"))
    df = folder_to_df(root, encoding="latin-1")
    assert "un film très réussi" in df["text"].tolist()


def test_latin1_csv_names_the_file_and_the_encoding(tmp_path):
    (tmp_path / "texts.csv").write_bytes("text,label,is_valid\ncafé crème,pos,False\nbad,neg,True\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"texts\.csv.*utf-8.*encoding="):
        TextDataLoaders.from_csv(tmp_path, "texts.csv", cache_dir=tmp_path / "cache", device="cpu")
    dls = TextDataLoaders.from_csv(tmp_path, "texts.csv", encoding="latin-1", min_freq=1, cache_dir=tmp_path / "cache",
                                   device="cpu")
    assert "café" in dls.text_vocab.itos


def test_lone_surrogate_names_the_text_and_the_problem(tmp_path):
    texts = ["fine", "broken \ud800 text", "fine too"]
    with pytest.raises(ValueError, match=r"text 1 .*surrogate"):
        tokenize_texts(texts, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"text 1 .*surrogate"):
        tokenize_texts(texts, use_cache=False)
    df = reviews(8)
    df.loc[5, "text"] = "bytes read with errors='surrogateescape' \udce9"
    with pytest.raises(ValueError, match=r"text 5 .*surrogate.*encoding"):
        TextDataLoaders.from_df(df, cache_dir=tmp_path, device="cpu")


def test_lone_surrogate_leaves_no_cache_file(tmp_path):
    with pytest.raises(ValueError):
        tokenize_texts(["ok", "\udfff"], cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- validation flags: one strict parser ------------------------------------------------------------------------

def test_validation_flags_are_read_like_colsplitter(tmp_path):
    df = reviews(6, [True, "False", 0, "TRUE", 1, "0"])
    dls = TextDataLoaders.from_df(df, min_freq=1, cache_dir=tmp_path, device="cpu")
    assert len(dls.valid.dataset) == 3 and len(dls.train.dataset) == 3


@pytest.mark.parametrize("flag", ["yes", "maybe", None, 2])
def test_unreadable_validation_flag_is_an_error(tmp_path, flag):
    df = reviews(6, [True, False, flag, True, False, False])
    with pytest.raises(ValueError, match="row 2"):
        TextDataLoaders.from_df(df, cache_dir=tmp_path, device="cpu")


# --- one random splitter ----------------------------------------------------------------------------------------

def test_random_split_is_random_splitters_and_leaves_the_global_generator_alone(tmp_path):
    df = reviews(40)                                # no is_valid column: a random valid_pct
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    dls = TextDataLoaders.from_df(df, valid_pct=0.25, seed=7, min_freq=1, cache_dir=tmp_path, device="cpu")
    assert torch.equal(torch.rand(3), expected)
    valid_idx = RandomSplitter(0.25, seed=7)(df)[1]
    assert sorted(dls.valid.dataset.texts) == sorted(df["text"].iloc[valid_idx])


def test_no_seed_is_not_a_hidden_fixed_seed(tmp_path):
    df = pd.DataFrame({"text": [f"review number {i}" for i in range(60)], "label": ["pos", "neg"] * 30})
    splits = {tuple(sorted(TextDataLoaders.from_df(df, valid_pct=0.5, min_freq=1, cache_dir=tmp_path, device="cpu")
                           .valid.dataset.texts)) for _ in range(4)}
    assert len(splits) > 1
    seeded = TextDataLoaders.from_df(df, valid_pct=0.5, seed=42, min_freq=1, cache_dir=tmp_path, device="cpu")
    assert np.array_equal(sorted(seeded.valid.dataset.texts), sorted(df["text"].iloc[RandomSplitter(0.5, 42)(df)[1]]))


# --- beyond the list: missing texts and labels ------------------------------------------------------------

def test_missing_texts_are_a_clear_error(tmp_path):
    df = reviews(8)
    df.loc[3, "text"] = None                       # was tokenized as the word "nan" before
    with pytest.raises(ValueError, match=r"1 row.*no text.*dropna"):
        TextDataLoaders.from_df(df, cache_dir=tmp_path, device="cpu")


def test_missing_labels_are_a_clear_error(tmp_path):
    df = reviews(8)
    df.loc[[2, 5], "label"] = None                 # None became a class before
    with pytest.raises(ValueError, match=r"2 row.*no label"):
        TextDataLoaders.from_df(df, cache_dir=tmp_path, device="cpu")
