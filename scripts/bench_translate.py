#!/usr/bin/env python3
"""Translation speed and BLEU of one checkpoint on every engine attnmt offers, as a markdown table.

Engines, each with greedy search and beam search (``--beam``, 5):

- ``attnmt native``: ``engine=native`` (:mod:`attnmt.inference.native`), attnmt's own search (fp32 on the CPU, bf16 on GPUs),
  beam search with the shipped stop (once ``beam_size`` hypotheses have ended, as CTranslate2 and
  transformers stop) and with ``beam_stop=exact``;
- ``attnmt ctranslate2 <type>``: ``engine=ctranslate2`` (:mod:`attnmt.inference.ctranslate2`) with compute_type
  float32 and int8 (and float16, bfloat16 on a GPU);
- ``CTranslate2 raw <type>``: the same loaded CTranslate2 model called as its README says, one
  ``translate_batch`` over the whole test set with SentencePiece around it: what attnmt's engine
  costs on top of CTranslate2;
- ``attnmt-translate``: the command as a user runs it, ``input=FILE output=FILE``, a subprocess a run,
  with the native rows' settings; its start-up (measured on a one-line file, the median of three) is
  taken off each run and printed apart;
- ``HF generate``: the model of the ``attnmt-export to=hf`` folder, loaded by ``AutoModelForSeq2SeqLM``,
  searching with ``generate()`` behind attnmt's engine interface (``engine=transformers``'s backend,
  :mod:`attnmt.inference.transformers`), when the model exports (pre-norm with sinusoidal_fairseq
  positions, or post-norm with sinusoidal ones).

Every engine gets the same threads (``--threads``, 2: torch's intra-op threads and CTranslate2's
``intra_threads``), the same batching limit (``--max-tokens`` source tokens) and attnmt's length
limits, and every timed run translates the whole test set from raw lines to detokenized text
(loading excluded). Each engine runs in a process of its own (native, each CTranslate2 compute type,
HF), as a user's program would: loaded into one process beside CTranslate2 and transformers, torch's
own search ran 1.3 to 1.6x slower. Runs are interleaved: repetition 1 of every row, then repetition 2
in reverse order, ..., each after a pause of a second (the engines' thread pools share the cores, and
one that has just finished keeps spinning for a while); the table holds the median of ``--repeats``
runs. Target tokens are the SentencePiece tokens of the output, EOS included. BLEU is sacreBLEU's
(attnmt.evaluation.corpus_scores) on the raw references. The ratio columns divide each row's speed
by raw CTranslate2 float32's, by CTranslate2 float32's at its fastest (the faster of the raw call and
``engine=ctranslate2``, whose batches by length get per-batch length limits where the raw call has
one for the whole set) and by HF ``generate``'s with the same search (``beam5 exact`` is compared with
their ``beam5``). The header names the CPU model: ratios differ between machines.

    python scripts/bench_translate.py --ckpt runs/quickstart/checkpoints/best.pt
    python scripts/bench_translate.py --ckpt PATH --test-sets test2016 --repeats 5 --threads 2

Needs ``pip install -e '.[ct2,hf]'``. See docs/BENCHMARKS.md for the figures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from attnmt import inference
from attnmt.checkpoint import CheckpointError, load_for_inference
from attnmt.config import DecodeConfig, compose
from attnmt.data import read_lines
from attnmt.decoding import max_length
from attnmt.evaluation import corpus_scores
from attnmt.tokenizer import normalize

from _args import at_least, existing_file, positive
from _machine import machine

REPO = Path(__file__).resolve().parents[1]
PAUSE_S = 1.0  # idle time before each timed run (see main)
# name -> (folder under the data root, file stem); the language suffix comes from the checkpoint.
TEST_SETS = {"test2016": ("multi30k", "test2016"), "newstest2014": ("wmt14-en-de-test", "newstest2014")}


@dataclass
class Engine:
    """An engine with one search, in a worker process (its timed runs are kept by the parent's :class:`Row`)."""

    name: str
    search: str  # greedy | beam<k> | beam<k> exact
    run: Callable[[list[str]], list[str]]  # raw source lines -> detokenized translations


@dataclass
class Row:
    """A row of the table in the parent process: an engine in a :class:`Worker`, and its timed runs."""

    name: str
    search: str  # as its Engine's
    worker: "Worker"
    index: int  # the engine's place in its worker
    seconds: list[float] = field(default_factory=list)
    hypotheses: list[str] = field(default_factory=list)


def best_texts(engine: inference.Engine, cfg: DecodeConfig) -> Callable[[list[str]], list[str]]:
    return lambda lines: [t.texts[0] for t in engine.translate(lines, cfg)]


def native_engines(ckpt: Path, device: torch.device, configs: dict[str, DecodeConfig]) -> list[Engine]:
    from attnmt.inference import native

    engine = inference.Engine("native", *native.open_backend([ckpt], device, "default"))
    return [Engine("attnmt native", search, best_texts(engine, cfg)) for search, cfg in configs.items()]


def ctranslate2_engines(ckpt: Path, device: torch.device, compute_type: str, threads: int,
                        configs: dict[str, DecodeConfig]) -> list[Engine]:
    """attnmt's engine=ctranslate2, and the same translator called directly (``raw``)."""
    import sentencepiece as spm

    from attnmt.export.ctranslate2 import JOINT_SPM, SOURCE_SPM, TARGET_SPM
    from attnmt.inference.ctranslate2 import CTranslate2Backend, cached_model, search_options

    model_dir = cached_model([ckpt])
    backend = CTranslate2Backend(model_dir, device.type, device.index or 0, compute_type, threads)
    engine = inference.Engine("ctranslate2", backend, backend.tokenizer, backend.run_config or {})
    joint = (model_dir / JOINT_SPM).is_file()
    source_sp = spm.SentencePieceProcessor(model_file=str(model_dir / (JOINT_SPM if joint else SOURCE_SPM)))
    target_sp = spm.SentencePieceProcessor(model_file=str(model_dir / (JOINT_SPM if joint else TARGET_SPM)))

    def raw(lines: list[str], cfg: DecodeConfig) -> list[str]:
        pieces = [source_sp.encode(normalize(line), out_type=str) for line in lines]
        limit = max(max_length(len(p) + 1, cfg.max_len_a, cfg.max_len_b, backend.max_positions) for p in pieces)
        options = search_options(cfg, limit, backend.suppress)
        options.update(num_hypotheses=1, return_scores=False, return_end_token=False)  # what a user would ask
        results = backend.translator.translate_batch(pieces, max_batch_size=cfg.max_tokens, batch_type="tokens", **options)
        return [target_sp.decode(result.hypotheses[0]) for result in results]

    rows = []
    for search, cfg in configs.items():
        rows.append(Engine(f"attnmt ctranslate2 {compute_type}", search, best_texts(engine, cfg)))
        rows.append(Engine(f"CTranslate2 raw {compute_type}", search, lambda lines, cfg=cfg: raw(lines, cfg)))
    return rows


def hf_engines(ckpt: Path, device: torch.device, configs: dict[str, DecodeConfig], out: Path) -> list[Engine]:
    from transformers import AutoModelForSeq2SeqLM

    from attnmt.export import ExportError, hf
    from attnmt.inference.transformers import TransformersBackend

    model, tokenizer, _ = load_for_inference(ckpt)
    try:
        hf.export(model, tokenizer, out)
    except ExportError as err:
        print(f"HF rows left out: {err}", file=sys.stderr)
        return []
    backend = TransformersBackend(AutoModelForSeq2SeqLM.from_pretrained(out).to(device))
    engine = inference.Engine("transformers", backend, tokenizer)
    return [Engine("HF generate", search, best_texts(engine, cfg)) for search, cfg in configs.items()]


def serve(conn: Connection, kind: str, ckpt: Path, device: str, threads: int,
          configs: dict[str, DecodeConfig]) -> None:
    """A worker process: loads the engines of ``kind`` (``native``, ``ctranslate2:<compute type>`` or
    ``hf``), sends their (name, search) rows, then times ``(row, lines)`` requests until ``None``."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="attnmt-bench-") as tmp:
        try:
            if kind == "native":
                rows = native_engines(ckpt, device, configs)
            elif kind == "hf":
                rows = hf_engines(ckpt, device, configs, Path(tmp) / "model")
            else:
                rows = ctranslate2_engines(ckpt, device, kind.split(":")[1], threads, configs)
        except BaseException as err:  # reported by the parent, which names the engine
            conn.send(f"{type(err).__name__}: {err}")
            raise
        conn.send([(row.name, row.search) for row in rows])
        while (request := conn.recv()) is not None:
            index, lines = request
            start = time.perf_counter()
            hypotheses = rows[index].run(lines)
            conn.send((time.perf_counter() - start, hypotheses))


class Worker:
    """The parent's handle on a :func:`serve` process."""

    def __init__(self, kind: str, *args) -> None:
        self.kind = kind
        self.conn, child = mp.Pipe()
        self.process = mp.get_context("spawn").Process(target=serve, args=(child, kind, *args), daemon=True)
        self.process.start()
        child.close()  # the worker's end lives in the worker: if it dies, recv() raises instead of waiting
        reply = self.conn.recv()
        if isinstance(reply, str):
            raise SystemExit(f"the {kind} engine failed to load: {reply}")
        self.rows = reply

    def run(self, index: int, lines: list[str]) -> tuple[float, list[str]]:
        self.conn.send((index, lines))
        try:
            return self.conn.recv()
        except EOFError:
            raise SystemExit(f"the {self.kind} engine's process died (its error is above)") from None

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


class CommandWorker:
    """``attnmt-translate input=FILE output=FILE`` as a user runs it, a subprocess a run, with the same
    rows interface as :class:`Worker`. Its start-up (interpreter, imports, loading the checkpoint) is
    measured apart, as the median time of the command on a one-line file, and taken off each run:
    the row's speed is the translation's, its start-up is printed in the header."""

    kind = "command"

    def __init__(self, ckpt: Path, threads: int, configs: dict[str, list[str]], tmp: Path) -> None:
        self.ckpt, self.configs, self.tmp = ckpt, configs, tmp
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.rows = [("attnmt-translate", search) for search in configs]
        one = tmp / "one.txt"
        one.write_text("Ein Hund.\n", encoding="utf-8")
        self.startups = [self._run(one, next(iter(configs.values()))) for _ in range(3)]
        self.startup = statistics.median(self.startups)

    def _run(self, source: Path, overrides: list[str]) -> float:
        output = self.tmp / "out.txt"
        command = [sys.executable, "-m", "attnmt.cli.translate", f"ckpt={self.ckpt}", f"input={source}",
                   f"output={output}", "device=cpu", *overrides]
        start = time.perf_counter()
        done = subprocess.run(command, env=self.env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
        return seconds

    def run(self, index: int, lines: list[str]) -> tuple[float, list[str]]:
        source = self.tmp / "input.txt"
        source.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        seconds = self._run(source, self.configs[self.rows[index][1]])
        return seconds - self.startup, (self.tmp / "out.txt").read_text(encoding="utf-8").splitlines()

    def close(self) -> None:
        pass


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for package in ("ctranslate2", "transformers"):  # metadata only: the engines live in their own processes
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        parts.append(f"attnmt {commit}")
    except OSError:
        pass
    return ", ".join(parts)


def print_table(test_set: str, rows: list[Row], n_sentences: int, tgt_tokens: dict[str, int],
                bleu: dict[str, float]) -> None:
    seconds = {(r.name, r.search): statistics.median(r.seconds) for r in rows}

    def ratio(row: Row, peer: str) -> str:
        same = row.search.split()[0]  # "beam5 exact" against the peer's beam5
        if peer == "CTranslate2 fp32":  # CTranslate2 at its fastest: called raw, or through engine=ctranslate2
            times = [seconds[p, same] for p in ("CTranslate2 raw float32", "attnmt ctranslate2 float32")
                     if (p, same) in seconds]
            return f"{min(times) / seconds[row.name, row.search]:.2f}x" if times else "n/a"
        return f"{seconds[peer, same] / seconds[row.name, row.search]:.2f}x" if (peer, same) in seconds else "n/a"

    print(f"\n{test_set}: {n_sentences} sentences, median of {len(rows[0].seconds)} runs\n")
    print("| engine | search | sentences/s | target tokens/s | BLEU | speed / CT2 raw fp32 | speed / CT2 fp32 at "
          "its fastest | speed / HF |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        key = f"{r.name}/{r.search}"
        t = seconds[r.name, r.search]
        print(f"| {r.name} | {r.search} | {n_sentences / t:.1f} | {tgt_tokens[key] / t:.0f} | {bleu[key]:.2f} | "
              f"{ratio(r, 'CTranslate2 raw float32')} | {ratio(r, 'CTranslate2 fp32')} | {ratio(r, 'HF generate')} |")
    for (name, search), t in seconds.items():
        raw = seconds.get(("CTranslate2 raw float32", search))
        if name == "attnmt ctranslate2 float32" and raw:
            print(f"\nattnmt engine=ctranslate2 over raw CTranslate2 (float32, {search}): {100 * (t / raw - 1):+.1f}% time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ckpt", required=True, type=existing_file, help="an attnmt checkpoint")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("ATTNMT_DATA", REPO.parent / "shared" / "data")),
                        help="the folder holding multi30k/ and wmt14-en-de-test/ ($ATTNMT_DATA, else ../shared/data)")
    parser.add_argument("--test-sets", default="test2016,newstest2014", help=f"comma-separated, of {', '.join(TEST_SETS)}")
    parser.add_argument("--max-sentences", type=at_least(0), default=0,
                        help="only the first N lines of each test set (0: all)")
    parser.add_argument("--engines", default="native,command,ctranslate2,hf",
                        help="comma-separated: native, command (attnmt-translate as a subprocess), ctranslate2, hf")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=positive, default=2, help="CPU threads of every engine")
    parser.add_argument("--repeats", type=positive, default=3, help="timed runs per row (interleaved); the median is reported")
    parser.add_argument("--beam", type=at_least(2), default=5, help="beam size of the beam rows")
    parser.add_argument("--max-tokens", type=positive, default=4096, help="source tokens per batch, padding included")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available here")
    engines = args.engines.split(",")
    if unknown := set(engines) - {"native", "command", "ctranslate2", "hf"}:
        parser.error(f"--engines: unknown {', '.join(sorted(unknown))}; use native, command, ctranslate2, hf")

    try:
        _, tokenizer, run_config = load_for_inference(args.ckpt)
    except CheckpointError as err:
        parser.error(f"--ckpt: {err}")
    src_lang, tgt_lang = run_config["data"]["src_lang"], run_config["data"]["tgt_lang"]
    test_sets = args.test_sets.split(",")
    if unknown := [name for name in test_sets if name not in TEST_SETS]:
        parser.error(f"--test-sets: unknown {', '.join(map(repr, unknown))}; use {', '.join(TEST_SETS)}")
    for name in test_sets:
        folder, stem = TEST_SETS[name]
        for lang in (src_lang, tgt_lang):
            if not (args.data / folder / f"{stem}.{lang}").is_file():
                parser.error(f"--test-sets {name}: {args.data / folder / f'{stem}.{lang}'} does not exist (the "
                             f"checkpoint translates {src_lang}->{tgt_lang}); set --data to the folder holding {folder}/")
    base = compose("translate", ["ckpt=unused", f"max_tokens={args.max_tokens}"])  # the shipped search settings
    configs = {"greedy": replace(base, beam_size=1), f"beam{args.beam}": replace(base, beam_size=args.beam)}
    # The shipped stop is CTranslate2's and transformers' (once beam_size hypotheses have ended); the
    # native engine also runs with the exact stop, in a row of its own.
    native_configs = {**configs, f"beam{args.beam} exact": replace(base, beam_size=args.beam, beam_stop="exact")}

    kinds = []
    for engine in engines:
        if engine == "ctranslate2":
            kinds += [f"ctranslate2:{t}" for t in ["float32", "int8"] + (["float16", "bfloat16"] if args.device == "cuda" else [])]
        else:
            kinds.append(engine)
    tmp = Path(tempfile.mkdtemp(prefix="attnmt-bench-command-"))
    workers = []
    for kind in kinds:
        if kind == "command":
            overrides = {search: [f"max_tokens={args.max_tokens}", f"beam_size={cfg.beam_size}", f"beam_stop={cfg.beam_stop}"]
                         for search, cfg in native_configs.items()}
            workers.append(CommandWorker(args.ckpt, args.threads, overrides, tmp))
        else:
            workers.append(Worker(kind, args.ckpt, args.device, args.threads,
                                  native_configs if kind == "native" else configs))
    rows = [Row(name, search, worker, i) for worker in workers for i, (name, search) in enumerate(worker.rows)]
    if not rows:
        raise SystemExit("no engine to time (see above)")

    print(f"date {datetime.now().isoformat(timespec='minutes')}; machine {machine()}; {args.threads} threads")
    print(f"versions: {versions()}")
    print(f"command: {' '.join(sys.argv)}")
    for worker in workers:
        if worker.kind == "command":
            print(f"attnmt-translate's start-up (a one-line file, taken off its rows): {worker.startup:.2f} s "
                  f"(runs: {', '.join(f'{t:.2f}' for t in worker.startups)})")
    print(f"checkpoint {args.ckpt} ({src_lang}->{tgt_lang}); max_tokens {args.max_tokens}, "
          f"length limit {base.max_len_a} * source + {base.max_len_b}, len_penalty {base.len_penalty}; "
          f"each engine in a process of its own")
    for name in test_sets:
        folder, stem = TEST_SETS[name]
        sources = read_lines(args.data / folder / f"{stem}.{src_lang}")
        references = read_lines(args.data / folder / f"{stem}.{tgt_lang}")
        if args.max_sentences:
            sources, references = sources[: args.max_sentences], references[: args.max_sentences]
        for row in rows:  # warm-up: first calls allocate, load kernels, fill caches
            row.worker.run(row.index, sources[:16])
        for repeat in range(args.repeats):
            # Every other repetition backwards, so that no row always follows the same one.
            for row in rows if repeat % 2 == 0 else rows[::-1]:
                # The previous engine's OpenMP threads spin for a while after it returns; on a few
                # cores they would slow whichever engine runs next. A pause lets them sleep.
                time.sleep(PAUSE_S)
                seconds, row.hypotheses = row.worker.run(row.index, sources)
                row.seconds.append(seconds)
                print(f"  {name} run {repeat + 1}/{args.repeats}: {row.name} {row.search} {seconds:.2f} s",
                      file=sys.stderr, flush=True)
        tgt_tokens, bleu = {}, {}
        for row in rows:
            key = f"{row.name}/{row.search}"
            tgt_tokens[key] = sum(len(ids) + 1 for ids in tokenizer.encode_tgt([normalize(h) for h in row.hypotheses]))
            bleu[key] = corpus_scores(row.hypotheses, references, tgt_lang)["bleu"]
        print_table(f"{name} ({src_lang}->{tgt_lang})", rows, len(sources), tgt_tokens, bleu)
        for row in rows:
            row.seconds = []
    for worker in workers:
        worker.close()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
