#!/usr/bin/env python3
"""The input pipeline, as tables: its throughput on Multi30k train, and how it scales with the corpus.

Throughput (the default): loads and cleans the train split, trains (or reuses) a SentencePiece model,
tokenizes (cached), then times one epoch of DataLoader batches for several max_tokens and worker
counts (worker start-up included). Nothing runs on a model: this is the rate at which the pipeline
can feed one.

Scale (``--scale N [N ...]``): for each N, writes a synthetic corpus of N pairs with WMT-like lengths
(each line two random Multi30k train sentences, about 26 words, as WMT14's average; no network), then
runs ``attnmt-train model=tiny`` for 20 updates on it twice, each in a process of its own: first with
an empty cache (reading, cleaning, tokenizer training, tokenization), then in a new run directory with
another learning rate (everything reused from ``data.cache_dir``). It prints each run's phases from its
log, the time from the command to the first update, and the peak resident memory of the training
process (VmHWM), and apart its anonymous memory (what it allocated) and its file-backed memory (pages
of the memory-mapped cache files it touched: shared page cache, which the kernel reclaims under
pressure), and the peak of its largest helper process (the tokenizer trainer, the cleaning and
tokenizing workers); with two sizes, the memory growth per pair.

usage: python scripts/bench_data.py [--root ../shared/data/multi30k] [--max-tokens 1024 2048 4096 8192]
                                     [--workers 0 2] [--vocab-size 8000] [--update-freq 1] [--sort-window 0]
       python scripts/bench_data.py --scale 900000 4500000 [--out data/bench] [--keep]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from attnmt.batching import TokenBucketSampler, make_dataloader
from attnmt.config import compose
from attnmt.data import load_split, read_lines, token_lengths, tokenize, train_tokenizer

from _args import at_least, folder_with, new_or_folder, positive


def throughput(args: argparse.Namespace) -> None:
    cfg = compose("train", [f"data.root={args.root}", f"data.cache_dir={args.out}/cache",
                            f"data.tokenizer.vocab_size={args.vocab_size}"]).data
    start = time.perf_counter()
    train = load_split(cfg, "train", train=True)
    loaded = time.perf_counter()
    tokenizer = train_tokenizer([train], cfg)
    trained = time.perf_counter()
    ds = tokenize(train, tokenizer, cfg, train=True)
    tokenized = time.perf_counter()
    src_lens, tgt_lens = token_lengths(ds)
    print(f"\nMulti30k train: {len(ds)} pairs, vocabulary {tokenizer.src_vocab_size}; load+clean "
          f"{loaded - start:.2f}s, tokenizer {trained - loaded:.2f}s, tokenize {tokenized - trained:.2f}s\n")

    print(f"updates of update_freq={args.update_freq} batches, sentences sorted by length in windows of "
          f"train.sort_window={args.sort_window} updates (0 = the whole epoch)\n")
    header = f"| {'max_tokens':>10} | {'workers':>7} | {'batches':>7} | {'batches/s':>9} | {'tokens/s':>11} | {'padding':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    for max_tokens in args.max_tokens:
        for workers in args.workers:
            sampler = TokenBucketSampler(src_lens, tgt_lens, max_tokens, seed=1, update_freq=args.update_freq,
                                         window=args.sort_window)
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


# ----------------------------------------------------------------------------------------------------
# Scale


def synthetic_corpus(multi30k: Path, n: int, folder: Path) -> Path:
    """``folder/train.{de,en}`` with ``n`` pairs, each two random Multi30k train pairs joined (seeded),
    and Multi30k's own valid split; written once. As in a real corpus, the rules drop a few pairs: in
    every thousand, one has an empty English side and one a one-word German side (a length ratio over
    3), so the cache holds kept-row indexes, as it does for real data."""
    if (folder / "train.en").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    de, en = read_lines(multi30k / "train.de"), read_lines(multi30k / "train.en")
    for lang, lines in (("de", de), ("en", en)):
        tmp = folder / f".train.{lang}.tmp"
        rng_lang = np.random.default_rng(n)  # the same pairs on both sides
        with open(tmp, "w", encoding="utf-8") as f:
            for start in range(0, n, 100_000):
                picks = rng_lang.integers(0, len(lines), size=(min(100_000, n - start), 2))
                f.write("".join(_damaged(lang, start + i, f"{lines[a]} {lines[b]}") + "\n"
                                for i, (a, b) in enumerate(picks.tolist())))
        tmp.rename(folder / f"train.{lang}")
    for lang in ("de", "en"):
        shutil.copy(multi30k / f"valid.{lang}", folder / f"valid.{lang}")
    return folder


def _damaged(lang: str, i: int, line: str) -> str:
    """Pair ``i``'s ``lang`` side as :func:`synthetic_corpus` writes it: two pairs in a thousand damaged."""
    if lang == "en" and i % 1000 == 999:
        return ""
    if lang == "de" and i % 1000 == 499:
        return line.split()[0]
    return line


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_PHASES = {  # the log line that ends each phase
    "read+clean": re.compile(r"train split \(.*\): \d+ pairs read"),
    "tokenizer": re.compile(r"trained a .* tokenizer|reusing the tokenizer"),
    "tokenize": re.compile(r"train split: \d+ pairs over data\.max_len"),
    "first update": re.compile(r"\| step 1 \|| step 1 \| epoch"),
}


def timed_run(corpus: Path, cache: Path, run_dir: Path, lr: str, vocab_size: int) -> dict:
    """One ``attnmt-train`` process of 20 updates; its phases (seconds from its start), wall time and peak RSS."""
    hwm_file = run_dir.with_suffix(".status")
    # In the training process: a thread samples its anonymous and file-backed resident memory (the
    # kernel keeps only their sum's peak, VmHWM); at exit, both peaks, VmHWM and the helpers' peak.
    code = f"""
import atexit, resource, threading, time
peaks = {{"RssAnon": 0, "RssFile": 0}}
def sample():
    while True:
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in peaks:
                peaks[key] = max(peaks[key], int(line.split()[1]))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
def report():
    status = open("/proc/self/status").read()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    open({str(hwm_file)!r}, "w").write(status + f"PeakAnon: {{peaks['RssAnon']}} kB\\nPeakFile: {{peaks['RssFile']}} kB\\nChildrenHWM: {{children}} kB\\n")
atexit.register(report)
import attnmt.cli.train
attnmt.cli.train.main()
"""
    cmd = [sys.executable, "-c", code, "model=tiny", f"data.root={corpus}", f"data.cache_dir={cache}",
           f"data.tokenizer.vocab_size={vocab_size}", "data.splits.test=valid", f"train.run_dir={run_dir}",
           f"optim.lr={lr}", "train.max_steps=20", "train.valid_every=100000", "train.log_every=1",
           "train.device=cpu", "train.max_tokens=4096"]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"attnmt-train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    phases = {}
    for line in proc.stderr.splitlines():
        stamp = _STAMP.match(line)
        if not stamp:
            continue
        seconds = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - started
        for name, pattern in _PHASES.items():
            if name not in phases and pattern.search(line):
                phases[name] = seconds
    status = hwm_file.read_text()
    peak, anon, file, children = (int(re.search(rf"{name}:\s+(\d+) kB", status).group(1)) / 1024
                                  for name in ("VmHWM", "PeakAnon", "PeakFile", "ChildrenHWM"))
    return {"phases": phases, "wall": wall, "peak_mb": peak, "anon_mb": anon, "file_mb": file, "children_mb": children}


def cache_on_disk(cache: Path) -> dict[str, int]:
    """Bytes under ``cache`` by kind of file: ``raw``, ``clean``, ``tokenized``, ``kept`` (the name before
    its first dash) and ``tokenizers`` (the folder), the lock left out."""
    sizes: dict[str, int] = {}
    for path in cache.rglob("*"):
        if path.is_file() and path.name != ".lock":
            top = path.relative_to(cache).parts[0]
            kind = top if top == "tokenizers" else top.split("-")[0]
            sizes[kind] = sizes.get(kind, 0) + path.stat().st_size
    return sizes


def scale(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows, disk = [], []
    for n in args.scale:
        corpus = synthetic_corpus(Path(args.root), n, out / f"corpus-{n}")
        cache, runs = out / f"cache-{n}", out / f"runs-{n}"
        for folder in (cache, runs):
            shutil.rmtree(folder, ignore_errors=True)
        first = timed_run(corpus, cache, runs / "first", "1e-3", args.vocab_size)
        second = timed_run(corpus, cache, runs / "second", "2e-3", args.vocab_size)
        rows.append((n, first, second))
        disk.append((n, sum(f.stat().st_size for f in corpus.glob("train.*")), cache_on_disk(cache)))
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(runs, ignore_errors=True)

    def at(run: dict, phase: str) -> str:
        return f"{run['phases'][phase]:.1f}" if phase in run["phases"] else "-"

    print(f"\nattnmt-train model=tiny, 20 updates, data.tokenizer.vocab_size={args.vocab_size}; "
          f"seconds from the command's start; {os.cpu_count()} cores\n")
    print("| pairs | run | read+clean done | tokenizer done | tokenized | first update | wall | peak RSS MB | "
          "of which anonymous, peak | file-backed, peak | largest helper process MB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, first, second in rows:
        for name, run in (("first (empty cache)", first), ("second (new run dir)", second)):
            print(f"| {n:,} | {name} | {at(run, 'read+clean')} | {at(run, 'tokenizer')} | {at(run, 'tokenize')} | "
                  f"{at(run, 'first update')} | {run['wall']:.1f} | {run['peak_mb']:,.0f} | {run['anon_mb']:,.0f} | "
                  f"{run['file_mb']:,.0f} | {run['children_mb']:,.0f} |")
    kinds = ("raw", "clean", "tokenized", "kept", "tokenizers")
    print("\nThe cache on disk after both runs (MB; each kind's files with their seals), against the train text\n")
    print(f"| pairs | train text | {' | '.join(kinds)} | total | total / text |")
    print("| ---: | ---: |" + " ---: |" * (len(kinds) + 2))
    for n, text, sizes in disk:
        total = sum(sizes.values())
        print(f"| {n:,} | {text / 1e6:,.1f} | {' | '.join(f'{sizes.get(k, 0) / 1e6:,.1f}' for k in kinds)} | "
              f"{total / 1e6:,.1f} | {total / text:.2f}x |")
    if len(rows) >= 2:
        (n1, a1, b1), (n2, a2, b2) = rows[0], rows[-1]
        for name, x, y in (("first", a1, a2), ("second", b1, b2)):
            growth = {key: (y[key] - x[key]) * 2**20 / (n2 - n1) for key in ("peak_mb", "anon_mb", "file_mb")}
            print(f"\n{name} run, growth per pair ({n1:,} -> {n2:,} pairs): peak RSS {growth['peak_mb']:.1f} bytes, "
                  f"anonymous {growth['anon_mb']:.1f} bytes, file-backed {growth['file_mb']:.1f} bytes")


def main() -> None:
    default_root = Path(os.environ.get("ATTNMT_DATA", "../shared/data")) / "multi30k"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=folder_with("train.de", "train.en"), default=default_root,
                        help="the Multi30k folder")
    parser.add_argument("--max-tokens", type=positive, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 2])
    parser.add_argument("--update-freq", type=positive, default=1, help="batches per update (train.update_freq)")
    parser.add_argument("--sort-window", type=at_least(0), default=0, help="train.sort_window: updates sorted together")
    parser.add_argument("--vocab-size", type=at_least(16), default=8000)
    parser.add_argument("--out", type=new_or_folder, default=Path("data/bench"),
                        help="corpora, caches and runs of the benchmark")
    parser.add_argument("--scale", type=positive, nargs="+", help="corpus sizes (pairs) for the scale benchmark")
    parser.add_argument("--keep", action="store_true", help="keep the scale runs' caches and run folders")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.scale:
        scale(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
