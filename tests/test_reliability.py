"""Crash safety and one-line errors: whatever happens (a kill mid-write, a read-only or full disk, a
wrong file, a bad setting), the run stays usable and the command says in one line what to do.

Kills are simulated by raising :class:`Killed` (a BaseException nothing in attnmt catches) at the
write being tested: what is on disk afterwards is what a kill -9 at that point leaves, except the
temporary file, which the tests that need one create themselves.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from attnmt import checkpoint
from attnmt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from attnmt.config import ConfigError
from attnmt.tokenizer import Tokenizer, TokenizerError
from conftest import FIXTURE_CORPUS, REPO, fixture_train_config, free_port, tokenizer_config


class Killed(BaseException):
    """A simulated kill -9: nothing catches it, so the run stops exactly where it is raised."""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's, for every test here


def config(run_dir: Path, *overrides: str, corpus: Path = FIXTURE_CORPUS):
    """A tiny, fast run on the fixture corpus that learns within a few dozen updates."""
    return fixture_train_config(run_dir, "model.d_model=32", "model.ffn_dim=64", "model.dropout=0.0", "optim.lr=3e-3",
                                "optim.warmup_steps=10", "train.max_tokens=512", "train.log_every=5", "train.seed=2",
                                *overrides, corpus=corpus)


def train(run_dir: Path, *overrides: str, **kw) -> dict:
    from attnmt.training import train as train_run

    return train_run(config(run_dir, *overrides, **kw))


# ----------------------------------------------------------------------------------------------------
# Crash points


def test_a_kill_while_best_pt_is_written_leaves_a_run_whose_best_pt_comes_back(tmp_path, monkeypatch):
    run = ("train.max_steps=40", "train.valid_every=10")
    written = []
    real_save = checkpoint.save_checkpoint

    def spy(state, path):
        written.append((Path(path).name, state["step"]))
        return real_save(state, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", spy)
    straight = train(tmp_path / "straight", *run)
    best_steps = [step for name, step in written if name == "best.pt"]
    assert len(best_steps) >= 2, f"BLEU must improve at least twice for this test to mean anything: {written}"

    def killed_at_the_last_best(state, path):  # after it, no validation beats the record: nothing rewrites best.pt
        if Path(path).name == "best.pt" and state["step"] == best_steps[-1]:
            raise Killed
        return real_save(state, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", killed_at_the_last_best)
    with pytest.raises(Killed):
        train(tmp_path / "killed", *run)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    resumed = train(tmp_path / "killed", *run, "train.resume=auto")

    assert resumed["best_bleu"] == straight["best_bleu"]
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "best.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "best.pt")
    assert (a["step"], a["best_bleu"]) == (b["step"], b["best_bleu"]) == (best_steps[-1], straight["best_bleu"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_a_half_written_tokenizer_folder_is_replaced_not_fatal(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "tokenizer").mkdir(parents=True)
    (run_dir / "tokenizer" / "joint.model").write_bytes(b"\x00" * 100)  # killed before tokenizer.json
    result = train(run_dir, "train.max_steps=2", "train.valid_every=2")
    assert result["step"] == 2
    assert Tokenizer.load(run_dir / "tokenizer").src_vocab_size > 100


def test_tokenizer_save_is_atomic(tmp_path, monkeypatch):
    src, tgt = (FIXTURE_CORPUS / "train.de").read_text().splitlines(), (FIXTURE_CORPUS / "train.en").read_text().splitlines()
    first = Tokenizer.train(src, tgt, tokenizer_config(vocab_size=400), tmp_path / "tok")
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "tok").iterdir())
    other = Tokenizer.train(src, tgt, tokenizer_config(vocab_size=350), tmp_path / "elsewhere")

    real_write = Path.write_text

    def killed_writing_settings(self, *args, **kwargs):
        if self.name == "tokenizer.json":
            raise Killed
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed_writing_settings)
    with pytest.raises(Killed):
        other.save(tmp_path / "tok")
    monkeypatch.setattr(Path, "write_text", real_write)
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "tok").iterdir()) == before
    assert Tokenizer.load(tmp_path / "tok").fingerprint == first.fingerprint


def test_a_restart_with_other_tokenizer_settings_trains_a_new_tokenizer(tmp_path, monkeypatch):
    from attnmt import training

    def killed_before_the_first_update(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(training, "train_step", killed_before_the_first_update)
    with pytest.raises(Killed):
        train(tmp_path, "train.max_steps=2", "data.tokenizer.vocab_size=400")
    old = Tokenizer.load(tmp_path / "tokenizer")
    monkeypatch.undo()
    train(tmp_path, "train.max_steps=2", "train.valid_every=2", "data.tokenizer.vocab_size=350")
    new = Tokenizer.load(tmp_path / "tokenizer")
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert new.fingerprint != old.fingerprint and new.settings["vocab_size"] == 350
    assert state["model_config"]["src_vocab_size"] == new.src_vocab_size != old.src_vocab_size
    assert state["tokenizer"]["fingerprint"] == new.fingerprint


def test_resuming_with_other_tokenizer_settings_is_refused(tmp_path):
    train(tmp_path, "train.max_steps=2", "train.valid_every=2")
    with pytest.raises(ConfigError, match=r"another tokenizer: data\.tokenizer\.vocab_size=350 \(checkpoint: 400\)"):
        train(tmp_path, "train.max_steps=4", "train.resume=auto", "data.tokenizer.vocab_size=350")


def test_a_start_removes_the_temporary_files_a_kill_left(tmp_path):
    train(tmp_path, "train.max_steps=2", "train.valid_every=2")
    folder = tmp_path / "checkpoints"
    stale = [folder / ".last.pt.tmp12345", folder / ".best.pt.tmp999", tmp_path / ".config.yaml.tmp77"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (tmp_path / ".tokenizer.tmpab12_x").mkdir()
    kept = [tmp_path / "notes.txt", folder / ".hidden", folder / "mine.pt.tmp"]
    for path in kept:
        path.write_text("the user's")
    train(tmp_path, "train.max_steps=4", "train.valid_every=2", "train.resume=auto")
    assert not any(p.exists() for p in stale) and not (tmp_path / ".tokenizer.tmpab12_x").exists()
    assert all(p.read_text() == "the user's" for p in kept)


def test_a_second_process_in_the_same_run_dir_is_refused(tmp_path):
    train(tmp_path, "train.max_steps=2", "train.valid_every=2")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.seek(0); f.truncate(); f.write('attnmt-train (pid 4242)'); f.flush(); print('held', flush=True); "
        "time.sleep(60)"), str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (tmp_path / "config.yaml").read_text()
        with pytest.raises(ConfigError, match=r"is in use by attnmt-train \(pid 4242\)"):
            train(tmp_path, "train.max_steps=4", "train.resume=auto")
        assert (tmp_path / "config.yaml").read_text() == before
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------------------------------
# A full disk


def test_a_failed_checkpoint_write_keeps_the_previous_file_and_says_how_much_room_is_needed(tmp_path, monkeypatch):
    state = {"format": checkpoint.FORMAT, "weights": torch.zeros(250_000), "step": 1, "optimizer": {}}  # a training run's
    save_checkpoint(state, tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last\.pt: not enough disk space \(it needs "
                                              r"about 1\.0 MB, .* MB free\).*train\.resume=auto"):
        save_checkpoint({**state, "step": 2}, tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left


@pytest.fixture
def small_disk():
    """An 8 MB tmpfs (root with mount rights only), unmounted afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="attnmt-small-disk-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()[:80]})")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)
    shutil.rmtree(folder, ignore_errors=True)


def run_cli_train(cwd: Path, *overrides: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "attnmt.cli.train", f"data.root={FIXTURE_CORPUS}", "data.splits.test=test",
           "data.tokenizer.vocab_size=400", "data.cache_dir=null", "model=tiny", "train.max_tokens=1024",
           "optim.warmup_steps=10", "optim.lr=2e-3", "train.device=cpu", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **kwargs.pop("env", {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def test_a_disk_that_fills_during_a_checkpoint_stops_with_one_line_and_keeps_the_checkpoints(tmp_path, small_disk):
    # Each checkpoint of this model is ~2.3 MB: the first validation's three files fit in 8 MB, the
    # second validation's first new file (written beside the old ones) does not.
    run_dir = small_disk / "run"
    proc = run_cli_train(tmp_path, f"train.run_dir={run_dir}", "train.max_steps=40", "train.valid_every=10",
                         "train.keep_last=1", "train.progress_bar=false")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "not enough disk space (it needs about" in line and "MB free" in line and str(run_dir) in line, line
    folder = run_dir / "checkpoints"
    saved = {p.name: load_checkpoint(p)["step"] for p in folder.iterdir()}
    assert saved and set(saved.values()) == {10}, saved  # the first validation's files, intact
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------------
# Read-only folders


@pytest.fixture
def read_only():
    """Make a folder read-only for this test: a read-only bind mount over it as root (root ignores
    file modes), ``chmod`` otherwise; undone afterwards. Skips where root may not mount."""
    undo = []

    def make(path: Path) -> None:
        if os.geteuid() != 0:
            for p in [path, *path.rglob("*")]:
                p.chmod(0o555 if p.is_dir() else 0o444)
            undo.append(lambda: [p.chmod(0o755 if p.is_dir() else 0o644) for p in [path, *path.rglob("*")]])
            return
        bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
        if bind.returncode != 0:
            pytest.skip(f"root cannot mount here, so nothing is read-only to it: {bind.stderr.strip()[:80]}")
        undo.append(lambda: subprocess.run(["umount", "-l", str(path)], check=False))
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)

    yield make
    for step in reversed(undo):
        step()


@pytest.mark.parametrize("what", ["fresh_run_dir", "resumed_run_dir", "checkpoints_only"])
def test_a_read_only_folder_fails_at_start_with_one_line(tmp_path, read_only, what):
    run_dir = tmp_path / "run"
    common = (f"train.run_dir={run_dir}", "train.progress_bar=false", "train.valid_every=5")
    if what == "fresh_run_dir":
        run_dir.mkdir()
    else:
        first = run_cli_train(tmp_path, *common, "train.max_steps=5")
        assert first.returncode == 0, first.stderr[-3000:]
    read_only(run_dir if what != "checkpoints_only" else run_dir / "checkpoints")
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    resume = ["train.resume=auto"] if what != "fresh_run_dir" else []
    proc = run_cli_train(tmp_path, *common, "train.max_steps=30", *resume)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "cannot be written" in line and ("Read-only file system" in line or "Permission denied" in line), line
    assert "step 1 |" not in proc.stderr  # refused before any update
    assert sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before


def test_a_run_dir_that_cannot_be_created_gets_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_cli_train(tmp_path, f"train.run_dir={blocker / 'run'}", "train.max_steps=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert f"train.run_dir={blocker / 'run'} cannot be written" in line and "Not a directory" in line, line


# ----------------------------------------------------------------------------------------------------
# Refused commands change nothing; bad inputs get one line


def test_a_refused_resume_leaves_config_and_log_untouched(tmp_path):
    from attnmt.data import DataError

    train(tmp_path / "run", "train.max_steps=4", "train.valid_every=4")
    run_dir = tmp_path / "run"
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "train.log")}
    corpus = tmp_path / "other"
    shutil.copytree(FIXTURE_CORPUS, corpus)
    (corpus / "valid.en").write_text("")  # a damaged corpus: the valid split lost its English side
    with pytest.raises(DataError):
        train(run_dir, "train.max_steps=8", "train.resume=auto", corpus=corpus)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(run_dir, "train.max_steps=8")
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_an_empty_valid_split_gets_one_line(tmp_path):
    from attnmt.data import DataError

    corpus = tmp_path / "corpus"
    shutil.copytree(FIXTURE_CORPUS, corpus)
    for lang in ("de", "en"):
        (corpus / f"valid.{lang}").write_text("")
    with pytest.raises(DataError, match=r"valid split .* has no lines; point data\.splits\.valid at"):
        train(tmp_path / "run", "train.max_steps=2", corpus=corpus)
    assert not (tmp_path / "run").exists()


def test_resume_with_another_batch_size_says_what_to_do_and_init_from_starts_a_new_run(tmp_path):
    train(tmp_path / "run", "train.max_steps=4", "train.valid_every=4")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match=r"max_tokens=512, this run has 256; resume with the same data and "
                                              r"batching settings, or start a new run from these weights with "
                                              r"train\.init_from="):
        train(tmp_path / "run", "train.max_steps=8", "train.resume=auto", "train.max_tokens=256")
    new = train(tmp_path / "new", "train.max_steps=2", "train.valid_every=2", "train.max_tokens=256",
                f"train.init_from={last}")
    assert new["step"] == 2
    started = load_checkpoint(tmp_path / "new" / "checkpoints" / "last.pt")
    assert started["tokenizer"]["fingerprint"] == load_checkpoint(last)["tokenizer"]["fingerprint"]
    with pytest.raises(ConfigError, match=r"holds another model: model\.d_model=64 \(checkpoint: 32\)"):
        train(tmp_path / "bigger", "train.max_steps=2", "model.d_model=64", f"train.init_from={last}")


@pytest.fixture
def bad_checkpoints(tmp_path, trained_checkpoint) -> dict[str, Path]:
    """Files a user might pass as a checkpoint by mistake."""
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes\nnot a checkpoint\n")
    state = load_checkpoint(trained_checkpoint)
    no_config = tmp_path / "no_config.pt"
    save_checkpoint({k: v for k, v in state.items() if k != "model_config"}, no_config)
    wrong_shape = tmp_path / "wrong_shape.pt"
    save_checkpoint({**state, "model_config": {**state["model_config"], "d_model": 32, "ffn_dim": 64}}, wrong_shape)
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "run": os.system}, evil)
    # Written by a newer attnmt: a model or data option this version does not know.
    newer_model = tmp_path / "newer_model.pt"
    save_checkpoint({**state, "attnmt_version": "9.0.0", "model_config": {**state["model_config"], "norm": "rms"}},
                    newer_model)
    newer_data = tmp_path / "newer_data.pt"
    config = {**state["config"], "data": {**state["config"]["data"], "new_option": 1}}
    save_checkpoint({**{k: v for k, v in state.items() if k != "attnmt_version"}, "config": config}, newer_data)
    return {"text": text, "no_config": no_config, "wrong_shape": wrong_shape, "evil": evil,
            "newer_model": newer_model, "newer_data": newer_data}


EXPECTED = {
    "text": r"notes\.pt cannot be read .*not a torch checkpoint",
    "no_config": r"no_config\.pt lacks 'model_config'",
    "wrong_shape": r"wrong_shape\.pt: its weights do not match",
    "evil": r"evil\.pt was refused: .*would run as code",
    "newer_model": r"newer_model\.pt has config keys attnmt \S+ does not know: model\.norm \(written by attnmt 9\.0\.0\)",
    "newer_data": r"newer_data\.pt has config keys attnmt \S+ does not know: data\.new_option \(written by an attnmt "
                  r"that did not record its version\)",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_a_wrong_file_as_checkpoint_gets_one_line_from_every_command(kind, bad_checkpoints, tmp_path, monkeypatch,
                                                                    capsys, restore_logging):
    import attnmt.cli.average as average
    import attnmt.cli.evaluate as evaluate
    import attnmt.cli.translate as translate

    path = bad_checkpoints[kind]
    commands = {
        "translate": lambda: (monkeypatch.setattr(sys, "argv", ["attnmt-translate", f"ckpt={path}", "text=Hallo"]),
                              translate.main()),
        "evaluate": lambda: (monkeypatch.setattr(sys, "argv", ["attnmt-evaluate", f"ckpt={path}", "split=test"]),
                             evaluate.main()),
        "average": lambda: average.main([str(path), str(path), "--out", str(tmp_path / "avg.pt")]),
    }
    for name, command in commands.items():
        if kind in ("no_config", "wrong_shape", "newer_model", "newer_data") and name == "average":
            continue  # averaging reads only the weights; what it writes is checked when it is used
        with pytest.raises(SystemExit) as exit_info:
            command()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (name, err)
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in err, (name, err)
        assert __import__("re").search(EXPECTED[kind], errors[0]), (name, errors[0])
    with pytest.raises(CheckpointError, match=EXPECTED[kind]):  # the run's model is the file's model_config
        train(tmp_path / "resumed", "train.max_steps=2", "model.d_model=32", "model.ffn_dim=64",
              "model.max_positions=256", "train.max_tokens=1024", f"train.resume={path}")


def test_tokenizer_settings_sentencepiece_rejects_get_one_line(tmp_path):
    proc = run_cli_train(tmp_path, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2",
                         "data.tokenizer.vocab_size=20", "data.tokenizer.byte_fallback=false")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "data.tokenizer.vocab_size=20" in line and "Vocabulary size is smaller than required_chars" in line, line
    src, tgt = (FIXTURE_CORPUS / "train.de").read_text().splitlines(), (FIXTURE_CORPUS / "train.en").read_text().splitlines()
    with pytest.raises(TokenizerError, match="vocab_size=20"):
        Tokenizer.train(src, tgt, tokenizer_config(vocab_size=20, byte_fallback=False), tmp_path / "tok")


def test_the_log_of_a_run_without_a_terminal_holds_no_progress_bar_redraws(tmp_path):
    proc = run_cli_train(tmp_path, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=12", "train.valid_every=6",
                         "train.log_every=4", "train.progress_bar=true", "data.cache_dir=cache")  # tokenizing too
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr
    assert "step 4 |" in proc.stderr and "step 12 |" in proc.stderr  # the periodic log lines stay


# ----------------------------------------------------------------------------------------------------
# The data cache: what a resumed run compares, what proves a cache file whole


def test_resume_refuses_a_corpus_whose_text_changed_with_the_same_line_count(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(FIXTURE_CORPUS, corpus)
    train(tmp_path / "run", "train.max_steps=4", "train.valid_every=4", corpus=corpus)
    english = (corpus / "train.en").read_text()
    (corpus / "train.en").write_text(english.replace("a", "o"))  # same lines, same size, other text
    with pytest.raises(CheckpointError, match=rf"was trained on other text: {corpus / 'train.en'} has changed since"):
        train(tmp_path / "run", "train.max_steps=8", "train.resume=auto", corpus=corpus)
    # The same text with a new modification time is the same corpus: the run continues.
    (corpus / "train.en").write_text(english)
    assert train(tmp_path / "run", "train.max_steps=8", "train.resume=auto", corpus=corpus)["step"] == 8


def prepare_train_split(cfg):
    """The cached pipeline of a train split: raw, cleaned (an empty pair dropped: a kept-row index), tokenized."""
    from attnmt.data import load_split, tokenize, train_tokenizer

    ds = load_split(cfg, "train", train=True)
    return tokenize(ds, train_tokenizer([ds], cfg), cfg, train=True)


def corpus_with_an_empty_pair(folder: Path) -> Path:
    shutil.copytree(FIXTURE_CORPUS, folder)
    for lang in ("de", "en"):
        with open(folder / f"train.{lang}", "a") as f:
            f.write("\n" if lang == "de" else "an English side without its German\n")
    return folder


def cut_at_a_record_batch(path: Path) -> None:
    """What a crash can leave: a valid Arrow stream that ends after its first half of record batches."""
    import pyarrow as pa

    with pa.OSFile(str(path)) as f:
        reader = pa.ipc.open_stream(f)
        schema, batches = reader.schema, list(reader)
    assert len(batches) >= 2, "the test needs files of several record batches"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches[: len(batches) // 2]:
            writer.write_batch(batch)


@pytest.mark.parametrize("damage", ["cut_at_a_record_batch", "empty", "garbage", "seal_lost", "seal_is_a_folder"])
@pytest.mark.parametrize("entry", ["raw", "clean", "kept", "tokenized"])
def test_a_damaged_cache_file_is_rebuilt_with_one_warning_naming_it(tmp_path, monkeypatch, caplog, entry, damage):
    from attnmt import data
    from conftest import data_config

    monkeypatch.setattr(data, "_BATCH_ROWS", 64)  # files of several record batches, as a large corpus has
    monkeypatch.setattr(data, "_MAP_ROWS", 64)
    monkeypatch.setattr(data, "_INDEX_ROWS", 64)
    cfg = data_config(root=str(corpus_with_an_empty_pair(tmp_path / "corpus")), cache_dir=str(tmp_path / "cache"),
                      tokenizer=tokenizer_config(vocab_size=400), num_proc=1)
    expected = list(prepare_train_split(cfg)["src_ids"])  # a copy: the file it maps is damaged below
    assert len(expected) == 400  # the empty pair dropped
    (path,) = (tmp_path / "cache").glob(f"{entry}-*.arrow")
    if damage == "cut_at_a_record_batch":
        cut_at_a_record_batch(path)
    elif damage == "empty":
        path.write_bytes(b"")  # what a rename can leave after a power cut
    elif damage == "garbage":
        size = path.stat().st_size
        path.write_bytes(bytes(range(256)) * (size // 256) + b"\0" * (size % 256))  # the same size, not Arrow
    elif damage == "seal_lost":
        path.with_name(path.stem + ".seal").unlink()
    else:
        seal = path.with_name(path.stem + ".seal")
        seal.unlink()
        (seal / "inside").mkdir(parents=True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="attnmt.data"):
        rebuilt = list(prepare_train_split(cfg)["src_ids"])
    assert rebuilt == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"cache file {path} " in warnings[0] and "rebuilding it" in warnings[0], warnings
    caplog.clear()
    with caplog.at_level("WARNING", logger="attnmt.data"):
        assert list(prepare_train_split(cfg)["src_ids"]) == expected  # sealed again: used as it is
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_warm_cache_is_used_read_only_and_a_cold_one_gets_one_line(tmp_path, read_only):
    from attnmt.data import DataError
    from conftest import data_config

    cache = tmp_path / "cache"
    cfg = data_config(root=str(corpus_with_an_empty_pair(tmp_path / "corpus")), cache_dir=str(cache),
                      tokenizer=tokenizer_config(vocab_size=400), num_proc=1)
    expected = list(prepare_train_split(cfg)["tgt_ids"])
    before = sorted((p.name, p.stat().st_mtime_ns) for p in cache.rglob("*"))
    read_only(cache)  # e.g. a corpus cache shared on a cluster's read-only mount
    assert list(prepare_train_split(cfg)["tgt_ids"]) == expected
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cache.rglob("*")) == before  # nothing rewritten
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "corpus", other)
    (other / "train.de").write_text((other / "train.de").read_text().replace("Hund", "Katze"))
    with pytest.raises(DataError, match=rf"raw-\w+\.arrow is not in the cache .* data\.cache_dir={cache} cannot be "
                                        r"written \((Read-only file system|Permission denied)\)"):
        prepare_train_split(data_config(**{**cfg.__dict__, "root": str(other)}))


def test_the_first_use_of_a_cache_removes_the_temporary_files_a_killed_run_left(tmp_path, caplog):
    from attnmt import datacache
    from conftest import data_config

    cache = tmp_path / "cache"
    cfg = data_config(root=str(FIXTURE_CORPUS), cache_dir=str(cache), tokenizer=tokenizer_config(vocab_size=400))
    prepare_train_split(cfg)
    left = [cache / "tmpk3x9_q2a", cache / ".raw-0123456789abcdef0123.arrow.tmp4242",
            cache / ".clean-0123456789abcdef0123.seal.tmp77"]  # datasets' and attnmt's temporary names
    for path in left:
        path.write_bytes(b"x" * 1000)
    kept = cache / "notes.txt"
    kept.write_text("the user's")
    datacache._swept.clear()  # a new process
    with caplog.at_level("WARNING", logger="attnmt.data"):
        prepare_train_split(cfg)  # warm: nothing is built
    assert not any(p.exists() for p in left) and kept.read_text() == "the user's"
    assert any("removing 3 temporary files" in r.getMessage() for r in caplog.records)


def test_a_null_cache_lives_in_the_run_dir_and_orphaned_temporary_caches_are_removed(tmp_path):
    from attnmt import datacache
    from conftest import data_config

    train(tmp_path / "run", "train.max_steps=2", "train.valid_every=2")  # data.cache_dir=null
    seals = sorted(p.name.split("-")[0] for p in (tmp_path / "run" / "data-cache").glob("*.seal"))
    assert seals.count("raw") == 2 and seals.count("tokenized") == 2, seals  # train and valid, sealed
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = Path(tempfile.gettempdir()) / f"attnmt-data-{finished.stdout.strip()}-abc123"  # a killed process's
    orphan.mkdir()
    (orphan / "raw-x.arrow").write_bytes(b"x" * 1000)
    mine = Path(tempfile.gettempdir()) / f"attnmt-data-{os.getpid()}-alive"  # a running process's
    mine.mkdir(exist_ok=True)
    try:
        monkey = datacache._temporary_cache
        datacache._temporary_cache = None
        root = datacache.cache_root(data_config(cache_dir=None))
        assert root.name.startswith(f"attnmt-data-{os.getpid()}-") and not orphan.exists() and mine.exists()
    finally:
        datacache._temporary_cache = monkey
        shutil.rmtree(mine, ignore_errors=True)


def test_a_disk_that_fills_while_caching_gets_one_line_and_leaves_no_temporary_file(multi30k, small_disk, tmp_path):
    from attnmt.data import DataError, load_split
    from conftest import data_config

    for lang in ("de", "en"):  # 43,500 pairs: the raw copy (6 MB) fits the 8 MB disk, the cleaned one does not
        lines = (multi30k / f"train.{lang}").read_text().splitlines(keepends=True)
        (tmp_path / f"train.{lang}").write_text("".join(lines + lines[: len(lines) // 2]))
    cache = small_disk / "cache"
    cfg = data_config(root=str(tmp_path), cache_dir=str(cache), num_proc=2)  # cleaned in two processes
    for attempt in range(2):  # a retry fails the same way, not on a disk full of the first try's leftovers
        with pytest.raises(DataError, match=r"cannot write .*-\w+\.arrow: not enough disk space \(it needs about "
                                            r"[\d.]+ MB, [\d.]+ MB free\); free some space or set data\.cache_dir"):
            load_split(cfg, "train", train=True)
        names = sorted(p.name for p in cache.iterdir())
        assert not [n for n in names if n.startswith("tmp") or ".tmp" in n], names
        # Every data file there is whole: the lock, seals, and files whose seal was written after them.
        sealed = {n.removesuffix(".seal") for n in names if n.endswith(".seal")}
        unsealed = [n for n in names if n != ".lock" and not n.endswith(".seal") and n.removesuffix(".arrow") not in sealed]
        assert not unsealed, names


# ----------------------------------------------------------------------------------------------------
# Processes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_stop_with_a_checkpoint_when_the_torchrun_agent_is_killed(tmp_path):
    import time

    run_dir = tmp_path / "run"
    log = open(tmp_path / "out.log", "w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
         "attnmt.cli.train", "model=tiny",
         f"data.root={FIXTURE_CORPUS}", "data.splits.test=test", "data.tokenizer.vocab_size=400", "data.cache_dir=null",
         f"train.run_dir={run_dir}", "train.max_steps=1000000", "train.valid_every=1000000", "train.device=cpu",
         "train.max_tokens=512", "train.progress_bar=false", "train.log_every=5"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while "step 10 |" not in (tmp_path / "out.log").read_text() and time.monotonic() < deadline:
            assert agent.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
            time.sleep(0.5)
        workers = [int(pid) for path in Path(f"/proc/{agent.pid}/task").glob("*/children")
                   for pid in path.read_text().split()]
        assert len(workers) == 2, workers
        agent.kill()  # kill -9: the agent can tell its workers nothing
        agent.wait()
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
                  for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
                 and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
        assert not alive, f"workers {alive} still run after their agent died"
    finally:
        agent.kill()
        for pid in [p for p in workers if Path(f"/proc/{p}").exists()]:
            os.kill(pid, 9)
    out = (tmp_path / "out.log").read_text()
    assert "the torchrun agent exited" in out and "Traceback" not in out, out[-3000:]
    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert step >= 10 and (run_dir / "checkpoints" / f"step_{step}.pt").is_file()


def test_text_changed_inside_a_sealed_cache_file_is_found_and_rebuilt_from_the_source(tmp_path, caplog):
    """Bytes changed inside the raw copy, its size kept: its seal's size check cannot see it; its text's
    SHA-256, taken again at every training start, does."""
    from attnmt import data
    from conftest import FIXTURE_CORPUS, data_config

    cfg = data_config(root=str(FIXTURE_CORPUS), cache_dir=str(tmp_path / "cache"))
    expected = data.corpus_fingerprint(cfg)
    (path,) = (tmp_path / "cache").glob("raw-*.arrow")
    word = (FIXTURE_CORPUS / "train.de").read_text(encoding="utf-8").split()[1].encode()
    content = path.read_bytes()
    at = content.index(word)
    path.write_bytes(content[:at] + word[::-1] + content[at + len(word):])  # same size, other text
    caplog.clear()
    with caplog.at_level("WARNING", logger="attnmt.data"):
        again = data.corpus_fingerprint(cfg)
    assert again == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"cache file {path} does not hold the text its seal records" in warnings[0], warnings
    assert path.read_bytes() == content  # rebuilt from the source


def test_a_copied_cache_is_used_where_it_lies(tmp_path, caplog):
    """Cache entries are named by what they were made from, not by the folder they were built in: a
    cache copied elsewhere (another machine, a read-only mount at another path) is used as it is."""
    import shutil
    from dataclasses import replace

    from attnmt.data import prepare_data
    from conftest import FIXTURE_CORPUS, data_config

    cfg = data_config(root=str(FIXTURE_CORPUS), cache_dir=str(tmp_path / "built"), tokenizer=tokenizer_config(vocab_size=400))
    prepare_data(cfg, tmp_path / "run-1" / "tokenizer")
    shutil.copytree(tmp_path / "built", tmp_path / "copied")
    files = sorted(str(p.relative_to(tmp_path / "copied")) for p in (tmp_path / "copied").rglob("*"))
    caplog.clear()
    with caplog.at_level("INFO", logger="attnmt.data"):
        prepare_data(replace(cfg, cache_dir=str(tmp_path / "copied")), tmp_path / "run-2" / "tokenizer")
    assert sorted(str(p.relative_to(tmp_path / "copied")) for p in (tmp_path / "copied").rglob("*")) == files
    assert "training the tokenizer" not in caplog.text and "reusing the tokenizer" in caplog.text
