"""Shared test fixtures. Tests are fast and CPU-only unless marked ``slow`` or ``gpu``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from attnmt.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CORPUS = REPO / "tests" / "fixtures" / "tiny"  # 400/40/40 de-en pairs, written for the tests


def data_root() -> Path:
    """Where the real corpora live: $ATTNMT_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("ATTNMT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def multi30k() -> Path:
    """The Multi30k folder; tests that use it skip, saying why, where it is absent."""
    root = data_root() / "multi30k"
    if not (root / "train.de").is_file():
        pytest.skip(f"Multi30k not found at {root}; set ATTNMT_DATA to the folder that holds multi30k/")
    return root


@pytest.fixture
def fixture_corpus() -> Path:
    """The self-contained de-en corpus in ``tests/fixtures/tiny`` (splits train, valid, test)."""
    return FIXTURE_CORPUS


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_config(**overrides) -> ModelConfig:
    """A tiny model: d_model 32, 2 heads, 2+2 layers, no dropout, vocabulary 24."""
    fields = dict(
        d_model=32, n_heads=2, ffn_dim=64, encoder_layers=2, decoder_layers=2,
        dropout=0.0, attention_dropout=0.0, src_vocab_size=24, tgt_vocab_size=24,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """``best.pt`` of a tiny de-en model trained for a few seconds on the fixture corpus (CPU, fp32):
    enough to translate the fixture sentences well, for tests of the commands that load checkpoints."""
    from attnmt.config import DataConfig, OptimConfig, TokenizerConfig, TrainConfig, TrainRunConfig
    from attnmt.training import train

    run_dir = tmp_path_factory.mktemp("trained")
    cfg = TrainRunConfig(
        model=tiny_config(d_model=64, ffn_dim=128, src_vocab_size=0, tgt_vocab_size=0, max_positions=256),
        data=DataConfig(root=str(FIXTURE_CORPUS), cache_dir=None, tokenizer=TokenizerConfig(vocab_size=400)),
        optim=OptimConfig(lr=2e-3, warmup_steps=50),
        train=TrainConfig(run_dir=str(run_dir), device="cpu", precision="fp32", max_tokens=1024, max_steps=200,
                          valid_every=100, progress_bar=False, seed=1),
    )
    train(cfg)
    return run_dir / "checkpoints" / "best.pt"
