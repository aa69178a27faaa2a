"""AWD-LSTM language-model training throughput in tokens per second (bs 64, bptt 72, vocab 60k, fastai's LM sizes).

The tokens are synthetic (uniform random ids over the vocabulary: the speed of an LSTM does not depend on which
words it reads), split 90/10 into training and validation streams, loaded by coursekit's `LMDataLoader` and trained
by `language_model_learner` (its AWD-LSTM with weight-dropped recurrent matrices, which stay on the cuDNN path:
`WeightDropout` hands the kernel its weights in cuDNN's flat layout). One epoch is timed after `--warmup`
batches: tokens per second and the share of the time spent waiting for batches. The learner runs at its default
precision for the device.

    python bench/gpu_text.py [--tokens 3000000] [--bs 64] [--bptt 72] [--vocab 60000]
    python bench/gpu_text.py --smoke     # a tiny run on any device, in seconds

Prints one JSON line.
"""
import argparse

import numpy as np

from coursekit.core import default_device, set_seed
from coursekit.data.core import CategoryBlock, TransformBlock
from coursekit.text.core import PAD, UNK, Vocab
from coursekit.text.data import LMDataLoader, TextDataLoaders, TextDataset
from coursekit.text.learner import language_model_learner

from gpu_common import StepTimer, device_info, peak_memory_gb, print_result, reset_peak_memory


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=3_000_000, help="synthetic tokens in all")
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--bptt", type=int, default=72)
    parser.add_argument("--vocab", type=int, default=60_000)
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches at the start of the epoch")
    parser.add_argument("--smoke", action="store_true", help="a tiny run: a small AWD-LSTM, 8k tokens, vocab 500")
    args = parser.parse_args(argv)
    args.config = "lm"
    if args.smoke:
        args.tokens, args.bs, args.bptt, args.vocab, args.warmup, args.config = 8_000, 16, 24, 500, 2, "small_lm"
    return args


def synthetic_loaders(args, device) -> TextDataLoaders:
    "Language-model loaders over random token ids: 90% of the stream to train on, 10% to validate."
    vocab = Vocab([UNK, PAD] + [f"w{i}" for i in range(args.vocab - 2)])
    ids = np.random.default_rng(0).integers(2, args.vocab, args.tokens)
    split = int(0.9 * len(ids))
    train = LMDataLoader(TextDataset([ids[:split]]), bs=args.bs, seq_len=args.bptt, shuffle=True, device=device)
    valid = LMDataLoader(TextDataset([ids[split:]]), bs=args.bs, seq_len=args.bptt, device=device)
    blocks = [TransformBlock(), CategoryBlock(vocab.itos, encoded=True)]
    return TextDataLoaders(train, valid, blocks, vocab, is_lm=True)


def main(argv=None):
    args = parse_args(argv)
    device = default_device()
    set_seed(42)
    dls = synthetic_loaders(args, device)
    learn = language_model_learner(dls, config=args.config, pretrained=False, metrics=[])
    reset_peak_memory(device)
    timer = StepTimer(args.warmup)
    with learn.no_bar():
        learn.fit_one_cycle(1, 2e-3, cbs=[timer])
    timed = timer.result()
    print_result({"bench": "gpu_text", **device_info(device), "smoke": args.smoke, "model": f"AWD-LSTM ({args.config})",
                  "bs": args.bs, "bptt": args.bptt, "vocab": args.vocab, "tokens": args.tokens,
                  "tok_per_s": timed["per_s"], "data_wait_share": timed["data_wait_share"],
                  "timed_batches": timed["timed_batches"], "peak_gpu_memory_gb": peak_memory_gb(device),
                  "precision": learn.precision})


if __name__ == "__main__":
    main()
