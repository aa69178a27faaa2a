"""What language-model pre-training brings in the IMDB lesson's quick mode, over several seeds.

    COURSEKIT_MIRROR=../shared/datasets python bench/bench_imdb_pretraining.py [--seeds 1 2 3]

Trains the quick-mode language model once (7,000 reviews, one epoch), then for each seed two classifiers
with the same data and budget (one epoch, lr 1e-2): one from the language model's encoder, one from random
weights. Prints the test accuracy of each on the 5,000 test reviews, and the range over the seeds.
About 2 minutes per seed plus 4 for the language model on 2 CPU cores.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from coursekit.core import set_seed
from coursekit.metrics import accuracy
from coursekit.text.data import TextDataLoaders
from coursekit.text.learner import TextLearner, language_model_learner, text_classifier_learner

MAX_CHARS, LM_DOCS, MAX_VOCAB = 1000, 7000, 6000   # the lesson's quick settings


def imdb_frames(folder: Path):
    "train, test and unsup DataFrames of the mirror, every text cut to the lesson's MAX_CHARS."
    frames = [pd.read_csv(folder / f"{name}.csv.gz") for name in ("train", "test", "unsup")]
    return [df.assign(text=df.text.str[:MAX_CHARS]) for df in frames]


def train_classifier(dls, seed: int, encoder: str | None, path) -> TextLearner:
    "One epoch at 1e-2, everything trainable, from `encoder` (a saved name) or from random weights."
    set_seed(seed)
    learn = text_classifier_learner(dls, config="small_clas", drop_mult=0.1, metrics=accuracy, path=path)
    if encoder: learn.load_encoder(encoder)
    with learn.no_bar(): learn.fit_one_cycle(1, 1e-2)
    return learn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()
    folder = Path(os.environ.get("COURSEKIT_MIRROR") or "../shared/datasets") / "imdb"
    if not (folder / "train.csv.gz").exists():
        raise SystemExit(f"{folder}/train.csv.gz not found: set COURSEKIT_MIRROR to the datasets folder.")
    train_df, test_df, unsup_df = imdb_frames(folder)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        lm_texts = pd.concat([unsup_df[["text"]], train_df[["text"]]], ignore_index=True)
        lm_texts = lm_texts.sample(LM_DOCS, random_state=0).reset_index(drop=True)
        dls_lm = TextDataLoaders.from_df(lm_texts, is_lm=True, valid_pct=0.1, bs=64, seq_len=64, max_vocab=MAX_VOCAB, seed=0)
        set_seed(42)
        learn_lm = language_model_learner(dls_lm, config="small_lm", drop_mult=0.3, pretrained=False, path=work)
        with learn_lm.no_bar(): learn_lm.fit_one_cycle(1, 3e-2)
        learn_lm.save_encoder("finetuned")
        _, lm_acc, lm_ppl = learn_lm.recorder.values[-1][1:4]
        print(f"language model: accuracy {lm_acc:.3f}, perplexity {lm_ppl:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)

        clas_df = train_df.sample(frac=1, random_state=0)
        clas_df = clas_df.assign(is_valid=np.arange(len(clas_df)) < len(clas_df) // 10)
        dls = TextDataLoaders.from_df(clas_df, valid_col="is_valid", text_vocab=dls_lm.text_vocab, bs=64)
        test_dl = dls.test_dl(test_df, with_labels=True, bs=256)
        results = {"language-model encoder": [], "random encoder": []}
        for seed in args.seeds:
            for name, encoder in (("language-model encoder", "finetuned"), ("random encoder", None)):
                t0 = time.perf_counter()
                acc = train_classifier(dls, seed, encoder, work).validate(dl=test_dl)[1]
                results[name].append(acc)
                print(f"seed {seed}  {name:23s} test accuracy {acc:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"load {os.getloadavg()[0]:.1f}; test accuracy over seeds {args.seeds}:")
    for name, accs in results.items():
        print(f"  {name:23s} min {min(accs):.4f}  mean {np.mean(accs):.4f}  max {max(accs):.4f}")
    gains = np.subtract(results["language-model encoder"], results["random encoder"])
    print(f"  gain of pre-training per seed: {', '.join(f'{g:+.4f}' for g in gains)}")


if __name__ == "__main__":
    main()
