"""Smoke tests of the scripts in ``scripts/``: each runs end to end at tiny sizes, so none rots unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURE_CORPUS

REPO = Path(__file__).resolve().parents[1]
# A few updates of a tiny model on the fixture corpus (its test split is named test).
TINY = ("model=tiny model.d_model=32 model.ffn_dim=64 data.splits.test=test data.tokenizer.vocab_size=400 "
        "train.max_tokens=256 train.max_steps=4 train.valid_every=2 train.valid_max_sentences=8 train.device=cpu")


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / args[0]), *args[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_recipes_trains_scores_and_tabulates(tmp_path):
    work = tmp_path / "work"
    common = ("--multi30k", str(FIXTURE_CORPUS), "--work", str(work), "--threads", "1", "--decode", "beam_size=2")
    proc = run_script("bench_recipes.py", "--setting", f"plain={TINY}",
                      "--setting", f"ema={TINY} train.ema_decay=0.9 train.update_freq=2 train.sort_window=1",
                      "--parallel", "2", "--seeds", "1", *common, cwd=tmp_path)
    rows = {line.split(" | ")[0].lstrip("| ").split(" `")[0]: line for line in proc.stdout.splitlines()
            if line.startswith("| plain") or line.startswith("| ema")}
    assert set(rows) == {"plain", "ema", "ema, last.pt without EMA"}, proc.stdout
    result = json.loads((work / "ema" / "seed1" / "result.json").read_text())
    assert result["seed"] == 1 and sorted(result["curve"]) == ["2", "4"]
    assert 0 <= result["valid"] <= 100 and 0 <= result["trained_test"] <= 100
    # A second call reads the results instead of training again, beside a run it trains.
    again = run_script("bench_recipes.py", "--setting", f"plain={TINY}", "--seeds", "1", "2", *common, cwd=tmp_path)
    assert "plain seed 1" not in again.stdout and "plain seed 2" in again.stdout and "| plain" in again.stdout

    speed = run_script("bench_recipes.py", "--speed", "10", "--repeats", "1", "--setting", f"a={TINY}", *common,
                       cwd=tmp_path)
    assert "| a `" in speed.stdout and "1.00x |" in speed.stdout
