"""Typed schemas for every config group, registered in Hydra's ConfigStore.

YAML files under ``configs/`` hold the values; these dataclasses hold the names and types, so a
misspelt key fails when the config is composed rather than thousands of steps into a run. Only
``attnmt.cli`` sees a ``DictConfig``; it converts it to these dataclasses and passes those down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config that cannot work; raised before any work starts, naming the key and what to do."""


@dataclass
class ModelConfig:
    """Shape of the encoder-decoder Transformer.

    ``src_vocab_size`` and ``tgt_vocab_size`` are 0 in the YAML files: training fills them in from
    the tokenizer, and checkpoints store the filled-in values.
    """

    d_model: int = 512
    n_heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: str = "relu"  # relu | gelu
    norm_first: bool = True  # pre-norm (with a final LayerNorm per stack); False = the paper's post-norm
    positions: str = "sinusoidal"  # sinusoidal | learned
    max_positions: int = 1024
    share_embeddings: bool = True  # one embedding table for source and target (needs a joint vocabulary)
    tie_output: bool = True  # output projection = target embedding matrix
    src_vocab_size: int = 0
    tgt_vocab_size: int = 0
    pad_id: int = 0


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule.

    The schedule warms up linearly from ``warmup_init_lr`` to ``lr`` over ``warmup_steps`` updates, then
    decays as ``lr * sqrt(warmup_steps / step)`` (``inverse_sqrt``, Vaswani et al.) or along a cosine to
    ``min_lr`` at ``train.max_steps`` (``cosine``).
    """

    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.0001
    schedule: str = "inverse_sqrt"  # inverse_sqrt | cosine
    warmup_steps: int = 4000
    warmup_init_lr: float = 1e-7
    min_lr: float = 0.0  # the floor of the cosine schedule
    clip_norm: float = 1.0  # max global gradient norm; 0 disables clipping
    label_smoothing: float = 0.1
    fused: bool | None = None  # fused AdamW kernel; None = on CUDA only


@dataclass
class TokenizerConfig:
    """SentencePiece settings (:mod:`attnmt.tokenizer`).

    The model is trained on a seeded sample of at most ``sample_size`` training pairs and saved with
    the run; a later run with the same data and settings reuses it. ``model`` skips training: a
    SentencePiece ``.model`` file (used as a joint vocabulary; its pad/unk/bos/eos ids must be
    0/1/2/3) or a folder written by ``Tokenizer.save``.
    """

    joint: bool = True  # one vocabulary for both languages; False = one model per language
    model_type: str = "unigram"  # unigram | bpe
    vocab_size: int = 8000  # of the joint model, or of each per-language model
    character_coverage: float = 1.0
    byte_fallback: bool = True  # unseen characters become byte pieces instead of <unk>
    sample_size: int = 1_000_000  # training pairs the model is trained on at most
    seed: int = 1
    model: str | None = None


@dataclass
class DataConfig:
    """Where the parallel corpus comes from and how it is cleaned (:mod:`attnmt.data`).

    ``format`` picks the source: ``folder`` (line-aligned ``{split}.{lang}`` text files in ``root``),
    ``tsv`` (``{split}.tsv`` in ``root``, ``src<TAB>tgt`` per line), ``jsonl`` (``{split}.jsonl``,
    objects with the two language keys or a ``translation`` dict), ``hub`` (``hub_id``/``hub_config``
    on the Hugging Face hub, a ``translation`` column) or ``disk`` (a ``DatasetDict.save_to_disk``
    folder in ``root``, columns as for the hub). ``splits`` maps the names attnmt uses (train, valid,
    test) to the names in the source. Length rules count SentencePiece tokens and apply to the train
    split only; valid and test keep every line, in order.
    """

    format: str = "folder"  # folder | tsv | jsonl | hub | disk
    root: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    src_lang: str = "de"
    tgt_lang: str = "en"
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "valid": "valid", "test": "test"})
    max_len: int = 250  # train pairs with a side longer than this many tokens are dropped; 0 = no limit
    max_len_ratio: float = 3.0  # train pairs whose longer side has more than r times the tokens of the other; 0 = off
    dedup: bool = False  # drop exact duplicate train pairs (after normalisation)
    num_proc: int = 1  # processes for datasets.map (tokenization)
    cache_dir: str | None = "data/cache"  # tokenized datasets are cached here; None = in memory only
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class TrainConfig:
    """The training run: where it writes, how it batches, when it validates, saves and stops.

    Every ``max_*`` limit is off at 0; training stops at the first limit reached.
    """

    run_dir: str = "runs/default"
    seed: int = 1
    device: str = "auto"  # auto (CUDA if present, else CPU) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    max_tokens: int = 4096  # source or target tokens per batch (the larger side counts), per rank
    update_freq: int = 1  # micro-batches accumulated into one update
    max_steps: int = 0
    max_epochs: int = 0
    max_hours: float = 0.0  # wall-clock limit of this process
    valid_every: int = 1000  # updates between validations (and checkpoints)
    valid_decode: str = "greedy"  # greedy | beam: the search that produces BLEU/chrF output
    beam_size: int = 5
    valid_max_sentences: int = 0  # translate only the first N valid sentences for BLEU; 0 = all
    patience: int = 0  # stop after this many validations without a better BLEU; 0 = never
    log_every: int = 50  # updates between TensorBoard/log lines
    keep_last: int = 5  # numbered checkpoints kept besides last and best
    resume: str = "none"  # none | auto (from run_dir/checkpoints/last.pt if it exists) | a checkpoint path
    compile: bool = False  # torch.compile the model
    num_workers: int = 0  # DataLoader worker processes
    max_bad_steps: int = 10  # stop after this many non-finite losses in a row
    progress_bar: bool = True


@dataclass
class TrainRunConfig:
    """Everything ``attnmt-train`` composes: ``configs/train.yaml`` and its groups."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DecodeConfig:
    """How evaluation and translation search: the settings of :mod:`attnmt.decoding`, and batching.

    ``beam_size=1`` with ``nbest=1`` runs greedy search.
    """

    beam_size: int = 5
    len_penalty: float = 1.0  # GNMT alpha: hypotheses rank by log P / ((5 + len) / 6) ** alpha
    nbest: int = 1
    max_len_a: float = 1.5  # at most a * source_len + b target tokens
    max_len_b: int = 10
    min_len: int = 0
    max_tokens: int = 4096  # source tokens per batch, padding included


@dataclass
class TranslateConfig(DecodeConfig):
    """``attnmt-translate``: the search settings plus where sentences come from and go."""

    ckpt: Any = MISSING  # a checkpoint path, or a list of paths whose weights are averaged
    input: str | None = None  # a file; None = stdin (or ``text``)
    output: str | None = None  # a file; None = stdout
    text: Any = None  # a sentence, or a list of sentences, given on the command line
    device: str = "auto"
    buffer_lines: int = 512  # lines read ahead and batched together
    attention_plot: str | None = None  # a folder: one cross-attention heatmap PNG per input line
    attention_layer: int | None = None  # the decoder layer to plot; None = mean over layers (and heads)


@dataclass
class EvaluateConfig(DecodeConfig):
    """``attnmt-evaluate``: a checkpoint's BLEU and chrF on ``src``/``ref`` files or a data split."""

    ckpt: Any = MISSING
    src: str | None = None
    ref: str | None = None
    split: str | None = None  # a split of the checkpoint's data config, e.g. test (or test2016)
    # With split=: ``data.KEY=VALUE`` on the command line overrides that key of the checkpoint's data
    # config (e.g. data.root=...); the defaults here only give the keys and their types.
    data: DataConfig = field(default_factory=DataConfig)
    hyp: str | None = None  # write the hypotheses here, one line per source line
    device: str = "auto"
    tgt_lang: str | None = None  # picks sacreBLEU's tokenizer (zh, ja, ko); default: the checkpoint's
    bleu_tokenize: str | None = None  # overrides sacreBLEU's tokenizer, e.g. 13a, intl, zh, char


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(name="translate_schema", node=TranslateConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="data", name="schema", node=DataConfig)
