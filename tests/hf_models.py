"""Small transformers translation models for the import tests, made here (no download can happen).

Each is what ``save_pretrained`` writes for its architecture, with OPUS-MT's or M2M100's or NLLB's
own settings and SentencePiece model(s) trained on Multi30k: Marian (post-norm, swish, a non-zero
``final_logits_bias``, separate source/target SentencePiece models over one joint ``vocab.json``,
``<pad>`` as the decoder's start), M2M100 (fairseq's dictionary over a BPE model, ``__xx__`` codes,
madeup words) and NLLB-200 (fairseq's id offset, ``xxx_Xxxx`` codes, ``sentencepiece.bpe.model``
beside ``tokenizer.json``). Weights are random (std 0.15): such a model repeats a few pieces up to
the length limit, so these models test the computation (logits, tokenization, greedy search), and
the tests compare beam search on trained models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import sentencepiece as spm
import torch

SIZES = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256, init_std=0.15)
NLLB_CODES = ["ces_Latn", "deu_Latn", "eng_Latn", "fra_Latn"]


def _spm(lines: list[str], prefix: Path, vocab_size: int, model_type: str) -> Path:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size,
                                   model_type=model_type, minloglevel=2, num_threads=1)
    return Path(f"{prefix}.model")


def _lines(multi30k: Path, lang: str, n: int = 2000) -> list[str]:
    return (multi30k / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:n]


def _work_dir(out: Path) -> Path:
    """A scratch folder beside ``out`` for the SentencePiece models and vocabularies a tokenizer is built from."""
    work = out.parent / f".{out.name}-spm"
    work.mkdir(parents=True, exist_ok=True)
    return work


def _save(model, tokenizer, out: Path, work: Path) -> Path:
    """Randomize ``model``'s parameters (LayerNorms kept) and Marian's output bias (a buffer),
    ``save_pretrained`` it and ``tokenizer`` into ``out``, and remove the scratch folder ``work``."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0.0, SIZES["init_std"])
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0.0, 1.0)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(work)
    return out


def marian(multi30k: Path, out: Path) -> Path:
    """An OPUS-MT-shaped de-en Marian folder."""
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    work = _work_dir(out)
    src = _spm(_lines(multi30k, "de"), work / "source", 600, "unigram")
    tgt = _spm(_lines(multi30k, "en"), work / "target", 600, "unigram")
    sp_src, sp_tgt = spm.SentencePieceProcessor(model_file=str(src)), spm.SentencePieceProcessor(model_file=str(tgt))
    pieces = sorted({sp.id_to_piece(i) for sp in (sp_src, sp_tgt) for i in range(3, sp.get_piece_size())})
    vocab = {piece: i for i, piece in enumerate(["</s>", "<unk>", *pieces, "<pad>"])}  # OPUS-MT: pad last
    shutil.copy(src, work / "source.spm")
    shutil.copy(tgt, work / "target.spm")
    (work / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    tokenizer = MarianTokenizer(str(work / "source.spm"), str(work / "target.spm"), str(work / "vocab.json"),
                                source_lang="de", target_lang="en")
    pad = tokenizer.pad_token_id
    config = MarianConfig(vocab_size=len(vocab), activation_function="swish", scale_embedding=True,
                          pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=pad,
                          forced_eos_token_id=tokenizer.eos_token_id, share_encoder_decoder_embeddings=True,
                          tie_word_embeddings=True, **SIZES)
    return _save(MarianMTModel(config), tokenizer, out, work)


def m2m_100(multi30k: Path, out: Path) -> Path:
    """An M2M100-shaped folder (de, en and every other M2M100 code; 8 madeup words)."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    work = _work_dir(out)
    model_file = _spm(_lines(multi30k, "de") + _lines(multi30k, "en"), work / "sentencepiece.bpe", 800, "bpe")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = ["<s>", "<pad>", "</s>", "<unk>"] + [sp.id_to_piece(i) for i in range(3, sp.get_piece_size())]
    (work / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}, ensure_ascii=False))
    tokenizer = M2M100Tokenizer(str(work / "vocab.json"), str(model_file), src_lang="de", tgt_lang="en")
    # As M2M100's: the dictionary, then a code per language (__de__, ...), then 8 madeup words.
    config = M2M100Config(vocab_size=len(pieces) + len(tokenizer.lang_code_to_id) + 8, **SIZES)
    return _save(M2M100ForConditionalGeneration(config), tokenizer, out, work)


def nllb(multi30k: Path, out: Path) -> Path:
    """An NLLB-200-shaped folder (four codes), its SentencePiece model beside tokenizer.json as on the hub."""
    from transformers import AutoTokenizer, M2M100Config, M2M100ForConditionalGeneration

    work = _work_dir(out)
    model_file = _spm(_lines(multi30k, "de") + _lines(multi30k, "en"), work / "spm", 800, "bpe")
    shutil.copy(model_file, work / "sentencepiece.bpe.model")
    (work / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "NllbTokenizer", "src_lang": "deu_Latn", "tgt_lang": "eng_Latn",
        "extra_special_tokens": NLLB_CODES}))
    tokenizer = AutoTokenizer.from_pretrained(str(work))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, out / "sentencepiece.bpe.model")  # transformers 5 writes tokenizer.json only
    return _save(M2M100ForConditionalGeneration(M2M100Config(vocab_size=len(tokenizer), **SIZES)), tokenizer, out, work)


BUILDERS = {"marian": marian, "m2m_100": m2m_100, "nllb": nllb}
