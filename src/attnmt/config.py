"""Typed schemas for every config group, registered in Hydra's ConfigStore.

YAML files under ``configs/`` hold the values; these dataclasses hold the names and types, so a
misspelt key fails when the config is composed rather than thousands of steps into a run. Only
``attnmt.cli`` sees a ``DictConfig``; it converts it to these dataclasses and passes those down.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Shape of the encoder-decoder Transformer.

    ``src_vocab_size`` and ``tgt_vocab_size`` are 0 in the YAML files: training fills them in from
    the tokenizer, and checkpoints store the filled-in values.
    """

    d_model: int = 512
    n_heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: str = "relu"  # relu | gelu
    norm_first: bool = True  # pre-norm (with a final LayerNorm per stack); False = the paper's post-norm
    positions: str = "sinusoidal"  # sinusoidal | learned
    max_positions: int = 1024
    share_embeddings: bool = True  # one embedding table for source and target (needs a joint vocabulary)
    tie_output: bool = True  # output projection = target embedding matrix
    src_vocab_size: int = 0
    tgt_vocab_size: int = 0
    pad_id: int = 0


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="model", name="schema", node=ModelConfig)
