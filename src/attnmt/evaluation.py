"""Scoring: sacreBLEU corpus BLEU and chrF of detokenized hypotheses against raw references.
:func:`translate_and_score` is the one path from a test set to its scores, which ``attnmt-evaluate``
and training's validation both take, so the BLEU that picks ``best.pt`` is the BLEU that command reports."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attnmt.config import DecodeConfig
    from attnmt.inference import Engine


def translate_and_score(engine: Engine, sources: list[str], references: list[str], decode: DecodeConfig,
                        tgt_lang: str | None = None, bleu_tokenize: str | None = None, *,
                        prefix: Sequence[int] | None = None, tgt_prefix: Sequence[int] | None = None,
                        on_batch: Callable[[int], None] | None = None) -> tuple[list[str], dict, float]:
    """Translate ``sources`` with ``engine`` and ``decode`` and score each line's first translation
    (:func:`corpus_scores`). Returns the hypotheses, the scores and the seconds the translation took."""
    start = time.perf_counter()
    translations = engine.translate(sources, decode, on_batch=on_batch, prefix=prefix, tgt_prefix=tgt_prefix)
    seconds = time.perf_counter() - start
    hypotheses = [t.texts[0] for t in translations]
    return hypotheses, corpus_scores(hypotheses, references, tgt_lang, bleu_tokenize), seconds


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
