"""Feed-forward block and the encoder and decoder layers.

Each sub-layer (attention or feed-forward) is wrapped as ``x + dropout(f(norm(x)))`` with pre-norm
(the default: stable without warm-up tricks, and a final LayerNorm closes each stack) or as
``norm(x + dropout(f(x)))`` with post-norm (Vaswani et al.).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from attnmt.model.attention import KVCache, MultiHeadAttention
from attnmt.model.linear import Linear

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}  # silu: Marian's "swish"


class FeedForward(nn.Module):
    """Position-wise ``linear -> activation -> dropout -> linear``."""

    def __init__(self, d_model: int, ffn_dim: int, activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r} is unknown; use one of {sorted(ACTIVATIONS)}")
        self.fc1 = Linear(d_model, ffn_dim)
        self.fc2 = Linear(ffn_dim, d_model)
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))  # (B, T, D)


class _Residual(nn.Module):
    """One sub-layer's norm, dropout and residual connection, pre- or post-norm."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention over the source, then feed-forward."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float, attention_dropout: float,
                 activation_dropout: float, activation: str, norm_first: bool) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.ffn = FeedForward(d_model, ffn_dim, activation, activation_dropout)
        self.attn_block = _Residual(d_model, dropout, norm_first)
        self.ffn_block = _Residual(d_model, dropout, norm_first)

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        """x: (B, S, D); src_mask: (B, S) bool, True at real tokens. Returns (B, S, D)."""
        x = self.attn_block(x, lambda h: self.self_attn(h, key_mask=src_mask))
        return self.ffn_block(x, self.ffn)


class DecoderLayer(nn.Module):
    """Causal self-attention over the target, cross-attention to the source memory, feed-forward."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float, attention_dropout: float,
                 activation_dropout: float, activation: str, norm_first: bool) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attention_dropout, cross=True)
        self.ffn = FeedForward(d_model, ffn_dim, activation, activation_dropout)
        self.self_block = _Residual(d_model, dropout, norm_first)
        self.cross_block = _Residual(d_model, dropout, norm_first)
        self.ffn_block = _Residual(d_model, dropout, norm_first)

    def forward(self, x: Tensor, memory: Tensor, src_mask: Tensor, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        """x: (B, T, D) target states; memory: (N, S, D); src_mask: (N, S). Returns (B, T, D).

        N = B, except with a cache of several beams per sentence (:class:`KVCache`): N = B / beams.

        Target padding needs no mask: it sits to the right of every real position, and the causal
        mask already keeps real positions from attending to anything on their right.
        """
        x = self.self_block(x, lambda h: self.self_attn(h, causal=True, cache=cache, layer=layer))
        x = self.cross_block(x, lambda h: self.cross_attn(h, memory, key_mask=src_mask, cache=cache, layer=layer))
        return self.ffn_block(x, self.ffn)
