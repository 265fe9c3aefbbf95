"""Shared test fixtures. Tests are fast and CPU-only unless marked ``slow`` or ``gpu``."""

from __future__ import annotations

import copy
import functools
import logging
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from attnmt.config import DataConfig, ModelConfig, TokenizerConfig, TrainRunConfig, compose

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CORPUS = REPO / "tests" / "fixtures" / "tiny"  # 400/40/40 de-en pairs, written for the tests


def data_root() -> Path:
    """Where the real corpora live: $ATTNMT_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("ATTNMT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def multi30k() -> Path:
    """The Multi30k folder; tests that use it skip, saying why, where it is absent. Every test that
    uses it, directly or through another fixture, is marked ``data`` (below), so that
    ``-m 'not data'`` leaves out exactly the tests that read the corpora."""
    root = data_root() / "multi30k"
    if not (root / "train.de").is_file():
        pytest.skip(f"Multi30k not found at {root}; set ATTNMT_DATA to the folder that holds multi30k/")
    return root


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``scripts/test.sh`` runs ``-n auto``), the workers share the cores: each
    computes on its share, and so do the commands its tests start. Two workers of two threads each on
    2 cores make OpenMP's waiting threads spin against each other (a 4-minute test took 12)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "multi30k" in item.fixturenames:
            item.add_marker(pytest.mark.data)
    # The tests marked ``long`` first: under pytest-xdist the other workers then run the rest beside
    # them, instead of one worker running them alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture
def fixture_corpus() -> Path:
    """The self-contained de-en corpus in ``tests/fixtures/tiny`` (splits train, valid, test)."""
    return FIXTURE_CORPUS


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models gain nothing from more, on a busy 2-core machine
    OpenMP threads spinning against other processes made the learning test 8x slower (56 s instead of
    7 s), and a training figure recorded in a test holds for one thread count only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_logging():
    """For tests that run a command's ``main()`` in-process: its logging setup replaces the root
    logger's handlers with one on the (captured, soon closed) stderr; put the old ones back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@functools.cache
def _shipped(*overrides: str) -> TrainRunConfig:
    return compose("train", list(overrides))


def _shipped_tiny_model() -> ModelConfig:
    return _shipped("model=tiny").model


@functools.cache
def _translate_config(*overrides: str):
    return compose("translate", ["ckpt=unused", *overrides])


def decode_config(**settings):
    """The shipped search settings of attnmt-translate (``configs/decode/beam.yaml`` composed, a
    :class:`TranslateConfig`, which is a ``DecodeConfig``) with ``settings`` given as overrides."""
    return copy.deepcopy(_translate_config(*(f"{key}={value}" for key, value in sorted(settings.items()))))


def native_engine(ckpt: Path):
    """``engine=native`` on checkpoint ``ckpt``, on the CPU, with no target prefix."""
    from attnmt.inference import Engine
    from attnmt.inference import native

    return Engine("native", *native.open_backend([ckpt], torch.device("cpu"), "default"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server or a process group to bind)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_config(**fields) -> DataConfig:
    """The shipped data config (``data=multi30k``) with ``fields`` replaced; by default without a root,
    with the splits train/valid/test and the default tokenizer settings."""
    fields = {"root": None, "splits": {"train": "train", "valid": "valid", "test": "test"}, **fields}
    return replace(copy.deepcopy(_shipped().data), **fields)


def tokenizer_config(**fields) -> TokenizerConfig:
    """The shipped tokenizer settings with ``fields`` replaced."""
    return replace(_shipped().data.tokenizer, **fields)


def tiny_config(**overrides) -> ModelConfig:
    """The shipped ``model=tiny`` at d_model 32, 2 heads, 2+2 layers, no dropout, vocabulary 24."""
    fields = dict(d_model=32, n_heads=2, ffn_dim=64, encoder_layers=2, decoder_layers=2, dropout=0.0,
                  attention_dropout=0.0, src_vocab_size=24, tgt_vocab_size=24)
    fields.update(overrides)
    return replace(_shipped_tiny_model(), **fields)


def fixture_train_config(run_dir: Path, *overrides: str, corpus: Path = FIXTURE_CORPUS) -> TrainRunConfig:
    """The shipped train config for a tiny model on the fixture corpus (CPU, fp32, no disk cache, no
    progress bar), with ``overrides`` in Hydra's command-line syntax."""
    return compose("train", [
        "model=tiny", f"data.root={corpus}", "data.splits.test=test", "data.cache_dir=null",
        "data.tokenizer.vocab_size=400", f"train.run_dir={run_dir}", "train.device=cpu", "train.precision=fp32",
        "train.progress_bar=false", *overrides,
    ])


def train_tiny(run_dir: Path, *overrides: str, max_steps: int = 200) -> Path:
    """Train a tiny de-en model on the fixture corpus for a few seconds (CPU, fp32); return its ``best.pt``.
    ``overrides`` in Hydra's syntax, e.g. ``model.norm_first=false``."""
    from attnmt.training import train

    cfg = fixture_train_config(run_dir, "model.max_positions=256", "model.dropout=0.0", "optim.lr=2e-3",
                               "optim.warmup_steps=50", "train.max_tokens=1024", f"train.max_steps={max_steps}",
                               f"train.valid_every={max_steps // 2}", "train.seed=1", *overrides)
    train(cfg)
    return run_dir / "checkpoints" / "best.pt"


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """``best.pt`` of a tiny de-en model trained for a few seconds on the fixture corpus (CPU, fp32):
    enough to translate the fixture sentences well, for tests of the commands that load checkpoints."""
    return train_tiny(tmp_path_factory.mktemp("trained"))
