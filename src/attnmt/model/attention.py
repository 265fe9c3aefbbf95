"""Multi-head attention on ``scaled_dot_product_attention``, and the key/value cache for decoding.

Mask convention, used everywhere in attnmt: a mask is a boolean tensor and ``True`` means
"may attend". A padding mask of shape (B, S) is True at real tokens and False at padding; it is
broadcast to (B, 1, 1, S) for SDPA. Masks are never turned into additive ``-1e9`` biases, which
overflow in fp16: SDPA applies boolean masks itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KVCache:
    """Keys and values kept between decoding steps, one slot per decoder layer.

    Self-attention keys/values grow by the number of new target positions at each step; their
    buffers double in capacity when full, so a step appends in place instead of re-concatenating the
    whole history. Cross-attention keys/values are projected from the encoder memory once per source
    batch and then reused. ``reorder`` selects rows along the batch dimension (beams in beam search,
    or the sentences still being decoded).
    """

    def __init__(self, n_layers: int) -> None:
        self._self_k: list[Tensor | None] = [None] * n_layers
        self._self_v: list[Tensor | None] = [None] * n_layers
        self._len = [0] * n_layers
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * n_layers

    @property
    def seq_len(self) -> int:
        """Number of target positions already cached (in layer 0; all layers agree between steps)."""
        return self._len[0]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values ``(B, H, T_new, Dh)``; return all cached so far ``(B, H, T, Dh)``."""
        buf_k, buf_v, n = self._self_k[layer], self._self_v[layer], self._len[layer]
        t_new = k.size(2)
        if buf_k is None or n + t_new > buf_k.size(2):
            capacity = max(16, 2 * (n + t_new))
            new_k = k.new_empty(k.size(0), k.size(1), capacity, k.size(3))
            new_v = v.new_empty(new_k.shape)
            if buf_k is not None:
                new_k[:, :, :n] = buf_k[:, :, :n]
                new_v[:, :, :n] = buf_v[:, :, :n]
            buf_k, buf_v = self._self_k[layer], self._self_v[layer] = new_k, new_v
        buf_k[:, :, n : n + t_new] = k
        buf_v[:, :, n : n + t_new] = v
        self._len[layer] = n + t_new
        return buf_k[:, :, : n + t_new], buf_v[:, :, : n + t_new]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (a 1-D long tensor), in that order, in every cached tensor."""
        for i, buf in enumerate(self._self_k):
            if buf is not None:
                n = self._len[i]
                self._self_k[i] = buf[:, :, :n].index_select(0, index)
                self._self_v[i] = self._self_v[i][:, :, :n].index_select(0, index)
        self.cross = [
            None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
            for kv in self.cross
        ]


class MultiHeadAttention(nn.Module):
    """Multi-head attention with head size ``d_model // n_heads``; self- or cross-attention.

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: attention-probability dropout, applied in training only.
        cross: True for encoder-decoder attention (queries from the decoder, keys/values from the
            encoder memory); False for self-attention.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, cross: bool = False) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}: "
                f"each head gets d_model / n_heads dimensions; choose n_heads among the divisors of {d_model}"
            )
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.dropout = dropout
        self.cross = cross
        self.q_proj = nn.Linear(d_model, d_model)
        # Self-attention projects q, k, v from the same input in one matmul; cross-attention
        # projects k, v from the memory (once per source batch when decoding with a cache).
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``(B, H, S, Dh)`` of ``memory`` ``(B, S, D)``."""
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        key_mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """Attend from ``x`` to itself (self) or to ``memory`` (cross).

        Args:
            x: queries' input, (B, T, D).
            memory: encoder output (B, S, D); cross-attention only. Ignored when the cache already
                holds this layer's cross keys/values.
            key_mask: (B, S) bool, True at keys that may be attended (padding mask).
            causal: each query position attends only to itself and earlier positions.
            cache: decoding state; self-attention appends its keys/values to it, cross-attention
                reads (or fills) its projected memory.
            layer: this layer's slot in ``cache``.

        Returns:
            (B, T, D)
        """
        b, t, d = x.shape
        q = self._split(self.q_proj(x))  # (B, H, T, Dh)
        if self.cross:
            kv = cache.cross[layer] if cache is not None else None
            if kv is None:
                kv = self.project_kv(memory)
                if cache is not None:
                    cache.cross[layer] = kv
            k, v = kv  # (B, H, S, Dh)
        else:
            k, v = self.project_kv(x)  # (B, H, T, Dh)
            if cache is not None:
                k, v = cache.append(layer, k, v)  # (B, H, T_past + T, Dh)

        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        is_causal = False
        if causal:
            t_past = k.size(2) - t
            if attn_mask is None and t_past == 0:
                is_causal = True  # SDPA's own causal path (flash kernels on GPU)
            elif t > 1:
                # New positions attend to all cached ones and causally among themselves.
                causal_mask = torch.ones(t, k.size(2), dtype=torch.bool, device=x.device).tril(t_past)
                attn_mask = causal_mask if attn_mask is None else attn_mask & causal_mask
            # t == 1 with a cache: the single new position may attend to everything cached.
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))

    def attention_weights(self, x: Tensor, memory: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Attention probabilities (B, H, T, S) of queries ``x`` over ``memory``, without causal
        masking and without dropout: what cross-attention maps show. SDPA does not return its
        weights, so they are computed here explicitly."""
        q = self._split(self.q_proj(x))
        k, _ = self.project_kv(memory)
        scores = q @ k.transpose(-2, -1) / self.d_head**0.5  # (B, H, T, S)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1)
