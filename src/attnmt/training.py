"""The training loop: :func:`train` is two functions, each read top to bottom.

``train(cfg)`` is two steps. :func:`start` checks the config and the run directory, prepares the
data, builds the model and the :class:`~attnmt.checkpoint.TrainState` (restored on resume), and only
once all of that has passed writes anything into the run directory: a refused command changes
nothing. :func:`run_loop` then alternates updates with validations and checkpoints until a limit,
early stopping or a signal. Helpers have names: :func:`lr_at` (the schedule),
:func:`label_smoothed_nll` (the loss), :func:`train_step` (one update over ``update_freq``
micro-batches), :func:`validate` (loss and perplexity, and BLEU/chrF through the same
:meth:`~attnmt.inference.Engine.translate` and :func:`~attnmt.evaluation.corpus_scores` as
``attnmt-evaluate``), :func:`validate_and_save` (a validation and its checkpoint files).

Gradients are normalised by the number of target tokens of the whole update, summed over
micro-batches and ranks, so ``update_freq=2`` on one GPU, two GPUs, and one batch twice the size all
make the same update.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
import logging
import logging.handlers
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from attnmt import checkpoint, distributed, durable
from attnmt.batching import Batch, TokenBucketSampler, collate, make_dataloader
from attnmt.checkpoint import CheckpointError, TrainState
from attnmt.config import ConfigError, DataConfig, DecodeConfig, ModelConfig, OptimConfig, TrainConfig, TrainRunConfig
from attnmt.data import (DataError, Stream, corpus_fingerprint, load_references, load_split, shares, streams, tags,
                         token_lengths, tokenize, train_tokenizer)
from attnmt.device import autocast as autocast_context
from attnmt.device import allow_tf32, resolve_device, resolve_precision
from attnmt.evaluation import corpus_scores
from attnmt.inference import Engine
from attnmt.inference.native import NativeBackend, cross_attention
from attnmt.model import Transformer, build_model
from attnmt.plots import attention_figure, missing_glyphs_allowed
from attnmt.tokenizer import Tokenizer, saved_fingerprint, tokenizer_settings

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TrainingError(RuntimeError):
    """Training cannot go on (out of memory, a run of non-finite losses, a full disk); the message says what to change."""


# ----------------------------------------------------------------------------------------------------
# Config and run-directory checks


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


def check_writable(run_dir: Path) -> None:
    """Fail at start, with one line, when training could not write its run directory.

    Probes ``run_dir`` and the folders and files inside it that training writes (or, where ``run_dir``
    does not exist yet, its nearest existing parent) by creating and removing a file, so a
    read-only mount or folder is found before any update is trained, not at the first checkpoint.
    """
    folders = [run_dir] + [run_dir / name for name in ("checkpoints", "tensorboard", "tokenizer")]
    for folder in folders:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if folder != run_dir and probe != folder:
            continue  # created by training inside run_dir, which is probed itself
        try:
            fd, name = tempfile.mkstemp(prefix=".attnmt-probe", dir=probe)
            os.close(fd)
            os.unlink(name)
        except OSError as err:
            raise ConfigError(f"train.run_dir={run_dir} cannot be written ({probe}: {err.strerror}); choose a writable "
                              "train.run_dir or fix the folder's permissions") from None
    log = run_dir / "train.log"
    try:
        if log.exists():
            log.open("a").close()
    except OSError as err:
        raise ConfigError(f"{log} cannot be written ({err.strerror}); fix its permissions or choose another "
                          "train.run_dir") from None


# ----------------------------------------------------------------------------------------------------
# Schedule, optimizer, loss


def lr_at(step: int, cfg: OptimConfig, max_steps: int = 0) -> float:
    """Learning rate of update number ``step`` (1-based): linear warm-up, then inverse square root
    or cosine decay (see :class:`~attnmt.config.OptimConfig`)."""
    warmup = cfg.warmup_steps
    if warmup > 0 and step <= warmup:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / warmup
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(max(warmup, 1) / step)
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# train.freeze's parameter groups: the model's top-level modules and parameters each one holds.
FREEZABLE = {
    "embeddings": ("src_embed", "tgt_embed", "output_proj", "output_bias"),  # tokens (the tied output too) and positions
    "encoder": ("encoder_layers", "encoder_norm"),
    "decoder": ("decoder_layers", "decoder_norm"),
}


def freeze(model: nn.Module, groups: list[str]) -> int:
    """Keep the parameters of ``groups`` (names of :data:`FREEZABLE`) fixed: they get no gradient and no
    optimizer state. Returns the number of parameters frozen."""
    frozen = {module for group in groups for module in FREEZABLE[group]}
    count = 0
    for name, p in model.named_parameters():
        if name.split(".")[0] in frozen:
            p.requires_grad_(False)
            count += p.numel()
    return count


DROPOUTS = ("dropout", "attention_dropout", "activation_dropout")  # the model keys a fine-tuning run sets


def init_model_config(model: ModelConfig, state: dict, path: str | Path) -> ModelConfig:
    """The model config of a run that starts from an imported checkpoint ``state`` (or continues one
    started from a checkpoint): the checkpoint's shape, vocabulary and special ids, with this run's
    dropouts (the only model keys such a run chooses)."""
    saved = checkpoint.model_config(state, path)
    changed = [f.name for f in fields(saved) if f.name not in DROPOUTS and getattr(saved, f.name) != getattr(model, f.name)]
    if changed:
        logger.info("the model's shape comes from %s: %s", path,
                    ", ".join(f"model.{key}={getattr(saved, key)!r}" for key in changed[:8]))
    return replace(saved, **{key: getattr(model, key) for key in DROPOUTS})


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, LayerNorm gains or embeddings' padding rows
    alone: embeddings are matrices and decay like the rest). Fused kernels on CUDA unless ``cfg.fused``
    says otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda" if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def label_smoothed_nll(logits: Tensor, target: Tensor, epsilon: float, pad_id: int) -> tuple[Tensor, Tensor]:
    """Label-smoothed cross-entropy and plain NLL, both summed over the non-padding target tokens.

    The smoothed target puts ``1 - epsilon`` on the reference token and spreads ``epsilon`` uniformly
    over the whole vocabulary (as ``F.cross_entropy(label_smoothing=...)`` does).

    Args:
        logits: (B, T, V), any float dtype; the log-softmax runs in fp32.
        target: (B, T) token ids, ``pad_id`` at padding.

    Returns:
        (loss, nll): two scalar fp32 tensors.
    """
    lprobs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    real = target != pad_id  # (B, T)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
    smooth = -lprobs.mean(dim=-1)  # (B, T)
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    return loss[real].sum(), nll[real].sum()


# ----------------------------------------------------------------------------------------------------
# One update


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """``ema <- d * ema + (1 - d) * model`` with ``d = min(decay, (1 + step) / (10 + step))``: the first
    updates average less, so a short run's average is not mostly its random start (TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates``). Buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - d)
    for mine, theirs in zip(ema.buffers(), model.buffers()):
        mine.copy_(theirs)


def moving_average(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` to hold its weights' moving average (:func:`update_ema`)."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@dataclass
class StepResult:
    """What one update did. ``loss`` and ``nll`` are per target token, over all micro-batches and ranks."""

    loss: float
    nll: float
    n_tokens: int
    grad_norm: float
    skipped: bool  # the loss or the gradient was not finite (with fp16, an overflow): no parameter changed


def train_step(
    model: nn.Module,
    micro_batches: list,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: contextlib.AbstractContextManager,
    label_smoothing: float,
    clip_norm: float,
    pad_id: int = 0,
) -> StepResult:
    """Forward and backward over ``micro_batches``, then one optimizer step.

    The gradient is that of the summed loss divided by the number of target tokens in all of this
    update's micro-batches on all ranks. DDP averages gradients over ranks, so each rank's loss is
    scaled by ``world_size / n_tokens`` to turn that average into the sum. Under DDP, gradients are
    synchronised only after the last micro-batch (``no_sync`` before).
    """
    device = micro_batches[0].src_tokens.device
    world = distributed.world_size()
    n_tokens = distributed.all_reduce_sum(
        torch.tensor(float(sum(b.n_tgt_tokens for b in micro_batches)), dtype=torch.float64, device=device)
    ).item()
    scale = world / max(n_tokens, 1.0)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss, nll (sums)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast:
                logits = model(batch.src_tokens, batch.src_mask, batch.tgt_in)  # (B, T, V)
            loss, nll = label_smoothed_nll(logits, batch.tgt_out, label_smoothing, pad_id)
            scaler.scale(loss * scale).backward()
        totals += torch.stack([loss.detach(), nll.detach()]).double()
    distributed.all_reduce_sum(totals)

    scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else float("inf"))
    # A non-finite unscaled gradient is an fp16 overflow (routine while the loss scale settles: the
    # update below lowers it) or, without loss scaling, a divergence; either way nothing is applied,
    # and the loop counts a skipped update (DDP's gradients and the summed losses agree on every rank).
    skipped = not bool(torch.isfinite(totals).all()) or not bool(torch.isfinite(grad_norm))
    if not skipped:
        scaler.step(optimizer)
    scaler.update()  # halves the scale after an overflow (unscale_ recorded it), grows it after a long calm
    optimizer.zero_grad(set_to_none=True)
    loss_sum, nll_sum = totals.tolist()
    return StepResult(loss_sum / max(n_tokens, 1.0), nll_sum / max(n_tokens, 1.0), int(n_tokens), float(grad_norm), skipped)


def describe_oom(micro_batches: list, max_tokens: int, update_freq: int) -> str:
    """The message for an out-of-memory update: the batch shapes and what to change."""
    shapes = ", ".join(f"src {tuple(b.src_tokens.shape)} tgt {tuple(b.tgt_in.shape)}" for b in micro_batches)
    return (
        f"out of memory on a batch of {shapes}; lower train.max_tokens (now {max_tokens}) and raise "
        f"train.update_freq (now {update_freq}) to keep the same tokens per update"
    )


# ----------------------------------------------------------------------------------------------------
# Validation


@dataclass
class ValidSet:
    """One direction's valid split as validation uses it (rank 0): teacher-forced batches for the loss,
    and the sources and raw references of its first ``train.valid_max_sentences`` lines for BLEU and chrF."""

    name: str  # the direction, e.g. en-de
    batches: list[Batch]  # collated, on the model's device
    sources: list[str]
    references: list[str]
    tgt_lang: str
    prefix: list[int]  # the ids before each source (tags, or the source language's code), as attnmt-evaluate puts them
    tgt_prefix: list[int]  # the ids each translation starts with (the target language's code for M2M100 and NLLB)
    first_pair: tuple[list[int], list[int]]  # ids of the first pair (EOS included), for the attention map


def valid_set(stream: Stream, valid_ds, prefixes: tuple[list[int], list[int]], train_cfg: TrainConfig,
              device: torch.device, tokenizer: Tokenizer) -> ValidSet:
    """Batch one direction's tokenized valid split once; valid sentences are never length-filtered, so
    one longer than ``train.max_tokens`` gets a batch of its own. ``prefixes``: the ids before each
    source and before each target (:meth:`~attnmt.tokenizer.Tokenizer.direction_ids`)."""
    src_len, tgt_len = token_lengths(valid_ds)
    longest = int(max(src_len.max(), tgt_len.max()))
    sampler = TokenBucketSampler(src_len, tgt_len, max(train_cfg.max_tokens, longest), shuffle=False)
    batches = [collate([valid_ds[i] for i in rows], tokenizer.pad_id, tokenizer.bos_id).to(device) for rows in sampler]
    prefix, tgt_prefix = prefixes
    limit = min(train_cfg.valid_max_sentences or len(valid_ds), len(valid_ds))
    first = valid_ds[0]
    return ValidSet(stream.name, batches, list(valid_ds.select(range(limit))["src"]),
                    load_references(stream.cfg, "valid")[:limit], stream.cfg.tgt_lang, prefix, tgt_prefix,
                    (list(first["src_ids"]), list(first["tgt_ids"])))


@torch.no_grad()
def validate(model: Transformer, valid: list[ValidSet], tokenizer: Tokenizer, decode: DecodeConfig,
             autocast: contextlib.AbstractContextManager, label_smoothing: float, best_metric: str = "mean") -> dict:
    """Loss, NLL and perplexity over every direction's valid batches, and each direction's BLEU/chrF.

    The translations and their scores come from the native engine's :meth:`~attnmt.inference.Engine.translate`
    and :func:`~attnmt.evaluation.corpus_scores` with ``decode``, as ``attnmt-evaluate split=valid``
    computes them, so the BLEU that picks ``best.pt`` is the BLEU that command reports. ``bleu`` and
    ``chrf`` are the mean over directions (``best_metric="mean"``) or one direction's (its name); with
    several directions, ``bleu/NAME`` and ``chrf/NAME`` hold each one's.
    """
    was_training = model.training
    model.eval()
    loss_sum = nll_sum = 0.0
    n_tokens = 0
    for batch in (b for direction in valid for b in direction.batches):
        with autocast:
            logits = model(batch.src_tokens, batch.src_mask, batch.tgt_in)
        loss, nll = label_smoothed_nll(logits, batch.tgt_out, label_smoothing, model.cfg.pad_id)
        loss_sum += loss.item()
        nll_sum += nll.item()
        n_tokens += batch.n_tgt_tokens
    scores, examples = {}, []
    engine = Engine("native", NativeBackend(model), tokenizer)
    for direction in valid:
        hypotheses = [t.texts[0] for t in engine.translate(direction.sources, decode, prefix=direction.prefix,
                                                           tgt_prefix=direction.tgt_prefix)]
        scores[direction.name] = corpus_scores(hypotheses, direction.references, direction.tgt_lang)
        examples += list(zip(hypotheses[:3], direction.references[:3]))[: max(1, 3 // len(valid))]
    model.train(was_training)
    nll = nll_sum / max(n_tokens, 1)
    chosen = {
        key: float(np.mean([s[key] for s in scores.values()])) if best_metric == "mean" else scores[best_metric][key]
        for key in ("bleu", "chrf")
    }
    per_direction = {f"{key}/{name}": s[key] for name, s in scores.items() for key in ("bleu", "chrf")}
    signatures = {k: v for k, v in next(iter(scores.values())).items() if k.endswith("signature")}
    return {
        "loss": loss_sum / max(n_tokens, 1),
        "nll": nll,
        "ppl": math.exp(min(nll, 100.0)),
        **chosen,
        **(per_direction if len(valid) > 1 else {}),
        **signatures,
        "n_sentences": sum(len(d.sources) for d in valid),
        "examples": examples,
    }


def log_attention_map(writer, model: Transformer, tokenizer: Tokenizer, src_ids: list[int], tgt_ids: list[int],
                      step: int) -> None:
    """Add one cross-attention heatmap (mean over layers and heads) of a valid pair to TensorBoard.

    The reference is teacher-forced, so the map shows where the model looks while it predicts each
    reference token. Needs matplotlib, an optional extra (``pip install -e '.[plot]'``).

    Args:
        src_ids: source ids, EOS included; tgt_ids: reference ids, EOS included.
    """
    was_training = model.training
    model.eval()  # dropout would blur the map
    weights = cross_attention(model, src_ids, tgt_ids[:-1])  # (T, S): rows predict tgt_ids, EOS last
    model.train(was_training)
    fig = attention_figure(weights, tokenizer.src_pieces(src_ids), tokenizer.tgt_pieces(tgt_ids),
                           title=f"valid sentence 1, step {step}: mean over layers and heads")
    with missing_glyphs_allowed():
        writer.add_figure("valid/attention", fig, step)  # closes the figure


# ----------------------------------------------------------------------------------------------------
# Data, signals, the log file


def prepare_data(data_cfg: DataConfig, tokenizer_dir: Path, tokenizer: Tokenizer | None = None):
    """The tokenizer, every stream's tokenized train split, and each direction's tokenized valid
    split, prepared once per job.

    Under torchrun, local rank 0 of each machine reads, cleans and tokenizes into ``data.cache_dir``
    first; the other ranks then memory-map what it wrote. The tokenizer is ``tokenizer`` (a
    checkpoint's), else global rank 0's (reused from ``tokenizer_dir`` or the cache when it was made
    from the same data and settings, else trained), sent to every rank.

    Returns:
        (tokenizer, train, mix, valid): ``train`` holds the pairs of every stream
        (:func:`attnmt.data.streams`), one stream after another, with ``src_ids``, ``tgt_ids`` and
        their lengths; ``mix`` is ``(sizes, shares)`` of those streams, or None for a single one;
        ``valid`` lists ``(stream, valid dataset, (source prefix, target prefix))`` of each direction
        of the main corpus.
    """
    train_streams = streams(data_cfg)
    valid_streams = train_streams[: len(data_cfg.pairs())]
    with distributed.local_rank_zero_first():
        # With several streams, each one's log lines and errors start with its name.
        names = [stream.name if len(train_streams) > 1 else None for stream in train_streams]
        cleaned = [_named(name, load_split, stream.cfg, "train", train=True) for stream, name in zip(train_streams, names)]
        valid_clean = [load_split(stream.cfg, "valid", train=False) for stream in valid_streams]
    if tokenizer is None:
        state = (train_tokenizer(cleaned, data_cfg, tokenizer_dir, tags(data_cfg)).to_state()
                 if distributed.rank() == 0 else None)
        tokenizer = Tokenizer.from_state(distributed.broadcast_object(state))
    prefixes = [tokenizer.direction_ids(stream.cfg.src_lang, stream.cfg.tgt_lang, stream.tags) for stream in train_streams]
    with distributed.local_rank_zero_first():
        train_sets = [_named(name, tokenize, ds, tokenizer, stream.cfg, train=True, prefix=prefix,
                             name=name or "train split", tgt_prefix=tgt_prefix)
                      for stream, name, ds, (prefix, tgt_prefix) in zip(train_streams, names, cleaned, prefixes)]
        valid = [(stream, tokenize(ds, tokenizer, stream.cfg, train=False, prefix=prefix, tgt_prefix=tgt_prefix),
                  (prefix, tgt_prefix))
                 for stream, ds, (prefix, tgt_prefix) in zip(valid_streams, valid_clean, prefixes)]
    if len(train_sets) == 1:
        return tokenizer, train_sets[0], None, valid
    sizes = [len(ds) for ds in train_sets]
    mix = (sizes, shares(sizes, [s.weight for s in train_streams], data_cfg.temperature).tolist())
    logger.info("mixing %s", ", ".join(f"{s.name}: {n} pairs, {share:.1%} of an epoch"
                                       for s, n, share in zip(train_streams, *mix)))
    return tokenizer, datasets.concatenate_datasets(train_sets), mix, valid


def _named(label: str | None, step, *args, **kwargs):
    """``step(*args, **kwargs)`` on a stream; a :class:`DataError` starts with ``label`` where one is
    given, e.g. ``en-de (data.mix[0], bt)``, whose entry the ``data.*`` keys it names stand for."""
    try:
        return step(*args, **kwargs)
    except DataError as err:
        if label is None:
            raise
        raise DataError(f"{label}: {err}") from None


def install_stop_handlers() -> tuple[dict, dict]:
    """Turn the first SIGINT/SIGTERM into a request to checkpoint and stop; a second one acts as usual.
    The signal that says the torchrun agent died (:data:`attnmt.distributed.PARENT_DIED`) asks the
    same, however often it comes (Linux may send it more than once).

    Returns:
        (flag, previous handlers): ``flag["signal"]`` is set to the signal's name when one arrives.
    """
    flag: dict = {"signal": None}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, distributed.PARENT_DIED)}

    def handler(signum, _frame):
        if signum == distributed.PARENT_DIED:
            if flag["signal"] is None:
                flag["signal"] = distributed.PARENT_DIED.name
                logger.warning("the torchrun agent exited (%s): saving a checkpoint after this update, then stopping",
                               flag["signal"])
            return
        flag["signal"] = signal.Signals(signum).name
        signal.signal(signum, previous[signal.Signals(signum)])  # a second Ctrl-C interrupts at once
        logger.warning("%s received: saving a checkpoint after this update, then stopping", flag["signal"])

    if threading.current_thread() is threading.main_thread():
        for sig in previous:
            signal.signal(sig, handler)
    return flag, previous


def restore_handlers(previous: dict) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunDir:
    """The run directory as rank 0 holds it: a lock against a second process training in it, and
    ``train.log``, begun only when a start is accepted (:meth:`accept`).

    Records logged before then (data hygiene, tokenizer training) are held in memory and written
    first, so a refused start leaves ``train.log`` and ``config.yaml`` as they were; a refused start in
    a folder that did not exist removes what it made there (the cache of ``data.cache_dir=null``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.existed = path.exists()
        self.lock: Any = None
        self.buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1,
                                                     flushOnClose=False)
        self.log_file: logging.Handler | None = None
        logging.getLogger().addHandler(self.buffer)

    def acquire(self) -> None:
        """Hold ``.lock`` in the run directory until :meth:`close` (or until the process exits, however).

        Raises:
            ConfigError: another process trains in this directory: the two would overwrite each other.
        """
        if self.lock is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"train.run_dir={self.path} is in use by {owner}; wait for it to finish or use another "
                              "train.run_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"attnmt-train (pid {os.getpid()})\n")
        handle.flush()
        self.lock = handle

    def accept(self, cfg: TrainRunConfig, tokenizer: Tokenizer) -> None:
        """The start passed every check: clean up after a killed run, write ``config.yaml`` and the run's
        copy of the tokenizer, begin ``train.log``."""
        self.acquire()
        stale = checkpoint.remove_temporary_files(self.path) + checkpoint.remove_temporary_files(
            checkpoint.checkpoint_dir(self.path))
        if saved_fingerprint(self.path / "tokenizer") != tokenizer.fingerprint:
            tokenizer.save(self.path / "tokenizer")
        with durable.replacing(self.path / "config.yaml") as tmp:
            OmegaConf.save(OmegaConf.structured(cfg), tmp)
        self.log_file = logging.FileHandler(self.path / "train.log", encoding="utf-8")
        self.log_file.setFormatter(logging.Formatter(LOG_FORMAT))
        self.buffer.setTarget(self.log_file)
        self.buffer.flush()
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        root.addHandler(self.log_file)
        if stale:
            logger.info("removed %d temporary files left by a killed run: %s", len(stale), ", ".join(p.name for p in stale))

    def close(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        if self.log_file is not None:
            root.removeHandler(self.log_file)
            self.log_file.close()
        if self.lock is not None:
            self.lock.close()
        if self.log_file is None and not self.existed:  # a refused fresh start
            shutil.rmtree(self.path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# The run: set up by start(), driven by run_loop()


@dataclass
class Meter:
    """Training metrics summed over the updates since the last log line.

    Throughput counts the time of updates alone (their batches' loading included): the validations,
    checkpoints and log writes between them are left out, and so is an update in which
    ``torch.compile`` built a graph (its tokens too), which would measure the compiler.
    """

    tokens: int = 0  # target tokens of the timed updates
    seconds: float = 0.0  # their time
    compiling: int = 0  # updates left out of the throughput because they compiled
    padding: int = 0
    slots: int = 0
    loss: float = 0.0
    nll: float = 0.0
    steps: int = 0  # updates that were not skipped

    def add(self, result: StepResult, micro: list[Batch], seconds: float, compiled: bool = False) -> None:
        if not result.skipped:
            self.loss += result.loss
            self.nll += result.nll
            self.steps += 1
        if compiled:
            self.compiling += 1
        else:
            self.tokens += result.n_tokens
            self.seconds += seconds
        for b in micro:
            self.padding += b.src_tokens.numel() + b.tgt_in.numel() - int(b.src_mask.sum()) - b.n_tgt_tokens
            self.slots += b.src_tokens.numel() + b.tgt_in.numel()


@dataclass
class Run:
    """Everything the loop works with, built by :func:`start` and released by :meth:`close`."""

    cfg: TrainRunConfig
    info: distributed.DistInfo
    device: torch.device
    autocast: contextlib.AbstractContextManager
    run_dir: Path
    state: TrainState
    model: nn.Module  # what updates run: the state's model, compiled and/or wrapped in DDP
    loader: Any
    valid: list[ValidSet] | None  # one per direction, rank 0 only
    writer: Any  # TensorBoard, rank 0 only
    progress: Any
    stop_flag: dict = field(default_factory=dict)
    previous_handlers: dict = field(default_factory=dict)
    batch_iter: Any = None

    def next_micro_batches(self) -> list[Batch]:
        """Up to ``update_freq`` batches, moving into the next epoch when this one runs out."""
        t, state, sampler = self.cfg.train, self.state, self.state.sampler
        micro = []
        while len(micro) < t.update_freq and not self.last_epoch_done():
            if state.batches_in_epoch >= len(sampler):
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                sampler.set_epoch(state.epoch)
                self.batch_iter = iter(self.loader)
            # From pinned memory the copy to the GPU need not wait: the stream orders it before the forward.
            micro.append(next(self.batch_iter).to(self.device, non_blocking=self.loader.pin_memory))
            state.batches_in_epoch += 1
        return micro

    def last_epoch_done(self) -> bool:
        t, state = self.cfg.train, self.state
        return bool(t.max_epochs) and state.epoch >= t.max_epochs and state.batches_in_epoch >= len(state.sampler)

    def close(self) -> None:
        restore_handlers(self.previous_handlers)
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


def start(cfg: TrainRunConfig, info: distributed.DistInfo, run_dir: RunDir | None) -> Run:
    """Check everything that can be checked, build the run, and only then touch the run directory
    (``run_dir``, rank 0's; None on the other ranks)."""
    t = cfg.train
    device = resolve_device(t.device, info.local_rank)
    amp_dtype = resolve_precision(t.precision, device)
    allow_tf32(device, t.tf32)
    check_config(cfg.model, cfg.optim, t, max_sentence_tokens(cfg.data))
    if run_dir is not None:
        check_writable(run_dir.path)
        if run_dir.path.is_dir():  # refuse a busy run directory before the data is prepared
            run_dir.acquire()
    resume_from = checkpoint.resume_path(t.resume, t.run_dir)
    resumed = checkpoint.load_checkpoint(resume_from) if resume_from else None
    init = checkpoint.load_checkpoint(t.init_from) if t.init_from else None
    source, source_path = (resumed, resume_from) if resumed else (init, t.init_from)
    # The checkpoint this run's weights started from, kept in every checkpoint it writes.
    init_from = t.init_from if resumed is None else checkpoint.started_from(resumed)
    if source is not None:
        checkpoint.require(source, checkpoint.INFERENCE_KEYS, source_path, "train.resume and train.init_from")
        # An imported model's shape is no model= of ours: a run started from one takes the checkpoint's
        # shape, and so does such a run each time it continues.
        if (init is not None and init.get("imported_from")) or (resumed is not None and init_from):
            cfg = replace(cfg, model=init_model_config(cfg.model, source, source_path))
        else:
            checkpoint.check_same_model(source, cfg.model, source_path)
    if resumed is not None:
        checkpoint.check_same_tokenizer(resumed, cfg.data.tokenizer, resume_from)

    # Data and model. Every rank builds the same initial weights from the same seed.
    seed_everything(t.seed)
    tokenizer = checkpoint.tokenizer_of(source, source_path) if source is not None else None
    # data.cache_dir=null: a cache in the run directory, which every rank shares and a resumed run finds again.
    data_cfg = cfg.data if cfg.data.cache_dir else replace(cfg.data, cache_dir=str(Path(t.run_dir) / "data-cache"))
    tokenizer, train_ds, mix, valid_sets = prepare_data(data_cfg, Path(t.run_dir) / "tokenizer", tokenizer)
    model_cfg = replace(cfg.model, src_vocab_size=tokenizer.src_vocab_size, tgt_vocab_size=tokenizer.tgt_vocab_size,
                        pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    model = build_model(model_cfg).to(device)
    if init is not None:
        checkpoint.load_model_weights(model, init, t.init_from, "the model this run builds (model.* settings)")
        logger.info("weights and tokenizer from %s (train.init_from); a fresh optimizer and schedule", t.init_from)
    if t.freeze:
        logger.info("train.freeze=%s: %s of %s parameters kept fixed", t.freeze, f"{freeze(model, t.freeze):,}",
                    f"{sum(p.numel() for p in model.parameters()):,}")
    sampler = TokenBucketSampler(*token_lengths(train_ds), t.max_tokens, shuffle=True, seed=t.seed, rank=info.rank,
                                 world_size=info.world_size, update_freq=t.update_freq, window=t.sort_window,
                                 streams=mix[0] if mix else None,
                                 shares=mix[1] if mix else None)
    state = TrainState(model, model_cfg, tokenizer, asdict(cfg), build_optimizer(model, cfg.optim, device),
                       torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), sampler,
                       ema=moving_average(model) if t.ema_decay else None,
                       corpus=[corpus_fingerprint(stream.cfg) for stream in streams(data_cfg)],
                       init_from=None if init_from is None else str(init_from))
    seed_everything(t.seed + info.rank)  # ranks differ from here on (dropout)
    rng_to_restore = None
    if resumed is not None:
        rngs = state.restore(resumed, resume_from)
        if len(rngs) == info.world_size:
            rng_to_restore = rngs[info.rank]
        else:
            logger.warning("the checkpoint was written by %d ranks, this run has %d: random streams restart",
                           len(rngs), info.world_size)
            seed_everything(t.seed + info.rank + state.step)
        logger.info("resumed from %s at step %d, epoch %d", resume_from, state.step, state.epoch)
    else:
        sampler.set_epoch(state.epoch)
    loader = make_dataloader(train_ds, sampler, t.num_workers, device.type == "cuda", pad_id=tokenizer.pad_id,
                             bos_id=tokenizer.bos_id)
    train_model = wrap_model(model, device, info.world_size, t.compile)
    valid = ([valid_set(stream, ds, prefixes, t, device, tokenizer) for stream, ds, prefixes in valid_sets]
             if info.is_main else None)

    # Accepted: from here on the run directory changes.
    writer = None
    if run_dir is not None:
        run_dir.accept(cfg, tokenizer)
        writer = tensorboard_writer(run_dir.path, state.step)
    logger.info("model: %s parameters; device %s, %s; %d ranks; %d train batches per epoch per rank",
                f"{model.num_parameters():,}", device, str(amp_dtype).removeprefix("torch."), info.world_size,
                len(sampler))
    total_steps = t.max_steps or (math.ceil(len(sampler) / t.update_freq) * t.max_epochs if t.max_epochs else None)
    # A bar at a terminal only: elsewhere (nohup, a scheduler, 2> file) its redraws would fill the log.
    progress = tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True,
                    disable=not (info.is_main and t.progress_bar and sys.stderr.isatty()))
    stop_flag, previous_handlers = install_stop_handlers()
    run = Run(cfg, info, device, autocast_context(device, amp_dtype), Path(t.run_dir), state, train_model, loader,
              valid, writer, progress, stop_flag, previous_handlers)
    run.batch_iter = iter(loader)
    if rng_to_restore is not None:
        # Last: building the model and starting the DataLoader iterator both draw from the torch
        # generator, and the uninterrupted run made those draws before the step the checkpoint follows.
        if (why := checkpoint.set_rng_state(rng_to_restore, device)) is not None:
            logger.warning("%s: %s", resume_from, why)
    return run


def wrap_model(model: nn.Module, device: torch.device, world_size: int, compile_model: bool) -> nn.Module:
    """What updates run: ``model`` in DDP across ranks, then compiled (``train.compile``). In that order
    DDP's bucketed all-reduces stay hooks around the compiled graphs (TorchDynamo splits the graph at
    bucket boundaries), so communication overlaps the backward; a compiled model wrapped in DDP waits."""
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def compiled_graphs() -> int:
    """How many graphs ``torch.compile`` has built in this process so far (TorchDynamo's own count)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def tensorboard_writer(run_dir: Path, step: int):
    """The run's TensorBoard writer, continuing after ``step`` (imported here: a heavy module)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1)


def report_validation(run: Run) -> None:
    """The log lines, TensorBoard scalars and attention map of the validation just done."""
    state, metrics = run.state, run.state.metrics
    is_best = state.stale_validations == 0
    over = "" if len(run.valid) == 1 else f" ({run.cfg.train.best_metric} of {len(run.valid)} directions)"
    logger.info("valid at step %d: loss %.4f | ppl %.2f | BLEU %.2f | chrF %.2f%s%s", state.step, metrics["loss"],
                metrics["ppl"], metrics["bleu"], metrics["chrf"], over,
                " (best)" if is_best else f" (best {state.best_bleu:.2f})")
    if len(run.valid) > 1:
        logger.info("  %s", " | ".join(f"{d.name} BLEU {metrics['bleu/' + d.name]:.2f} chrF {metrics['chrf/' + d.name]:.2f}"
                                       for d in run.valid))
    for hyp, ref in metrics.pop("examples"):
        logger.info("  hyp: %s\n  ref: %s", hyp, ref)
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and name != "n_sentences":
            run.writer.add_scalar(f"valid/{name}", value, state.step)
    if importlib.util.find_spec("matplotlib") is not None:
        log_attention_map(run.writer, state.translation_model, state.tokenizer, *run.valid[0].first_pair, state.step)
    run.writer.flush()
    run.progress.set_postfix(bleu=f"{metrics['bleu']:.2f}")


def validate_and_save(run: Run, stop_reason: str | None) -> str | None:
    """Validate on rank 0 (unless a signal is stopping the run), write the checkpoint files, and
    return the early-stopping reason if patience has run out."""
    t, state = run.cfg.train, run.state
    interrupted = stop_reason is not None and stop_reason.endswith("received")
    is_best = False
    if run.info.is_main and not interrupted:
        state.metrics = validate(state.translation_model, run.valid, state.tokenizer, t.valid_decode, run.autocast,
                                 run.cfg.optim.label_smoothing, t.best_metric)
        is_best = state.metrics["bleu"] > state.best_bleu
        state.best_bleu = state.metrics["bleu"] if is_best else state.best_bleu
        state.stale_validations = 0 if is_best else state.stale_validations + 1
        report_validation(run)
    rng = distributed.all_gather_objects(checkpoint.rng_state(run.device))
    if run.info.is_main:
        # Stopped by a signal at a validation step: the resumed run validates first.
        state.validation_pending = interrupted and state.step % t.valid_every == 0
        try:
            checkpoint.save_run_checkpoint(state.to_checkpoint(rng), run.run_dir, t.keep_last, is_best)
        except CheckpointError as err:  # a full disk or a folder made read-only mid-run
            raise TrainingError(str(err)) from None
    reason = None
    if t.patience and stop_reason is None:
        stale = distributed.broadcast_object(state.stale_validations)
        if stale >= t.patience:
            reason = f"no better valid BLEU in {stale} validations (train.patience={t.patience})"
    distributed.barrier()
    return reason


def average_last_checkpoints(run: Run) -> dict | None:
    """Rank 0, at the end of a run: ``average.pt``, the mean of the newest ``train.average_last``
    numbered checkpoints, validated like any checkpoint; it becomes ``best.pt`` too when its valid
    BLEU beats the best one. Returns its metrics (None with fewer than two checkpoints)."""
    t, state = run.cfg.train, run.state
    folder = checkpoint.checkpoint_dir(run.run_dir)
    paths = checkpoint.numbered_checkpoints(folder)[-t.average_last:]
    if len(paths) < 2:
        logger.info("train.average_last=%d: %d numbered checkpoint(s), nothing to average", t.average_last, len(paths))
        return None
    try:
        averaged = checkpoint.average_checkpoints(paths, folder / "average.pt")
        saved = checkpoint.load_checkpoint(averaged)
        model = moving_average(state.translation_model)
        checkpoint.load_model_weights(model, saved, averaged)
    except CheckpointError as err:
        raise TrainingError(str(err)) from None
    metrics = validate(model, run.valid, state.tokenizer, t.valid_decode, run.autocast,
                       run.cfg.optim.label_smoothing, t.best_metric)
    better = metrics["bleu"] > state.best_bleu
    logger.info("average of %s: valid loss %.4f | BLEU %.2f | chrF %.2f (%s best %.2f) -> %s%s",
                ", ".join(p.name for p in paths), metrics["loss"], metrics["bleu"], metrics["chrf"],
                "above the" if better else "not above the", state.best_bleu, averaged,
                " and best.pt" if better else "")
    if better:
        try:
            checkpoint.save_checkpoint(checkpoint.record_metrics(saved, metrics), folder / "best.pt")
        except CheckpointError as err:
            raise TrainingError(str(err)) from None
    return metrics


def log_progress(run: Run, meter: Meter, result: StepResult) -> None:
    """A log line and TensorBoard scalars over the updates in ``meter``."""
    state = run.state
    loss, nll = meter.loss / meter.steps, meter.nll / meter.steps
    tokens_per_s = meter.tokens / meter.seconds if meter.seconds > 0 else None  # None: every update compiled
    speed = "compiling" if tokens_per_s is None else f"{tokens_per_s:.0f} tok/s"
    run.progress.set_postfix(loss=f"{loss:.3f}", lr=f"{state.lr:.2e}", tok_s=speed.removesuffix(" tok/s"),
                             epoch=state.epoch)
    if run.writer is not None:
        scalars = {
            "train/loss": loss, "train/nll": nll, "train/ppl": math.exp(min(nll, 100.0)), "train/lr": state.lr,
            "train/grad_norm": result.grad_norm, "train/padding_fraction": meter.padding / max(meter.slots, 1),
            "train/epoch": state.epoch,
        }
        if tokens_per_s is not None:
            scalars["train/tokens_per_s"] = tokens_per_s
        if state.scaler.is_enabled():
            scalars["train/loss_scale"] = state.scaler.get_scale()
        if run.device.type == "cuda":
            scalars["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        for name, value in scalars.items():
            run.writer.add_scalar(name, value, state.step)
    logger.info("step %d | epoch %d | loss %.4f | nll %.4f | lr %.3e | grad norm %.3f | %s%s", state.step, state.epoch,
                loss, nll, state.lr, result.grad_norm, speed,
                f" ({meter.compiling} compiling updates left out)" if meter.compiling and tokens_per_s else "")


def agreed_stop(run: Run, started: float) -> str | None:
    """Why to stop after this update, if at all. Every rank must agree, or the next collective would hang."""
    t = run.cfg.train
    limits = [
        (t.max_steps and run.state.step >= t.max_steps, f"train.max_steps={t.max_steps} reached"),
        (t.max_hours and time.time() - started >= t.max_hours * 3600, f"train.max_hours={t.max_hours} reached"),
        (run.stop_flag["signal"] is not None, f"{run.stop_flag['signal'] or 'a stop signal'} received"),
    ]
    votes = distributed.all_reduce_sum(torch.tensor([float(bool(hit)) for hit, _ in limits], device=run.device))
    reason = next((reason for (_, reason), vote in zip(limits, votes.tolist()) if vote > 0), None)
    if reason is None and run.last_epoch_done():
        reason = f"train.max_epochs={t.max_epochs} reached"
    return reason


def update(run: Run, micro: list[Batch]) -> StepResult:
    """One optimizer step at the schedule's learning rate; an out-of-memory batch becomes a TrainingError.

    A skipped update (:attr:`StepResult.skipped`) changes no weight and does not count: the step, and
    with it the schedule, the moving average and the next validation, stay where they were (as fairseq
    does with an fp16 overflow). Its batches are spent: the next update takes the next ones.
    """
    t, state = run.cfg.train, run.state
    state.lr = lr_at(state.step + 1, run.cfg.optim, t.max_steps)
    for group in state.optimizer.param_groups:
        group["lr"] = state.lr
    try:
        result = train_step(run.model, micro, state.optimizer, state.scaler, run.autocast,
                            run.cfg.optim.label_smoothing, run.cfg.optim.clip_norm, run.state.model_config.pad_id)
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(f"{describe_oom(micro, t.max_tokens, t.update_freq)}; checkpoints so far are in "
                            f"{checkpoint.checkpoint_dir(run.run_dir)}") from e
    if result.skipped:
        return result
    state.step += 1
    if state.ema is not None:
        update_ema(state.ema, state.model, t.ema_decay, state.step)
    run.progress.update(1)
    return result


# Below this fp16 loss scale, gradients underflow whatever the model does: a scale that keeps falling
# through overflows, even with updates between them, is a divergence (fairseq's --min-loss-scale).
MIN_LOSS_SCALE = 1e-4


def check_skipped(run: Run, result: StepResult, in_a_row: int) -> None:
    """Say why an update was skipped; stop the run in one line after ``train.max_bad_steps`` skips in
    a row, or once the fp16 loss scale has fallen below :data:`MIN_LOSS_SCALE`."""
    t, state = run.cfg.train, run.state
    scaler = state.scaler
    overflow = scaler.is_enabled() and math.isfinite(result.loss)
    scale = f"; loss scale now {scaler.get_scale():g}" if scaler.is_enabled() else ""
    if overflow:
        logger.info("after step %d: fp16 gradient overflow, update skipped (%d in a row)%s", state.step, in_a_row, scale)
    else:
        logger.warning("after step %d: non-finite loss or gradient (loss %s, grad norm %s); update skipped (%d in a "
                       "row)%s", state.step, result.loss, result.grad_norm, in_a_row, scale)
    fix = ("Lower optim.lr, raise optim.warmup_steps, set optim.clip_norm, or use train.precision=bf16/fp32; "
           f"checkpoints so far are in {checkpoint.checkpoint_dir(run.run_dir)}")
    if in_a_row >= t.max_bad_steps:
        what = "fp16 gradient overflows" if overflow else "non-finite losses"
        raise TrainingError(f"training stopped at step {state.step}: {in_a_row} {what} in a row (train.max_bad_steps="
                            f"{t.max_bad_steps}){scale}. {fix}")
    if scaler.is_enabled() and scaler.get_scale() < MIN_LOSS_SCALE:
        raise TrainingError(f"training stopped at step {state.step}: the fp16 loss scale fell to {scaler.get_scale():g}"
                            f" (below {MIN_LOSS_SCALE:g}): gradients overflow however far they are scaled down. {fix}")


def run_loop(run: Run) -> dict:
    """Updates, validations and checkpoints until a limit, early stopping or a signal; returns a summary."""
    t, state = run.cfg.train, run.state
    stop_reason = None
    if t.max_steps and state.step >= t.max_steps:  # a finished run resumed: nothing left to do
        stop_reason = f"train.max_steps={t.max_steps} was already reached"
    elif run.last_epoch_done():
        stop_reason = f"train.max_epochs={t.max_epochs} was already reached"
    validation_due = state.validation_pending  # a resume that owes the validation a signal cut short
    skipped_in_a_row = skipped_total = 0
    losses: list[float] = []  # per update of this call, for the caller (and the resume test)
    meter, started = Meter(), time.time()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    while True:
        if validation_due:
            stop_reason = validate_and_save(run, stop_reason) or stop_reason
        if stop_reason is not None:
            break
        tic = time.perf_counter()
        graphs = compiled_graphs() if t.compile else 0
        micro = run.next_micro_batches()
        result = update(run, micro)
        meter.add(result, micro, time.perf_counter() - tic, t.compile and compiled_graphs() != graphs)
        losses.append(result.loss)
        skipped_in_a_row = skipped_in_a_row + 1 if result.skipped else 0
        skipped_total += result.skipped
        if result.skipped:
            check_skipped(run, result, skipped_in_a_row)
        elif state.step % t.log_every == 0 and meter.steps > 0:
            log_progress(run, meter, result)
            if run.writer is not None:
                run.writer.add_scalar("train/skipped_updates", skipped_total, state.step)
            meter = Meter()
        stop_reason = agreed_stop(run, started)
        validation_due = (not result.skipped and state.step % t.valid_every == 0) or stop_reason is not None

    averaged = None
    if t.average_last and run.info.is_main and not (stop_reason or "").endswith("received"):
        averaged = average_last_checkpoints(run)
    distributed.barrier()
    best = f"best valid BLEU {state.best_bleu:.2f}" if state.best_bleu >= 0 else "no validation yet"
    logger.info("stopped at step %d (epoch %d): %s; %s; checkpoints in %s",
                state.step, state.epoch, stop_reason, best, checkpoint.checkpoint_dir(run.run_dir))
    return {
        "step": state.step,
        "epoch": state.epoch,
        "stop_reason": stop_reason,
        "interrupted": run.stop_flag["signal"],
        "best_bleu": state.best_bleu,
        "valid": state.metrics,
        "averaged": averaged,
        "skipped_updates": skipped_total,
        "losses": losses,
        "checkpoint": str(checkpoint.checkpoint_dir(run.run_dir) / "last.pt"),
    }


def train(cfg: TrainRunConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` until a ``train.max_*`` limit, early stopping or a signal.

    Works unchanged under ``torchrun``: each rank reads its shard of every epoch's batches, DDP
    synchronises gradients, and rank 0 alone validates, logs and writes checkpoints into
    ``train.run_dir``.

    Returns:
        A summary: ``step``, ``epoch``, ``stop_reason``, ``best_bleu``, the last ``valid`` metrics,
        ``skipped_updates``, ``losses`` (the train loss of each update of this call) and ``checkpoint``
        (the path of ``last.pt``).

    Raises:
        ConfigError, DataError, CheckpointError, TokenizerError: a start that cannot work (nothing in
            the run directory changed); TrainingError: training cannot go on.
    """
    info = distributed.setup(cfg.train.device)
    run_dir = RunDir(Path(cfg.train.run_dir)) if info.is_main else None
    try:
        run = start(cfg, info, run_dir)
        try:
            return run_loop(run)
        finally:
            run.close()
    finally:
        if run_dir is not None:
            run_dir.close()
