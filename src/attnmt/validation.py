"""Validation during training (rank 0): each direction's valid split batched once (:class:`ValidSet`,
:func:`valid_set`), its loss and perplexity teacher-forced, and its BLEU and chrF through
:func:`~attnmt.evaluation.translate_and_score`, the path ``attnmt-evaluate`` takes (:func:`validate`);
and the cross-attention map TensorBoard shows (:func:`log_attention_map`)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from attnmt.batching import Batch, TokenBucketSampler, collate
from attnmt.config import DecodeConfig, TrainConfig
from attnmt.data import Stream, load_references, token_lengths
from attnmt.evaluation import translate_and_score
from attnmt.inference import Engine
from attnmt.inference.native import NativeBackend, cross_attention
from attnmt.model import Transformer
from attnmt.optim import label_smoothed_nll
from attnmt.plots import attention_figure, missing_glyphs_allowed
from attnmt.tokenizer import Tokenizer


@dataclass
class ValidSet:
    """One direction's valid split as validation uses it (rank 0): teacher-forced batches for the loss,
    and the sources and raw references of its first ``train.valid_max_sentences`` lines for BLEU and chrF."""

    name: str  # the direction, e.g. en-de
    batches: list[Batch]  # collated, on the model's device
    sources: list[str]
    references: list[str]
    tgt_lang: str
    prefix: list[int]  # the ids before each source (tags, or the source language's code), as attnmt-evaluate puts them
    tgt_prefix: list[int]  # the ids each translation starts with (the target language's code for M2M100 and NLLB)
    first_pair: tuple[list[int], list[int]]  # ids of the first pair (EOS included), for the attention map


def valid_set(stream: Stream, valid_ds, prefixes: tuple[list[int], list[int]], train_cfg: TrainConfig,
              device: torch.device, tokenizer: Tokenizer) -> ValidSet:
    """Batch one direction's tokenized valid split once; valid sentences are never length-filtered, so
    one longer than ``train.max_tokens`` gets a batch of its own. ``prefixes``: the ids before each
    source and before each target (:meth:`~attnmt.tokenizer.Tokenizer.direction_ids`)."""
    src_len, tgt_len = token_lengths(valid_ds)
    longest = int(max(src_len.max(), tgt_len.max()))
    sampler = TokenBucketSampler(src_len, tgt_len, max(train_cfg.max_tokens, longest), shuffle=False)
    batches = [collate([valid_ds[i] for i in rows], tokenizer.pad_id, tokenizer.bos_id).to(device) for rows in sampler]
    prefix, tgt_prefix = prefixes
    limit = min(train_cfg.valid_max_sentences or len(valid_ds), len(valid_ds))
    first = valid_ds[0]
    return ValidSet(stream.name, batches, list(valid_ds.select(range(limit))["src"]),
                    load_references(stream.cfg, "valid")[:limit], stream.cfg.tgt_lang, prefix, tgt_prefix,
                    (list(first["src_ids"]), list(first["tgt_ids"])))


@torch.no_grad()
def validate(model: Transformer, valid: list[ValidSet], tokenizer: Tokenizer, decode: DecodeConfig,
             autocast: contextlib.AbstractContextManager, label_smoothing: float, best_metric: str = "mean") -> dict:
    """Loss, NLL and perplexity over every direction's valid batches, and each direction's BLEU/chrF.

    The translations and their scores come from the native engine through
    :func:`~attnmt.evaluation.translate_and_score` with ``decode``, as ``attnmt-evaluate split=valid``
    computes them, so the BLEU that picks ``best.pt`` is the BLEU that command reports. ``bleu`` and
    ``chrf`` are the mean over directions (``best_metric="mean"``) or one direction's (its name); with
    several directions, ``bleu/NAME`` and ``chrf/NAME`` hold each one's.
    """
    was_training = model.training
    model.eval()
    loss_sum = nll_sum = 0.0
    n_tokens = 0
    for batch in (b for direction in valid for b in direction.batches):
        with autocast:
            logits = model(batch.src_tokens, batch.src_mask, batch.tgt_in)
        loss, nll = label_smoothed_nll(logits, batch.tgt_out, label_smoothing, model.cfg.pad_id)
        loss_sum += loss.item()
        nll_sum += nll.item()
        n_tokens += batch.n_tgt_tokens
    scores, examples = {}, []
    engine = Engine("native", NativeBackend(model), tokenizer)
    for direction in valid:
        hypotheses, scores[direction.name], _ = translate_and_score(
            engine, direction.sources, direction.references, decode, direction.tgt_lang, prefix=direction.prefix,
            tgt_prefix=direction.tgt_prefix)
        examples += list(zip(hypotheses[:3], direction.references[:3]))[: max(1, 3 // len(valid))]
    model.train(was_training)
    nll = nll_sum / max(n_tokens, 1)
    chosen = {
        key: float(np.mean([s[key] for s in scores.values()])) if best_metric == "mean" else scores[best_metric][key]
        for key in ("bleu", "chrf")
    }
    per_direction = {f"{key}/{name}": s[key] for name, s in scores.items() for key in ("bleu", "chrf")}
    signatures = {k: v for k, v in next(iter(scores.values())).items() if k.endswith("signature")}
    return {
        "loss": loss_sum / max(n_tokens, 1),
        "nll": nll,
        "ppl": math.exp(min(nll, 100.0)),
        **chosen,
        **(per_direction if len(valid) > 1 else {}),
        **signatures,
        "n_sentences": sum(len(d.sources) for d in valid),
        "examples": examples,
    }


def log_attention_map(writer, model: Transformer, tokenizer: Tokenizer, src_ids: list[int], tgt_ids: list[int],
                      step: int) -> None:
    """Add one cross-attention heatmap (mean over layers and heads) of a valid pair to TensorBoard.

    The reference is teacher-forced, so the map shows where the model looks while it predicts each
    reference token. Needs matplotlib, an optional extra (``pip install -e '.[plot]'``).

    Args:
        src_ids: source ids, EOS included; tgt_ids: reference ids, EOS included.
    """
    was_training = model.training
    model.eval()  # dropout would blur the map
    weights = cross_attention(model, src_ids, tgt_ids[:-1])  # (T, S): rows predict tgt_ids, EOS last
    model.train(was_training)
    fig = attention_figure(weights, tokenizer.src_pieces(src_ids), tokenizer.tgt_pieces(tgt_ids),
                           title=f"valid sentence 1, step {step}: mean over layers and heads")
    with missing_glyphs_allowed():
        writer.add_figure("valid/attention", fig, step)  # closes the figure
