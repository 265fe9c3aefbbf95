"""Typed schemas for every config group, registered in Hydra's ConfigStore.

The YAML files under ``configs/`` are the one home of every default value; these dataclasses hold the
names, the types and the allowed values, and have no defaults of their own, so what a test composes
is what a user gets. A misspelt key or a wrong type fails when Hydra composes the config, and a value
outside an option's fixed set (``model.activation=swish``) when the composed config becomes these
dataclasses, which every command does before any work. Only ``attnmt.cli`` sees a ``DictConfig``; it
converts it to these dataclasses and passes those down. :func:`compose` gives the same objects to
Python code and tests.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints



class ConfigError(ValueError):
    """A config that cannot work; raised before any work starts, naming the key and what to do."""


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is unknown; use one of {', '.join(choices)}")


def _check_finite(config: Any, prefix: str) -> None:
    """Refuse ``nan`` and ``inf`` in the float fields of ``config``: such values pass every range check
    (``nan < 0`` is false) and then silently empty or break the work, so they fail here, named."""
    for f in fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            what = "hold finite numbers only" if isinstance(value, list) else "be a finite number"
            raise ConfigError(f"{prefix}{f.name}={value} must {what}")


ACTIVATIONS = ("relu", "gelu", "silu")
POSITIONS = ("sinusoidal_fairseq", "sinusoidal", "learned")
SCHEDULES = ("inverse_sqrt", "cosine")
TOKENIZER_TYPES = ("unigram", "bpe")
DATA_FORMATS = ("folder", "tsv", "jsonl", "hub", "disk")
PRECISION_NAMES = ("auto", "fp32", "bf16", "fp16")
BEAM_STOPS = ("exact", "finished")
# <s>, <unk>, <pad> are the tokenizer's special tokens; a data.mix tag with one of these names would become one.
RESERVED_TAGS = ("s", "unk", "pad")


@dataclass
class ModelConfig:
    """Shape of the encoder-decoder Transformer (``configs/model/``).

    ``src_vocab_size`` and ``tgt_vocab_size`` are 0 in the YAML files: training fills them in from
    the tokenizer, and checkpoints store the filled-in values.
    """

    d_model: int
    n_heads: int
    ffn_dim: int
    encoder_layers: int
    decoder_layers: int
    dropout: float
    attention_dropout: float
    activation_dropout: float | None  # dropout after the feed-forward's activation; None = model.dropout
    activation: str  # relu | gelu | silu (Marian's swish)
    norm_first: bool  # pre-norm (with a final LayerNorm per stack); False = the paper's post-norm
    # sinusoidal_fairseq: fairseq's (and M2M100's) sin/cos table, what configs/model/ choose, so that a
    # pre-norm model exports to transformers exactly | sinusoidal: Vaswani's interleaved table, which
    # every checkpoint written before sinusoidal_fairseq existed holds | learned
    positions: str
    max_positions: int
    share_embeddings: bool  # one embedding table for source and target (needs a joint vocabulary)
    tie_output: bool  # output projection = target embedding matrix
    src_vocab_size: int
    tgt_vocab_size: int
    output_bias: bool  # a learned bias added to the output logits (Marian's final_logits_bias)
    # The special ids of the vocabulary, filled in from the tokenizer: padding, the token the decoder
    # starts from (attnmt's <s>; </s> in M2M100 and NLLB; <pad> in Marian) and the end of a sentence.
    pad_id: int
    bos_id: int
    eos_id: int

    def __post_init__(self) -> None:
        _check_finite(self, "model.")
        _check_choice("model.activation", self.activation, ACTIVATIONS)
        _check_choice("model.positions", self.positions, POSITIONS)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (``configs/optim/``).

    The schedule warms up linearly from ``warmup_init_lr`` to ``lr`` over ``warmup_steps`` updates, then
    decays as ``lr * sqrt(warmup_steps / step)`` (``inverse_sqrt``, Vaswani et al.) or along a cosine to
    ``min_lr`` at ``train.max_steps`` (``cosine``).
    """

    lr: float
    betas: list[float]
    eps: float
    weight_decay: float
    schedule: str  # inverse_sqrt | cosine
    warmup_steps: int
    warmup_init_lr: float
    min_lr: float  # the floor of the cosine schedule
    clip_norm: float  # max global gradient norm; 0 disables clipping
    label_smoothing: float
    fused: bool | None  # fused AdamW kernel; None = on CUDA only

    def __post_init__(self) -> None:
        _check_finite(self, "optim.")
        _check_choice("optim.schedule", self.schedule, SCHEDULES)


@dataclass
class TokenizerConfig:
    """SentencePiece settings (:mod:`attnmt.tokenizer`).

    The model is trained on a seeded sample of at most ``sample_size`` training pairs and saved with
    the run; a later run with the same data and settings reuses it. ``model`` skips training: a
    SentencePiece ``.model`` file (used as a joint vocabulary; its pad/unk/bos/eos ids must be
    0/1/2/3) or a folder written by ``Tokenizer.save``.
    """

    joint: bool  # one vocabulary for both languages; False = one model per language
    model_type: str  # unigram | bpe
    vocab_size: int  # of the joint model, or of each per-language model
    character_coverage: float
    byte_fallback: bool  # unseen characters become byte pieces instead of <unk>
    sample_size: int  # training pairs the model is trained on at most
    seed: int
    model: str | None

    def __post_init__(self) -> None:
        _check_finite(self, "data.tokenizer.")
        _check_choice("data.tokenizer.model_type", self.model_type, TOKENIZER_TYPES)


@dataclass
class CorpusConfig:
    """A further training corpus mixed into the main one (``data.mix``), read as the main corpus is read
    and cleaned by the main corpus's rules: a second parallel corpus, or synthetic pairs from
    back-translation.

    The one schema with defaults: a list's items get nothing from the YAML files, so an entry needs
    only its source and languages (``{root: bt, src_lang: en, tgt_lang: de}``).
    """

    src_lang: str
    tgt_lang: str
    format: str = "folder"  # folder | tsv | jsonl | hub | disk
    root: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "train"  # the split of this source that is trained on
    weight: float = 1.0  # multiplies its share of each epoch (1.0: as its size and data.temperature give)
    tag: str | None = None  # a tag token <TAG> before its sources, e.g. bt for tagged back-translation

    def check(self, key: str) -> None:
        """Raise :class:`ConfigError` on settings that cannot work, keys named with ``key`` (``data.mix[0]``)."""
        _check_choice(f"{key}.format", self.format, DATA_FORMATS)
        _check_finite(self, f"{key}.")
        if self.weight < 0:
            raise ConfigError(f"{key}.weight={self.weight} must not be negative")
        if self.format == "hub" and not self.hub_id:
            raise ConfigError(f"{key}: format=hub needs hub_id (a dataset id of the Hugging Face hub)")
        if self.format != "hub" and not self.root:
            raise ConfigError(f"{key}: format={self.format} reads from a folder: give its root")
        if self.tag is not None and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.tag) or self.tag in RESERVED_TAGS):
            raise ConfigError(f"{key}.tag={self.tag!r} must be a plain identifier (ASCII letters, digits and _, not "
                              f"starting with a digit) other than {', '.join(RESERVED_TAGS)} (it becomes the token "
                              "<TAG>, which must not be a special token or a piece of the vocabulary), e.g. bt")


@dataclass
class DataConfig:
    """Where the parallel corpus comes from and how it is cleaned (:mod:`attnmt.data`, ``configs/data/``).

    ``format`` picks the source: ``folder`` (line-aligned ``{split}.{lang}`` text files in ``root``),
    ``tsv`` (``{split}.tsv`` in ``root``, ``src<TAB>tgt`` per line), ``jsonl`` (``{split}.jsonl``,
    objects with the two language keys or a ``translation`` dict), ``hub`` (``hub_id``/``hub_config``
    on the Hugging Face hub, a ``translation`` column) or ``disk`` (a ``DatasetDict.save_to_disk``
    folder in ``root``, columns as for the hub). ``splits`` maps the names attnmt uses (train, valid,
    test) to the names in the source. Length rules count SentencePiece tokens and apply to the train
    split only; valid and test keep every line, in order.
    """

    format: str  # folder | tsv | jsonl | hub | disk
    root: str | None
    hub_id: str | None
    hub_config: str | None
    src_lang: str
    tgt_lang: str
    langs: list[str] | None  # the languages of an aligned corpus: one model for several directions
    directions: list[str] | None  # with langs: e.g. [en-de, en-fr]; null = every ordered pair of langs
    splits: dict[str, str]
    max_len: int  # train pairs with a side longer than this many tokens are dropped; 0 = no limit
    max_len_ratio: float  # train pairs whose longer side has more than r times the tokens of the other; 0 = off
    dedup: bool  # drop exact duplicate train pairs (after normalisation)
    num_proc: int  # processes for cleaning and tokenizing; 0 = every core
    cache_dir: str | None  # prepared data are cached here; None = a temporary folder
    mix: list[CorpusConfig]  # further training corpora, mixed into the main corpus's directions
    temperature: float  # an epoch's share of each direction and corpus: size ** (1 / T) * weight; 1 = as sizes
    tokenizer: TokenizerConfig

    def __post_init__(self) -> None:
        _check_choice("data.format", self.format, DATA_FORMATS)
        _check_finite(self, "data.")
        if self.temperature <= 0:
            raise ConfigError(f"data.temperature={self.temperature} must be positive (1 = proportional to sizes)")
        if self.langs is not None:
            if len(set(self.langs)) != len(self.langs) or len(self.langs) < 2:
                raise ConfigError(f"data.langs={self.langs} must name two or more languages, each once")
            if self.format == "tsv":
                raise ConfigError("data.langs needs a corpus whose columns are named by language (data.format=folder, "
                                  "jsonl, hub or disk); a tsv file's two columns are data.src_lang and data.tgt_lang")
        for direction in self.directions or []:
            src, _, tgt = direction.partition("-")
            if not src or not tgt or src == tgt or (self.langs and not {src, tgt} <= set(self.langs)):
                raise ConfigError(f"data.directions: {direction!r} is not SRC-TGT with two of data.langs={self.langs}")
        if self.directions is not None:
            if not self.langs:
                raise ConfigError("data.directions needs data.langs (the languages of the aligned corpus)")
            if not self.directions or len(set(self.directions)) != len(self.directions):
                raise ConfigError(f"data.directions={self.directions} must name one or more directions, each once "
                                  "(null: every ordered pair of data.langs)")
        for i, corpus in enumerate(self.mix):
            corpus.check(f"data.mix[{i}]")

    def pairs(self) -> list[tuple[str, str]]:
        """The main corpus's directions: (src, tgt) for each of ``directions``, every ordered pair of
        ``langs``, or ``(src_lang, tgt_lang)``."""
        if not self.langs:
            return [(self.src_lang, self.tgt_lang)]
        if self.directions:
            return [tuple(d.split("-", 1)) for d in self.directions]
        return [(a, b) for a in self.langs for b in self.langs if a != b]

    def trained_pairs(self) -> list[tuple[str, str]]:
        """Every direction a model trained on this config learns: the main corpus's, then ``mix``'s."""
        return self.pairs() + [(corpus.src_lang, corpus.tgt_lang) for corpus in self.mix]

    def source_languages(self) -> list[str]:
        """The languages a model trained on this config translates from."""
        return sorted({src for src, _ in self.trained_pairs()})

    def target_languages(self) -> list[str]:
        """The languages a model trained on this config translates into; two or more need target-language tags."""
        return sorted({tgt for _, tgt in self.trained_pairs()})


# Model-config keys added after checkpoints were written, with the value that reproduces the model
# those were trained as; checkpoint.model_config fills them in (tests/fixtures/checkpoint-5ba9c4e.pt).
MODEL_KEYS_ADDED = {"activation_dropout": None, "output_bias": False, "bos_id": 2, "eos_id": 3}

# Data-config keys added after checkpoints were written, with the value that reproduces what those
# were trained with; commands that rebuild a checkpoint's data config merge these first.
DATA_KEYS_ADDED = {"langs": None, "directions": None, "mix": [], "temperature": 1.0}


def unknown_keys(schema: type, saved: Any, prefix: str) -> list[str]:
    """The keys of ``saved`` (a config stored in a checkpoint) that ``schema`` has no field for, in
    nested configs and lists of them too, named from ``prefix`` (``data.new_option``): what a newer
    attnmt wrote, which this one cannot honour."""
    if not isinstance(saved, dict):
        return []
    hints = get_type_hints(schema)
    unknown = []
    for key, value in saved.items():
        if key not in hints:
            unknown.append(f"{prefix}{key}")
            continue
        kind = hints[key]
        nested = next((t for t in (kind, *get_args(kind)) if is_dataclass(t)), None)
        if nested is not None and isinstance(value, dict):
            unknown += unknown_keys(nested, value, f"{prefix}{key}.")
        elif nested is not None and isinstance(value, list):
            for i, item in enumerate(value):
                unknown += unknown_keys(nested, item, f"{prefix}{key}[{i}].")
    return unknown


def trained_data_config(trained: dict, overrides: Any = None) -> DataConfig:
    """The data config a checkpoint was trained with (its ``config["data"]``), keys added since filled
    in, with ``overrides`` (a dict or ``DictConfig`` of its keys) on top.

    Raises:
        omegaconf.errors.OmegaConfBaseException: an override names no key of it or has the wrong type.
        ConfigError: the result cannot work.
    """
    from omegaconf import OmegaConf

    layers = [OmegaConf.structured(DataConfig), DATA_KEYS_ADDED, trained, *([overrides] if overrides is not None else [])]
    return OmegaConf.to_object(OmegaConf.merge(*layers))


@dataclass
class DecodeConfig:
    """How a model searches and batches when it translates (``configs/decode/``): the settings of
    :mod:`attnmt.decoding` shared by ``attnmt-translate``, ``attnmt-evaluate`` and validation.

    ``beam_size=1`` with ``nbest=1`` runs greedy search.
    """

    beam_size: int
    len_penalty: float  # GNMT alpha: hypotheses rank by log P / ((5 + len) / 6) ** alpha
    nbest: int
    max_len_a: float  # at most a * source_len + b target tokens
    max_len_b: int
    min_len: int
    max_tokens: int  # source tokens per batch, padding included
    beam_stop: str  # finished (once beam_size hypotheses ended) | exact (once no live beam could still win: slower)
    sampling: bool  # draw translations from the model instead of searching (nbest draws per line)
    temperature: float  # sampling: softmax(logits / temperature); 0 = greedy
    top_k: int  # sampling: only the k most probable tokens; 0 = all
    top_p: float  # sampling: only the smallest set of tokens with this much probability; 1.0 = all
    seed: int  # sampling: with the line number, fixes each line's draws (the same in any batch)

    def __post_init__(self) -> None:
        _check_choice("beam_stop", self.beam_stop, BEAM_STOPS)

    def check(self, prefix: str = "") -> None:
        """Raise :class:`ConfigError` on settings that cannot work, keys named with ``prefix``."""
        _check_finite(self, prefix)
        for key in ("beam_size", "nbest", "max_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}{key}={getattr(self, key)} must be at least 1")
        if self.nbest > self.beam_size and not self.sampling:
            raise ConfigError(f"{prefix}nbest={self.nbest} needs {prefix}beam_size >= {self.nbest} "
                              f"({prefix}beam_size={self.beam_size})")
        for key in ("temperature", "top_k"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}{key}={getattr(self, key)} must not be negative")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}top_p={self.top_p} must lie in (0, 1]: the share of probability kept")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"{prefix}seed={self.seed} must be between 0 and 2**63 - 1")
        if abs(self.len_penalty) > 100:  # ((5 + length) / 6) ** alpha overflows a float at long outputs past that
            raise ConfigError(f"{prefix}len_penalty={self.len_penalty} is out of range: GNMT's alpha is used between "
                              "0 and 2, and must lie within [-100, 100]")
        for key in ("min_len", "max_len_a"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}{key}={getattr(self, key)} must not be negative")
        for key in ("min_len", "max_len_b"):  # lengths past any model's positions; far larger overflow a float
            if abs(getattr(self, key)) > 10**9:
                raise ConfigError(f"{prefix}{key}={getattr(self, key)} is out of range: it must lie within "
                                  "[-10**9, 10**9] (lengths are capped by the model's positions anyway)")


@dataclass
class TrainConfig:
    """The training run: where it writes, how it batches, when it validates, saves and stops.

    Every ``max_*`` limit is off at 0; training stops at the first limit reached.
    """

    run_dir: str
    seed: int
    device: str  # auto (CUDA if present, else CPU) | cpu | cuda | cuda:N
    precision: str  # auto (bf16 where supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    max_tokens: int  # source or target tokens per batch (the larger side counts), per rank
    update_freq: int  # micro-batches accumulated into one update
    sort_window: int  # updates whose sentences are sorted by length together; 0 = the whole epoch
    ema_decay: float  # validate, keep and translate with an exponential moving average of the weights; 0 = off
    max_steps: int
    max_epochs: int
    max_hours: float  # wall-clock limit of this process
    valid_every: int  # updates between validations (and checkpoints)
    valid_decode: DecodeConfig  # the search whose output valid BLEU/chrF score, as attnmt-evaluate's
    valid_max_sentences: int  # translate only the first N valid sentences for BLEU; 0 = all
    best_metric: str  # the BLEU that picks best.pt and patience: mean (over directions) or a direction, e.g. en-de
    patience: int  # stop after this many validations without a better BLEU; 0 = never
    log_every: int  # updates between TensorBoard/log lines
    keep_last: int  # numbered checkpoints kept besides last and best
    average_last: int  # at the end, average.pt: the mean of the last N numbered checkpoints; 0 = off
    resume: str  # none | auto (from run_dir/checkpoints/last.pt if it exists) | a checkpoint path
    init_from: str | None  # a checkpoint whose weights, tokenizer and model shape start a new run; None = random init
    freeze: list[str]  # parameter groups kept fixed: embeddings, encoder, decoder (fine-tuning)
    compile: bool  # torch.compile the model
    tf32: bool  # fp32 matrix products in TensorFloat-32 on Ampere and newer GPUs (no effect on the CPU)
    num_workers: int  # DataLoader worker processes
    max_bad_steps: int  # stop after this many skipped updates in a row (non-finite loss, fp16 overflow)
    progress_bar: bool  # at a terminal; elsewhere (nohup, a scheduler, 2> file) only the log lines

    def __post_init__(self) -> None:
        _check_finite(self, "train.")
        _check_choice("train.precision", self.precision, PRECISION_NAMES)


# train.freeze's parameter groups: the model's top-level modules and parameters each one holds.
FREEZABLE = {
    "embeddings": ("src_embed", "tgt_embed", "output_proj", "output_bias"),  # tokens (the tied output too) and positions
    "encoder": ("encoder_layers", "encoder_norm"),
    "decoder": ("decoder_layers", "decoder_norm"),
}


def check_config(model: ModelConfig, optim: OptimConfig, train: TrainConfig, max_sentence_tokens: int | None) -> None:
    """Fail at start, naming the key, on settings that cannot work.

    Args:
        max_sentence_tokens: the longest sentence the data filter lets through (EOS included), if known.
    """
    if model.d_model % model.n_heads != 0:
        raise ConfigError(
            f"model.d_model={model.d_model} is not divisible by model.n_heads={model.n_heads}; "
            f"choose n_heads among the divisors of {model.d_model}"
        )
    for key in ("dropout", "attention_dropout", "activation_dropout"):
        value = getattr(model, key)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"model.{key}={value} must be in [0, 1)")
    if max_sentence_tokens is not None and train.max_tokens < max_sentence_tokens:
        raise ConfigError(
            f"train.max_tokens={train.max_tokens} is below the longest allowed sentence ({max_sentence_tokens} "
            "tokens), which would fit in no batch; raise train.max_tokens or lower the data length limit"
        )
    if optim.schedule == "cosine" and train.max_steps <= 0:
        raise ConfigError("optim.schedule=cosine decays to train.max_steps, which is 0; set train.max_steps")
    if not 0.0 <= optim.label_smoothing < 1.0:
        raise ConfigError(f"optim.label_smoothing={optim.label_smoothing} must be in [0, 1)")
    if optim.lr <= 0:
        raise ConfigError(f"optim.lr={optim.lr} must be above 0 (the peak learning rate, e.g. 5e-4)")
    for key in ("warmup_init_lr", "min_lr", "weight_decay", "clip_norm"):
        if getattr(optim, key) < 0:
            raise ConfigError(f"optim.{key}={getattr(optim, key)} must not be negative")
    if optim.eps <= 0 or len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        raise ConfigError(f"optim.betas={list(optim.betas)} and optim.eps={optim.eps}: AdamW needs two betas in [0, 1) "
                          "and an eps above 0 (0.9, 0.98 and 1e-9 are usual)")
    if train.update_freq < 1:
        raise ConfigError(f"train.update_freq={train.update_freq} must be at least 1")
    if not 0.0 <= train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={train.ema_decay} must be in [0, 1) (0 = off; 0.999 is usual)")
    if train.average_last == 1 or train.average_last < 0 or 0 < train.keep_last < train.average_last:
        raise ConfigError(f"train.average_last={train.average_last} must be 0 (off) or from 2 to train.keep_last="
                          f"{train.keep_last}, the numbered checkpoints kept")
    if train.sort_window < 0:
        raise ConfigError(f"train.sort_window={train.sort_window} must be 0 (the whole epoch) or more updates")
    if train.max_steps <= 0 and train.max_epochs <= 0 and train.max_hours <= 0:
        raise ConfigError("no stopping rule: set train.max_steps, train.max_epochs or train.max_hours")
    for key in ("valid_every", "log_every", "max_bad_steps"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(train, key)} must be at least 1")
    train.valid_decode.check("train.valid_decode.")
    unknown = [group for group in train.freeze if group not in FREEZABLE]
    if unknown:
        raise ConfigError(f"train.freeze={train.freeze}: {', '.join(unknown)} is no parameter group; use "
                          f"{', '.join(FREEZABLE)}")
    if set(train.freeze) == set(FREEZABLE):
        raise ConfigError(f"train.freeze={train.freeze} freezes every parameter: nothing would train")
    if train.init_from and train.resume != "none":
        raise ConfigError(f"train.init_from={train.init_from} starts a new run, train.resume={train.resume} continues "
                          "one; set only one of them")


def max_sentence_tokens(data_cfg: DataConfig) -> int | None:
    """The longest sentence the data filter allows, EOS included (None when the data config sets none)."""
    return data_cfg.max_len + 1 if data_cfg.max_len else None


@dataclass
class TrainRunConfig:
    """Everything ``attnmt-train`` composes: ``configs/train.yaml`` and its groups."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        names = [f"{src}-{tgt}" for src, tgt in self.data.pairs()]
        if self.train.best_metric != "mean" and self.train.best_metric not in names:
            raise ConfigError(f"train.best_metric={self.train.best_metric!r} is neither mean nor a direction of the "
                              f"data: {', '.join(names)}")

    def check(self) -> None:
        """Fail at start, naming the key, on settings that cannot work together (:func:`check_config`)."""
        check_config(self.model, self.optim, self.train, max_sentence_tokens(self.data))


@dataclass
class EngineConfig(DecodeConfig):
    """What ``attnmt-translate``, ``attnmt-evaluate`` and ``attnmt-serve`` share: the search settings,
    the model and the engine that runs it (:func:`attnmt.inference.open_engine`), and the direction."""

    ckpt: Any  # a checkpoint path, or a list of paths whose weights are averaged
    device: str
    engine: str  # native | ctranslate2 | transformers (attnmt.inference)
    compute_type: str  # engine=ctranslate2: CTranslate2's compute_type (default, auto, int8, float16, ...)
    tgt_lang: str | None  # the language to translate into; None = the model's only one (serve: a request's default)
    src_lang: str | None  # the language of the input, checked against those the model knows; None = unchecked


@dataclass
class TranslateConfig(EngineConfig):
    """``attnmt-translate``: the engine settings plus where sentences come from and go."""

    input: str | None  # a file; None = stdin (or ``text``)
    output: str | None  # a file; None = stdout
    text: Any  # sentences to translate; on the command line each text=... is one sentence, taken literally
    buffer_lines: int  # lines read ahead and batched together
    attention_plot: str | None  # a folder: one cross-attention heatmap PNG per input line
    attention_layer: int | None  # the decoder layer to plot; None = mean over layers (and heads)


@dataclass
class EvaluateConfig(EngineConfig):
    """``attnmt-evaluate``: a checkpoint's BLEU and chrF on ``src``/``ref`` files or a data split.

    With ``split=``, ``data.KEY=VALUE`` on the command line overrides that key of the checkpoint's own
    data config (e.g. ``data.root=...``); the command takes those items before the rest is composed.
    ``src_lang`` and ``tgt_lang`` also pick a split's direction where the data has several, and
    ``tgt_lang`` sacreBLEU's tokenizer.
    """

    src: str | None
    ref: str | None
    split: str | None  # a split of the checkpoint's data config, e.g. test (or test2016)
    hyp: str | None  # write the hypotheses here, one line per source line
    bleu_tokenize: str | None  # overrides sacreBLEU's tokenizer, e.g. 13a, intl, zh, char


@dataclass
class ServeConfig(EngineConfig):
    """``attnmt-serve``: the engine settings, where to listen, how requests are batched, what a request
    may ask. The decode settings and languages are the defaults a request's own settings override."""

    host: str  # the address to listen on; 127.0.0.1 = this machine only
    port: int
    batching: str  # per_call (gather requests into engine calls) | continuous (engine=native: a running search)
    batch_wait_ms: float  # per_call: how long a request waits for others to share its batch
    gather_tokens: int  # per_call: source tokens queued that start an engine call at once (max_tokens: its batches)
    max_rows: int  # continuous: rows (lines x beams) the running search decodes at once
    max_lines: int  # lines a request may hold (more: 413)
    max_line_bytes: int  # UTF-8 bytes a line may hold (more: 413)
    max_request_bytes: int  # bytes a request body may hold (more: 413)
    max_beam_size: int  # the largest beam_size (and nbest) a request may ask for
    max_pending_lines: int  # lines waiting for the engine before new requests are turned away (503)
    threads: int  # the engine's threads (torch's; CTranslate2's intra_threads); 0 = all cores but one
    shutdown_timeout_s: float  # after SIGTERM, how long requests in flight may take before they are cut off
    kernel_cache: int  # compiled matmul kernels kept (oneDNN, CPU): bounds the memory many batch shapes take

    def check(self, prefix: str = "") -> None:
        super().check(prefix)
        for key in ("max_lines", "max_line_bytes", "max_request_bytes", "max_beam_size", "max_pending_lines",
                    "max_rows", "kernel_cache", "gather_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}{key}={getattr(self, key)} must be at least 1")
        if self.threads < 0:
            raise ConfigError(f"{prefix}threads={self.threads} must not be negative (0: all cores but one)")
        if not 0 <= self.shutdown_timeout_s <= 3600:
            raise ConfigError(f"{prefix}shutdown_timeout_s={self.shutdown_timeout_s} must be between 0 and 3600 "
                              "(seconds)")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"{prefix}port={self.port} must be between 0 and 65535 (0: any free port)")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ConfigError(f"{prefix}batch_wait_ms={self.batch_wait_ms} must be between 0 and 1000 (milliseconds)")
        check_beam_limit(self, self.max_beam_size, prefix)  # else every request would be refused for the default
        if self.batching not in ("per_call", "continuous"):
            raise ConfigError(f"{prefix}batching={self.batching!r} is unknown; use per_call or continuous")
        if self.batching == "continuous" and self.engine != "native":
            raise ConfigError(f"{prefix}batching=continuous needs engine=native (engine={self.engine} has no running "
                              "search); use batching=per_call")
        if self.max_rows < self.max_beam_size:
            raise ConfigError(f"{prefix}max_rows={self.max_rows} is below max_beam_size={self.max_beam_size}: a "
                              "line of the largest search allowed would never fit; raise max_rows")


def check_beam_limit(cfg: DecodeConfig, max_beam_size: int, prefix: str = "") -> None:
    """attnmt-serve's bound on a search's size: ``beam_size`` and ``nbest`` at most ``max_beam_size``
    (the server's defaults at start, each request's settings after)."""
    for key in ("beam_size", "nbest"):
        if getattr(cfg, key) > max_beam_size:
            raise ConfigError(f"{prefix}{key}={getattr(cfg, key)} exceeds max_beam_size={max_beam_size}, "
                              "the largest this server searches")


@dataclass
class ExportConfig:
    """``attnmt-export``: a checkpoint as a CTranslate2 model directory or a transformers folder."""

    ckpt: Any  # a checkpoint path, or a list of paths whose weights are averaged
    to: str  # ctranslate2 | hf
    out: str  # the directory to write; it must not exist or be empty
    quantization: str | None  # to=ctranslate2: int8, int8_float32, float16, bfloat16, ...; None = float32


@dataclass
class AverageConfig:
    """``attnmt-average``: the weights of several checkpoints averaged into one checkpoint."""

    ckpt: Any  # checkpoint files ([a.pt,b.pt]), or one run directory: its newest `last` numbered checkpoints
    last: int  # with a run directory: how many of its step_*.pt
    out: str  # the checkpoint to write

    def check(self) -> None:
        if self.last < 1:
            raise ConfigError(f"last={self.last} must be at least 1")


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(name="translate_schema", node=TranslateConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="average_schema", node=AverageConfig)


def config_dir() -> Path:
    """The Hydra config tree (``configs/`` with ``train.yaml``, ``model/``, ``data/``, ...).

    The tree lives at the repository's top level, beside ``src/``, and is not copied into the
    package. Looked up, in order:

    1. ``$ATTNMT_CONFIGS``, if set: a config tree of one's own;
    2. ``<repository>/configs`` relative to this file's source (``src/attnmt`` -> two levels up).
       ``pip install -e .`` keeps the package in the checkout, so this works from any working
       directory.

    Raises:
        FileNotFoundError: neither exists (e.g. a non-editable install without ``$ATTNMT_CONFIGS``).
    """
    env = os.environ.get("ATTNMT_CONFIGS")
    candidates = [Path(env)] if env else [Path(__file__).resolve().parents[2] / "configs"]
    for path in candidates:
        if (path / "train.yaml").is_file():
            return path
    raise FileNotFoundError(
        f"attnmt's config tree was not found at {candidates[0]}; install the package editable "
        "(pip install -e .) from the repository, or set ATTNMT_CONFIGS to the repository's configs/ folder"
    )


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The shipped config ``config_name`` (``train``, ``translate``, ``evaluate``) with ``overrides``
    (Hydra's command-line syntax), as its dataclass: exactly what the command would run with.

    >>> cfg = compose("train", ["model=tiny", "train.max_steps=100"])  # a TrainRunConfig
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_configs()
    was_initialized = GlobalHydra.instance().is_initialized()
    if was_initialized:
        return OmegaConf.to_object(hydra_compose(config_name=config_name, overrides=list(overrides)))
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return OmegaConf.to_object(hydra_compose(config_name=config_name, overrides=list(overrides)))
