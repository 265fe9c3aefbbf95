#!/usr/bin/env python3
"""Training recipes side by side: each setting x each seed trained, then scored on valid and test.

    python scripts/bench_recipes.py --setting before="train.sort_window=0 train.max_tokens=4096 train.update_freq=1" \\
        --setting shipped= --seeds 1 2 3 [--experiment quickstart] [--parallel 2] [--threads 1]
        [--multi30k ../shared/data/multi30k] [--work runs/recipes] [--decode beam_size=5 ...]

A setting is ``NAME=OVERRIDES``: Hydra overrides of ``attnmt-train experiment=EXPERIMENT`` (empty: the
experiment as shipped). Every run trains in ``WORK/NAME/seed<N>`` with ``train.seed=N``; ``--parallel``
runs train side by side, each on ``--threads`` threads (on a 2-core CPU, two 1-thread runs make about
1.4x the updates of one 2-thread run). Each run's ``best.pt`` is then scored by ``attnmt-evaluate`` on
the full valid split and on the test split (the decoding of ``--decode``, else the shipped beam search).

The table gives, per setting, the mean and standard deviation over seeds of: valid BLEU at each
validation during training (the curve), valid and test BLEU of ``best.pt``, the training command's
wall time and its target tokens per second. Choose on valid; test is reported, never tuned on. A run
whose ``result.json`` exists is not run again, so the script continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_VALID = re.compile(r"valid at step (\d+): .*\| BLEU ([\d.]+)")
_SPEED = re.compile(r": step \d+ \| .* \| ([\d.]+) tok/s")


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not re.fullmatch(r"[\w.-]+", name):
        raise argparse.ArgumentTypeError(f"--setting {text!r}: write NAME=OVERRIDES, e.g. mix='train.update_freq=4'")
    return name, shlex.split(overrides)


def run(cmd: list[str], log: Path, env: dict[str, str]) -> str:
    with open(log, "a") as err:
        err.write("+ " + shlex.join(cmd) + "\n")
        err.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd[:4])} ... failed with exit status {proc.returncode}; see {log}")
    return proc.stdout


def score(ckpt: Path, split: str, args: argparse.Namespace, log: Path, env: dict[str, str]) -> float:
    report = run([sys.executable, "-m", "attnmt.cli.evaluate", f"ckpt={ckpt}", f"split={split}",
                  f"data.root={args.multi30k.resolve()}", *args.decode], log, env)
    return json.loads(report.strip().splitlines()[-1])["bleu"]


def trained_weights(last: Path, out: Path) -> Path | None:
    """With ``train.ema_decay``, ``out``: a checkpoint of the run's last trained weights (not their
    moving average); None without EMA."""
    import torch  # here: the script starts without torch

    from attnmt.checkpoint import load_checkpoint, save_checkpoint, trained_weights_checkpoint

    state = trained_weights_checkpoint(load_checkpoint(last))
    if state is None:
        return None
    save_checkpoint({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}, out)
    return out


def train_and_score(name: str, overrides: list[str], seed: int, slots: queue.Queue, args: argparse.Namespace) -> dict:
    """One run (skipped when its result.json exists): train, then score best.pt on valid and test.
    ``slots`` hands out data cache folders, one per run in flight (no two processes build one cache)."""
    slot = slots.get()
    try:
        return _train_and_score(name, overrides, seed, slot, args)
    finally:
        slots.put(slot)


def _train_and_score(name: str, overrides: list[str], seed: int, slot: int, args: argparse.Namespace) -> dict:
    run_dir = (args.work / name / f"seed{seed}").resolve()
    result_file = run_dir / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        result["curve"] = {int(step): bleu for step, bleu in result["curve"].items()}  # JSON keys are strings
        return result
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "bench.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    run([sys.executable, "-m", "attnmt.cli.train", f"experiment={args.experiment}", f"train.seed={seed}",
         f"train.run_dir={run_dir}", "train.resume=none", "train.progress_bar=false",
         f"data.root={args.multi30k.resolve()}", f"data.cache_dir={args.work.resolve() / f'cache{slot}'}",
         *overrides], log, env)
    wall = time.perf_counter() - started
    text = (run_dir / "train.log").read_text()
    speeds = [float(s) for s in _SPEED.findall(text)]
    ckpt = run_dir / "checkpoints" / "best.pt"
    result = {
        "setting": name, "seed": seed, "overrides": overrides, "train_s": wall,
        "tok_s": statistics.median(speeds) if speeds else float("nan"),
        "curve": {int(step): float(bleu) for step, bleu in _VALID.findall(text)},
        "valid": score(ckpt, "valid", args, log, env), "test": score(ckpt, "test", args, log, env),
    }
    last = run_dir / "checkpoints" / "last.pt"
    trained = trained_weights(last, run_dir / "checkpoints" / "trained.pt")
    if trained is not None:  # with train.ema_decay: the same run without the average, for free
        result["trained_valid"] = score(trained, "valid", args, log, env)
        result["trained_test"] = score(trained, "test", args, log, env)
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{name} seed {seed}: valid {result['valid']:.2f} test {result['test']:.2f} "
          f"({wall / 60:.1f} min, {result['tok_s']:,.0f} tok/s)", flush=True)
    return result


def speed(args: argparse.Namespace) -> None:
    """Each setting alone on ``--threads`` threads for ``--speed`` updates, ``--repeats`` rounds
    interleaved; the median target tokens/s of its log lines after the first, and the ratio to the
    first setting."""
    rates: dict[str, list[float]] = {name: [] for name, _ in args.setting}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    log_every = max(1, args.speed // 5)
    for repeat in range(args.repeats):
        for name, overrides in args.setting:
            run_dir = (args.work / "speed" / name / f"r{repeat}").resolve()
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            run([sys.executable, "-m", "attnmt.cli.train", f"experiment={args.experiment}", f"train.run_dir={run_dir}",
                 "train.resume=none", "train.progress_bar=false", f"train.max_steps={args.speed}",
                 f"train.valid_every={args.speed}", "train.valid_max_sentences=1", f"train.log_every={log_every}",
                 f"data.root={args.multi30k.resolve()}", f"data.cache_dir={args.work.resolve() / 'cache0'}",
                 *overrides], run_dir / "bench.log", env)
            lines = [float(x) for x in _SPEED.findall((run_dir / "train.log").read_text())][1:]
            rates[name].append(statistics.median(lines))
            print(f"{name} round {repeat + 1}: {rates[name][-1]:,.0f} target tokens/s", flush=True)
    first = statistics.median(rates[args.setting[0][0]])
    print(f"\nexperiment={args.experiment}; {args.speed} updates per run, {args.repeats} rounds interleaved, "
          f"{args.threads} thread(s); target tokens/s, median of the log windows after the first\n")
    print(f"| setting | target tokens/s (median of rounds) | rounds | vs {args.setting[0][0]} |\n| --- | ---: | --- | ---: |")
    for name, overrides in args.setting:
        med = statistics.median(rates[name])
        label = f"{name} `{' '.join(overrides)}`" if overrides else name
        print(f"| {label} | {med:,.0f} | {', '.join(f'{r:,.0f}' for r in rates[name])} | {med / first:.2f}x |")


def mean_sd(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if math.isfinite(v)]
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(settings: list[tuple[str, list[str]]], results: dict[str, list[dict]]) -> str:
    steps = sorted({step for runs in results.values() for r in runs for step in r["curve"]})
    head = ["setting", "seeds", *[f"valid@{s} (greedy)" for s in steps], "valid (best.pt)", "test", "train min",
            "tgt tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" + " ---: |" * (len(head) - 1)]
    for name, overrides in settings:
        runs = results[name]
        curve = [mean_sd([r["curve"][s] for r in runs if s in r["curve"]]) for s in steps]
        cells = [f"{name} `{' '.join(overrides)}`" if overrides else name, str(len(runs)), *curve,
                 mean_sd([r["valid"] for r in runs]), mean_sd([r["test"] for r in runs]),
                 mean_sd([r["train_s"] / 60 for r in runs], 1), mean_sd([r["tok_s"] for r in runs], 0)]
        lines.append("| " + " | ".join(cells) + " |")
        if all("trained_valid" in r for r in runs):  # the same runs scored without the moving average
            cells = [f"{name}, last.pt without EMA", str(len(runs)), *["" for _ in steps],
                     mean_sd([r["trained_valid"] for r in runs]), mean_sd([r["trained_test"] for r in runs]), "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", type=parse_setting, required=True, metavar="NAME=OVERRIDES")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--multi30k", type=Path,
                        default=Path(os.environ.get("ATTNMT_DATA", "../shared/data")) / "multi30k")
    parser.add_argument("--work", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--parallel", type=int, default=1, help="runs training side by side")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="threads of each run")
    parser.add_argument("--decode", nargs="*", default=[], help="attnmt-evaluate overrides, e.g. len_penalty=1.2")
    parser.add_argument("--speed", type=int, default=0, metavar="UPDATES",
                        help="time each setting alone for this many updates instead (no scores)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of --speed, interleaved")
    args = parser.parse_args()
    if not (args.multi30k / "train.de").is_file():
        parser.error(f"--multi30k {args.multi30k}: no train.de there; point it at a Multi30k folder")
    names = [name for name, _ in args.setting]
    if len(set(names)) != len(names):
        parser.error(f"setting names repeat: {names}")
    if args.parallel < 1 or args.threads < 1:
        parser.error("--parallel and --threads must be at least 1")

    if args.speed:
        if args.speed < 10 or args.repeats < 1:
            parser.error("--speed needs at least 10 updates and --repeats at least 1")
        speed(args)
        return
    jobs = [(name, overrides, seed) for seed in args.seeds for name, overrides in args.setting]
    results: dict[str, list[dict]] = {name: [] for name in names}
    slots: queue.Queue = queue.Queue()
    for slot in range(args.parallel):
        slots.put(slot)
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(train_and_score, name, overrides, seed, slots, args) for name, overrides, seed in jobs]
        for (name, _, _), future in zip(jobs, futures):
            results[name].append(future.result())
    print(f"\nexperiment={args.experiment}; BLEU on Multi30k (sacreBLEU); valid@N: greedy during training, as "
          f"train.valid_decode; best.pt scored with attnmt-evaluate {' '.join(args.decode) or '(shipped beam search)'}; "
          f"{args.parallel} run(s) side by side, {args.threads} thread(s) each\n")
    print(table(args.setting, results))


if __name__ == "__main__":
    main()
