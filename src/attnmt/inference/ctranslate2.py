"""``engine=ctranslate2``: CTranslate2 searching on a conversion of the checkpoint, made on first use
and cached beside it (:func:`cached_model`).

CTranslate2 runs greedy and beam search and n-best lists; it stops a sentence once ``beam_size``
hypotheses have ended (``beam_stop=finished`` only), draws samples that are not reproducible line by
line (``sampling`` is refused), and returns no attention weights. Its ``compute_type`` (int8,
float16, ...) applies. The backend keeps attnmt's contract exactly: the same lengths, the same
ranking (:func:`search_options`, :meth:`CTranslate2Backend.hypotheses`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from attnmt import install_hint
from attnmt.config import MODEL_KEYS_ADDED, DecodeConfig
from attnmt.decoding import Hypothesis, length_penalty, max_length, never_generated
from attnmt.export import ExportError, checkpoint_hash
from attnmt.export.ctranslate2 import FORMAT, JOINT_SPM, META_FILE, SOURCE_SPM, TARGET_SPM, export
from attnmt.inference import Capabilities
from attnmt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CAPABILITIES = Capabilities(strategies=frozenset({"greedy", "beam"}), exact_stop=False, nbest=True, attention=False,
                            compute_type=True)


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
    returned, to be ranked by attnmt's penalty (:meth:`CTranslate2Backend.hypotheses`). Greedy search
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


class CTranslate2Backend:
    """A CTranslate2 model directory loaded for translation, with the tokenizer and run config kept
    in it: the same length limits, ranking and n-best lists as attnmt's search.

    Args:
        model_dir: a directory written by :func:`attnmt.export.ctranslate2.export` or :func:`cached_model`.
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
        self.capabilities = CAPABILITIES
        self.max_positions = meta["model_config"]["max_positions"]
        self.run_config = meta["config"]  # the checkpoint's (model, data, optim, train), or None
        settings = meta.get("tokenizer_settings")
        if (model_dir / JOINT_SPM).is_file():
            self.tokenizer = Tokenizer((model_dir / JOINT_SPM).read_bytes(), None, settings,
                                       vocab=meta.get("tokenizer_vocab"))
        else:
            self.tokenizer = Tokenizer((model_dir / SOURCE_SPM).read_bytes(), (model_dir / TARGET_SPM).read_bytes(),
                                       settings, vocab=meta.get("tokenizer_vocab"))
        try:
            self.translator = ctranslate2.Translator(str(model_dir), device=device, device_index=device_index,
                                                     compute_type=compute_type, intra_threads=threads)
        except ValueError as err:
            raise ExportError(f"compute_type={compute_type} on {device}: {err}; use default, auto, int8, "
                              "int8_float32, float32, or (on a GPU) float16, bfloat16, int8_float16") from None
        model_cfg = {**MODEL_KEYS_ADDED, **meta["model_config"]}  # a directory exported before the special ids
        pad, bos, eos = model_cfg["pad_id"], model_cfg["bos_id"], model_cfg["eos_id"]
        self.suppress = [[piece] for piece in self.tokenizer.tgt_pieces(never_generated(pad, bos, eos))]
        self._eos = self.tokenizer.tgt_pieces([eos])[0]

    def search(self, sources: list[list[int]], line_numbers: list[int], cfg: DecodeConfig,
               tgt_prefix: list[int]) -> list[list[Hypothesis]]:
        limits = [max_length(len(source), cfg.max_len_a, cfg.max_len_b, self.max_positions) for source in sources]
        pieces = [self.tokenizer.src_pieces(source[:-1]) for source in sources]  # CTranslate2 appends </s> itself
        options = search_options(cfg, max(limits), self.suppress)
        if tgt_prefix:
            options["target_prefix"] = [self.tokenizer.tgt_pieces(tgt_prefix)] * len(sources)
        results = self.translator.translate_batch(pieces, **options)
        return [self.hypotheses(result, limit, cfg) for limit, result in zip(limits, results)]

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


def open_backend(paths: Sequence, device: torch.device, compute_type: str) -> tuple[CTranslate2Backend, Tokenizer, dict]:
    """The backend on the conversion of checkpoint(s) ``paths`` (made on first use, then cached beside
    the last one), with the tokenizer and run config the conversion keeps.

    Raises:
        ConfigError: CTranslate2 is not installed.
        ExportError: ``compute_type`` is unknown or not supported on the device.
    """
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        from attnmt.config import ConfigError

        raise ConfigError(f"engine=ctranslate2 needs CTranslate2: {install_hint('ct2')}") from None
    # torch's thread count, which the commands set (attnmt-serve: all cores but one), so that one
    # setting governs every engine; CTranslate2's own default ignores it.
    backend = CTranslate2Backend(cached_model(paths), device.type, device.index or 0, compute_type,
                                 threads=torch.get_num_threads())
    return backend, backend.tokenizer, backend.run_config or {}
