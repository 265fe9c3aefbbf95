"""Scoring: sacreBLEU corpus BLEU and chrF of detokenized hypotheses against raw references, the one
function behind ``attnmt-evaluate`` and training's validation."""

from __future__ import annotations


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
