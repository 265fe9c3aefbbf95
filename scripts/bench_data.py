#!/usr/bin/env python3
"""Throughput of the input pipeline on Multi30k train: batches/s, tokens/s and padding, as a table.

Loads and cleans the train split, trains (or reuses) a SentencePiece model, tokenizes (cached), then
times one epoch of DataLoader batches for several max_tokens and worker counts (worker start-up
included). Nothing runs on a
model: this is the rate at which the pipeline can feed one.

usage: python scripts/bench_data.py [--root ../shared/data/multi30k] [--max-tokens 1024 2048 4096 8192]
                                     [--workers 0 2] [--vocab-size 8000]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from attnmt.batching import TokenBucketSampler, make_dataloader
from attnmt.config import compose
from attnmt.data import load_split, token_lengths, tokenize
from attnmt.tokenizer import Tokenizer


def main() -> None:
    default_root = Path(os.environ.get("ATTNMT_DATA", "../shared/data")) / "multi30k"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(default_root))
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--out", default="data/bench", help="tokenizer and tokenized-data cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = compose("train", [f"data.root={args.root}", f"data.cache_dir={args.out}/cache",
                            f"data.tokenizer.vocab_size={args.vocab_size}"]).data
    start = time.perf_counter()
    train = load_split(cfg, "train", train=True)
    loaded = time.perf_counter()
    tokenizer = Tokenizer.train(train["src"], train["tgt"], cfg.tokenizer, f"{args.out}/tokenizer")
    trained = time.perf_counter()
    ds = tokenize(train, tokenizer, cfg, train=True)
    tokenized = time.perf_counter()
    src_lens, tgt_lens = token_lengths(ds)
    print(f"\nMulti30k train: {len(ds)} pairs, vocabulary {tokenizer.src_vocab_size}; load+clean "
          f"{loaded - start:.2f}s, tokenizer {trained - loaded:.2f}s, tokenize {tokenized - trained:.2f}s\n")

    header = f"| {'max_tokens':>10} | {'workers':>7} | {'batches':>7} | {'batches/s':>9} | {'tokens/s':>11} | {'padding':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    for max_tokens in args.max_tokens:
        for workers in args.workers:
            sampler = TokenBucketSampler(src_lens, tgt_lens, max_tokens, seed=1)
            sampler.set_epoch(1)
            n_batches = tokens = slots = 0
            t0 = time.perf_counter()
            for batch in make_dataloader(ds, sampler, num_workers=workers):
                n_batches += 1
                tokens += int(batch.src_mask.sum()) + batch.n_tgt_tokens  # real tokens, padding excluded
                slots += batch.src_tokens.numel() + batch.tgt_out.numel()
            seconds = time.perf_counter() - t0
            print(f"| {max_tokens:>10} | {workers:>7} | {n_batches:>7} | {n_batches / seconds:>9.1f} | "
                  f"{tokens / seconds:>11,.0f} | {1 - tokens / slots:>7.2%} |")


if __name__ == "__main__":
    main()
