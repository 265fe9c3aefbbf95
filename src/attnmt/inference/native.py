"""``engine=native``: attnmt's own search (:mod:`attnmt.decoding`) on the checkpoint's model, fp32 on
the CPU and bf16 on GPUs that support it; the one engine that runs every strategy, ``beam_stop=exact``
and cross-attention maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnmt.batching import pad
from attnmt.config import DecodeConfig
from attnmt.decoding import STRATEGIES, Hypothesis, RunningSearch, search
from attnmt.device import autocast, inference_dtype
from attnmt.inference import Capabilities
from attnmt.model import Transformer
from attnmt.tokenizer import Tokenizer

CAPABILITIES = Capabilities(strategies=frozenset(s.name for s in STRATEGIES), exact_stop=True, nbest=True,
                            attention=True, compute_type=False, continuous=True)


class NativeBackend:
    """attnmt's search on ``model`` (in eval mode, on its device)."""

    capabilities = CAPABILITIES

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.max_positions = model.cfg.max_positions

    @torch.inference_mode()
    def search(self, sources: list[list[int]], line_numbers: list[int], cfg: DecodeConfig,
               tgt_prefix: list[int]) -> list[list[Hypothesis]]:
        device = next(self.model.parameters()).device
        src_tokens, src_mask = (t.to(device) for t in pad(sources, pad_id=self.model.cfg.pad_id))
        with autocast(device, inference_dtype(device)):
            return search(self.model, src_tokens, src_mask, cfg, torch.tensor(line_numbers, device=device), tgt_prefix)

    def running_search(self, cfg: DecodeConfig, tgt_prefix: Sequence[int], max_rows: int | None) -> NativeRunningSearch:
        """A :class:`~attnmt.decoding.RunningSearch` on the model (continuous batching: lines join
        and leave at any step), each step under inference mode and the engine's precision."""
        return NativeRunningSearch(RunningSearch(self.model, cfg, tgt_prefix, max_rows))

    @torch.inference_mode()
    def cross_attention(self, src_ids: list[int], tgt_ids: list[int], layer: int | None = None) -> Tensor:
        """Cross-attention map (T, S) of one sentence pair, averaged over heads and over all layers
        (``layer=None``) or taken from one layer. Rows are the predicted target tokens (EOS last),
        columns the source tokens (EOS last)."""
        return cross_attention(self.model, src_ids, tgt_ids, layer)

    def attention_maps(self, src_ids: list[int], tgt_ids: list[int]) -> Tensor:
        """:func:`attention_maps`: every layer's and head's cross-attention (L, H, T, S) of one pair."""
        return attention_maps(self.model, src_ids, tgt_ids)


class NativeRunningSearch:
    """A :class:`~attnmt.decoding.RunningSearch` whose steps run as :meth:`NativeBackend.search` runs
    its batches: without autograd, under the device's inference precision."""

    def __init__(self, search: RunningSearch) -> None:
        self.search = search
        self.device = search.device
        self.dtype = inference_dtype(search.device)

    def add(self, source: Sequence[int], line_number: int = 0) -> int:
        return self.search.add(source, line_number)

    def cancel(self, ticket: int) -> None:
        self.search.cancel(ticket)

    @property
    def rows(self) -> int:
        return self.search.rows

    @property
    def waiting(self) -> int:
        return self.search.waiting

    @property
    def last_rows(self) -> int:
        return self.search.last_rows

    def __bool__(self) -> bool:
        return bool(self.search)

    @torch.inference_mode()
    def step(self) -> list[tuple[int, list[Hypothesis]]]:
        with autocast(self.device, self.dtype):
            return self.search.step()


def cross_attention(model: Transformer, src_ids: list[int], tgt_ids: list[int], layer: int | None = None) -> Tensor:
    """:meth:`NativeBackend.cross_attention` of ``model`` (validation draws its maps with it too)."""
    weights = attention_maps(model, src_ids, tgt_ids).mean(dim=1)  # (L, T, S)
    return weights.mean(dim=0) if layer is None else weights[layer]


@torch.inference_mode()
def attention_maps(model: Transformer, src_ids: list[int], tgt_ids: list[int]) -> Tensor:
    """The cross-attention (L, H, T, S) of every decoder layer and head for one sentence pair, as the
    model attended while it decoded ``tgt_ids`` (teacher-forced: cached decoding computes the same).
    Rows are the predicted target tokens (EOS last), columns the source tokens (EOS last)."""
    device = next(model.parameters()).device
    src_tokens, src_mask = (t.to(device) for t in pad([src_ids], pad_id=model.cfg.pad_id))
    tgt_in = torch.tensor([[model.cfg.bos_id, *tgt_ids]], device=device)
    weights = model.cross_attention_weights(tgt_in, model.encode(src_tokens, src_mask), src_mask)  # (L, 1, H, T, S)
    return weights[:, 0].float().cpu()


def open_backend(paths: Sequence, device: torch.device, compute_type: str) -> tuple[NativeBackend, Tokenizer, dict]:
    """The backend on checkpoint(s) ``paths`` (weights averaged when several), with its tokenizer and run config."""
    from attnmt.checkpoint import load_for_inference

    model, tokenizer, run_config = load_for_inference(list(paths), device)
    return NativeBackend(model), tokenizer, run_config
