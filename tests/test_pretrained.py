"""attnmt-import: pretrained Marian, M2M100 and NLLB models compute what transformers computes,
translate through every engine, fine-tune, and export back as the architecture they came from.

No weights can be downloaded here: the models are made by ``tests/hf_models.py`` from transformers'
configs, with SentencePiece models trained on Multi30k, and saved with ``save_pretrained``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import hf_models  # noqa: E402
from conftest import decode_config, train_tiny  # noqa: E402

from attnmt.checkpoint import load_checkpoint, load_for_inference  # noqa: E402
from attnmt.inference import Engine, encode_sources, language_prefixes  # noqa: E402
from attnmt.inference.native import NativeBackend  # noqa: E402
from attnmt.pretrained import PretrainedError, import_model, save  # noqa: E402

# Each architecture's direction: the language arguments attnmt takes (None: a model of one direction).
DIRECTIONS = {"marian": (None, None), "m2m_100": ("de", "en"), "nllb": ("deu_Latn", "eng_Latn")}
LIMIT = 30  # generated tokens, EOS excluded: attnmt's max_len_a=0 max_len_b=30, transformers' max_length=32


@pytest.fixture(scope="module")
def folders(tmp_path_factory, multi30k) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: build(multi30k, root / name) for name, build in hf_models.BUILDERS.items()}


@pytest.fixture(scope="module")
def test_lines(multi30k) -> list[str]:
    return (multi30k / "test2016.de").read_text(encoding="utf-8").splitlines()[:200]


def hf_generate(hf, sources: list[list[int]], tgt_prefix: list[int], num_beams: int) -> list[list[int]]:
    """transformers' ``generate()`` of each source with attnmt's length limit and never-generated tokens."""
    c = hf.config
    never = [c.pad_token_id] + ([c.decoder_start_token_id] if c.decoder_start_token_id != c.eos_token_id else [])
    outputs = []
    for start in range(0, len(sources), 50):
        batch = sources[start : start + 50]
        width = max(map(len, batch))
        ids = torch.tensor([s + [c.pad_token_id] * (width - len(s)) for s in batch])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
        with torch.no_grad():
            generated = hf.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams, do_sample=False,
                                    max_length=LIMIT + 2, forced_eos_token_id=c.eos_token_id, length_penalty=0.0,
                                    early_stopping=True, suppress_tokens=never,
                                    forced_bos_token_id=tgt_prefix[0] if tgt_prefix else None)
        for row in generated[:, 1:].tolist():
            outputs.append(row[: row.index(c.eos_token_id)] if c.eos_token_id in row else row)
    return outputs


@pytest.mark.data
@pytest.mark.parametrize("name", list(hf_models.BUILDERS))
def test_imported_model_computes_what_transformers_computes(folders, test_lines, name):
    """On 200 Multi30k test sentences: the same source ids as transformers' tokenizer, first-step
    logits within 1e-4, greedy output equal on >= 99% of lines. (These random models never end a
    sentence before the length limit, where transformers' forced EOS costs nothing and attnmt's costs
    log P(EOS): beam search is compared on a trained model, below.)"""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model, tokenizer = import_model(folders[name])
    hf = AutoModelForSeq2SeqLM.from_pretrained(folders[name]).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(folders[name])
    src_lang, tgt_lang = DIRECTIONS[name]
    if src_lang:
        hf_tokenizer.src_lang = src_lang
    prefix, tgt_prefix = language_prefixes(tokenizer, None, tgt_lang, src_lang)
    sources = encode_sources(tokenizer, test_lines, model.cfg.max_positions, 1, prefix)
    assert sum(a == hf_tokenizer(line).input_ids for a, line in zip(sources, test_lines)) >= 0.99 * len(test_lines)

    start = torch.tensor([[model.cfg.bos_id]])
    worst = 0.0
    for source in sources[:50]:
        src = torch.tensor([source])
        mask = torch.ones_like(src, dtype=torch.bool)
        with torch.no_grad():
            ours = model.decode(start, model.encode(src, mask), mask)[0, -1]
            theirs = hf(input_ids=src, decoder_input_ids=torch.tensor([[hf.config.decoder_start_token_id]])).logits[0, -1]
        worst = max(worst, (ours - theirs).abs().max().item())
    assert worst < 1e-4

    engine = Engine("native", NativeBackend(model), tokenizer, {}, prefix, tgt_prefix)
    cfg = decode_config(beam_size=1, max_len_a=0.0, max_len_b=LIMIT, min_len=0)
    ours = [t.tokens[0] for t in engine.translate(test_lines, cfg)]
    same = sum(a == b for a, b in zip(ours, hf_generate(hf, sources, tgt_prefix, 1)))
    assert same >= 0.99 * len(test_lines), f"greedy: {same} of {len(test_lines)} lines equal"


# Marian's options: post-norm, its sin/cos table, SiLU and an output bias.
MARIAN_OPTIONS = ("model.norm_first=false", "model.positions=sinusoidal", "model.activation=silu",
                  "model.output_bias=true")


@pytest.mark.data
@pytest.mark.parametrize("architecture", ["m2m_100", "marian"])
def test_trained_model_through_transformers_greedy_and_beam(trained_checkpoint, test_lines, tmp_path, architecture):
    """A trained model exported to M2M100 (pre-norm) or Marian (post-norm, SiLU, output bias) and
    imported back: on 200 Multi30k test sentences greedy output equals transformers' generate() on
    >= 99% of lines and beam 5 on >= 95%."""
    from transformers import AutoModelForSeq2SeqLM

    from attnmt.export import hf as hf_export

    checkpoint = trained_checkpoint if architecture == "m2m_100" else train_tiny(tmp_path / "run", *MARIAN_OPTIONS)
    model, tokenizer, _ = load_for_inference([checkpoint])
    hf_export.export(model, tokenizer, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == architecture
    imported, imported_tokenizer = import_model(tmp_path / "hf")
    hf = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    sources = encode_sources(imported_tokenizer, test_lines, imported.cfg.max_positions)
    engine = Engine("native", NativeBackend(imported), imported_tokenizer)
    for beams, share in ((1, 0.99), (5, 0.95)):
        cfg = decode_config(beam_size=beams, len_penalty=0.0, max_len_a=0.0, max_len_b=LIMIT, min_len=0,
                            beam_stop="finished")
        ours = [t.tokens[0] for t in engine.translate(test_lines, cfg)]
        same = sum(a == b for a, b in zip(ours, hf_generate(hf, sources, [], beams)))
        assert same >= share * len(test_lines), f"beam {beams}: {same} of {len(test_lines)} lines equal"


def test_export_then_import_gives_the_original_model_back(trained_checkpoint, tmp_path):
    """attnmt -> transformers (M2M100 for pre-norm) -> attnmt: the same weights, so the same translations."""
    from attnmt.export import hf as hf_export

    model, tokenizer, _ = load_for_inference([trained_checkpoint])
    hf_export.export(model, tokenizer, tmp_path / "hf")
    imported, imported_tokenizer = import_model(tmp_path / "hf")
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in imported.state_dict().items())
    lines = (Path(__file__).parent / "fixtures" / "tiny" / "test.de").read_text().splitlines()[:20]
    cfg = decode_config(beam_size=4)
    before = Engine("native", NativeBackend(model), tokenizer).translate(lines, cfg)
    after = Engine("native", NativeBackend(imported), imported_tokenizer).translate(lines, cfg)
    assert [t.texts for t in before] == [t.texts for t in after]
    assert len({t.texts[0] for t in before}) > 10  # a trained model: outputs that differ


def test_marian_options_round_trip_exactly(tmp_path):
    """Post-norm, SiLU and an output bias (Marian's options) go to transformers and back bit for bit."""
    import sentencepiece as spm

    from attnmt.config import ModelConfig
    from attnmt.export import hf as hf_export
    from attnmt.model import build_model
    from attnmt.tokenizer import Tokenizer
    from conftest import tiny_config

    lines = (Path(__file__).parent / "fixtures" / "tiny" / "train.de").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=200,
                                   pad_id=0, unk_id=1, bos_id=2, eos_id=3, normalization_rule_name="identity", hard_vocab_limit=False,
                                   minloglevel=2)
    tokenizer = Tokenizer((tmp_path / "sp.model").read_bytes())
    cfg: ModelConfig = tiny_config(norm_first=False, positions="sinusoidal", activation="silu", output_bias=True,
                                   src_vocab_size=tokenizer.src_vocab_size, tgt_vocab_size=tokenizer.tgt_vocab_size)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.output_bias.normal_()
    hf_export.export(model, tokenizer, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "marian"
    imported, _ = import_model(tmp_path / "hf")
    assert imported.cfg == replace(cfg, activation_dropout=cfg.dropout)  # None: model.dropout, written out
    assert all(torch.equal(model.state_dict()[k], v) for k, v in imported.state_dict().items())


@pytest.mark.data
def test_fine_tune_an_imported_model_then_export_it_back(folders, tmp_path):
    """attnmt-import -> attnmt-train train.init_from (embeddings frozen, the model's own tokenizer) ->
    exports: transformers loads the result with the original MarianTokenizer and translates as attnmt."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from attnmt.export import ctranslate2 as ct2_export
    from attnmt.export import hf as hf_export

    model, tokenizer = import_model(folders["marian"])
    save(model, tokenizer, tmp_path / "marian.pt", "test")
    best = train_tiny(tmp_path / "run", f"train.init_from={tmp_path / 'marian.pt'}", "train.freeze=[embeddings]",
                      "train.valid_max_sentences=10", max_steps=20)
    tuned = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert tuned["tokenizer"] == tokenizer.to_state()  # no new SentencePiece model
    assert tuned["model_config"]["d_model"] == model.cfg.d_model  # the imported shape, not model=tiny's
    start = model.state_dict()
    assert torch.equal(tuned["model"]["src_embed.tokens.weight"], start["src_embed.tokens.weight"])
    assert not torch.equal(tuned["model"]["encoder_layers.0.ffn.fc1.weight"], start["encoder_layers.0.ffn.fc1.weight"])

    tuned_model, tuned_tokenizer, _ = load_for_inference([best])
    hf_export.export(tuned_model, tuned_tokenizer, tmp_path / "hf")
    hf = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MarianMTModel"
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf_tokenizer).__name__ == "MarianTokenizer"
    lines = (Path(__file__).parent / "fixtures" / "tiny" / "test.de").read_text().splitlines()[:20]
    sources = [hf_tokenizer(line).input_ids for line in lines]
    cfg = decode_config(beam_size=1, max_len_a=0.0, max_len_b=LIMIT, min_len=0)
    ours = [t.tokens[0] for t in Engine("native", NativeBackend(tuned_model), tuned_tokenizer).translate(lines, cfg)]
    assert hf_generate(hf, sources, [], 1) == ours

    pytest.importorskip("ctranslate2")  # before the export, which writes with CTranslate2's own converter
    from attnmt.inference.ctranslate2 import CTranslate2Backend

    ct2_export.export(tuned_model, tuned_tokenizer, tmp_path / "ct2")
    backend = CTranslate2Backend(tmp_path / "ct2")
    assert [t.tokens[0] for t in Engine("ctranslate2", backend, backend.tokenizer).translate(lines, cfg)] == ours


def test_a_fine_tune_of_an_imported_model_resumes_any_number_of_times(folders, tmp_path):
    """Each resume names neither the model nor train.init_from: the run's checkpoints say where it started."""
    model, tokenizer = import_model(folders["marian"])
    save(model, tokenizer, tmp_path / "marian.pt", "test")
    run = tmp_path / "run"
    train_tiny(run, f"train.init_from={tmp_path / 'marian.pt'}", "train.valid_max_sentences=5", max_steps=4)
    for steps in (6, 8, 10):
        train_tiny(run, "train.resume=auto", "train.valid_max_sentences=5", max_steps=steps)
        last = load_checkpoint(run / "checkpoints" / "last.pt")
        assert last["step"] == steps and last["model_config"]["d_model"] == model.cfg.d_model
    assert last["init_from"] == str(tmp_path / "marian.pt")


@pytest.mark.parametrize("architecture", ["marian", "m2m_100", "nllb"])
def test_the_ctranslate2_readme_recipe_translates_an_imported_model_as_attnmt_does(folders, tmp_path, test_lines,
                                                                                   architecture):
    """The Python in the README that attnmt-export to=ctranslate2 writes, run as a user would (its example
    line replaced by 30 test sentences): it runs, and its greedy version gives attnmt's tokens."""
    pytest.importorskip("ctranslate2")
    from attnmt.export import ctranslate2 as ct2_export
    from attnmt.inference.ctranslate2 import CTranslate2Backend

    model, tokenizer = import_model(folders[architecture])
    ct2_export.export(model, tokenizer, tmp_path / "model")
    code = (tmp_path / "model" / "README.md").read_text().split("```python\n")[1].split("```")[0]
    lines = test_lines[:30]
    code = code.replace('lines = ["Ein Hund rennt durch das Gras."]', f"lines = {lines!r}")
    # These random-weight models stop at the length limit, where CTranslate2 keeps a last token that
    # attnmt replaces by EOS: compare greedy tokens, attnmt's against the recipe's first ones.
    greedy = code.replace("beam_size=5", "beam_size=1") + "\nprint([result.hypotheses[0] for result in results])\n"
    outputs = []
    for script in (code, greedy):
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(proc.stdout.strip().splitlines())
    assert len(ast.literal_eval(outputs[0][-1])) == len(lines)
    recipe = ast.literal_eval(outputs[1][-1])  # each line's pieces, the target prefix included
    direction = ct2_export.example_direction(tokenizer)
    assert (direction is None) == (architecture == "marian")
    backend = CTranslate2Backend(tmp_path / "model")
    src_lang, tgt_lang = direction or (None, None)
    engine = Engine("ctranslate2", backend, backend.tokenizer, {},
                    *language_prefixes(backend.tokenizer, None, tgt_lang, src_lang))
    cfg = decode_config(beam_size=1, max_len_a=0.0, max_len_b=model.cfg.max_positions - 1, min_len=0)
    ours = [t.tokens[0] for t in engine.translate(lines, cfg)]  # the target prefix included
    same = sum(backend.tokenizer.tgt_pieces(a) == b[: len(a)] for a, b in zip(ours, recipe))
    assert same == len(lines), [(backend.tokenizer.tgt_pieces(a)[:8], b[:8]) for a, b in zip(ours, recipe)][:3]


def test_import_command_refuses_in_one_line(tmp_path):
    """Another architecture, a missing file and an unreachable hub id each end the command with one line."""
    from transformers import BartConfig, BartForConditionalGeneration

    BartForConditionalGeneration(BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16,
                                            decoder_ffn_dim=16, encoder_attention_heads=2, decoder_attention_heads=2,
                                            vocab_size=50)).save_pretrained(tmp_path / "bart")
    command = [sys.executable, "-m", "attnmt.cli.import_"]
    for source, said in ((tmp_path / "bart", "model_type='bart' cannot be imported"),
                         ("no-such-owner/no-such-model-xyz", "the hub cannot give it"),
                         (tmp_path / "none" / "x" / "y", "not a folder")):
        proc = subprocess.run([*command, f"from={source}", f"out={tmp_path / 'x.pt'}"], capture_output=True,
                              text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 2
        lines = [line for line in proc.stderr.splitlines() if line.startswith("attnmt-import: error:")]
        assert len(lines) == 1 and said in lines[0], proc.stderr
        assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("change, said", [
    ({"encoder_layers": 1}, "encoder_layers=1, but the weights hold 2 encoder layers"),
    ({"decoder_layers": 3}, "decoder_layers=3, but the weights hold 2 decoder layers"),
    ({"encoder_layers": -1}, "encoder_layers=-1; it must be a whole number of at least 1"),
    ({"decoder_layers": 0}, "decoder_layers=0; it must be a whole number of at least 1"),
    ({"max_position_embeddings": 0}, "max_position_embeddings=0; it must be a whole number of at least 1"),
    ({"d_model": "32"}, "d_model"),  # refused by transformers' own config checks, or by attnmt's
    ({"encoder_attention_heads": 3, "decoder_attention_heads": 3}, "which encoder_attention_heads=3 does not divide"),
    ({"dropout": 1.5}, "dropout=1.5; it must be a number in [0, 1)"),
    ({"eos_token_id": -1}, "eos_token_id=-1; it must be a token id of the vocabulary"),
    ({"pad_token_id": 10**6}, "pad_token_id=1000000; it must be a token id of the vocabulary"),
])
def test_import_refuses_a_config_that_cannot_be_or_is_not_the_weights(folders, tmp_path, change, said):
    import shutil

    folder = shutil.copytree(folders["marian"], tmp_path / "marian")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(PretrainedError, match=re.escape(said)):
        import_model(folder)


@pytest.mark.parametrize("extra, said", [
    ({"model.encoder.layers.0.extra.weight": torch.ones(2)}, "holds 1 tensors this model would not use "
                                                              "(model.encoder.layers.0.extra.weight)"),
    ({"lm_head.weight": None}, "lm_head.weight differs from model.shared.weight, which the config ties to it"),
    ({"model.encoder.embed_positions.weight": torch.zeros(4, 4)}, None),  # a position table: recomputed, accepted
])
def test_import_uses_every_tensor_of_the_folder_or_says_which_it_would_drop(folders, tmp_path, extra, said):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(folders["marian"], tmp_path / "marian")
    weights = load_file(str(folder / "model.safetensors"))
    shared = weights["model.shared.weight"]
    extra = {k: (torch.randn_like(shared) if v is None else v) for k, v in extra.items()}
    save_file({**weights, **extra}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if said is None:
        import_model(folder)
        return
    with pytest.raises(PretrainedError, match=re.escape(said)):
        import_model(folder)
    if "lm_head" in extra:
        return  # the command's one line, once:
    proc = subprocess.run([sys.executable, "-m", "attnmt.cli.import_", f"from={folder}", f"out={tmp_path / 'x.pt'}"],
                          capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("attnmt-import: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and said in errors[0], proc.stderr
    assert not (tmp_path / "x.pt").exists()


def test_import_replaces_an_existing_checkpoint_only_when_told(folders, tmp_path, capsys, restore_logging):
    from attnmt.cli import import_

    out = tmp_path / "model.pt"
    out.write_bytes(b"a checkpoint of last week")
    with pytest.raises(SystemExit) as stop:
        import_.main([f"from={folders['marian']}", f"out={out}"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and f"out={out} exists; choose another out=, or replace it with overwrite=true" in error
    assert out.read_bytes() == b"a checkpoint of last week"
    import_.main([f"from={folders['marian']}", f"out={out}", "overwrite=true"])
    assert load_checkpoint(out)["imported_from"] == str(folders["marian"])


class RunsCode:
    """What a malicious pickle holds: an object whose unpickling runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage, said", [
    ("cut_weights", "model.safetensors: not a whole safetensors file"),
    ("empty_weights", "model.safetensors: not a whole safetensors file"),
    ("malicious_pickle", "pytorch_model.bin: refused: it holds objects other than tensors"),
    ("garbage_spm", "transformers cannot read its tokenizer (RuntimeError: "),
    ("no_target_spm", "no target.spm; attnmt tokenizes with the model's SentencePiece file"),
    ("garbage_tokenizer_config", "transformers cannot read its tokenizer (JSONDecodeError: "),
])
def test_a_damaged_folder_is_one_line_naming_the_file(folders, tmp_path, damage, said):
    import pickle
    import shutil

    folder = shutil.copytree(folders["marian"], tmp_path / "marian")
    weights = folder / "model.safetensors"
    if damage == "cut_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty_weights":
        weights.write_bytes(b"")
    elif damage == "malicious_pickle":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": RunsCode(tmp_path / "ran")}))
    elif damage == "garbage_spm":
        (folder / "source.spm").write_bytes(b"garbage")
    elif damage == "no_target_spm":
        (folder / "target.spm").unlink()
    else:
        (folder / "tokenizer_config.json").write_text("{garbage")
    with pytest.raises(PretrainedError, match=re.escape(said)):
        import_model(folder)
    assert not (tmp_path / "ran").exists()  # the pickle's command never ran


def test_missing_sentencepiece_file_is_named(folders, tmp_path):
    import shutil

    shutil.copytree(folders["nllb"], tmp_path / "nllb")
    (tmp_path / "nllb" / "sentencepiece.bpe.model").unlink()
    with pytest.raises(PretrainedError, match="no sentencepiece.bpe.model"):
        import_model(tmp_path / "nllb")
