"""SentencePiece tokenizer: round trips, fixed special ids, reuse by hash, states for checkpoints."""

from __future__ import annotations

import logging
import io
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from attnmt.data import read_lines
from attnmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, TokenizerError, normalize
from conftest import tokenizer_config

TINY = Path(__file__).parent / "fixtures" / "tiny"


def tiny_pairs(split: str = "train") -> tuple[list[str], list[str]]:
    return read_lines(TINY / f"{split}.de"), read_lines(TINY / f"{split}.en")


@pytest.fixture(scope="module")
def joint(tmp_path_factory) -> Tokenizer:
    src, tgt = tiny_pairs()
    return Tokenizer.train(src, tgt, tokenizer_config(vocab_size=400), tmp_path_factory.mktemp("joint"))


def test_normalize_applies_nfkc_and_collapses_whitespace():
    assert normalize("  Ein\tHund \u00a0 läuft. ") == "Ein Hund läuft."
    assert normalize("ﬁne Ｄａｙ") == "fine Day"  # ligature and full-width forms
    assert normalize("Cafe\u0301") == "Café"  # combining accent composed
    assert normalize(normalize("  a\u3000b ")) == normalize("  a\u3000b ")


def test_special_ids_are_fixed(joint):
    sp = joint._src_sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    ids = joint.encode_src(["Der Hund läuft."])[0]
    assert ids and BOS_ID not in ids and EOS_ID not in ids and PAD_ID not in ids


def test_encode_decode_round_trip_including_unseen_characters(joint):
    src, tgt = tiny_pairs("valid")
    odd = ["Ωμέγα und 😀 im Café", "Straße №5 – ok?"]  # characters the training data never had
    for texts, encode, decode in ((src + odd, joint.encode_src, joint.decode_src), (tgt + odd, joint.encode_tgt, joint.decode_tgt)):
        texts = [normalize(t) for t in texts]
        assert decode(encode(texts)) == texts
    assert UNK_ID not in joint.encode_src([normalize(odd[0])])[0]  # byte fallback, not <unk>


def test_decode_ignores_pad_bos_eos(joint):
    ids = joint.encode_tgt(["The dog runs."])[0]
    assert joint.decode_tgt([[BOS_ID] + ids + [EOS_ID, PAD_ID, PAD_ID]]) == joint.decode_tgt([ids])


def test_decoded_targets_never_hold_a_line_break(joint):
    # Byte fallback puts <0x0A> and friends in the vocabulary; a model can emit them.
    sp = joint._tgt_sp
    breaks = [sp.piece_to_id(f"<0x{b:02X}>") for b in (0x0A, 0x0D, 0x0B, 0x0C)]
    assert all(sp.id_to_piece(i) != "<unk>" for i in breaks)
    dog = joint.encode_tgt(["The dog"])[0]
    runs = joint.encode_tgt(["runs."])[0]
    (text,) = joint.decode_tgt([dog + breaks + runs])
    assert text.splitlines() == [text] and text.startswith("The dog") and text.endswith("runs."), repr(text)
    assert joint._tgt_sp.decode(dog + breaks + runs).count("\n") == 1  # what the fix is for


def test_pieces_spell_the_sentence(joint):
    text = "Die Kinder spielen im Garten."
    pieces = joint.src_pieces(joint.encode_src([text])[0])
    assert "".join(pieces).replace("▁", " ").strip() == text
    ids = joint.encode_tgt([text])[0]
    assert "".join(joint.tgt_pieces(ids)).replace("▁", " ").strip() == text


def test_per_language_models_and_bpe(tmp_path):
    src, tgt = tiny_pairs()
    tok = Tokenizer.train(src, tgt, tokenizer_config(joint=False, model_type="bpe", vocab_size=330), tmp_path)
    assert not tok.joint
    assert {p.name for p in tmp_path.iterdir()} >= {"src.model", "tgt.model", "tokenizer.json"}
    assert tok.decode_src(tok.encode_src(src[:20])) == src[:20]
    assert tok.decode_tgt(tok.encode_tgt(tgt[:20])) == tgt[:20]
    # Each side has its own vocabulary: German-only words are single pieces only on the source side.
    assert len(tok.src_pieces(tok.encode_src(["Mädchen"])[0])) < len(tok.tgt_pieces(tok.encode_tgt(["Mädchen"])[0]))


def test_reused_when_data_and_settings_match(tmp_path, monkeypatch):
    src, tgt = tiny_pairs()
    cfg = tokenizer_config(vocab_size=400)
    first = Tokenizer.train(src, tgt, cfg, tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although data and settings are unchanged")

    monkeypatch.setattr("attnmt.tokenizer._train_model", no_training)
    again = Tokenizer.train(src, tgt, cfg, tmp_path)
    assert again.fingerprint == first.fingerprint
    with pytest.raises(AssertionError):  # other data: must train
        Tokenizer.train(src[:-1], tgt[:-1], cfg, tmp_path)
    with pytest.raises(AssertionError):  # other settings: must train
        Tokenizer.train(src, tgt, tokenizer_config(vocab_size=401), tmp_path)


def test_state_survives_weights_only_checkpoint(joint):
    state = joint.to_state()
    buf = io.BytesIO()
    torch.save({"tokenizer": state}, buf)
    buf.seek(0)
    restored = Tokenizer.from_state(torch.load(buf, weights_only=True)["tokenizer"])
    texts = tiny_pairs("test")[0]
    assert restored.encode_src(texts) == joint.encode_src(texts)
    assert restored.joint and restored.src_vocab_size == joint.src_vocab_size
    assert pickle.loads(pickle.dumps(joint)).encode_tgt(texts) == joint.encode_tgt(texts)


def test_save_load_and_user_model(joint, tmp_path):
    joint.save(tmp_path / "saved")
    loaded = Tokenizer.load(tmp_path / "saved")
    texts = tiny_pairs("test")[1]
    assert loaded.encode_tgt(texts) == joint.encode_tgt(texts)
    # A user-supplied .model, directly or through the config.
    user = Tokenizer.load(tmp_path / "saved" / "joint.model")
    assert user.encode_tgt(texts) == joint.encode_tgt(texts)
    via_cfg = Tokenizer.train([], [], tokenizer_config(model=str(tmp_path / "saved" / "joint.model")), tmp_path / "run")
    assert via_cfg.encode_tgt(texts) == joint.encode_tgt(texts)
    assert (tmp_path / "run" / "joint.model").is_file()
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_a_user_model_without_the_datas_tags_is_refused(joint, tmp_path):
    joint.save(tmp_path / "saved")  # trained without tags
    cfg = tokenizer_config(model=str(tmp_path / "saved"))
    with pytest.raises(TokenizerError, match=r"data.tokenizer.model=\S+ has no tag <2de>, <2fr>, which the data needs"):
        Tokenizer.train([], [], cfg, tmp_path / "run", tags=["<2de>", "<2fr>"])
    assert Tokenizer.train([], [], cfg, tmp_path / "run").tags == []


def test_user_model_with_other_special_ids_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny_pairs()[0]) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=60,
                                   minloglevel=2)  # spm defaults: unk 0, bos 1, eos 2, no pad
    with pytest.raises(ValueError, match="--pad_id=0 --unk_id=1 --bos_id=2 --eos_id=3"):
        Tokenizer.load(tmp_path / "m.model")


def test_too_small_vocabulary_says_which_key(tmp_path):
    src, tgt = tiny_pairs()
    with pytest.raises(ValueError, match="data.tokenizer.vocab_size=100"):
        Tokenizer.train(src, tgt, tokenizer_config(vocab_size=100), tmp_path)


def test_a_vocabulary_smaller_than_asked_is_said_in_one_warning(tmp_path, caplog):
    src, tgt = tiny_pairs()
    with caplog.at_level(logging.WARNING, logger="attnmt.tokenizer"):
        tok = Tokenizer.train(src, tgt, tokenizer_config(vocab_size=100000), tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert f"vocab_size=100000, but {len(src) + len(tgt)} training sentences hold only {tok.src_vocab_size} pieces" \
        in warnings[0]


@pytest.mark.data
def test_multi30k_round_trip_returns_normalised_text(multi30k, tmp_path):
    src, tgt = read_lines(multi30k / "train.de"), read_lines(multi30k / "train.en")
    src, tgt = [normalize(s) for s in src], [normalize(t) for t in tgt]
    tok = Tokenizer.train(src, tgt, tokenizer_config(vocab_size=1000, sample_size=5000), tmp_path)
    for split in ("valid", "test2016"):
        for lang, encode, decode in (("de", tok.encode_src, tok.decode_src), ("en", tok.encode_tgt, tok.decode_tgt)):
            lines = [normalize(line) for line in read_lines(multi30k / f"{split}.{lang}")]
            assert decode(encode(lines)) == lines
    raw = read_lines(multi30k / "train.de")  # includes lines with trailing spaces and a tab
    changed = [line for line in raw if normalize(line) != line]
    assert changed, "expected some train.de lines that normalisation changes"
    assert tok.decode_src(tok.encode_src([normalize(line) for line in changed])) == [normalize(line) for line in changed]
