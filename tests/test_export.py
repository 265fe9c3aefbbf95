"""attnmt-export, engine=ctranslate2 and engine=transformers: exported models compute what attnmt computes.

Logits are compared on untrained models of every model option (CTranslate2: all of them; transformers:
equal or refused with one line naming the option), greedy outputs on tiny models trained on the
fixture corpus. Logits agree within ``LOGITS_TOL`` (absolute): float32 arithmetic in another order.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from attnmt.batching import pad
from attnmt.config import ConfigError
from attnmt.export import ExportError, write_directory
from attnmt.inference import Engine, encode_sources
from attnmt.inference.native import NativeBackend
from attnmt.model import build_model
from attnmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, normalize
from conftest import FIXTURE_CORPUS, decode_config, tiny_config, tokenizer_config, train_tiny
from test_cli import run

LOGITS_TOL = 1e-4

# Accents, digits, characters the tokenizer never saw (byte fallback), odd whitespace, NFKC's work.
HOSTILE = [
    "Ça  coûte 3,50 € — très cher!", "   Leading and trailing   ", "Привет, как дела?", "東京は大きな都市です。",
    "ﬁ ① ＡＢＣ \ufdfa x\u00a0y\u2003z", "tab\there\x1cand\x1fsep\u2028line", "e\u0301 é ñ ß", "12345 67.890 3:45",
    "emoji 🙂👍🏽", "a\u200bb", "Der\tHund  läuft   schnell.",
]

# Model options: (ModelConfig overrides, tokenizer, what attnmt-export to=hf does: architecture or refusal).
OPTIONS = {
    "default": ({}, "joint", "m2m_100"),
    "gelu": ({"activation": "gelu"}, "joint", "m2m_100"),
    "untied_output": ({"tie_output": False}, "joint", "m2m_100"),
    "separate_embeddings": ({"share_embeddings": False}, "joint", "m2m_100"),
    "post_norm": ({"norm_first": False, "positions": "sinusoidal"}, "joint", "marian"),
    "post_norm_all_separate_gelu": ({"norm_first": False, "positions": "sinusoidal", "share_embeddings": False,
                                     "tie_output": False, "activation": "gelu"}, "joint", "marian"),
    "interleaved_positions": ({"positions": "sinusoidal"}, "joint", "model.positions=sinusoidal with pre-norm"),
    "learned_positions": ({"positions": "learned"}, "joint", "model.positions=learned with pre-norm"),
    "post_norm_fairseq_positions": ({"norm_first": False}, "joint", "model.positions=sinusoidal_fairseq with post-norm"),
    "post_norm_learned": ({"norm_first": False, "positions": "learned"}, "joint", "model.positions=learned with post-norm"),
    "separate_vocabularies": ({"share_embeddings": False}, "separate", "data.tokenizer.joint=false"),
}


def native(model, tokenizer) -> Engine:
    return Engine("native", NativeBackend(model), tokenizer)


def ct2_engine(model_dir: Path, **options) -> Engine:
    """engine=ctranslate2 on an exported directory."""
    from attnmt.inference.ctranslate2 import CTranslate2Backend

    backend = CTranslate2Backend(model_dir, **options)
    return Engine("ctranslate2", backend, backend.tokenizer, backend.run_config or {})


def fixture_texts(split: str = "train") -> tuple[list[str], list[str]]:
    return tuple([normalize(line) for line in (FIXTURE_CORPUS / f"{split}.{lang}").read_text().splitlines()]
                 for lang in ("de", "en"))


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    src, tgt = fixture_texts()
    out = tmp_path_factory.mktemp("tokenizers")
    return {
        "joint": Tokenizer.train(src, tgt, tokenizer_config(vocab_size=400), out / "joint"),
        "separate": Tokenizer.train(src, tgt, tokenizer_config(vocab_size=350, joint=False), out / "separate"),
    }


def untrained(overrides: dict, tokenizer: Tokenizer):
    fields = dict(positions="sinusoidal_fairseq", src_vocab_size=tokenizer.src_vocab_size,
                  tgt_vocab_size=tokenizer.tgt_vocab_size, max_positions=64)
    cfg = tiny_config(**{**fields, **overrides})
    return build_model(cfg).eval()


@pytest.fixture(scope="session")
def postnorm_checkpoint(tmp_path_factory) -> Path:
    """A tiny post-norm model (interleaved positions: what transformers' Marian computes), trained briefly."""
    return train_tiny(tmp_path_factory.mktemp("postnorm"), "model.norm_first=false", "model.positions=sinusoidal",
                      max_steps=160)


# ----------------------------------------------------------------------------------------------
# CTranslate2


@pytest.mark.parametrize("option", OPTIONS)
def test_ctranslate2_logits_equal_attnmts_for_every_model_option(option, tokenizers, tmp_path) -> None:
    pytest.importorskip("ctranslate2")
    from attnmt.export import ctranslate2 as ct2

    overrides, tokenizer_kind, _ = OPTIONS[option]
    tokenizer = tokenizers[tokenizer_kind]
    model = untrained(overrides, tokenizer)
    engine = ct2_engine(ct2.export(model, tokenizer, tmp_path / "ct2"))
    sources = encode_sources(tokenizer, fixture_texts("test")[0][:4], 64)
    results = engine.backend.translator.translate_batch(
        [tokenizer.src_pieces(s[:-1]) for s in sources], beam_size=1, max_decoding_length=10, min_decoding_length=0,
        max_input_length=0, return_logits_vocab=True, return_end_token=True)
    for source, result in zip(sources, results):
        steps = torch.stack([torch.from_numpy(np.asarray(x)) for x in result.logits[0]])  # (T, V)
        path = tokenizer.tgt_piece_ids(result.hypotheses[0])
        src_tokens, src_mask = pad([source])
        with torch.no_grad():
            ours = model.decode(torch.tensor([[BOS_ID] + path[:-1]]), model.encode(src_tokens, src_mask), src_mask)[0]
        assert steps.shape == ours.shape == (len(path), tokenizer.tgt_vocab_size)
        torch.testing.assert_close(steps, ours, atol=LOGITS_TOL, rtol=0)


def test_ctranslate2_engine_translates_as_attnmt_greedy(trained_checkpoint, postnorm_checkpoint, tmp_path) -> None:
    pytest.importorskip("ctranslate2")
    from attnmt.checkpoint import load_for_inference
    from attnmt.export import ctranslate2 as ct2

    lines = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines() + ["", HOSTILE[0], HOSTILE[3]]
    for ckpt in (trained_checkpoint, postnorm_checkpoint):
        model, tokenizer, _ = load_for_inference(ckpt)
        engine = ct2_engine(ct2.export(model, tokenizer, tmp_path / ckpt.parent.parent.name))
        for cfg in (decode_config(beam_size=1), decode_config(beam_size=1, max_len_a=0.0, max_len_b=3, max_tokens=64),
                    decode_config(beam_size=1, min_len=12)):
            ours = native(model, tokenizer).translate(lines, cfg)
            theirs = engine.translate(lines, cfg)
            assert [t.tokens for t in theirs] == [t.tokens for t in ours], cfg
            assert [t.texts for t in theirs] == [t.texts for t in ours]
            # Greedy search has no score in either engine (CTranslate2 is asked for none: faster).
            assert all(math.isnan(t.scores[0]) for t, line in zip(theirs, lines) if line)
        assert sum(bool(t.texts[0]) for t in ours) == len(lines) - 1  # only the empty line is empty


def test_ctranslate2_beam_nbest_is_ranked_by_attnmts_penalty(trained_checkpoint, tmp_path) -> None:
    pytest.importorskip("ctranslate2")
    from attnmt.checkpoint import load_for_inference
    from attnmt.decoding import length_penalty
    from attnmt.export import ctranslate2 as ct2

    model, tokenizer, _ = load_for_inference(trained_checkpoint)
    engine = ct2_engine(ct2.export(model, tokenizer, tmp_path / "ct2"))
    lines = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines()[:10]
    cfg = decode_config(beam_size=4, nbest=3, len_penalty=1.0)
    for line, translation in zip(lines, engine.translate(lines, cfg)):
        assert len(translation.texts) == 3 and translation.scores == sorted(translation.scores, reverse=True)
        # Each score is log P of tokens + EOS divided by GNMT's penalty, P being CTranslate2's
        # distribution: <pad> and <s> suppressed before the softmax (attnmt suppresses them after).
        source, _ = pad(encode_sources(tokenizer, [line], 256))
        tokens = translation.tokens[0]
        with torch.no_grad():
            logits = model(source, source != 0, torch.tensor([[BOS_ID] + tokens]))[0]
            logits[:, [PAD_ID, BOS_ID]] = -torch.inf
            logits = logits.log_softmax(-1)
        log_prob = logits.gather(1, torch.tensor(tokens + [EOS_ID])[:, None]).sum().item()
        assert translation.scores[0] == pytest.approx(log_prob / length_penalty(len(tokens) + 1, 1.0), abs=1e-3)
    assert engine.translate(lines, cfg)[0].texts[0] == native(model, tokenizer).translate(lines[:1], decode_config(beam_size=4))[0].texts[0]
    with pytest.raises(ConfigError, match="beam_stop=exact needs engine=native"):
        engine.translate(lines, decode_config(beam_size=4, beam_stop="exact"))


def test_quantized_export_translates(trained_checkpoint, tmp_path) -> None:
    pytest.importorskip("ctranslate2")
    from attnmt.checkpoint import load_for_inference
    from attnmt.export import ctranslate2 as ct2

    model, tokenizer, _ = load_for_inference(trained_checkpoint)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    out = ct2.export(model, tokenizer, tmp_path / "int8", quantization="int8")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert not changed, f"exporting rewrote the model's {changed}"
    assert json.loads((out / "attnmt.json").read_text())["quantization"] == "int8"
    assert (out / "model.bin").stat().st_size < 0.5 * sum(p.numel() * 4 for p in model.parameters())
    # int8 rounds each weight to 1/127 of its row's largest: on a model sure of its translations (this one
    # translates the fixture's test set as its references) that must leave at least 90% of the lines as
    # float32 gives them; wrong scales or a transposed matrix leave few or none.
    lines = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines()
    int8 = [t.texts[0] for t in ct2_engine(out).translate(lines, decode_config(beam_size=1))]
    fp32 = [t.texts[0] for t in native(model, tokenizer).translate(lines, decode_config(beam_size=1))]
    assert all(int8) and sum(a == b for a, b in zip(int8, fp32)) >= 0.9 * len(lines), list(zip(int8, fp32))
    with pytest.raises(ExportError, match="quantization=int3 is not a CTranslate2 weight type"):
        ct2.export(model, tokenizer, tmp_path / "bad", quantization="int3")
    assert not (tmp_path / "bad").exists()


def test_an_interrupted_export_leaves_nothing(tmp_path) -> None:
    def crash(tmp: Path) -> None:
        (tmp / "model.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_directory(tmp_path / "out", crash)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="already exists and is not an empty directory"):
        write_directory(tmp_path / "full", lambda tmp: None)


def test_engine_cache_is_keyed_by_the_checkpoints_content(trained_checkpoint, tmp_path) -> None:
    pytest.importorskip("ctranslate2")
    from attnmt.inference.ctranslate2 import cached_model

    ckpt = tmp_path / "model.pt"
    shutil.copy(trained_checkpoint, ckpt)
    first = cached_model([ckpt])
    assert first.parent == tmp_path and first.name.startswith("model.pt.ct2-")
    assert cached_model([ckpt]) == first and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", first.name]
    from attnmt.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(ckpt)  # the same path, other weights
    state["model"]["encoder_norm.weight"] += 1.0
    save_checkpoint(state, ckpt)
    second = cached_model([ckpt])
    assert second != first and (second / "model.bin").is_file()
    assert json.loads((second / "attnmt.json").read_text())["checkpoint_sha256"] != \
        json.loads((first / "attnmt.json").read_text())["checkpoint_sha256"]


def test_ctranslate2_engine_takes_torchs_thread_count(trained_checkpoint, tmp_path, monkeypatch) -> None:
    """One setting governs every engine's threads (attnmt-serve's ``threads`` sets torch's): CTranslate2
    gets torch's count as its ``intra_threads`` instead of its own default."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from attnmt.inference import open_engine

    made = []

    def translator(*args, **kwargs):
        made.append(kwargs["intra_threads"])
        return real(*args, **kwargs)

    real = ctranslate2.Translator
    monkeypatch.setattr(ctranslate2, "Translator", translator)
    ckpt = tmp_path / "model.pt"
    shutil.copy(trained_checkpoint, ckpt)
    cfg = decode_config(engine="ctranslate2")
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            engine = open_engine(cfg, [ckpt], torch.device("cpu"))
            assert engine.translate(["Ein Hund."], cfg)[0].texts[0]
    finally:
        torch.set_num_threads(threads)
    assert made == [1, 2]


@pytest.mark.parametrize("damage", ["model_bin_removed", "model_bin_cut", "meta_removed", "another_checkpoints"])
def test_a_damaged_or_foreign_engine_cache_is_converted_again(trained_checkpoint, tmp_path, caplog, damage) -> None:
    pytest.importorskip("ctranslate2")
    from attnmt.inference.ctranslate2 import cached_model

    ckpt = tmp_path / "model.pt"
    shutil.copy(trained_checkpoint, ckpt)
    cached = cached_model([ckpt])
    whole = {p.name: p.read_bytes() for p in cached.iterdir()}
    if damage == "model_bin_removed":
        (cached / "model.bin").unlink()
        why = "lacks model.bin"
    elif damage == "model_bin_cut":
        (cached / "model.bin").write_bytes(whole["model.bin"][:1000])
        why = "has a model.bin of 1000 bytes where"
    elif damage == "meta_removed":
        (cached / "attnmt.json").unlink()
        why = "has no readable attnmt.json"
    else:  # another checkpoint's conversion copied under this checkpoint's key
        other = tmp_path / "other.pt"
        from attnmt.checkpoint import load_checkpoint, save_checkpoint

        state = load_checkpoint(ckpt)
        state["model"]["encoder_norm.weight"] += 1.0
        save_checkpoint(state, other)
        foreign = cached_model([other])
        shutil.rmtree(cached)
        shutil.copytree(foreign, cached)
        why = "was converted from another checkpoint"
    with caplog.at_level("WARNING", logger="attnmt.inference.ctranslate2"):
        assert cached_model([ckpt]) == cached
    assert any(why in r.getMessage() and str(cached) in r.getMessage() for r in caplog.records), caplog.text
    assert {p.name: p.read_bytes() for p in cached.iterdir()} == whole
    ct2_engine(cached)  # loads


def test_translate_and_evaluate_with_engine_ctranslate2(trained_checkpoint, tmp_path) -> None:
    pytest.importorskip("ctranslate2")
    ckpt = tmp_path / "model.pt"
    shutil.copy(trained_checkpoint, ckpt)
    lines = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines()[:12]
    stdin = "".join(line + "\n" for line in lines[:5] + [""] + lines[5:])

    native = run("translate", f"ckpt={ckpt}", "beam_size=1", stdin=stdin)
    ct2 = run("translate", f"ckpt={ckpt}", "beam_size=1", "engine=ctranslate2", stdin=stdin)
    assert ct2.returncode == 0, ct2.stderr
    assert "converting" in ct2.stderr  # first use: converted, then cached beside the checkpoint
    assert ct2.stdout == native.stdout and len(ct2.stdout.split("\n")) == 14

    nbest = run("translate", f"ckpt={ckpt}", "engine=ctranslate2", "compute_type=int8", "beam_size=4", "nbest=2",
                f"text={lines[0]}")
    assert nbest.returncode == 0, nbest.stderr
    assert "converting" not in nbest.stderr
    rows = [row.split(" ||| ") for row in nbest.stdout.splitlines()]
    assert [r[0] for r in rows] == ["0", "0"] and float(rows[0][2]) >= float(rows[1][2])

    src, ref = FIXTURE_CORPUS / "test.de", FIXTURE_CORPUS / "test.en"
    reports = [json.loads(run("evaluate", f"ckpt={ckpt}", f"src={src}", f"ref={ref}", "beam_size=1", *engine)
                          .stdout.splitlines()[-1]) for engine in ([], ["engine=ctranslate2"])]
    assert reports[1]["engine"] == "ctranslate2" and reports[1]["bleu"] == reports[0]["bleu"] > 30
    split = run("evaluate", f"ckpt={ckpt}", "split=test", "beam_size=1", "engine=ctranslate2")
    assert split.returncode == 0 and json.loads(split.stdout.splitlines()[-1])["bleu"] == reports[0]["bleu"]


@pytest.mark.parametrize("args, expected", [
    (["engine=fast"], "engine=fast is unknown"),
    (["compute_type=int8"], "compute_type=int8 applies to engine=ctranslate2"),
    (["engine=ctranslate2", "compute_type=int3"], "compute_type=int3"),
    (["engine=ctranslate2", "attention_plot=plots"], "attention_plot needs engine=native"),
    (["engine=ctranslate2", "beam_stop=exact"], "beam_stop=exact needs engine=native"),
    (["engine=ctranslate2", "sampling=true"], "sampling=true asks for sampling, which engine=ctranslate2 does not run"),
    (["engine=transformers", "nbest=2"], "nbest=2 needs engine=native or engine=ctranslate2"),
])
def test_engine_errors_are_one_line(args, expected, trained_checkpoint, tmp_path) -> None:
    pytest.importorskip("ctranslate2")
    ckpt = tmp_path / "model.pt"
    shutil.copy(trained_checkpoint, ckpt)
    result = run("translate", f"ckpt={ckpt}", "text=Hallo", *args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line.lower()]
    assert len(errors) == 1 and expected in errors[0], result.stderr


def test_evaluate_refuses_what_the_engine_cannot_do_before_reading_anything(trained_checkpoint, tmp_path) -> None:
    """The refusal comes before the checkpoint and the test set are read: a missing data root and a
    missing checkpoint are not what it reports."""
    for ckpt in (trained_checkpoint, tmp_path / "missing.pt"):
        result = run("evaluate", f"ckpt={ckpt}", "split=test", f"data.root={tmp_path / 'nowhere'}",
                     "engine=ctranslate2", "sampling=true")
        assert result.returncode == 2
        errors = [line for line in result.stderr.splitlines() if "error:" in line.lower()]
        assert len(errors) == 1 and "sampling=true asks for sampling, which engine=ctranslate2" in errors[0], result.stderr


# ----------------------------------------------------------------------------------------------
# transformers


@pytest.mark.parametrize("option", OPTIONS)
def test_hf_logits_equal_attnmts_or_the_option_is_refused(option, tokenizers, tmp_path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from attnmt.export import hf

    overrides, tokenizer_kind, expected = OPTIONS[option]
    tokenizer = tokenizers[tokenizer_kind]
    model = untrained(overrides, tokenizer)
    if expected not in ("m2m_100", "marian"):
        with pytest.raises(ExportError) as refusal:
            hf.export(model, tokenizer, tmp_path / "hf")
        assert str(refusal.value).startswith(expected) and "\n" not in str(refusal.value)
        assert not (tmp_path / "hf").exists()
        return
    hf.export(model, tokenizer, tmp_path / "hf")
    hf_model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_model.config.model_type == expected

    lines = fixture_texts("test")[0][:6] + HOSTILE
    batch = hf_tok(lines, return_tensors="pt", padding=True)
    src_tokens, src_mask = pad(encode_sources(tokenizer, lines, 64))
    assert torch.equal(batch["input_ids"], src_tokens)
    tgt_in = torch.cat([torch.full((len(lines), 1), BOS_ID), torch.randint(4, tokenizer.tgt_vocab_size, (len(lines), 12))], 1)
    with torch.no_grad():
        theirs = hf_model(**batch, decoder_input_ids=tgt_in).logits
        ours = model(src_tokens, src_mask, tgt_in)
    torch.testing.assert_close(theirs, ours, atol=LOGITS_TOL, rtol=0)


def test_hf_export_generates_as_attnmt_greedy(trained_checkpoint, postnorm_checkpoint, tmp_path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from attnmt.checkpoint import load_for_inference
    from attnmt.inference.transformers import TransformersBackend

    lines = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines() + ["", HOSTILE[0]]
    cfg = decode_config(beam_size=1, max_tokens=256)
    for ckpt, architecture in ((trained_checkpoint, "m2m_100"), (postnorm_checkpoint, "marian")):
        out = tmp_path / architecture
        result = run("export", f"ckpt={ckpt}", "to=hf", f"out={out}")
        assert result.returncode == 0, result.stderr
        hf_model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
        hf_tok = AutoTokenizer.from_pretrained(out)
        assert hf_model.config.model_type == architecture
        model, tokenizer, _ = load_for_inference(ckpt)
        ours = [t.texts[0] for t in native(model, tokenizer).translate(lines, cfg)]
        theirs = Engine("transformers", TransformersBackend(hf_model), tokenizer).translate(lines, cfg)
        assert [t.texts[0] for t in theirs] == ours
        # generate()'s own defaults (generation_config.json) are attnmt's greedy search too.
        batch = hf_tok(lines[:8], return_tensors="pt", padding=True)
        plain = hf_tok.batch_decode(hf_model.generate(**batch), skip_special_tokens=True)
        assert plain == ours[:8]
    # engine=transformers converts the checkpoint in memory: the command's output is native's.
    stdin = "".join(line + "\n" for line in lines[:12])
    native_out = run("translate", f"ckpt={trained_checkpoint}", "beam_size=1", stdin=stdin)
    hf_out = run("translate", f"ckpt={trained_checkpoint}", "beam_size=1", "engine=transformers", stdin=stdin)
    assert hf_out.returncode == 0, hf_out.stderr
    assert hf_out.stdout == native_out.stdout and hf_out.stdout.count("\n") == 12


def test_hf_tokenizer_encodes_multi30k_as_attnmt(multi30k, tmp_path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from attnmt.export import hf

    def read(name: str, n: int) -> list[str]:
        return (multi30k / name).read_text(encoding="utf-8").splitlines()[:n]

    src, tgt = [normalize(line) for line in read("train.de", 5000)], [normalize(line) for line in read("train.en", 5000)]
    tokenizer = Tokenizer.train(src, tgt, tokenizer_config(vocab_size=2000), tmp_path / "spm", tags=["<2de>", "<bt>"])
    hf.hf_tokenizer(tokenizer, 256).save_pretrained(tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    lines = read("test2016.de", 1000) + read("test2016.en", 1000) + HOSTILE
    # A tag written before the text is the tag's id before attnmt's ids of the text.
    tags = [tokenizer.tag_id("<bt>"), tokenizer.tag_id("<2de>")]
    assert hf_tok(["<bt> <2de> " + line for line in lines[:50]])["input_ids"] == [
        tags + ids + [EOS_ID] for ids in tokenizer.encode_src([normalize(line) for line in lines[:50]])]
    expected = [ids + [EOS_ID] for ids in tokenizer.encode_src([normalize(line) for line in lines])]
    assert hf_tok(lines)["input_ids"] == expected
    targets = tokenizer.encode_tgt([normalize(line) for line in lines])
    assert hf_tok.batch_decode(targets) == tokenizer.decode_tgt(targets)


@pytest.mark.parametrize("args, expected", [
    (["to=onnx"], "to=onnx is unknown"),
    (["to=hf", "quantization=int8"], "quantization=int8 applies to to=ctranslate2 only"),
    (["to=hf", "out=EXISTING"], "already exists and is not an empty directory"),
    (["to=ctranslate2"], "out= is required"),
])
def test_export_errors_are_one_line(args, expected, trained_checkpoint, tmp_path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    args = [a.replace("EXISTING", str(existing)) for a in args]
    if not any(a.startswith("out=") for a in args) and expected != "out= is required":
        args.append(f"out={tmp_path / 'out'}")
    result = run("export", f"ckpt={trained_checkpoint}", *args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line.lower()]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert (existing / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("target", ["ctranslate2", "hf"])
def test_every_model_option_is_declared_by_each_exporter_and_a_new_one_is_refused(target, tokenizers, tmp_path,
                                                                                 monkeypatch) -> None:
    """Each exporter lists every model option it converts; one it does not list (an option added to the
    model after the exporter was written) is refused in one line before anything is written, not
    converted wrongly or failed on deep inside the conversion."""
    from dataclasses import fields

    from attnmt.config import ModelConfig

    module = pytest.importorskip(f"attnmt.export.{target}")
    pytest.importorskip("ctranslate2" if target == "ctranslate2" else "transformers")
    assert set(module.EXPRESSIBLE) == {f.name for f in fields(ModelConfig)}
    model = untrained({}, tokenizers["joint"])
    monkeypatch.delitem(module.EXPRESSIBLE, "norm_first")
    with pytest.raises(ExportError) as refusal:
        module.export(model, tokenizers["joint"], tmp_path / "out")
    assert str(refusal.value).startswith(f"model.norm_first=True: attnmt-export to={target} does not convert this option")
    assert "\n" not in str(refusal.value) and not (tmp_path / "out").exists()
    monkeypatch.setitem(module.EXPRESSIBLE, "norm_first", (False,))
    with pytest.raises(ExportError, match=f"model.norm_first=True: to={target} expresses False only"):
        module.export(model, tokenizers["joint"], tmp_path / "out")
