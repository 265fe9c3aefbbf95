"""Validation is evaluation: the BLEU that training logs (and picks best.pt by) is the BLEU that
``attnmt-evaluate split=valid`` reports for the same checkpoint and search settings."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import sacrebleu

from attnmt.checkpoint import load_checkpoint
from conftest import FIXTURE_CORPUS, fixture_train_config


def chinese_side(sentences: list[str]) -> list[str]:
    """A stand-in Chinese target: each English word becomes two fixed CJK characters, no spaces, so
    that BLEU's 13a tokenizer (one token per sentence) and its zh tokenizer (one per character) differ."""
    def word(w: str) -> str:
        digest = hashlib.sha256(w.lower().encode()).digest()
        return "".join(chr(0x4E00 + int.from_bytes(digest[i : i + 2], "big") % 3000) for i in (0, 2))

    return ["".join(word(w) for w in s.replace(".", " .").split()) for s in sentences]


@pytest.fixture
def zh_corpus(tmp_path) -> Path:
    root = tmp_path / "de-zh"
    root.mkdir()
    for split in ("train", "valid", "test"):
        (root / f"{split}.de").write_bytes((FIXTURE_CORPUS / f"{split}.de").read_bytes())
        en = (FIXTURE_CORPUS / f"{split}.en").read_text(encoding="utf-8").splitlines()
        (root / f"{split}.zh").write_text("".join(line + "\n" for line in chinese_side(en)), encoding="utf-8")
    return root


def evaluate_split_valid(monkeypatch, capsys, ckpt: Path, *args: str) -> dict:
    import attnmt.cli.evaluate as evaluate

    monkeypatch.setattr(sys, "argv", ["attnmt-evaluate", f"ckpt={ckpt}", "split=valid", *args])
    evaluate.main()
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("tgt_lang", ["en", "zh"])
def test_valid_bleu_in_training_equals_attnmt_evaluate(tgt_lang, tmp_path, zh_corpus, monkeypatch, capsys,
                                                       restore_logging, one_thread):
    from attnmt.training import train

    corpus = FIXTURE_CORPUS if tgt_lang == "en" else zh_corpus
    cfg = fixture_train_config(tmp_path / "run", f"data.tgt_lang={tgt_lang}", "optim.lr=3e-3", "optim.warmup_steps=10",
                               "model.dropout=0.0", "train.max_tokens=1024", "train.max_steps=60",
                               "train.valid_every=60", "train.valid_decode.beam_size=2", "train.valid_decode.len_penalty=0.6",
                               "train.seed=1", corpus=corpus)
    result = train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    logged = load_checkpoint(ckpt)["metrics"]
    assert logged["bleu"] == result["best_bleu"] > 1, logged  # the model has learnt something to score

    hyp_file = tmp_path / "hyp.txt"
    report = evaluate_split_valid(monkeypatch, capsys, ckpt, "beam_size=2", "len_penalty=0.6", f"hyp={hyp_file}")
    assert report["bleu"] == round(logged["bleu"], 2) and report["chrf"] == round(logged["chrf"], 2)
    assert report["n_sentences"] == logged["n_sentences"] == 40
    hyps = hyp_file.read_text(encoding="utf-8").splitlines()
    refs = (corpus / f"valid.{tgt_lang}").read_text(encoding="utf-8").splitlines()
    if tgt_lang == "zh":
        # sacreBLEU's zh tokenizer, as attnmt-evaluate picks it; 13a (what validation once used) would
        # see one token per sentence and give another BLEU.
        assert "tok:zh" in report["bleu_signature"]
        assert report["bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score, 2)
        assert abs(sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score - report["bleu"]) > 1
    else:
        assert report["bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
