"""Translate sentences with a trained model and score them with sacreBLEU.

Input lines are normalised as the training data was, encoded, length-sorted into batches of at
most ``max_tokens`` source tokens (padding included), decoded, and put back in input order:
exactly one result per input line, an empty line giving an empty translation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnmt.batching import length_batches, pad
from attnmt.config import DecodeConfig, trained_data_config
from attnmt.decoding import Hypothesis, beam_search, greedy_search, sample_search
from attnmt.device import autocast, inference_dtype
from attnmt.model import Transformer
from attnmt.tokenizer import BOS_ID, EOS_ID, Tokenizer, TokenizerError, normalize

log = logging.getLogger(__name__)


@dataclass
class Translation:
    """The candidates for one input line, best first: detokenized text, score and target ids."""

    texts: list[str]
    scores: list[float]
    tokens: list[list[int]]


def encode_sources(tokenizer: Tokenizer, lines: list[str], max_len: int, first_line: int = 1,
                   prefix: Sequence[int] = ()) -> list[list[int]]:
    """Source ids (``prefix``, the pieces, EOS) of each line; an empty line gives ``[]``.

    A line with more than ``max_len`` ids (prefix and EOS included) is truncated to fit, with a
    warning that names its line number (``first_line`` is the number of ``lines[0]``): never dropped.
    """
    texts = [normalize(line) for line in lines]
    ids = tokenizer.encode_src(texts)
    sources = []
    for i, (text, piece_ids) in enumerate(zip(texts, ids)):
        if not text:
            sources.append([])
            continue
        room = max_len - len(prefix) - 1
        if len(piece_ids) > room:
            log.warning("line %d: %d source tokens exceed the model's limit of %d; truncated",
                        first_line + i, len(prefix) + len(piece_ids) + 1, max_len)
            piece_ids = piece_ids[:room]
        sources.append([*prefix, *piece_ids, EOS_ID])
    return sources


def target_prefix(tokenizer: Tokenizer, run_config: dict, tgt_lang: str | None,
                  src_lang: str | None = None) -> list[int]:
    """The tag ids that ask a model for ``tgt_lang``: ``[<2xx>]`` for a model of several target
    languages, none for a model of one (whose language ``tgt_lang``, if given, must be).

    The languages a model knows come from its tags, else from the data config it was trained on
    (``run_config["data"]``); ``src_lang``, if given, must be one it was trained to translate from.
    A direction of two known languages that was not trained (zero-shot) is translated, with a warning.

    Raises:
        TokenizerError: the model does not translate into ``tgt_lang`` or from ``src_lang`` (or, with
            several target languages, none was given); the message names the languages it knows.
    """
    data = trained_data_config(run_config["data"]) if run_config.get("data") else None
    tagged = sorted(tag[2:-1] for tag in tokenizer.tags if tag.startswith("<2"))
    targets = tagged or (data.target_languages() if data else [])
    if src_lang is not None and data and src_lang not in data.source_languages():
        raise TokenizerError(f"src_lang={src_lang}: this model translates from {', '.join(data.source_languages())} only")
    if tgt_lang is not None and targets and tgt_lang not in targets:
        raise TokenizerError(f"tgt_lang={tgt_lang}: this model translates into {', '.join(targets)} only")
    if tgt_lang is None and len(tagged) > 1:
        raise TokenizerError(f"this model translates into {', '.join(tagged)}: choose one with tgt_lang=")
    if src_lang is not None and tgt_lang is not None and data and (src_lang, tgt_lang) not in data.trained_pairs():
        log.warning("%s-%s is not a direction this model was trained on (%s): zero-shot", src_lang, tgt_lang,
                    ", ".join(sorted({f"{s}-{t}" for s, t in data.trained_pairs()})))
    if not tagged:
        return []
    return [tokenizer.tag_id(f"<2{tgt_lang or tagged[0]}>")]


def search(model: Transformer, src_tokens: Tensor, src_mask: Tensor, cfg: DecodeConfig,
           line_numbers: Tensor | None = None) -> list[list[Hypothesis]]:
    """``nbest`` draws per source with ``sampling`` (their random numbers fixed by ``cfg.seed`` and each
    source's ``line_numbers``, (B,)), best first; else greedy search for ``beam_size=1, nbest=1`` (its
    hypotheses have no score: NaN), else beam search."""
    lengths = dict(max_len_a=cfg.max_len_a, max_len_b=cfg.max_len_b, min_len=cfg.min_len)
    if cfg.sampling:
        if line_numbers is None:
            line_numbers = torch.arange(src_tokens.size(0), device=src_tokens.device)
        n, k = src_tokens.size(0), cfg.nbest
        draw_ids = line_numbers.repeat_interleave(k) * k + torch.arange(k, device=src_tokens.device).repeat(n)
        draws = sample_search(model, src_tokens.repeat_interleave(k, 0), src_mask.repeat_interleave(k, 0), draw_ids,
                              seed=cfg.seed, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, **lengths)
        return [sorted(draws[i * k : (i + 1) * k], key=lambda h: h.score, reverse=True) for i in range(n)]
    if cfg.beam_size == 1 and cfg.nbest == 1:
        return [[Hypothesis(tokens, math.nan)] for tokens in greedy_search(model, src_tokens, src_mask, **lengths)]
    return beam_search(model, src_tokens, src_mask, beam_size=cfg.beam_size, len_penalty=cfg.len_penalty,
                       nbest=cfg.nbest, stop=cfg.beam_stop, **lengths)


@torch.inference_mode()
def translate(
    model: Transformer,
    tokenizer: Tokenizer,
    lines: list[str],
    cfg: DecodeConfig,
    first_line: int = 1,
    on_batch: Callable[[int], None] | None = None,
    prefix: Sequence[int] = (),
) -> list[Translation]:
    """Translate ``lines``; one :class:`Translation` per line, in input order.

    Args:
        model: the model, in eval mode, on its device.
        tokenizer: the checkpoint's tokenizer.
        lines: raw source sentences.
        cfg: search and batching settings.
        first_line: the line number of ``lines[0]`` in its file, for warnings.
        on_batch: called with the number of sentences of each decoded batch (progress bars).
        prefix: tag ids put before every source (:func:`target_prefix`).
    """
    device = next(model.parameters()).device
    sources = encode_sources(tokenizer, lines, model.cfg.max_positions, first_line, prefix)
    hypotheses: list[list[Hypothesis]] = [[] for _ in lines]
    for batch in length_batches([len(s) for s in sources], cfg.max_tokens):
        src_tokens, src_mask = (t.to(device) for t in pad([sources[i] for i in batch]))
        with autocast(device, inference_dtype(device)):
            # Line numbers in the input (as first_line counts them) fix a line's draws when sampling.
            results = search(model, src_tokens, src_mask, cfg, torch.tensor(batch, device=device) + first_line)
        for i, hyps in zip(batch, results):
            hypotheses[i] = hyps
        if on_batch is not None:
            on_batch(len(batch))
    return translations(tokenizer, hypotheses, cfg.nbest)


def translations(tokenizer: Tokenizer, hypotheses: list[list[Hypothesis]], nbest: int) -> list[Translation]:
    """Detokenized :class:`Translation` of each line's hypotheses (best first); a line without any
    (an empty line) gets ``nbest`` empty candidates. Every engine's results end here."""
    # One decode call for all of them: SentencePiece's batch decoding costs about 0.1 ms a call.
    texts = iter(tokenizer.decode_tgt([h.tokens for hyps in hypotheses for h in hyps]))
    result = []
    for hyps in hypotheses:
        if not hyps:
            result.append(Translation([""] * nbest, [0.0] * nbest, [[] for _ in range(nbest)]))
            continue
        result.append(Translation([next(texts) for _ in hyps], [h.score for h in hyps], [h.tokens for h in hyps]))
    return result


def corpus_scores(hypotheses: list[str], references: list[str], tgt_lang: str | None = None,
                  bleu_tokenize: str | None = None) -> dict:
    """sacreBLEU corpus BLEU and chrF of detokenized ``hypotheses`` against raw ``references``.

    BLEU uses the 13a tokenizer and keeps case, except that ``tgt_lang`` zh, ja or ko selects the
    tokenizer sacreBLEU recommends for that language; ``bleu_tokenize`` overrides either.
    """
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu = BLEU(trg_lang=tgt_lang or "", tokenize=bleu_tokenize)
    chrf = CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


@torch.inference_mode()
def cross_attention(model: Transformer, src_ids: list[int], tgt_ids: list[int], layer: int | None = None) -> Tensor:
    """Cross-attention map (T, S) of one sentence pair, averaged over heads and over all layers
    (``layer=None``) or taken from one layer. Rows are the predicted target tokens (EOS last),
    columns the source tokens (EOS last)."""
    device = next(model.parameters()).device
    src_tokens, src_mask = (t.to(device) for t in pad([src_ids]))
    tgt_in = torch.tensor([[BOS_ID, *tgt_ids]], device=device)
    weights = model.cross_attention_weights(tgt_in, model.encode(src_tokens, src_mask), src_mask)  # (L, 1, H, T, S)
    weights = weights[:, 0].float().mean(dim=1)  # (L, T, S)
    return (weights.mean(dim=0) if layer is None else weights[layer]).cpu()


def attention_figure(weights: Tensor, src_pieces: list[str], tgt_pieces: list[str], title: str = ""):
    """A matplotlib heatmap of ``weights`` (T, S): target pieces down, source pieces across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, s = weights.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * s, 40), min(1.5 + 0.3 * t, 40)), dpi=100)
    ax.imshow(weights.numpy(), cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(s), src_pieces, rotation=90, fontsize=8)
    ax.set_yticks(range(t), tgt_pieces, fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    if title:
        ax.set_title(title, fontsize=9)
    with missing_glyphs_allowed():
        fig.tight_layout()
    return fig


@contextlib.contextmanager
def missing_glyphs_allowed() -> Iterator[None]:
    """Draw pieces in scripts the plot font lacks (CJK, say) as boxes, without a warning per glyph."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        yield
