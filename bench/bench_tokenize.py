"""Tokenize the 25,000 IMDB reviews of the mirror (train + test + unsup) on 2 cores, then again from the cache.

    COURSEKIT_MIRROR=../shared/datasets python bench/bench_tokenize.py [--workers 2]

Prints the seconds of each run and the number of tokens. Target: <= 15 s for the first run.
"""
import argparse, os, tempfile, time
from pathlib import Path

import pandas as pd

from coursekit.text.core import tokenize_texts


def imdb_texts(folder: Path) -> list[str]:
    "The review texts of train, test and unsup (.csv.gz)."
    return [t for f in ("train.csv.gz", "test.csv.gz", "unsup.csv.gz") for t in pd.read_csv(folder / f)["text"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    mirror = os.environ.get("COURSEKIT_MIRROR")
    folder = Path(mirror or "../shared/datasets") / "imdb"
    if not (folder / "train.csv.gz").exists():
        raise SystemExit(f"{folder}/train.csv.gz not found: set COURSEKIT_MIRROR to the datasets folder.")
    texts = imdb_texts(folder)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        docs = tokenize_texts(texts, n_workers=args.workers, cache_dir=cache)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = tokenize_texts(texts, n_workers=args.workers, cache_dir=cache)
        second = time.perf_counter() - t0
    assert again == docs
    n_tokens = sum(d.count(" ") + 1 for d in docs)
    load = os.getloadavg()[0]
    print(f"{len(texts):,} reviews, {n_tokens:,} tokens, {args.workers} workers (shared machine, load {load:.1f})")
    print(f"first run  {first:6.2f} s  ({n_tokens / first:,.0f} tokens/s)  target <= 15 s: {'OK' if first <= 15 else 'MISSED'}")
    print(f"from cache {second:6.2f} s")


if __name__ == "__main__":
    main()
