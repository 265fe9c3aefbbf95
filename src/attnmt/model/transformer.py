"""The encoder-decoder Transformer: embeddings, positions, the two stacks, the output projection.

API (the Annotated Transformer's): ``encode(src_tokens, src_mask) -> memory``,
``decode(tgt_tokens, memory, src_mask, cache=None) -> logits``, and ``forward`` = teacher forcing.
All tensors are batch-first. Masks follow ``attnmt.model.attention``: True means "may attend".
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

from attnmt.config import ModelConfig
from attnmt.model.attention import KVCache
from attnmt.model.layers import DecoderLayer, EncoderLayer
from attnmt.model.linear import Linear, PackedWeight


def sinusoidal_positions(n_positions: int, d_model: int) -> Tensor:
    """The fixed sin/cos table of Vaswani et al., sines and cosines interleaved, (n_positions, d_model).

    ``model.positions=sinusoidal``: the layout of checkpoints written before ``sinusoidal_fairseq``.
    """
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table


def fairseq_sinusoidal_positions(n_positions: int, d_model: int, pad_id: int) -> Tensor:
    """fairseq's sin/cos table as M2M100 builds it, (n_positions, d_model).

    ``model.positions=sinusoidal_fairseq``: all sines, then all cosines, with frequencies
    ``10000 ** (-i / (d_model / 2 - 1))``; position ``p`` (from 0) takes fairseq's row
    ``pad_id + 1 + p``, because fairseq numbers positions after the padding index. Computed with
    the same float32 operations as ``transformers``' ``M2M100SinusoidalPositionalEmbedding``, so an
    export to M2M100 sees the identical table.
    """
    half = d_model // 2
    inv_freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1)))
    angles = torch.arange(pad_id + 1 + n_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if d_model % 2 == 1:
        table = torch.cat([table, torch.zeros(table.size(0), 1)], dim=1)
    return table[pad_id + 1 :]


class Embedding(nn.Module):
    """Token embedding scaled by sqrt(d_model), plus positions, plus dropout."""

    def __init__(self, tokens: nn.Embedding, cfg: ModelConfig) -> None:
        super().__init__()
        self.tokens = tokens
        self.scale = math.sqrt(cfg.d_model)
        self.max_positions = cfg.max_positions
        if cfg.positions == "sinusoidal":
            self.register_buffer("sinusoids", sinusoidal_positions(cfg.max_positions, cfg.d_model), persistent=False)
            self.learned = None
        elif cfg.positions == "sinusoidal_fairseq":
            table = fairseq_sinusoidal_positions(cfg.max_positions, cfg.d_model, cfg.pad_id)
            self.register_buffer("sinusoids", table, persistent=False)
            self.learned = None
        elif cfg.positions == "learned":
            self.learned = nn.Embedding(cfg.max_positions, cfg.d_model)
        else:
            raise ValueError(
                f"model.positions={cfg.positions!r} is unknown; use 'sinusoidal_fairseq', 'sinusoidal' or 'learned'"
            )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens: Tensor, offset: int | Tensor = 0) -> Tensor:
        """tokens: (B, T) ids at positions offset .. offset+T-1, or at ``offset[b]`` (a (B,) tensor,
        T = 1: rows that started at different steps; the caller keeps them within the positions).
        Returns (B, T, D)."""
        t = tokens.size(1)
        if isinstance(offset, Tensor):
            return self.dropout(self.tokens(tokens) * self.scale + self.position_table()[offset][:, None])
        if offset + t > self.max_positions:
            raise ValueError(
                f"a sequence of {offset + t} tokens exceeds model.max_positions={self.max_positions}; "
                "shorten the input or train a model with a larger max_positions"
            )
        pos = self.position_table()[offset : offset + t]
        return self.dropout(self.tokens(tokens) * self.scale + pos)  # (B, T, D)

    def position_table(self) -> Tensor:
        """The vectors added at positions 0 .. max_positions-1, (max_positions, D): what exports copy."""
        return self.sinusoids if self.learned is None else self.learned.weight


class Transformer(nn.Module):
    """Encoder-decoder Transformer for translation. Build it with :func:`build_model`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.src_vocab_size <= 0 or cfg.tgt_vocab_size <= 0:
            raise ValueError(
                "model.src_vocab_size and model.tgt_vocab_size must be set (> 0); "
                "training fills them in from the tokenizer"
            )
        if cfg.share_embeddings and cfg.src_vocab_size != cfg.tgt_vocab_size:
            raise ValueError(
                f"model.share_embeddings=true needs one joint vocabulary, but src_vocab_size={cfg.src_vocab_size} "
                f"and tgt_vocab_size={cfg.tgt_vocab_size}; use a joint tokenizer or set model.share_embeddings=false"
            )
        self.cfg = cfg
        tgt_tokens = nn.Embedding(cfg.tgt_vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        src_tokens = tgt_tokens if cfg.share_embeddings else nn.Embedding(cfg.src_vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.src_embed = Embedding(src_tokens, cfg)
        self.tgt_embed = Embedding(tgt_tokens, cfg)
        activation_dropout = cfg.dropout if cfg.activation_dropout is None else cfg.activation_dropout
        layer_args = (cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg.dropout, cfg.attention_dropout, activation_dropout,
                      cfg.activation, cfg.norm_first)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(cfg.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(cfg.decoder_layers))
        # Pre-norm leaves the residual stream un-normalised: each stack ends with a LayerNorm.
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.output_proj = None if cfg.tie_output else Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
        self.tied_output = PackedWeight()  # the output projection when it is the embedding matrix
        self.output_bias = nn.Parameter(torch.zeros(cfg.tgt_vocab_size)) if cfg.output_bias else None
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.d_model**-0.5)
                if module.padding_idx is not None:
                    nn.init.zeros_(module.weight[module.padding_idx])

    def encode(self, src_tokens: Tensor, src_mask: Tensor) -> Tensor:
        """Source ids (B, S) and padding mask (B, S) (True at real tokens) -> memory (B, S, D)."""
        x = self.src_embed(src_tokens)
        for layer in self.encoder_layers:
            x = layer(x, src_mask)
        return self.encoder_norm(x)

    def decode(self, tgt_tokens: Tensor, memory: Tensor, src_mask: Tensor, cache: KVCache | None = None) -> Tensor:
        """Next-token logits (B, T, V) for target ids (B, T) that start with BOS.

        With a ``cache`` (from :meth:`new_cache`), ``tgt_tokens`` holds only the positions not yet
        decoded; their positions continue after the cached ones. The first call projects ``memory``
        (N, S, D) into each layer's cross-attention keys/values and stores them, with ``src_mask``
        (N, S), in the cache; later calls read them from there, so neither ``memory`` nor ``src_mask``
        need follow the cache's reordering. A cache whose rows are beams (``cache.beams`` rows per
        sentence, see :meth:`KVCache.reorder`) takes B = N * beams target rows.
        """
        return self.project(self.decode_states(tgt_tokens, memory, src_mask, cache))

    def decode_states(self, tgt_tokens: Tensor, memory: Tensor, src_mask: Tensor, cache: KVCache | None = None) -> Tensor:
        """The decoder's output states (B, T, D), before the output projection: :meth:`decode` is
        ``project(decode_states(...))``. Beam search projects them a block of rows at a time."""
        offset = 0
        if cache is not None:
            offset = cache.positions()
            cache.begin_step(tgt_tokens.size(1))
            if cache.src_mask is None:
                cache.src_mask = src_mask
            src_mask = cache.src_mask
        x = self.tgt_embed(tgt_tokens, offset)  # (B, T, D)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, memory, src_mask, cache, i)
        return self.decoder_norm(x)

    def project(self, states: Tensor) -> Tensor:
        """Logits (..., V) of decoder states (..., D)."""
        if self.output_proj is None:
            return self.tied_output(states, self.tgt_embed.tokens.weight, self.output_bias)
        logits = self.output_proj(states)
        return logits if self.output_bias is None else logits + self.output_bias

    def forward(self, src_tokens: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced training path: logits (B, T, V) for ``tgt_in`` (BOS + target)."""
        return self.decode(tgt_in, self.encode(src_tokens, src_mask), src_mask)

    def train(self, mode: bool = True) -> Transformer:
        self.tied_output.reset()  # as each Linear does (attnmt.model.linear)
        return super().train(mode)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty key/value cache for incremental decoding with :meth:`decode`, with room for
        ``max_len`` target positions (BOS included) allocated at the first step."""
        return KVCache(len(self.decoder_layers), max_len)

    @torch.no_grad()
    def cross_attention_weights(self, tgt_tokens: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Cross-attention probabilities (L, B, H, T, S) of every decoder layer for target ids (B, T)
        (teacher-forced, no dropout): the input of attention maps."""
        weights: list[Tensor] = []

        def capture(module, args, kwargs, _output):
            # Bound by name, so the hook does not depend on how the layer passes its arguments.
            call = inspect.signature(module.forward).bind(*args, **kwargs)
            call.apply_defaults()
            weights.append(module.attention_weights(call.arguments["x"], call.arguments["memory"],
                                                    call.arguments["key_mask"]))

        hooks = [layer.cross_attn.register_forward_hook(capture, with_kwargs=True) for layer in self.decoder_layers]
        try:
            self.decode(tgt_tokens, memory, src_mask)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack(weights)

    def num_parameters(self) -> int:
        """Trainable parameters, each shared tensor counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def training_flops(self, src_len: int, tgt_len: int) -> float:
        """FLOPs of one training step (forward + backward = 3x forward) on one sentence pair.

        Counts the matmuls: attention projections, feed-forward, the attention scores and weighted
        sums themselves (QK^T and PV over the full, unmasked length), and the output projection.
        Divide by ``tgt_len`` for FLOPs per target token; sum over a batch's sentence pairs and
        divide by the step time for achieved FLOP/s (MFU).
        """
        c = self.cfg
        d, f, s, t = c.d_model, c.ffn_dim, src_len, tgt_len
        encoder = c.encoder_layers * s * (8 * d * d + 4 * d * f + 4 * s * d)
        decoder = c.decoder_layers * (
            t * (8 * d * d + 4 * d * d + 4 * d * f + 4 * t * d + 4 * s * d)  # self proj, cross q/o, ffn, attention
            + s * 4 * d * d  # cross-attention keys/values of the memory
        )
        output = t * 2 * d * c.tgt_vocab_size
        return 3.0 * (encoder + decoder + output)


def build_model(cfg: ModelConfig) -> Transformer:
    """A freshly initialised :class:`Transformer` for ``cfg``."""
    return Transformer(cfg)
