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
