"""Multi-head attention on ``scaled_dot_product_attention``, and the key/value cache for decoding.

Mask convention, used everywhere in attnmt: a mask is a boolean tensor and ``True`` means
"may attend". A padding mask of shape (B, S) is True at real tokens and False at padding; it is
broadcast to (B, 1, 1, S) for SDPA. Masks are never turned into additive ``-1e9`` biases, which
overflow in fp16: SDPA applies boolean masks itself.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnmt.model.linear import Linear


class KVCache:
    """Keys and values kept between decoding steps, one slot per decoder layer.

    The cache holds rows (hypotheses) in groups of ``beams`` consecutive rows per source sentence: one
    row per sentence in greedy search, ``beam_size`` rows in beam search.

    Self-attention keys/values grow by the new target positions at each step. Each layer keeps them
    in one buffer (rows, capacity, 2, H, Dh), allocated for ``max_len`` positions (and doubled only if
    a longer target comes): ``append`` writes in place, and ``reorder`` gathers the kept rows into a
    spare buffer of the same size and swaps the two, so a decoding step allocates nothing. Positions
    come before heads in the buffer so that each row's cached prefix is one contiguous block, which
    ``reorder`` copies in one piece.

    Cross-attention keys/values (N, H, S, Dh) and the source padding mask (N, S) belong to the N
    source sentences, not to the rows: they are projected from the memory once and never copied per
    beam, since cross-attention folds each sentence's beams into its query dimension
    (:meth:`MultiHeadAttention.forward`). ``reorder`` copies them only when sentences leave.
    """

    def __init__(self, n_layers: int, max_len: int | None = None) -> None:
        self.max_len = max_len
        self.beams = 1
        self.rows = 0
        self._kv: list[Tensor | None] = [None] * n_layers  # (rows allocated, capacity, 2, H, Dh)
        self._spare: list[Tensor | None] = [None] * n_layers
        self._len = [0] * n_layers
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * n_layers
        self.src_mask: Tensor | None = None

    @property
    def seq_len(self) -> int:
        """Number of target positions already cached (in layer 0; all layers agree between steps)."""
        return self._len[0]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values ``(B, H, T_new, Dh)``; return all cached so far ``(B, H, T, Dh)``."""
        b, _, t_new, _ = k.shape
        if self.rows and b != self.rows:
            raise ValueError(f"appending {b} rows to a cache of {self.rows} rows; reorder the cache first")
        n = self._len[layer]
        buf = self._kv[layer]
        if buf is None or n + t_new > buf.size(1):
            buf = self._grow(layer, k, n + t_new)
        self.rows = b
        buf[:b, n : n + t_new, 0] = k.transpose(1, 2)
        buf[:b, n : n + t_new, 1] = v.transpose(1, 2)
        self._len[layer] = n + t_new
        kv = buf[:b, : n + t_new]  # (B, T, 2, H, Dh)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def _grow(self, layer: int, k: Tensor, length: int) -> Tensor:
        """A buffer for at least ``length`` positions holding this layer's cached ones (doubling, so
        that appends beyond ``max_len`` stay amortised O(1))."""
        b, h, _, dh = k.shape
        old = self._kv[layer]
        capacity = max(length, self.max_len or 16, 2 * old.size(1) if old is not None else 0)
        buf = k.new_empty(b if old is None else old.size(0), capacity, 2, h, dh)
        if old is not None:
            buf[:, : self._len[layer]] = old[:, : self._len[layer]]
        self._kv[layer], self._spare[layer] = buf, None
        return buf

    def reorder(self, index: Tensor, beams: int | None = None) -> None:
        """Keep rows ``index`` (a 1-D long tensor of current rows), in that order.

        Args:
            index: (R,) the current row each new row continues.
            beams: rows per source sentence from now on (default: unchanged). Each group of ``beams``
                consecutive new rows must continue rows of one sentence; the sentences of the groups
                (e.g. all but the finished ones) are kept, in that order, in the cross-attention state.
        """
        beams = self.beams if beams is None else beams
        rows = index.numel()
        if rows % beams:
            raise ValueError(f"{rows} rows do not form groups of {beams} beams")
        for layer, buf in enumerate(self._kv):
            if buf is None:
                continue
            spare = self._spare[layer]
            if spare is None or spare.size(0) < rows:
                spare = buf.new_empty(max(rows, buf.size(0)), *buf.shape[1:])
            n = self._len[layer]
            if buf.requires_grad:  # autograd does not follow out=; decoding runs without it
                spare[:rows, :n] = buf[: self.rows, :n][index]
            else:
                torch.index_select(buf[: self.rows, :n], 0, index, out=spare[:rows, :n])
            self._kv[layer], self._spare[layer] = spare, buf
        old_sentences = self.rows // self.beams if self.rows else len(index)
        sentences = index[::beams] // self.beams  # (N,) the sentence of each new group
        if not torch.equal(index.view(-1, beams) // self.beams, sentences[:, None].expand(-1, beams)):
            raise ValueError("a group of beams continues rows of more than one sentence")
        if sentences.numel() != old_sentences or not torch.equal(sentences, torch.arange(old_sentences, device=index.device)):
            self.cross = [None if kv is None else (kv[0][sentences], kv[1][sentences]) for kv in self.cross]
            if self.src_mask is not None:
                self.src_mask = self.src_mask[sentences]
        self.rows, self.beams = rows, beams


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
        self.q_proj = Linear(d_model, d_model)
        # Two matmuls, for self- and cross-attention alike: q from the queries' input, and k and v
        # together from the keys' input (for cross-attention the memory, projected once per source
        # batch when decoding with a cache).
        self.kv_proj = Linear(d_model, 2 * d_model)
        self.out_proj = Linear(d_model, d_model)

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
            memory: encoder output (N, S, D); cross-attention only. Ignored when the cache already
                holds this layer's cross keys/values.
            key_mask: (N, S) bool, True at keys that may be attended (padding mask); for cross-attention
                with a cache, the cache's ``src_mask``.
            causal: each query position attends only to itself and earlier positions.
            cache: decoding state; self-attention appends its keys/values to it, cross-attention
                reads (or fills) its projected memory.
            layer: this layer's slot in ``cache``.

        N is B, except in cross-attention with a cache of ``beams`` rows per sentence: N = B / beams.

        Returns:
            (B, T, D)
        """
        b, t, d = x.shape
        beams = 1
        if self.cross:
            kv = cache.cross[layer] if cache is not None else None
            if kv is None:
                kv = self.project_kv(memory)
                if cache is not None:  # read at every step: contiguous
                    kv = cache.cross[layer] = (kv[0].contiguous(), kv[1].contiguous())
            k, v = kv  # (N, H, S, Dh)
            if cache is not None:
                beams = cache.beams
        else:
            k, v = self.project_kv(x)  # (B, H, T, Dh)
            if cache is not None:
                k, v = cache.append(layer, k, v)  # (B, H, T_past + T, Dh)
        # A sentence's beams attend to the same keys: fold them into the query dimension, so that the
        # keys/values stay one per sentence. With beams = 1 this is the usual (B, H, T, Dh).
        n = b // beams
        q = self.q_proj(x).view(n, beams, t, self.n_heads, self.d_head)
        q = q.permute(0, 3, 1, 2, 4).reshape(n, self.n_heads, beams * t, self.d_head)  # (N, H, beams*T, Dh)

        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (N, 1, 1, S)
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
        # SDPA's flash kernel for the CPU costs more per (sentence, head) block than the few queries
        # of a decoding step's cross-attention need; its math kernel is about twice as fast there.
        few_queries_on_cpu = self.cross and cache is not None and x.device.type == "cpu"
        with sdpa_kernel(SDPBackend.MATH) if few_queries_on_cpu else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
            )  # (N, H, beams*T, Dh)
        out = out.view(n, self.n_heads, beams, t, self.d_head).permute(0, 2, 3, 1, 4)  # (N, beams, T, H, Dh)
        return self.out_proj(out.reshape(b, t, d))

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
