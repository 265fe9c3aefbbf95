"""Smoke tests of the scripts in ``scripts/``: each runs end to end at tiny sizes, so none rots unseen."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import FIXTURE_CORPUS

REPO = Path(__file__).resolve().parents[1]
# A few updates of a tiny model on the fixture corpus (its test split is named test).
TINY = ("model=tiny model.d_model=32 model.ffn_dim=64 data.splits.test=test data.tokenizer.vocab_size=400 "
        "train.max_tokens=256 train.max_steps=4 train.valid_every=2 train.valid_max_sentences=8 train.device=cpu")


def run_script(*args: str, cwd: Path, returncode: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / args[0]), *args[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc


def refused(*args: str, cwd: Path, message: str) -> None:
    """The script stops at once with argparse's one line (exit status 2) holding ``message``, no traceback."""
    proc = run_script(*args, cwd=cwd, returncode=2)
    assert "Traceback" not in proc.stderr and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def corpus_named_like_multi30k(folder: Path, langs=("de", "en")) -> Path:
    """The fixture corpus with Multi30k's split names (train, valid, test2016)."""
    folder.mkdir(parents=True)
    for lang in langs:
        for split, theirs in (("train", "train"), ("valid", "valid"), ("test2016", "test")):
            shutil.copy(FIXTURE_CORPUS / f"{theirs}.{lang}", folder / f"{split}.{lang}")
    return folder


# Overrides that make the quickstart recipe's runs tiny: a few updates of a d_model 32 model.
TINY_QUICKSTART = ["model.d_model=32", "model.ffn_dim=64", "model.n_heads=2", "data.tokenizer.vocab_size=400",
                   "train.max_tokens=256", "train.update_freq=1", "train.valid_every=2", "train.valid_max_sentences=8",
                   "train.device=cpu", "train.ema_decay=0.0"]


def test_bench_recipes_trains_scores_and_tabulates(tmp_path):
    work = tmp_path / "work"
    common = ("--multi30k", str(FIXTURE_CORPUS), "--work", str(work), "--threads", "1", "--decode", "beam_size=2")
    # 40 updates: enough for BLEU to leave 0 and differ between valid and test, so that a column taken
    # for another shows.
    tiny = TINY.replace("train.max_steps=4 train.valid_every=2", "train.max_steps=40 train.valid_every=20")
    tiny += " optim.lr=5e-3 optim.warmup_steps=10"
    proc = run_script("bench_recipes.py", "--setting", f"plain={tiny}",
                      "--setting", f"ema={tiny} train.ema_decay=0.9 train.update_freq=2 train.sort_window=1",
                      "--parallel", "2", "--seeds", "1", *common, cwd=tmp_path)
    rows = {line.split(" | ")[0].lstrip("| ").split(" `")[0]: line for line in proc.stdout.splitlines()
            if line.startswith("| plain") or line.startswith("| ema")}
    assert set(rows) == {"plain", "ema", "ema, last.pt without EMA"}, proc.stdout
    for name, label in (("plain", "plain"), ("ema", "ema"), ("ema", "ema, last.pt without EMA")):
        result = json.loads((work / name / "seed1" / "result.json").read_text())
        assert result["seed"] == 1 and sorted(result["curve"]) == ["20", "40"]
        cells = [cell.strip() for cell in rows[label].strip("| ").split(" | ")]
        # setting, seeds, valid@20, valid@40, valid (best.pt), test, ...: the table shows the runs' results
        if label.endswith("without EMA"):
            assert cells[4:6] == [f"{result['trained_valid']:.2f}", f"{result['trained_test']:.2f}"], cells
        else:
            values = result["curve"]["20"], result["curve"]["40"], result["valid"], result["test"]
            assert 0 < result["valid"] != result["test"], result
            assert cells[2:6] == [f"{v:.2f}" for v in values], cells
    # ... and the results are what attnmt-evaluate says of the saved checkpoint, with the script's search settings
    evaluate = subprocess.run([sys.executable, "-m", "attnmt.cli.evaluate", f"ckpt={work / 'plain/seed1/checkpoints/best.pt'}",
                               "split=valid", f"data.root={FIXTURE_CORPUS}", "beam_size=2"], capture_output=True, text=True,
                              cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})  # as the script scored it
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    plain = json.loads((work / "plain" / "seed1" / "result.json").read_text())
    assert plain["valid"] == json.loads(evaluate.stdout.strip().splitlines()[-1])["bleu"]


@pytest.mark.slow  # three more runs of the script: about 20 s
def test_bench_recipes_reads_finished_runs_and_times_settings(tmp_path):
    work = tmp_path / "work"
    common = ("--multi30k", str(FIXTURE_CORPUS), "--work", str(work), "--threads", "1", "--decode", "beam_size=2")
    run_script("bench_recipes.py", "--setting", f"plain={TINY}", "--seeds", "1", *common, cwd=tmp_path)
    # A second call reads the results instead of training again, beside a run it trains.
    again = run_script("bench_recipes.py", "--setting", f"plain={TINY}", "--seeds", "1", "2", *common, cwd=tmp_path)
    assert "plain seed 1" not in again.stdout and "plain seed 2" in again.stdout and "| plain" in again.stdout

    speed = run_script("bench_recipes.py", "--speed", "10", "--repeats", "1", "--setting", f"a={TINY}", *common,
                       cwd=tmp_path)
    assert "| a `" in speed.stdout and "1.00x |" in speed.stdout


def test_bench_matmul_prints_its_table_and_refuses_bad_sizes(tmp_path):
    proc = run_script("bench_matmul.py", "--threads", "1", "--rows", "4,2", "--d-model", "8", "--vocab", "16",
                      "--shapes", "1", "--calls", "1", cwd=tmp_path)
    assert sum(line.startswith("| 4 x 8") or line.startswith("| 2 x 8") for line in proc.stdout.splitlines()) == 4
    for args, message in ((["--threads", "0"], "argument --threads: must be a whole number of at least 1, got 0"),
                          (["--calls", "0"], "argument --calls: must be a whole number of at least 1, got 0"),
                          (["--rows", ""], "argument --rows: must list one or more whole numbers")):
        refused("bench_matmul.py", *args, cwd=tmp_path, message=message)


def test_bench_train_times_a_tiny_model_against_hf_and_refuses_an_unknown_one(tmp_path):
    import importlib.util

    with_hf = importlib.util.find_spec("transformers") is not None  # the hf extra; without it, attnmt alone
    proc = run_script("bench_train.py", "--device", "cpu", "--models", "tiny", "--lengths", "multi30k",
                      "--max-tokens", "256", "--steps", "1", "--warmup", "0", "--compile", "off",
                      "--precision", "fp32", "--vocab", "64", "--threads", "1", *([] if with_hf else ["--no-hf"]),
                      cwd=tmp_path)
    for impl in ("attnmt", "hf-marian") if with_hf else ("attnmt",):
        assert re.search(rf"tiny multi30k 256 compile=off {impl}: [\d,]+ tgt tok/s", proc.stdout), proc.stdout
    refused("bench_train.py", "--models", "nosuch", "--no-hf", cwd=tmp_path, message="--models: no model config 'nosuch'")


def test_bench_train_compares_every_shipped_model_with_hf(monkeypatch):
    """The GPU throughput call runs --models base and big against HF Marian: none may stop at the check."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    bench_train = importlib.import_module("bench_train")
    models = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
    assert {"base", "big", "tiny"} <= set(models)
    for name in models:
        bench_train.check_comparable(bench_train.load_model_config(name, 64))
    learned = replace(bench_train.load_model_config("tiny", 64), positions="learned")
    with pytest.raises(SystemExit, match="positions='learned': run with --no-hf"):
        bench_train.check_comparable(learned)


def test_check_env_names_what_to_carry_in_one_line(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra, which check_env requires: pip install -e '.[hf]'")
    ok = run_script("gpu/check_env.py", "--device", "cpu", cwd=tmp_path, env={"PYTHONPATH": str(REPO / "src")})
    assert ok.stdout.strip().splitlines()[-1].startswith("check_env: ok")
    assert re.search(r"^  datasets +\d", ok.stdout, re.MULTILINE) and re.search(r"^  hydra +\d", ok.stdout, re.MULTILINE)
    bad = run_script("gpu/check_env.py", "--device", "cpu", "--require", "sacrebleu>=99", "--require", "numpy<1",
                     cwd=tmp_path, returncode=1, env={"PYTHONPATH": str(REPO / "src")})
    assert re.fullmatch(r"check_env: FAILED in \d+ s: sacrebleu [\d.]+ is outside --require's >=99; carry a wheel that "
                        r"fits \(\.\./shared/tools/device-wheels 'sacrebleu>=99'\)", bad.stderr.strip().splitlines()[-1])
    assert "warning: numpy" in bad.stdout and "newer than it declares" in bad.stdout  # an upper bound only warns


def test_the_first_gpu_call_stops_in_seconds_where_attnmt_cannot_run(tmp_path):
    """An interpreter without the packages (here: no site-packages at all) ends the call at its first step."""
    bare = tmp_path / "python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu" / "first_call.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": str(bare), "QUICK": "1", "OUT": str(out),
                                            "WORK": str(tmp_path / "work")})
    assert proc.returncode == 1, proc.stdout[-2000:]
    console = (out / "console.log").read_text()
    # Without .whl/ (CI), the check names what is missing; with it, pip itself is missing and says so.
    assert ("check_env: FAILED" in console and "first_call.sh: stopped" in console) or (
        "the wheels in .whl/ did not install" in console), console[-2000:]
    assert "== 2." not in console
    assert int(re.search(r"first_call.sh: done after (\d+) s", console).group(1)) < 30


@pytest.mark.slow  # the whole first GPU call at tiny sizes on the CPU: about a minute
def test_the_first_gpu_call_rehearsed_on_the_cpu(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra (the throughput step): pip install -e '.[hf]'")
    out = tmp_path / "out"
    env = {**os.environ, "QUICK": "1", "OUT": str(out), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "MULTI30K": str(corpus_named_like_multi30k(tmp_path / "multi30k"))}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu" / "first_call.sh")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    # The 8 files a device call may bring back, each written by its step.
    assert sorted(p.name for p in out.iterdir()) == [
        "console.log", "cuda_tests.xml", "de_en.eval.jsonl", "de_en.test2016.hyp", "de_en.train.log", "env.txt",
        "summary.md", "throughput.md"]
    console = (out / "console.log").read_text()
    assert console == proc.stdout  # everything printed, from the first line
    for step in ("1. environment", "2. CUDA tests", "3. Multi30k de->en", "4. throughput"):
        assert re.search(rf"^== {re.escape(step)}: exit status 0 after \d+ s$", console, re.MULTILINE), step
    assert re.search(r'tests="5"', (out / "cuda_tests.xml").read_text()) and 'failures="0"' in (
        out / "cuda_tests.xml").read_text()
    assert (out / "env.txt").read_text().strip().splitlines()[-1].startswith("check_env: ok")
    assert len([line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| de->en |")]) == 2
    assert len((out / "de_en.test2016.hyp").read_text().splitlines()) == 40
    assert "| tiny | multi30k | 256 | off |" in (out / "throughput.md").read_text()


def test_bench_data_measures_batches_and_refuses_bad_arguments(tmp_path):
    common = ("--root", str(FIXTURE_CORPUS), "--vocab-size", "400", "--out", str(tmp_path / "out"))
    proc = run_script("bench_data.py", *common, "--max-tokens", "512", "--workers", "0", cwd=tmp_path)
    assert "|        512 |       0 |" in proc.stdout and "%" in proc.stdout
    refused("bench_data.py", "--root", str(tmp_path), cwd=tmp_path, message=f"{tmp_path} lacks train.de, train.en")
    refused("bench_data.py", "--update-freq", "0", cwd=tmp_path, message="argument --update-freq")


@pytest.mark.slow  # two training processes: about 20 s
def test_bench_data_measures_memory_at_scale(tmp_path):
    common = ("--root", str(FIXTURE_CORPUS), "--vocab-size", "400", "--out", str(tmp_path / "out"))
    scaled = run_script("bench_data.py", *common, "--scale", "300", cwd=tmp_path)
    assert "| 300 | first (empty cache) |" in scaled.stdout and "| 300 | second (new run dir) |" in scaled.stdout
    disk = next(line for line in scaled.stdout.splitlines() if line.startswith("| 300 |") and line.endswith("x |"))
    text, raw, clean, tokenized, kept, tokenizers, total = (float(c) for c in disk.split(" | ")[1:8])
    assert raw > 0 and clean > 0 and tokenized > 0 and tokenizers > 0 and total >= raw + clean + tokenized, disk


def test_bench_translate_times_the_native_engine_and_refuses_bad_inputs(trained_checkpoint, tmp_path):
    data = tmp_path / "data"
    corpus_named_like_multi30k(data / "multi30k")
    common = ("--engines", "native,command", "--max-sentences", "4", "--repeats", "1", "--beam", "2", "--threads", "1")
    proc = run_script("bench_translate.py", "--ckpt", str(trained_checkpoint), "--data", str(data),
                      "--test-sets", "test2016", *common, cwd=tmp_path)
    assert "test2016 (de->en)" in proc.stdout and "attnmt-translate's start-up" in proc.stdout
    # The command as a user runs it writes what the engine returns: the same BLEU, row for row.
    bleu = {tuple(cells[1:3]): cells[5] for line in proc.stdout.splitlines()
            if (cells := [c.strip() for c in line.split("|")])[1:2] in (["attnmt native"], ["attnmt-translate"])}
    for search in ("greedy", "beam2", "beam2 exact"):
        assert bleu["attnmt-translate", search] == bleu["attnmt native", search], (search, proc.stdout)
    notes = tmp_path / "notes.pt"
    notes.write_text("not a checkpoint")
    refused("bench_translate.py", "--ckpt", str(tmp_path / "none.pt"), cwd=tmp_path, message="none.pt is not a file")
    refused("bench_translate.py", "--ckpt", str(notes), cwd=tmp_path, message="--ckpt: ")
    refused("bench_translate.py", "--ckpt", str(trained_checkpoint), "--data", str(data), "--test-sets", "nosuch",
            cwd=tmp_path, message="--test-sets: unknown 'nosuch'")
    refused("bench_translate.py", "--ckpt", str(trained_checkpoint), "--data", str(data), "--test-sets",
            "newstest2014", cwd=tmp_path, message="newstest2014.de does not exist")


def test_backtranslate_refuses_bad_arguments_at_once(tmp_path):
    corpus = corpus_named_like_multi30k(tmp_path / "multi30k")
    refused("backtranslate.py", "--multi30k", str(tmp_path / "none"), cwd=tmp_path, message="none is not a folder")
    (tmp_path / "a_file").write_text("")
    refused("backtranslate.py", "--multi30k", str(corpus), "--work", str(tmp_path / "a_file" / "work"), cwd=tmp_path,
            message="a_file is a file")
    refused("backtranslate.py", "--multi30k", str(corpus), "--parallel", "-5", cwd=tmp_path,
            message="argument --parallel: must be a whole number of at least 1, got -5")
    refused("backtranslate.py", "--multi30k", str(corpus), "--parallel", "400", cwd=tmp_path,
            message="--parallel 400 leaves no monolingual text")


@pytest.mark.slow  # six attnmt commands, each a process of its own: about 25 s
def test_backtranslate_runs_its_steps(tmp_path):
    corpus = corpus_named_like_multi30k(tmp_path / "multi30k")
    proc = run_script("backtranslate.py", "--multi30k", str(corpus), "--work", str(tmp_path / "work"),
                      "--parallel", "300", "--steps", "2", "--reverse-steps", "2", "--train-overrides",
                      *TINY_QUICKSTART, cwd=tmp_path)
    assert "| + tagged back-translation |" in proc.stdout and "gain:" in proc.stdout
    assert len((tmp_path / "work" / "synthetic" / "train.en").read_text().splitlines()) == 100  # one line per line


def test_bench_multilingual_refuses_a_corpus_without_its_languages(tmp_path):
    refused("bench_multilingual.py", "--multi30k", str(FIXTURE_CORPUS), cwd=tmp_path, message="lacks train.fr, train.cs")
    four = tmp_path / "four"
    four.mkdir()
    for split in ("train", "valid", "test2016"):
        for lang in ("en", "de", "fr", "cs"):
            (four / f"{split}.{lang}").write_text("")
    refused("bench_multilingual.py", "--multi30k", str(four), "--steps", "2", cwd=tmp_path,
            message="argument --steps: must be a whole number of at least 3, got 2")


@pytest.mark.slow  # ten attnmt commands, each a process of its own: about 45 s
def test_bench_multilingual_scores_every_direction(multi30k, tmp_path):
    corpus = tmp_path / "multi30k"
    corpus.mkdir()
    for lang in ("en", "de", "fr", "cs"):
        for split, lines in (("train", 300), ("valid", 20), ("test2016", 20)):
            text = (multi30k / f"{split}.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)
            (corpus / f"{split}.{lang}").write_text("".join(text[:lines]), encoding="utf-8")
    proc = run_script("bench_multilingual.py", "--multi30k", str(corpus), "--work", str(tmp_path / "work"),
                      "--steps", "3", "--train-overrides", *TINY_QUICKSTART, cwd=tmp_path)
    assert "| bilingual |" in proc.stdout and "| multilingual |" in proc.stdout


def test_prepare_multi30k_keeps_a_local_copy_and_says_what_to_do_offline(tmp_path):
    corpus = corpus_named_like_multi30k(tmp_path / "multi30k")
    assert "already in" in run_script("prepare_multi30k.py", str(corpus), cwd=tmp_path).stdout
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_script("prepare_multi30k.py", str(tmp_path / "new"), cwd=tmp_path, returncode=1, env=offline)
    assert "could not fetch the HF hub dataset bentrevett/multi30k" in proc.stderr and "Traceback" not in proc.stderr


def checkout_copy(folder: Path) -> Path:
    """The repository's top level linked into ``folder``, so that what a script writes there (runs/, data/,
    .venv) stays out of the checkout."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("scripts", "configs", "src", "tests", "pyproject.toml", "README.md"):
        (folder / name).symlink_to(REPO / name)
    return folder


def this_environment(script: str, **extra: str) -> dict[str, str]:
    """The environment running the tests as the active one, which scripts/_setup.sh uses as it is; the test
    skips where ``script`` would pip install into it (its attnmt is not this checkout's, or the extras the
    script asks for are not all there, as under the bare dev install)."""
    extras = re.search(r"^attnmt_(?:setup|install) (\S+)", (REPO / "scripts" / script).read_text(), re.M).group(1)
    if subprocess.run([sys.executable, str(REPO / "scripts" / "_installed.py"), extras]).returncode != 0:
        pytest.skip(f"scripts/{script} would pip install into this Python: it lacks this checkout's attnmt[{extras}]")
    return {**os.environ, "VIRTUAL_ENV": sys.prefix, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1", **extra}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_readme_shows_two_commands_that_ci_runs_and_the_test_one_collects_the_suite(tmp_path, multi30k):
    commands = run_script("readme_commands.py", cwd=tmp_path).stdout.splitlines()
    assert len(commands) == 2 and all(os.access(REPO / c.split()[0], os.X_OK) for c in commands), commands
    assert "scripts/readme_commands.py" in (REPO / ".ci" / "run").read_text()  # CI runs these, not a copy
    # The test command, run as written in a copy of the checkout, collects the suite this run collected.
    copy = checkout_copy(tmp_path / "clone")
    env = this_environment("test.sh", PYTEST_ADDOPTS="--collect-only -q", ATTNMT_DATA=str(multi30k.parent))
    proc = subprocess.run(["bash", "-c", commands[1]], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = [line for line in proc.stdout.splitlines() if "tests collected" in line]
    assert collected and int(collected[0].split("/")[0].split()[0]) > 300, proc.stdout[-2000:]


@pytest.mark.parametrize("script", ["quickstart.sh", "test.sh"])
def test_the_readme_commands_refuse_an_old_python_in_one_line(script, tmp_path):
    copy = checkout_copy(tmp_path / "clone")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text('#!/bin/sh\ncase "$*" in *platform*) echo 3.9.18 ;; *) exit 1 ;; esac\n')
    (fake / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON")}
    proc = subprocess.run(["bash", f"scripts/{script}"], cwd=copy, env={**env, "PATH": f"{fake}:/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and len(error_lines(proc.stderr)) == 1, proc.stderr
    assert error_lines(proc.stderr) == proc.stderr.strip().splitlines(), proc.stderr
    assert "python3 is Python 3.9.18: attnmt needs 3.10 or newer" in proc.stderr and not (copy / ".venv").exists()


@pytest.mark.parametrize("script", ["quickstart.sh", "test.sh"])
def test_the_readme_commands_say_where_to_put_multi30k_when_there_is_none(script, tmp_path):
    copy = checkout_copy(tmp_path / "clone")  # no ../shared/data beside it
    env = this_environment(script, ATTNMT_DATA=str(tmp_path / "nowhere"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                           HF_HOME=str(tmp_path / "hf"))
    env.pop("MULTI30K", None)
    proc = subprocess.run(["bash", f"scripts/{script}"], cwd=copy, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    said = error_lines(proc.stderr)
    assert len(said) == 1, proc.stderr[-2000:]
    if script == "quickstart.sh":  # no local copy, and the hub out of reach
        assert "could not fetch the HF hub dataset" in said[0] and "put Multi30k" in said[0], said
        assert not (copy / "runs").exists()
    else:
        assert said == proc.stderr.strip().splitlines(), proc.stderr
        assert f"no Multi30k in {tmp_path / 'nowhere'}/multi30k" in said[0] and "ATTNMT_DATA" in said[0], said


def test_install_hints_name_this_checkout():
    from attnmt import install_hint

    assert install_hint("ct2") == f"pip install -e '{REPO.resolve()}[ct2]'"


def test_quickstart_sh_trains_evaluates_and_translates(tmp_path):
    # In a copy of the checkout, with the environment running the tests.
    checkout_copy(tmp_path)
    corpus = corpus_named_like_multi30k(tmp_path / "multi30k")
    env = this_environment("quickstart.sh")
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "quickstart.sh"), str(corpus), "train.max_steps=4",
                           *TINY_QUICKSTART], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== evaluating test2016" in proc.stdout and '"bleu":' in proc.stdout and "== done" in proc.stdout
    assert (tmp_path / "runs" / "quickstart" / "checkpoints" / "best.pt").is_file()
    assert not (tmp_path / ".venv").exists()


def test_bench_serve_loads_a_real_server_and_tabulates(trained_checkpoint, tmp_path):
    pytest.importorskip("fastapi", reason="attnmt-serve needs the serve extra")
    source = tmp_path / "lines.de"
    source.write_text((FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8"), encoding="utf-8")
    proc = run_script("bench_serve.py", "--ckpt", str(trained_checkpoint), "--input", str(source), "--lines", "12",
                      "--clients", "1,4", "--searches", "greedy", "--repeats", "1", cwd=tmp_path)
    assert "start to first answer:" in proc.stdout
    assert "| greedy | attnmt-translate |" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| greedy | 1 |") or line.startswith("| greedy | 4 |")]
    assert len(rows) == 2 and all(row.endswith("| 12/12 |") for row in rows), proc.stdout
    if Path("/proc/self/status").is_file():  # the memory table: the server's RSS as requests are answered
        proc = run_script("bench_serve.py", "--ckpt", str(trained_checkpoint), "--input", str(source), "--rss-at",
                          "20,5", "--clients", "2", "--searches", "greedy", "--repeats", "1", cwd=tmp_path)
        rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| greedy | 2 |")]
        assert [row[2] for row in rows] == ["attnmt-serve's kernel_cache", "1024 (torch's own)"], proc.stdout
        assert "| after 5 | after 20 |" in proc.stdout  # the counts in order
        assert all(float(row[3].removesuffix(" MB")) > 0 for row in rows), proc.stdout
    refused("bench_serve.py", "--ckpt", str(trained_checkpoint), "--input", str(source), "--searches", "beam9",
            cwd=tmp_path, message="--searches: unknown beam9")
    refused("bench_serve.py", "--ckpt", str(trained_checkpoint), "--input", str(source), "--clients", "0",
            cwd=tmp_path, message="--clients")
