"""CTranslate2: convert a model into a CTranslate2 model directory.

The conversion fills ``ctranslate2.specs.TransformerSpec`` from the model's weights. Every attnmt
model option has an exact CTranslate2 equivalent:

- pre-norm / post-norm: the spec's ``pre_norm``; pre-norm's closing LayerNorms are the encoder's and
  decoder's ``layer_norm``;
- positions: the table itself (``sinusoidal``, ``sinusoidal_fairseq`` or ``learned``) is copied into
  ``position_encodings``; CTranslate2 adds row ``t`` at position ``t`` as attnmt does;
- token embeddings scaled by sqrt(d_model) (``scale_embeddings``); shared embeddings are one array
  given twice, which CTranslate2 stores once; separate vocabularies become a source and a target
  vocabulary; a tied output projection is the target embedding matrix;
- ReLU / GELU (erf) / SiLU: ``Activation.RELU`` / ``Activation.GELU`` / ``Activation.SWISH``;
- the output bias (``model.output_bias``, Marian's): the projection's bias.

The vocabularies are the pieces of ids 0..V-1, so CTranslate2's ids are attnmt's (for attnmt's own
tokenizers pad 0, unk 1, ``<s>`` 2, ``</s>`` 3; an imported model's are its own). CTranslate2 appends
``</s>`` to the source (``add_source_eos``) and starts the target with the model's start token
(``model.bos_id``: ``<s>``, or ``</s>`` for M2M100 and NLLB, ``<pad>`` for Marian), as attnmt does.

A model directory holds::

    model.bin config.json *_vocabulary.json   CTranslate2's files
    sentencepiece.model                       the joint SentencePiece model (or source.model + target.model)
    attnmt.json                               the model config and the hash of the checkpoint(s)
    README.md                                 how to run it

``engine=ctranslate2`` of ``attnmt-translate`` / ``attnmt-evaluate`` converts a checkpoint on first
use into such a directory beside it and translates with it (:mod:`attnmt.inference.ctranslate2`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from attnmt.config import ModelConfig
from attnmt.export import (
    ExportError, check_model_options, check_new_directory, checkpoint_hash, write_directory,
)
from attnmt.model import Transformer
from attnmt.tokenizer import Tokenizer

# The values of each model option CTranslate2 expresses exactly (None: any); check_model_options
# refuses an option that is not listed (one added to the model after this conversion was written).
# Every model option this exporter converts, with the values it expresses (None: any). A model option
# added later is not here, and check_model_options refuses it until its conversion is written here: for
# this exporter alone (the HF exporter lists its own).
EXPRESSIBLE: dict[str, tuple | None] = dict.fromkeys((
    "d_model", "n_heads", "ffn_dim", "encoder_layers", "decoder_layers", "activation", "norm_first", "positions",
    "max_positions", "share_embeddings", "tie_output", "src_vocab_size", "tgt_vocab_size", "pad_id", "bos_id",
    "eos_id", "output_bias", "dropout", "attention_dropout", "activation_dropout"))  # dropouts: nothing to convert
FORMAT = "attnmt-ctranslate2-2"  # part of the cache key: a change of the conversion invalidates caches
META_FILE = "attnmt.json"
JOINT_SPM, SOURCE_SPM, TARGET_SPM = "sentencepiece.model", "source.model", "target.model"


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A copy of ``tensor`` as float32 NumPy: CTranslate2's quantization rewrites the arrays it is given in
    place, which through a shared buffer would rewrite the model being exported (its embeddings did)."""
    return tensor.detach().to("cpu", torch.float32, copy=True).numpy()


def _set_linear(spec, *layers: torch.nn.Linear) -> None:
    """Fill a ``LinearSpec`` with one linear layer, or several fused along the output dimension."""
    spec.weight = np.concatenate([_array(layer.weight) for layer in layers])
    if layers[0].bias is not None:
        spec.bias = np.concatenate([_array(layer.bias) for layer in layers])


def _set_norm(spec, norm: torch.nn.LayerNorm) -> None:
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def _set_self_attention(spec, attn, norm: torch.nn.LayerNorm) -> None:
    # CTranslate2 fuses q, k, v into one projection (rows q, then k, then v); attnmt's kv_proj is k then v.
    _set_linear(spec.linear[0], attn.q_proj, attn.kv_proj)
    _set_linear(spec.linear[1], attn.out_proj)
    _set_norm(spec.layer_norm, norm)


def _set_ffn(spec, ffn, norm: torch.nn.LayerNorm) -> None:
    _set_linear(spec.linear_0, ffn.fc1)
    _set_linear(spec.linear_1, ffn.fc2)
    _set_norm(spec.layer_norm, norm)


def model_spec(model: Transformer, tokenizer: Tokenizer):
    """The ``ctranslate2.specs.TransformerSpec`` of ``model`` with ``tokenizer``'s vocabularies (not validated yet).

    Raises:
        ExportError: a model option CTranslate2 cannot express (:data:`EXPRESSIBLE`).
    """
    from ctranslate2.specs import common_spec, transformer_spec

    cfg = model.cfg
    check_model_options(cfg, EXPRESSIBLE, "ctranslate2")
    activations = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU,
                   "silu": common_spec.Activation.SWISH}
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.encoder_layers, cfg.decoder_layers), cfg.n_heads, pre_norm=cfg.norm_first,
        activation=activations[cfg.activation],
    )
    encoder, decoder = spec.encoder, spec.decoder
    encoder.embeddings[0].weight = _array(model.src_embed.tokens.weight)
    encoder.position_encodings.encodings = _array(model.src_embed.position_table())
    decoder.embeddings.weight = _array(model.tgt_embed.tokens.weight)
    decoder.position_encodings.encodings = _array(model.tgt_embed.position_table())
    encoder.scale_embeddings = decoder.scale_embeddings = True  # sqrt(d_model)
    for layer_spec, layer in zip(encoder.layer, model.encoder_layers):
        _set_self_attention(layer_spec.self_attention, layer.self_attn, layer.attn_block.norm)
        _set_ffn(layer_spec.ffn, layer.ffn, layer.ffn_block.norm)
    for layer_spec, layer in zip(decoder.layer, model.decoder_layers):
        _set_self_attention(layer_spec.self_attention, layer.self_attn, layer.self_block.norm)
        cross = layer_spec.attention
        _set_linear(cross.linear[0], layer.cross_attn.q_proj)
        _set_linear(cross.linear[1], layer.cross_attn.kv_proj)
        _set_linear(cross.linear[2], layer.cross_attn.out_proj)
        _set_norm(cross.layer_norm, layer.cross_block.norm)
        _set_ffn(layer_spec.ffn, layer.ffn, layer.ffn_block.norm)
    if cfg.norm_first:
        _set_norm(encoder.layer_norm, model.encoder_norm)
        _set_norm(decoder.layer_norm, model.decoder_norm)
    output = model.tgt_embed.tokens.weight if model.output_proj is None else model.output_proj.weight
    decoder.projection.weight = _array(output)
    if model.output_bias is not None:
        decoder.projection.bias = _array(model.output_bias)

    spec.register_source_vocabulary(tokenizer.src_pieces(range(tokenizer.src_vocab_size)))
    spec.register_target_vocabulary(tokenizer.tgt_pieces(range(tokenizer.tgt_vocab_size)))
    config = spec.config
    config.unk_token, config.decoder_start_token, config.eos_token = tokenizer.tgt_pieces(
        [tokenizer.unk_id, cfg.bos_id, cfg.eos_id])
    config.bos_token = config.decoder_start_token
    config.add_source_eos = True
    config.layer_norm_epsilon = model.decoder_layers[0].ffn_block.norm.eps
    return spec


def export(model: Transformer, tokenizer: Tokenizer, out: str | Path, quantization: str | None = None,
           checkpoints: Sequence[str | Path] = (), run_config: dict | None = None) -> Path:
    """Write ``model`` as a CTranslate2 model directory ``out`` (atomically), SentencePiece models beside it.

    Args:
        model: the model to convert (its weights are read, not changed).
        tokenizer: its tokenizer.
        out: the directory to create; it must not exist or be empty.
        quantization: CTranslate2's weight type (``int8``, ``int8_float32``, ``float16``, ...);
            None keeps float32. Any model loads with any ``compute_type`` later either way.
        checkpoints: the checkpoint file(s) the model came from, whose hash ``attnmt.json`` records.
        run_config: the checkpoint's run config, kept in ``attnmt.json`` (``attnmt-evaluate split=``
            reads its data config from there).

    Raises:
        ExportError: an unknown ``quantization``, or ``out`` exists and is not empty.
    """
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES

    if quantization is not None and quantization not in ACCEPTED_MODEL_TYPES:
        raise ExportError(f"quantization={quantization} is not a CTranslate2 weight type; use one of "
                          f"{', '.join(ACCEPTED_MODEL_TYPES)} (or leave it out for float32)")
    check_new_directory(out)
    spec = model_spec(model, tokenizer)  # refuses an option it cannot express before anything is written
    spec.validate()
    spec.optimize(quantization=quantization)
    models = tokenizer.to_state()["models"]
    spm_files = {JOINT_SPM: models["joint"]} if tokenizer.joint else {SOURCE_SPM: models["src"], TARGET_SPM: models["tgt"]}
    meta = {
        "format": FORMAT,
        "model_config": vars(model.cfg),
        "quantization": quantization or "float32",
        "checkpoints": [str(p) for p in checkpoints],
        "checkpoint_sha256": checkpoint_hash(checkpoints) if checkpoints else None,
        "config": run_config,
        "tokenizer_settings": tokenizer.settings,  # its tags (<2de>, ...), for engine=ctranslate2
        # An imported model's vocabulary (its ids, special ids, language codes), for engine=ctranslate2.
        "tokenizer_vocab": None if tokenizer.vocab is None else {k: v for k, v in tokenizer.vocab.items() if k != "files"},
    }

    def fill(tmp: Path) -> None:
        spec.save(str(tmp))
        for name, data in spm_files.items():
            (tmp / name).write_bytes(data)
        (tmp / "README.md").write_text(_readme(Path(out).name, spm_files, model.cfg, meta["quantization"], tokenizer))
        # Written last, with every other file's size: what a cached conversion is checked against.
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")

    return write_directory(out, fill)


def example_direction(tokenizer: Tokenizer) -> tuple[str, str] | None:
    """A direction to show in the README of a model with language codes (M2M100, NLLB): German to
    English where it has them, else its first two languages; None for a model without codes."""
    langs = sorted(tokenizer.languages)
    if len(langs) < 2:
        return None
    pick = [next((code for code in langs if code in wanted), None) for wanted in (("de", "deu_Latn"), ("en", "eng_Latn"))]
    return (pick[0], pick[1]) if None not in pick else (langs[0], langs[1])


def _readme(name: str, spm_files: dict[str, bytes], cfg: ModelConfig, quantization: str, tokenizer: Tokenizer) -> str:
    """How to run the export without attnmt: CTranslate2 and SentencePiece, with the model's own
    special pieces (what it never generates, where its translations start) and, for a model of
    several languages, the pieces that ask for a direction (attnmt's tags, or M2M100/NLLB codes)."""
    from attnmt.decoding import never_generated

    src_spm, tgt_spm = (JOINT_SPM, JOINT_SPM) if JOINT_SPM in spm_files else (SOURCE_SPM, TARGET_SPM)
    never = dict.fromkeys(never_generated(cfg.pad_id, cfg.bos_id, cfg.eos_id))  # Marian starts from <pad>: once
    suppress = [[piece] for piece in tokenizer.tgt_pieces(list(never))]
    direction, prefix, tgt_prefix = example_direction(tokenizer), [], []
    if direction is not None:
        prefix_ids, tgt_prefix_ids = tokenizer.direction_ids(*direction)
        prefix, tgt_prefix = tokenizer.src_pieces(prefix_ids), tokenizer.tgt_pieces(tgt_prefix_ids)
    elif tokenizer.tags:
        prefix = [tokenizer.tags[0]]
    note = ""
    if tokenizer.tags:
        note = (f"\nThis model reads a tag before each source: {', '.join(f'`{t}`' for t in tokenizer.tags)} "
                "(`<2xx>` asks for language xx); put it before a line's pieces, as above.\n")
    elif direction is not None:
        note = (f"\nThis model translates between {len(tokenizer.languages)} languages: the source language's code "
                f"goes before the source ({prefix}), the target language's code starts the translation "
                f"(`target_prefix`, {tgt_prefix}), as above for {direction[0]} to {direction[1]}.\n")
    options = f"target_prefix=[{tgt_prefix!r}] * len(source), " if tgt_prefix else ""
    before = f"{prefix!r} + " if prefix else ""
    after = f"[{len(tgt_prefix)}:]" if tgt_prefix else ""  # the target language's code is no text
    return f"""# {name}: an attnmt model for CTranslate2

Written by `attnmt-export to=ctranslate2` (weights: {quantization}). `model.bin`, `config.json` and the
vocabulary files are CTranslate2's; `{src_spm}`{"" if src_spm == tgt_spm else f" and `{tgt_spm}`"} the SentencePiece
model(s); `attnmt.json` the attnmt model config and the checkpoint's SHA-256.

```python
import unicodedata
import ctranslate2, sentencepiece as spm

source_sp = spm.SentencePieceProcessor(model_file="{name}/{src_spm}")
target_sp = spm.SentencePieceProcessor(model_file="{name}/{tgt_spm}")
translator = ctranslate2.Translator("{name}", device="cpu")  # compute_type="int8" for speed

def normalize(line):  # what attnmt does to every input: NFKC, whitespace collapsed
    return " ".join(unicodedata.normalize("NFKC", line).split())

lines = ["Ein Hund rennt durch das Gras."]
source = [{before}source_sp.encode(normalize(line), out_type=str) for line in lines]  # </s> is appended by CTranslate2
results = translator.translate_batch(
    source, {options}beam_size=5, max_input_length=0,
    max_decoding_length={cfg.max_positions},  # attnmt: 1.5 * source tokens + 10, at most {cfg.max_positions - 1}
    suppress_sequences={suppress!r},  # attnmt never generates these
)
print([target_sp.decode(result.hypotheses[0]{after}) for result in results])
```

Or through attnmt, with its command-line contract: `attnmt-translate ckpt=CHECKPOINT engine=ctranslate2`.
CTranslate2 ranks beams by log P / length ** len_penalty; attnmt by GNMT's ((5 + length) / 6) ** len_penalty.
{note}"""
