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

    Sentences may also join a running search (:meth:`join`, continuous batching): their rows start
    empty at the current column of the self-attention buffers, which every row writes at each step.
    ``starts`` (N,) then holds the column of each sentence's first position: columns before it are
    masked (:attr:`self_mask`) and its positions count from it (:attr:`positions`). ``reorder`` drops
    the columns no kept sentence uses. While every sentence started together, ``starts`` is None and
    a step is what it was before joins existed: no mask, one position for all rows.
    """

    def __init__(self, n_layers: int, max_len: int | None = None) -> None:
        self.max_len = max_len
        self.beams = 1
        self.rows = 0
        self._kv: list[Tensor | None] = [None] * n_layers  # (rows allocated, capacity, 2, H, Dh)
        self._spare: list[Tensor | None] = [None] * n_layers
        self._len = [0] * n_layers
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * n_layers  # (N, H, S, Dh) each
        self.src_mask: Tensor | None = None  # (N, S)
        self.starts: Tensor | None = None  # (N,) first column of each sentence's rows; None: all 0
        self.self_mask: Tensor | None = None  # (rows, T) for the step under way; None: no mask
        # Room for sentences that join: cross keys/values and masks live in buffers of (sentences,
        # source length) capacity, of which `cross` and `src_mask` are views.
        self._cross_room: list[tuple[Tensor, Tensor] | None] = [None] * n_layers  # (N cap, H, S cap, Dh)
        self._mask_room: Tensor | None = None  # (N cap, S cap)
        self._cross_spare: list[tuple[Tensor, Tensor] | None] = [None] * n_layers  # reorder gathers into these
        self._mask_spare: Tensor | None = None

    @property
    def seq_len(self) -> int:
        """Number of target positions already cached (in layer 0; all layers agree between steps)."""
        return self._len[0]

    def positions(self) -> int | Tensor:
        """The position of each row's next token: the cached length, or (rows,) where sentences joined
        at different steps."""
        if self.starts is None:
            return self.seq_len
        return (self.seq_len - self.starts).repeat_interleave(self.beams)

    def begin_step(self, t_new: int) -> None:
        """Prepare :attr:`self_mask` for a step of ``t_new`` positions (one, where sentences joined
        at different steps)."""
        if self.starts is None:
            self.self_mask = None
            return
        if t_new != 1:
            raise ValueError(f"sentences that joined at different steps decode one position a step, not {t_new}")
        columns = torch.arange(self.seq_len + 1, device=self.starts.device)
        self.self_mask = (columns >= self.starts[:, None]).repeat_interleave(self.beams, 0)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values ``(B, H, T_new, Dh)``; return all cached so far ``(B, H, T, Dh)``."""
        b, _, t_new, _ = k.shape
        if self.rows and b != self.rows:
            raise ValueError(f"appending {b} rows to a cache of {self.rows} rows; reorder the cache first")
        n = self._len[layer]
        buf = self._kv[layer]
        if buf is None or n + t_new > buf.size(1) or b > buf.size(0):
            buf = self._grow(layer, k, n + t_new, b)
        self.rows = b
        buf[:b, n : n + t_new, 0] = k.transpose(1, 2)
        buf[:b, n : n + t_new, 1] = v.transpose(1, 2)
        self._len[layer] = n + t_new
        kv = buf[:b, : n + t_new]  # (B, T, 2, H, Dh)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def _grow(self, layer: int, k: Tensor | None, length: int, rows: int) -> Tensor:
        """A buffer for at least ``length`` positions and ``rows`` rows holding this layer's cached
        ones (doubling, so that appends beyond ``max_len`` stay amortised O(1)); ``k`` (B, H, T, Dh)
        gives the heads, width and type of a layer's first buffer (None: the layer has one)."""
        old = self._kv[layer]
        like, (h, dh) = (k, (k.size(1), k.size(3))) if old is None else (old, old.shape[3:])
        capacity = max(length, self.max_len or 16)
        n_rows = rows
        if old is not None:
            capacity = max(capacity, old.size(1) if length <= old.size(1) else 2 * old.size(1))
            n_rows = max(rows, old.size(0) if rows <= old.size(0) else 2 * old.size(0))
        buf = like.new_empty(n_rows, capacity, 2, h, dh)
        if old is not None:
            kept = min(self.rows, old.size(0))
            buf[:kept, : self._len[layer]] = old[:kept, : self._len[layer]]
        self._kv[layer], self._spare[layer] = buf, None
        return buf

    def join(self, cross: list[tuple[Tensor, Tensor]], src_mask: Tensor, beams: int) -> None:
        """Add J source sentences of ``beams`` rows each, after the rows there are; their rows'
        self-attention starts empty at the next step.

        Args:
            cross: each layer's cross-attention keys and values of the new sentences, (J, H, S_j, Dh)
                each (:meth:`MultiHeadAttention.project_kv` of their memory).
            src_mask: (J, S_j) their source padding mask.
            beams: rows per sentence, as the cache's (any, if it holds no rows).
        """
        j, s_new = src_mask.shape
        if self.rows == 0:  # a fresh start: everything from before has left
            self._len = [0] * len(self._len)
            self.starts = None
            self.cross = [(k.contiguous(), v.contiguous()) for k, v in cross]
            self.src_mask = src_mask
            self._cross_room, self._mask_room = [None] * len(self.cross), None
            self._cross_spare, self._mask_spare = [None] * len(self.cross), None
            self.rows, self.beams = j * beams, beams
            return
        if beams != self.beams:
            raise ValueError(f"sentences of {beams} beams cannot join a cache of {self.beams} beams a sentence")
        n, s_old = self.src_mask.shape
        width = max(s_old, s_new)
        if self._mask_room is None or self._mask_room.size(0) < n + j or self._mask_room.size(1) < width:
            self._make_room(max(n + j, 2 * n), max(width, s_old if self._mask_room is None else self._mask_room.size(1)))
        for layer, (k, v) in enumerate(cross):
            k_room, v_room = self._cross_room[layer]
            k_room[n : n + j, :, :s_new] = k
            v_room[n : n + j, :, :s_new] = v
            self.cross[layer] = (k_room[: n + j, :, :width], v_room[: n + j, :, :width])
        mask = self._mask_room
        mask[:n, s_old:width] = False
        mask[n : n + j, :s_new] = src_mask
        mask[n : n + j, s_new:width] = False
        self.src_mask = mask[: n + j, :width]
        before = torch.zeros(n, dtype=torch.long, device=src_mask.device) if self.starts is None else self.starts
        self.starts = torch.cat([before, torch.full((j,), self.seq_len, dtype=torch.long, device=src_mask.device)])
        first_row, self.rows = self.rows, self.rows + j * beams
        for layer, buf in enumerate(self._kv):
            if buf is not None and buf.size(0) < self.rows:
                buf = self._grow(layer, None, self._len[layer], self.rows)
            if buf is not None:
                # The columns before the new rows' start are read under the mask: they must hold no
                # NaN (0 x NaN is NaN). A kept row's columns are always written, so these are the only ones.
                buf[first_row : self.rows, : self._len[layer]] = 0

    def _make_room(self, sentences: int, width: int) -> None:
        """Move the cross-attention state into buffers of ``sentences`` x ``width`` capacity (zeros
        beyond what is there: read under the mask, they must hold no NaN)."""
        n, s = self.src_mask.shape
        mask = self.src_mask.new_zeros(sentences, width)
        mask[:n, :s] = self.src_mask
        self._mask_room, self.src_mask = mask, mask[:n, :s]
        self._mask_spare, self._cross_spare = None, [None] * len(self.cross)
        for layer, (k, v) in enumerate(self.cross):
            k_room = k.new_zeros(sentences, k.size(1), width, k.size(3))
            v_room = v.new_zeros(sentences, v.size(1), width, v.size(3))
            k_room[:n, :, :s], v_room[:n, :, :s] = k, v
            self._cross_room[layer] = (k_room, v_room)
            self.cross[layer] = (k_room[:n, :, :s], v_room[:n, :, :s])

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
        old_sentences = self.rows // self.beams if self.rows else len(index)
        sentences = index[::beams] // self.beams  # (N,) the sentence of each new group
        if not torch.equal(index.view(-1, beams) // self.beams, sentences[:, None].expand(-1, beams)):
            raise ValueError("a group of beams continues rows of more than one sentence")
        changed = sentences.numel() != old_sentences or not torch.equal(
            sentences, torch.arange(old_sentences, device=index.device))
        first = 0  # the first column a kept sentence uses: those before it are dropped
        if self.starts is not None and changed:
            self.starts = self.starts[sentences]
            first = int(self.starts.min()) if rows else 0
            self.starts -= first
            if rows == 0 or int(self.starts.max()) == 0:
                self.starts = None
        for layer, buf in enumerate(self._kv):
            if buf is None:
                continue
            spare = self._spare[layer]
            if spare is None or spare.size(0) < rows:
                spare = buf.new_empty(max(rows, buf.size(0)), *buf.shape[1:])
            n = self._len[layer]
            if buf.requires_grad:  # autograd does not follow out=; decoding runs without it
                spare[:rows, : n - first] = buf[: self.rows, first:n][index]
            else:
                torch.index_select(buf[: self.rows, first:n], 0, index, out=spare[:rows, : n - first])
            self._kv[layer], self._spare[layer] = spare, buf
            self._len[layer] = n - first
        if changed:
            self._keep_sentences(sentences)
        self.rows, self.beams = rows, beams

    def _keep_sentences(self, sentences: Tensor) -> None:
        """Keep the cross-attention state of ``sentences`` (N,), in that order."""
        if self._mask_room is None:
            self.cross = [None if kv is None else (kv[0][sentences], kv[1][sentences]) for kv in self.cross]
            if self.src_mask is not None:
                self.src_mask = self.src_mask[sentences]
            return
        # Sentences join and leave: gather into a second set of buffers of the same capacity, and
        # narrow the source width to the longest sentence kept.
        mask = self.src_mask[sentences]
        used = mask.any(dim=0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 1
        n = sentences.numel()
        spare_mask = self._mask_spare if self._mask_spare is not None else torch.zeros_like(self._mask_room)
        spare_mask[:n, :width] = mask[:, :width]
        self._mask_spare, self._mask_room = self._mask_room, spare_mask
        self.src_mask = spare_mask[:n, :width]
        spares = self._cross_spare
        for layer, (k, v) in enumerate(self.cross):
            k_room, v_room = spares[layer] or (torch.zeros_like(self._cross_room[layer][0]),
                                               torch.zeros_like(self._cross_room[layer][1]))
            torch.index_select(k[:, :, :width], 0, sentences, out=k_room[:n, :, :width])
            torch.index_select(v[:, :, :width], 0, sentences, out=v_room[:n, :, :width])
            spares[layer] = self._cross_room[layer]
            self._cross_room[layer] = (k_room, v_room)
            self.cross[layer] = (k_room[:n, :, :width], v_room[:n, :, :width])


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
                key_mask = cache.self_mask  # (B, T) where sentences joined at different steps, else None
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
