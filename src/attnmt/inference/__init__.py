"""Translation engines: one interface over attnmt's own search, CTranslate2 and transformers.

An :class:`Engine` is a model opened for translation. Its :meth:`Engine.translate` does what every
engine shares, once: input lines are normalised as the training data was, encoded (with the target
language's tag before them), cut to the model's positions, batched by length (at most ``max_tokens``
source tokens a batch, padding included), searched by the engine's backend, detokenized and put back
in input order: exactly one :class:`Translation` per line, an empty line giving empty candidates.

A backend is what differs between engines: its :class:`Capabilities` and one method,
``search(sources, line_numbers, cfg, tgt_prefix) -> hypotheses`` (a batch of encoded sources in, each
one's hypotheses out, best first, each translation starting with ``tgt_prefix``). The backends, one module each, are in :data:`ENGINES`:

- ``native`` (:mod:`attnmt.inference.native`): attnmt's own search (:mod:`attnmt.decoding`);
- ``ctranslate2`` (:mod:`attnmt.inference.ctranslate2`): CTranslate2 on a conversion cached beside the
  checkpoint;
- ``transformers`` (:mod:`attnmt.inference.transformers`): ``generate()`` of the transformers model
  that ``attnmt-export to=hf`` writes, converted in memory.

A backend module holds ``CAPABILITIES`` and ``open_backend(paths, device, compute_type) -> (backend,
tokenizer, run_config)``; :func:`open_engine` picks the module, refuses what it cannot do (one
:class:`~attnmt.config.ConfigError`, before anything is loaded), opens it and computes the target
prefix. A new engine is a module and an entry of :data:`ENGINES`.

>>> engine = open_engine(cfg, ["runs/quickstart/checkpoints/best.pt"], torch.device("cpu"))
>>> engine.translate(["Ein Hund rennt."], cfg)[0].texts[0]
'A dog is running.'
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from attnmt.batching import length_batches
from attnmt.config import ConfigError, DecodeConfig, trained_data_config
from attnmt.decoding import Hypothesis, strategy
from attnmt.tokenizer import Tokenizer, TokenizerError, language_tag, normalize, tag_language

if TYPE_CHECKING:
    import torch

    from attnmt.config import EngineConfig

log = logging.getLogger(__name__)


@dataclass
class Translation:
    """The candidates for one input line, best first: detokenized text, score and target ids."""

    texts: list[str]
    scores: list[float]
    tokens: list[list[int]]


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do; :func:`check_capabilities` refuses the rest in one line."""

    strategies: frozenset[str]  # the decoding strategies it runs (attnmt.decoding.STRATEGIES' names)
    exact_stop: bool  # beam_stop=exact: a sentence ends only once no live beam could still win
    nbest: bool  # n-best lists (nbest > 1)
    attention: bool  # cross-attention maps (attention_plot=)
    compute_type: bool  # compute_type= other than default (the weights' type)
    continuous: bool = False  # a running search that lines join and leave at any step (``running_search``)


class Backend(Protocol):
    """The part of an engine that searches: one batch of encoded sources in, hypotheses out."""

    capabilities: Capabilities
    max_positions: int  # the model's positions: sources are cut to fit them

    def search(self, sources: list[list[int]], line_numbers: list[int], cfg: DecodeConfig,
               tgt_prefix: list[int]) -> list[list[Hypothesis]]:
        """Each source's hypotheses, best first (at most ``cfg.nbest``).

        Args:
            sources: source ids (the source prefix, the pieces, EOS), none empty.
            line_numbers: each source's line number in its input (fixes its draws when sampling).
            cfg: the search settings, already checked against :attr:`capabilities`.
            tgt_prefix: ids every translation starts with (the target language's code in M2M100
                and NLLB; usually none), forced, and kept in the hypotheses' ids.
        """
        ...


# Engine name -> its module (imported when the engine is opened: each imports its library lazily).
ENGINES = {
    "native": "attnmt.inference.native",
    "ctranslate2": "attnmt.inference.ctranslate2",
    "transformers": "attnmt.inference.transformers",
}


def check_capabilities(engine: str, capabilities: Capabilities, cfg: DecodeConfig) -> None:
    """Refuse, in one line naming the setting and what to do, what ``engine`` cannot do with ``cfg``
    (its ``compute_type`` and ``attention_plot`` too, where ``cfg`` is a command's config).

    Raises:
        ConfigError: the first setting the engine cannot honour.
    """
    wanted = strategy(cfg).name
    if wanted not in capabilities.strategies:
        setting = {"sampling": "sampling=true", "greedy": "beam_size=1", "beam": f"beam_size={cfg.beam_size}"}.get(wanted, wanted)
        able = [name for name in ENGINES if wanted in capabilities_of(name).strategies]
        why = " (its draws would not be reproducible line by line)" if wanted == "sampling" else ""
        raise ConfigError(f"{setting} asks for {wanted}, which engine={engine} does not run{why}; use "
                          f"engine={' or engine='.join(able)}")
    if wanted == "beam" and cfg.beam_stop == "exact" and not capabilities.exact_stop:
        raise ConfigError(f"beam_stop=exact needs engine=native: engine={engine} stops a sentence once beam_size "
                          "hypotheses have ended (beam_stop=finished)")
    if cfg.nbest > 1 and not capabilities.nbest:
        raise ConfigError(f"nbest={cfg.nbest} needs engine=native or engine=ctranslate2: engine={engine} returns "
                          "one translation per line")
    compute_type = getattr(cfg, "compute_type", "default")
    if compute_type != "default" and not capabilities.compute_type:
        raise ConfigError(f"compute_type={compute_type} applies to engine=ctranslate2; engine={engine} chooses its "
                          "own (native: float32 on the CPU, bfloat16 on GPUs that support it)")
    if getattr(cfg, "attention_plot", None) is not None and not capabilities.attention:
        raise ConfigError(f"attention_plot needs engine=native (engine={engine} returns no attention weights)")


def capabilities_of(engine: str) -> Capabilities:
    """The capabilities of engine ``engine`` (its module is imported, not its library).

    Raises:
        ConfigError: no engine has that name.
    """
    return _module(engine).CAPABILITIES


def _module(engine: str):
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine} is unknown; use {', '.join(ENGINES)}")
    return importlib.import_module(ENGINES[engine])


@dataclass
class Engine:
    """A model opened for translation: a backend, the checkpoint's tokenizer and run config, and the
    ids that ask for the target language (:func:`language_prefixes`): ``prefix`` before each source
    (``[<2xx>]`` for an attnmt model of several target languages, the source language's code for
    M2M100 and NLLB, else empty) and ``tgt_prefix`` forced at the start of each translation (the
    target language's code for M2M100 and NLLB, else empty)."""

    name: str
    backend: Backend
    tokenizer: Tokenizer
    run_config: dict = field(default_factory=dict)
    prefix: list[int] = field(default_factory=list)
    tgt_prefix: list[int] = field(default_factory=list)

    @property
    def capabilities(self) -> Capabilities:
        return self.backend.capabilities

    def translate(self, lines: list[str], cfg: DecodeConfig, *, first_line: int = 1,
                  on_batch: Callable[[int], None] | None = None, prefix: Sequence[int] | None = None,
                  tgt_prefix: Sequence[int] | None = None) -> list[Translation]:
        """Translate ``lines``; one :class:`Translation` per line, in input order.

        Args:
            lines: raw source sentences.
            cfg: search and batching settings.
            first_line: the line number of ``lines[0]`` in its file (warnings name lines by it, and
                sampling fixes a line's draws by it).
            on_batch: called with the number of sentences of each decoded batch (progress bars).
            prefix: ids put before every source instead of the engine's :attr:`prefix`.
            tgt_prefix: ids forced at the start of every translation instead of :attr:`tgt_prefix`.

        Raises:
            ConfigError: ``cfg`` asks for something this engine cannot do.
        """
        check_capabilities(self.name, self.capabilities, cfg)
        sources = self.encode(lines, first_line, prefix)
        line_numbers = range(first_line, first_line + len(lines))
        return self.translate_sources(sources, cfg, line_numbers, tgt_prefix=tgt_prefix, on_batch=on_batch)

    def encode(self, lines: list[str], first_line: int = 1, prefix: Sequence[int] | None = None) -> list[list[int]]:
        """The source ids of ``lines`` (:func:`encode_sources` with ``prefix``, by default :attr:`prefix`)."""
        prefix = self.prefix if prefix is None else prefix
        return encode_sources(self.tokenizer, lines, self.backend.max_positions, first_line, prefix)

    def translate_sources(self, sources: list[list[int]], cfg: DecodeConfig, line_numbers: Sequence[int], *,
                          tgt_prefix: Sequence[int] | None = None,
                          on_batch: Callable[[int], None] | None = None) -> list[Translation]:
        """:meth:`translate` from encoded sources (:meth:`encode`); ``line_numbers`` gives each one's
        line number (sampling fixes a line's draws by it), so that sources of several inputs can share
        batches and each still gets the translation it would get alone. ``cfg`` must have been
        checked against :attr:`capabilities`."""
        tgt_prefix = list(self.tgt_prefix if tgt_prefix is None else tgt_prefix)
        hypotheses: list[list[Hypothesis]] = [[] for _ in sources]
        for batch in length_batches([len(s) for s in sources], cfg.max_tokens):
            results = self.backend.search([sources[i] for i in batch], [line_numbers[i] for i in batch], cfg, tgt_prefix)
            for i, hyps in zip(batch, results):
                hypotheses[i] = hyps
            if on_batch is not None:
                on_batch(len(batch))
        return translations(self.tokenizer, hypotheses, cfg.nbest)


def open_engine(cfg: EngineConfig, paths: Sequence, device: torch.device,
                src_lang: str | None = None, tgt_lang: str | None = None, direction: bool = True) -> Engine:
    """The engine ``cfg.engine`` on checkpoint(s) ``paths`` (weights averaged when several), on ``device``,
    translating from ``src_lang`` (checked, if given) into ``tgt_lang`` (default: the command's
    ``src_lang``/``tgt_lang``). ``direction=False``: no direction of its own (attnmt-serve without
    default languages, whose requests each name theirs).

    What the engine cannot do with ``cfg`` is refused before anything is loaded or converted.

    Raises:
        ConfigError: an unknown engine, or a setting it cannot honour.
        CheckpointError: a checkpoint is missing or unreadable.
        TokenizerError: the model does not translate into ``tgt_lang`` (or from ``src_lang``).
        ExportError: the engine's conversion of the model cannot be made.
    """
    module = _module(cfg.engine)
    check_capabilities(cfg.engine, module.CAPABILITIES, cfg)
    backend, tokenizer, run_config = module.open_backend(list(paths), device, cfg.compute_type)
    prefix, tgt_prefix = [], []
    if direction:
        prefix, tgt_prefix = language_prefixes(tokenizer, run_config, tgt_lang if tgt_lang is not None else cfg.tgt_lang,
                                               src_lang if src_lang is not None else cfg.src_lang)
    return Engine(cfg.engine, backend, tokenizer, run_config or {}, prefix, tgt_prefix)


def encode_sources(tokenizer: Tokenizer, lines: list[str], max_len: int, first_line: int = 1,
                   prefix: Sequence[int] = ()) -> list[list[int]]:
    """Source ids (``prefix``, the pieces, EOS) of each line; an empty line gives ``[]``.

    A line with more than ``max_len`` ids (prefix and EOS included) is truncated to fit, with a
    warning that names its line number (``first_line`` is the number of ``lines[0]``): never dropped.
    """
    texts = [normalize(line) for line in lines]
    ids = tokenizer.encode_src(texts)
    sources = []
    for i, (text, piece_ids) in enumerate(zip(texts, ids)):
        if not text:
            sources.append([])
            continue
        room = max_len - len(prefix) - 1
        if len(piece_ids) > room:
            log.warning("line %d: %d source tokens exceed the model's limit of %d; truncated",
                        first_line + i, len(prefix) + len(piece_ids) + 1, max_len)
            piece_ids = piece_ids[:room]
        sources.append([*prefix, *piece_ids, tokenizer.eos_id])
    return sources


def translations(tokenizer: Tokenizer, hypotheses: list[list[Hypothesis]], nbest: int) -> list[Translation]:
    """Detokenized :class:`Translation` of each line's hypotheses (best first); a line without any
    (an empty line) gets ``nbest`` empty candidates."""
    # One decode call for all of them: SentencePiece's batch decoding costs about 0.1 ms a call.
    texts = iter(tokenizer.decode_tgt([h.tokens for hyps in hypotheses for h in hyps]))
    result = []
    for hyps in hypotheses:
        if not hyps:
            result.append(Translation([""] * nbest, [0.0] * nbest, [[] for _ in range(nbest)]))
            continue
        result.append(Translation([next(texts) for _ in hyps], [h.score for h in hyps], [h.tokens for h in hyps]))
    return result


def language_prefixes(tokenizer: Tokenizer, run_config: dict | None, tgt_lang: str | None,
                      src_lang: str | None = None) -> tuple[list[int], list[int]]:
    """The ids that ask a model for ``tgt_lang``: (before each source, forced at the start of each translation).

    attnmt's models: ``[<2xx>]`` before the source for a model of several target languages, nothing
    for a model of one (whose language ``tgt_lang``, if given, must be). The languages a model knows
    come from its tags, else from the data config it was trained on (``run_config["data"]``);
    ``src_lang``, if given, must be one it was trained to translate from. A direction of two known
    languages that was not trained (zero-shot) is translated, with a warning.

    Models with language codes (M2M100, NLLB): the source language's code before the source, the
    target language's forced first; both languages are needed, from the arguments or else from the
    one direction the model was fine-tuned on.

    Raises:
        TokenizerError: the model does not translate into ``tgt_lang`` or from ``src_lang`` (or, with
            several target languages, none was given); the message names the languages it knows.
    """
    data = trained_data_config(run_config["data"]) if run_config and run_config.get("data") else None
    if tokenizer.languages:
        pairs = data.trained_pairs() if data else []
        src_lang = src_lang or (pairs[0][0] if len(pairs) == 1 else None)
        tgt_lang = tgt_lang or (pairs[0][1] if len(pairs) == 1 else None)
        if src_lang is None or tgt_lang is None:
            known = sorted(tokenizer.languages)
            raise TokenizerError(f"this model translates between {len(known)} languages ({', '.join(known[:6])}, ...): "
                                 "name the direction with src_lang= and tgt_lang=")
        return tokenizer.direction_ids(src_lang, tgt_lang)
    tagged = _tagged_languages(tokenizer)
    sources, targets = model_languages(tokenizer, run_config)
    if src_lang is not None and sources and src_lang not in sources:
        raise TokenizerError(f"src_lang={src_lang}: this model translates from {', '.join(sources)} only")
    if tgt_lang is not None and targets and tgt_lang not in targets:
        raise TokenizerError(f"tgt_lang={tgt_lang}: this model translates into {', '.join(targets)} only")
    if tgt_lang is None and len(tagged) > 1:
        raise TokenizerError(f"this model translates into {', '.join(tagged)}: choose one with tgt_lang=")
    if src_lang is not None and tgt_lang is not None and data and (src_lang, tgt_lang) not in data.trained_pairs():
        log.warning("%s-%s is not a direction this model was trained on (%s): zero-shot", src_lang, tgt_lang,
                    ", ".join(sorted({f"{s}-{t}" for s, t in data.trained_pairs()})))
    if not tagged:
        return [], []
    return [tokenizer.tag_id(language_tag(tgt_lang or tagged[0]))], []


def model_languages(tokenizer: Tokenizer, run_config: dict | None) -> tuple[list[str], list[str]]:
    """The languages a model translates (from, into), as :func:`language_prefixes` checks them: its
    language codes (M2M100, NLLB), else its target-language tags or the data config it was trained on
    (``run_config["data"]``); empty where the model does not say."""
    if tokenizer.languages:
        known = sorted(tokenizer.languages)
        return known, known
    data = trained_data_config(run_config["data"]) if run_config and run_config.get("data") else None
    return (data.source_languages() if data else []), (_tagged_languages(tokenizer) or
                                                       (data.target_languages() if data else []))


def _tagged_languages(tokenizer: Tokenizer) -> list[str]:
    """The target languages of a model's ``<2xx>`` tags, sorted."""
    return sorted(lang for lang in map(tag_language, tokenizer.tags) if lang is not None)
