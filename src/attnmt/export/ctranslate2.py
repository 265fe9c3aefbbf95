"""CTranslate2: convert a model into a CTranslate2 model directory, and translate with one.

The conversion fills ``ctranslate2.specs.TransformerSpec`` from the model's weights. Every attnmt
model option has an exact CTranslate2 equivalent:

- pre-norm / post-norm: the spec's ``pre_norm``; pre-norm's closing LayerNorms are the encoder's and
  decoder's ``layer_norm``;
- positions: the table itself (``sinusoidal``, ``sinusoidal_fairseq`` or ``learned``) is copied into
  ``position_encodings``; CTranslate2 adds row ``t`` at position ``t`` as attnmt does;
- token embeddings scaled by sqrt(d_model) (``scale_embeddings``); shared embeddings are one array
  given twice, which CTranslate2 stores once; separate vocabularies become a source and a target
  vocabulary; a tied output projection is the target embedding matrix;
- ReLU / GELU (erf): ``Activation.RELU`` / ``Activation.GELU``.

The vocabularies are the SentencePiece pieces of ids 0..V-1, so CTranslate2's ids are attnmt's
(pad 0, unk 1, ``<s>`` 2, ``</s>`` 3). CTranslate2 appends ``</s>`` to the source
(``add_source_eos``) and starts the target with ``<s>``, as attnmt does.

A model directory holds::

    model.bin config.json *_vocabulary.json   CTranslate2's files
    sentencepiece.model                       the joint SentencePiece model (or source.model + target.model)
    attnmt.json                               the model config and the hash of the checkpoint(s)
    README.md                                 how to run it

``engine=ctranslate2`` of ``attnmt-translate`` / ``attnmt-evaluate`` converts a checkpoint on first
use into such a directory beside it (:func:`cached_model`) and translates with
:class:`CTranslate2Engine`, which keeps attnmt's command-line contract.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from attnmt.config import DecodeConfig, ModelConfig
from attnmt.decoding import Hypothesis, length_penalty, max_length
from attnmt.batching import length_batches
from attnmt.evaluation import Translation, encode_sources, translations
from attnmt.export import ExportError, check_new_directory, checkpoint_hash, write_directory
from attnmt.model import Transformer
from attnmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

log = logging.getLogger(__name__)

FORMAT = "attnmt-ctranslate2-1"  # part of the cache key: a change of the conversion invalidates caches
META_FILE = "attnmt.json"
JOINT_SPM, SOURCE_SPM, TARGET_SPM = "sentencepiece.model", "source.model", "target.model"


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


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
    """The ``ctranslate2.specs.TransformerSpec`` of ``model`` with ``tokenizer``'s vocabularies (not validated yet)."""
    from ctranslate2.specs import common_spec, transformer_spec

    cfg = model.cfg
    activations = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU}
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

    spec.register_source_vocabulary(tokenizer.src_pieces(range(tokenizer.src_vocab_size)))
    spec.register_target_vocabulary(tokenizer.tgt_pieces(range(tokenizer.tgt_vocab_size)))
    config = spec.config
    config.unk_token, config.bos_token, config.eos_token = tokenizer.tgt_pieces([UNK_ID, BOS_ID, EOS_ID])
    config.decoder_start_token = config.bos_token
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
    spec = model_spec(model, tokenizer)
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
    }

    def fill(tmp: Path) -> None:
        spec.save(str(tmp))
        for name, data in spm_files.items():
            (tmp / name).write_bytes(data)
        (tmp / "README.md").write_text(_readme(Path(out).name, spm_files, model.cfg, meta["quantization"], tokenizer.tags))
        # Written last, with every other file's size: what a cached conversion is checked against.
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")

    return write_directory(out, fill)


def _readme(name: str, spm_files: dict[str, bytes], cfg: ModelConfig, quantization: str, tags: list[str]) -> str:
    src_spm, tgt_spm = (JOINT_SPM, JOINT_SPM) if JOINT_SPM in spm_files else (SOURCE_SPM, TARGET_SPM)
    prefix = "" if not tags else f"[\"{tags[0]}\"] + "
    tagged = "" if not tags else (f"\nThis model reads a tag before each source: {', '.join(f'`{t}`' for t in tags)} "
                                  "(`<2xx>` asks for language xx); put it before a line's pieces, as above.\n")
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
source = [{prefix}source_sp.encode(normalize(line), out_type=str) for line in lines]  # </s> is appended by CTranslate2
results = translator.translate_batch(
    source, beam_size=5, max_input_length=0,
    max_decoding_length={cfg.max_positions},  # attnmt: 1.5 * source tokens + 10, at most {cfg.max_positions - 1}
    suppress_sequences=[["<pad>"], ["<s>"]],  # attnmt never generates these
)
print([target_sp.decode(result.hypotheses[0]) for result in results])
```

Or through attnmt, with its command-line contract: `attnmt-translate ckpt=CHECKPOINT engine=ctranslate2`.
CTranslate2 ranks beams by log P / length ** len_penalty; attnmt by GNMT's ((5 + length) / 6) ** len_penalty.
{tagged}"""


def cached_model(paths: Sequence[str | Path]) -> Path:
    """The CTranslate2 directory of the checkpoint(s) ``paths`` (weights averaged when several), converted
    on first use into ``<last checkpoint>.ct2-<key>/`` beside the last one.

    The key is a hash of the checkpoint files' contents and of the conversion's format, so a
    retrained or overwritten checkpoint gets a new conversion. The directory is written atomically
    (:func:`attnmt.export.write_directory`): an interrupted conversion leaves no half directory.

    Raises:
        CheckpointError: a checkpoint is missing or unreadable.
        ExportError: the directory beside the checkpoint cannot be written.
    """
    from attnmt.checkpoint import CheckpointError, load_for_inference

    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
    digest = checkpoint_hash(paths)
    key = hashlib.sha256(f"{FORMAT}:{digest}".encode()).hexdigest()[:16]
    out = paths[-1].with_name(f"{paths[-1].name}.ct2-{key}")
    if out.exists():
        why = _conversion_problem(out, digest)
        if why is None:
            return out
        log.warning("the cached CTranslate2 conversion %s %s; converting again", out, why)
        try:
            shutil.rmtree(out)
        except PermissionError as err:
            raise ExportError(f"the cached CTranslate2 conversion {out} {why}, and cannot be removed ({err.strerror}); "
                              "remove it, or export elsewhere with attnmt-export to=ctranslate2") from None
    model, tokenizer, run_config = load_for_inference(paths, "cpu")
    log.info("converting %s to CTranslate2 into %s (once per checkpoint)", ", ".join(map(str, paths)), out)
    try:
        return export(model, tokenizer, out, checkpoints=paths, run_config=run_config)
    except PermissionError as err:
        raise ExportError(f"cannot write the CTranslate2 conversion beside the checkpoint, in {out.parent} "
                          f"({err.strerror}); export it elsewhere with attnmt-export to=ctranslate2") from None


def _conversion_problem(out: Path, digest: str) -> str | None:
    """Why the conversion directory ``out`` cannot be used for the checkpoint(s) of SHA-256 ``digest``
    (another checkpoint's, a file missing or cut), or None when it holds what its ``attnmt.json`` lists."""
    try:
        meta = json.loads((out / META_FILE).read_text())
        files = dict(meta["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"has no readable {META_FILE} listing its files (cut short, or converted by an older attnmt)"
    if meta.get("checkpoint_sha256") != digest:
        return "was converted from another checkpoint"
    for name, size in files.items():
        path = out / name
        if not path.is_file():
            return f"lacks {name}"
        if path.stat().st_size != size:
            return f"has a {name} of {path.stat().st_size} bytes where {size} were written"
    return None


def search_options(cfg: DecodeConfig, limit: int, suppress: list[list[str]]) -> dict:
    """``Translator.translate_batch`` options for attnmt's search settings, for a batch whose longest
    length limit (:func:`attnmt.decoding.max_length`) is ``limit`` tokens.

    CTranslate2 has one ``max_decoding_length`` per call, counting EOS, and keeps a last token that
    is not EOS where attnmt forces EOS; allowing ``limit + 1`` and cutting each output to its own
    limit gives attnmt's greedy result exactly. With a length penalty every finished beam is
    returned, to be ranked by attnmt's penalty (:meth:`CTranslate2Engine.hypotheses`). Greedy search
    asks for no scores (attnmt's greedy search has none either): CTranslate2 then picks each token by
    its logit and skips a log_softmax over the vocabulary at every step.
    """
    rescore = cfg.beam_size > 1 and cfg.len_penalty != 0
    greedy = cfg.beam_size == 1 and cfg.nbest == 1
    return dict(
        beam_size=cfg.beam_size,
        num_hypotheses=cfg.beam_size if rescore else cfg.nbest,
        length_penalty=cfg.len_penalty,
        max_decoding_length=limit + 1,
        min_decoding_length=min(cfg.min_len, limit + 1),
        max_input_length=0,  # attnmt truncated the source already, to the model's positions
        suppress_sequences=suppress,
        return_scores=not greedy,
        return_end_token=True,
    )


class CTranslate2Engine:
    """A CTranslate2 model directory loaded for translation: :meth:`translate` does what
    :func:`attnmt.evaluation.translate` does (same normalisation, truncation, batching, length limits,
    output order and n-best lists), with CTranslate2 searching.

    Args:
        model_dir: a directory written by :func:`export` or :func:`cached_model`.
        device: ``cpu``, ``cuda`` or ``auto``.
        device_index: the GPU's index.
        compute_type: CTranslate2's ``compute_type``: ``default`` (the weights' type), ``auto``,
            ``int8``, ``int8_float32``, ``float16``, ``bfloat16``, ``float32``, ...
        threads: OpenMP threads (``intra_threads``); 0 = CTranslate2's default.

    Raises:
        ExportError: ``compute_type`` is unknown or not supported on the device.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", device_index: int = 0,
                 compute_type: str = "default", threads: int = 0) -> None:
        import ctranslate2

        model_dir = Path(model_dir)
        meta = json.loads((model_dir / META_FILE).read_text())
        self.max_positions = meta["model_config"]["max_positions"]
        self.run_config = meta["config"]  # the checkpoint's (model, data, optim, train), or None
        settings = meta.get("tokenizer_settings")
        if (model_dir / JOINT_SPM).is_file():
            self.tokenizer = Tokenizer((model_dir / JOINT_SPM).read_bytes(), None, settings)
        else:
            self.tokenizer = Tokenizer((model_dir / SOURCE_SPM).read_bytes(), (model_dir / TARGET_SPM).read_bytes(),
                                       settings)
        try:
            self.translator = ctranslate2.Translator(str(model_dir), device=device, device_index=device_index,
                                                     compute_type=compute_type, intra_threads=threads)
        except ValueError as err:
            raise ExportError(f"compute_type={compute_type} on {device}: {err}; use default, auto, int8, "
                              "int8_float32, float32, or (on a GPU) float16, bfloat16, int8_float16") from None
        self.suppress = [[piece] for piece in self.tokenizer.tgt_pieces([PAD_ID, BOS_ID])]
        self._eos = self.tokenizer.tgt_pieces([EOS_ID])[0]

    def translate(self, lines: list[str], cfg: DecodeConfig, first_line: int = 1,
                  on_batch: Callable[[int], None] | None = None, prefix: Sequence[int] = ()) -> list[Translation]:
        """Translate ``lines``; one :class:`~attnmt.evaluation.Translation` per line, in input order.

        Args:
            lines: raw source sentences.
            cfg: search and batching settings (see :func:`search_options` for how they map).
            first_line: the line number of ``lines[0]`` in its file, for warnings.
            on_batch: called with the number of sentences of each decoded batch (progress bars).
            prefix: tag ids put before every source (:func:`attnmt.evaluation.target_prefix`).
        """
        if cfg.beam_stop == "exact" and cfg.beam_size > 1:
            raise ValueError("beam_stop=exact needs attnmt's own search: CTranslate2 stops a sentence once "
                             "beam_size hypotheses have ended (beam_stop=finished)")
        sources = encode_sources(self.tokenizer, lines, self.max_positions, first_line, prefix)
        hypotheses: list[list[Hypothesis]] = [[] for _ in lines]
        for batch in length_batches([len(s) for s in sources], cfg.max_tokens):
            limits = [max_length(len(sources[i]), cfg.max_len_a, cfg.max_len_b, self.max_positions) for i in batch]
            # CTranslate2 appends </s> itself (add_source_eos).
            pieces = [self.tokenizer.src_pieces(sources[i][:-1]) for i in batch]
            results = self.translator.translate_batch(pieces, **search_options(cfg, max(limits), self.suppress))
            for i, limit, result in zip(batch, limits, results):
                hypotheses[i] = self.hypotheses(result, limit, cfg)
            if on_batch is not None:
                on_batch(len(batch))
        return translations(self.tokenizer, hypotheses, cfg.nbest)

    def hypotheses(self, result, limit: int, cfg: DecodeConfig) -> list[Hypothesis]:
        """attnmt's hypotheses, best first, from one ``TranslationResult`` (pieces with their EOS).

        Each output is cut to the sentence's own ``limit``. CTranslate2 scores log P / length **
        alpha, its length counting EOS; the score is turned back into log P and divided by GNMT's
        penalty of the same length instead, as attnmt ranks and reports hypotheses. Greedy search
        returns no score: NaN, as attnmt's own greedy search.
        """
        scores = result.scores or [math.nan] * len(result.hypotheses)  # greedy asks for none
        ranked = sorted(((score * len(pieces) ** cfg.len_penalty / length_penalty(len(pieces), cfg.len_penalty), pieces)
                         for pieces, score in zip(result.hypotheses, scores)), key=lambda h: h[0], reverse=True)
        hyps = []
        for score, pieces in ranked[: cfg.nbest]:  # only those returned are turned into ids
            ended = bool(pieces) and pieces[-1] == self._eos
            hyps.append(Hypothesis(self.tokenizer.tgt_piece_ids(pieces[:-1] if ended else pieces)[:limit], score))
        return hyps
