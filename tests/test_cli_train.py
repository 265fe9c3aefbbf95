"""``attnmt-train`` as a user runs it: a subprocess on the fixture corpus.

The run directory's contents, Ctrl-C then ``train.resume=auto``, and config errors that fail at
start with one line naming the key. Each subprocess spends ~3 s importing torch, datasets and Hydra,
so the runs are few and short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from attnmt.checkpoint import load_checkpoint
from conftest import FIXTURE_CORPUS

# One intra-op thread: the tiny model gains nothing from more, and on a busy 2-core machine
# OpenMP threads spinning against other processes made a run ~8x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def train_command(run_dir: Path, cache_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "attnmt.cli.train",
        f"data.root={FIXTURE_CORPUS}", "data.splits.test=test", "data.tokenizer.vocab_size=400",
        f"data.cache_dir={cache_dir}", "model=tiny", f"train.run_dir={run_dir}", "train.max_tokens=1024",
        "optim.warmup_steps=10", "optim.lr=2e-3", "train.progress_bar=false", *overrides,
    ]


def run_train(tmp_path: Path, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = train_command(tmp_path / "run", tmp_path / "cache", *overrides)
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_run_dir_holds_config_log_tensorboard_and_checkpoints(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_train(tmp_path, "train.max_steps=20", "train.valid_every=10", "train.log_every=5", "train.keep_last=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 20 and config["model"]["d_model"] == 64
    assert config["data"]["root"] == str(FIXTURE_CORPUS)
    assert "${" not in (run_dir / "config.yaml").read_text()  # resolved

    log = (run_dir / "train.log").read_text()
    assert "valid at step 10" in log and "valid at step 20" in log
    assert "stopped at step 20" in log

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["best.pt", "last.pt", "step_20.pt"]  # keep_last=1 deleted step_10.pt
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 20
    assert (run_dir / "tokenizer").is_dir()

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    for name in ("train/loss", "train/nll", "train/ppl", "train/lr", "train/grad_norm", "train/tokens_per_s",
                 "train/padding_fraction", "valid/loss", "valid/bleu", "valid/chrf"):
        assert name in tags["scalars"], name
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [e.step for e in events.Scalars("valid/bleu")] == [10, 20]
    # One cross-attention heatmap per validation, a PNG.
    images = events.Images("valid/attention")
    assert [e.step for e in images] == [10, 20]
    assert images[0].encoded_image_string.startswith(b"\x89PNG") and images[0].width > 50


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended (exit {proc.returncode}) before {text!r} appeared in {path}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


def test_ctrl_c_writes_last_checkpoint_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    # max_steps far away: only the signal stops this run.
    cmd = train_command(run_dir, tmp_path / "cache", "train.max_steps=100000", "train.valid_every=100000",
                        "train.log_every=1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(run_dir / "train.log", "step 3 |", proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "SIGINT received" in stderr and "train.resume=auto" in stderr
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert 3 <= stopped_at < 100000

    # The same command with train.resume=auto (and a reachable end) continues from that step.
    target = stopped_at + 5
    proc = run_train(tmp_path, f"train.max_steps={target}", "train.valid_every=100000", "train.log_every=1",
                     "train.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {stopped_at}, epoch" in proc.stderr  # "resumed from ... at step N, epoch E"
    assert f"step {stopped_at + 1} |" in proc.stderr and f"step {stopped_at} |" not in proc.stderr
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == target


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.d_model=30", "model.n_heads=4"], "model.d_model=30 is not divisible by model.n_heads=4"),
        (["data.max_len=250", "train.max_tokens=100"], "train.max_tokens=100 is below the longest allowed sentence (251"),
        (["train.precision=fp8"], "train.precision='fp8' is unknown"),
        # bf16 runs on every CPU (autocast), so the CPU's missing half precision is fp16; bf16 on a GPU
        # without it is tested in test_training.py::test_precision_errors_name_the_key.
        (["train.device=cpu", "train.precision=fp16"], "train.precision=fp16 needs a CUDA device"),
        pytest.param(["train.device=cuda"], "train.device='cuda' but CUDA is not available",
                     marks=pytest.mark.skipif(CUDA, reason="CUDA is available here")),
        (["data.root=does/not/exist"], "data.root=does/not/exist does not exist"),
        (["data.mix=[{root: bt, tgt_lang: en}]"], "missing mandatory value: src_lang (data.mix[0].src_lang)"),
        (["train.best_metric=de_en"], "train.best_metric='de_en' is neither mean nor a direction of the data: de-en"),
        (["optim.lr=-1"], "optim.lr=-1.0 must be above 0"),
        ([f"data.root={FIXTURE_CORPUS / 'train.de'}"], f"data.root={FIXTURE_CORPUS / 'train.de'} is a file"),
    ],
    ids=["heads", "max_tokens", "precision", "fp16_on_cpu", "no_cuda", "data_root", "mix_entry", "best_metric",
         "negative_lr", "data_root_a_file"],
)
def test_config_error_fails_at_start_with_one_line(tmp_path, overrides, message):
    proc = run_train(tmp_path, "train.max_steps=10", *overrides, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    # At start: no tokenizer trained, no step taken, nothing saved, not even a log file.
    run_dir = tmp_path / "run"
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "tokenizer").exists()
    assert not (run_dir / "train.log").exists()


def test_a_misspelt_command_line_fails_in_one_line_before_anything_is_written(tmp_path):
    """attnmt's one line and exit status 2, where Hydra's own message (exit status 1) advised +key=."""
    proc = run_train(tmp_path, "model=tinyy", timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [  # the line of every attnmt command
        "attnmt-train: error: model=tinyy: configs/model/ has no tinyy.yaml; did you mean model=tiny? the options are "
        "base, big, small, tiny"], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argument, message", [
    ("train.max_step=10", "train.max_step=10: train.yaml has no key 'train.max_step'; did you mean train.max_steps"),
    ("data=multi31k", "data=multi31k: configs/data/ has no multi31k.yaml; did you mean data=multi30k?"),
    ("optim.lr=abc", "optim.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("train.freeze=encoder", "train.freeze is a list: write train.freeze=[encoder]"),
])
def test_the_command_lines_check_names_the_closest_key_or_option(argument, message):
    from attnmt.cli.common import UserError
    from attnmt.cli.train import check_command_line

    with pytest.raises(UserError) as refused:
        check_command_line(["model=tiny", argument])
    assert message in str(refused.value)
    check_command_line(["model=tiny", "train.max_steps=10", "+hydra.job.chdir=false", "--cfg", "job"])  # left to Hydra
