"""The training loop: :func:`train` reads top to bottom, nanoGPT-style.

Helpers around it have names: :func:`lr_at` (the schedule), :func:`label_smoothed_nll` (the loss),
:func:`train_step` (one update over ``update_freq`` micro-batches), :func:`validate` (loss, perplexity,
BLEU and chrF on the valid split), and the checkpoint functions in :mod:`attnmt.checkpoint`.

Gradients are normalised by the number of target tokens of the whole update, summed over
micro-batches and ranks, so ``update_freq=2`` on one GPU, two GPUs, and one batch twice the size all
make the same update.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from attnmt import checkpoint, distributed
from attnmt.config import ConfigError, ModelConfig, OptimConfig, TrainConfig
from attnmt.device import autocast as autocast_context
from attnmt.device import resolve_device, resolve_precision

if TYPE_CHECKING:
    from attnmt.config import TrainRunConfig

logger = logging.getLogger(__name__)

class TrainingError(RuntimeError):
    """Training cannot go on (out of memory, a run of non-finite losses); the message says what to change."""


# ----------------------------------------------------------------------------------------------------
# Config checks


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
    if max_sentence_tokens is not None and train.max_tokens < max_sentence_tokens:
        raise ConfigError(
            f"train.max_tokens={train.max_tokens} is below the longest allowed sentence ({max_sentence_tokens} "
            "tokens), which would fit in no batch; raise train.max_tokens or lower the data length limit"
        )
    if optim.schedule not in ("inverse_sqrt", "cosine"):
        raise ConfigError(f"optim.schedule={optim.schedule!r} is unknown; use inverse_sqrt or cosine")
    if optim.schedule == "cosine" and train.max_steps <= 0:
        raise ConfigError("optim.schedule=cosine decays to train.max_steps, which is 0; set train.max_steps")
    if not 0.0 <= optim.label_smoothing < 1.0:
        raise ConfigError(f"optim.label_smoothing={optim.label_smoothing} must be in [0, 1)")
    if train.update_freq < 1:
        raise ConfigError(f"train.update_freq={train.update_freq} must be at least 1")
    if train.max_steps <= 0 and train.max_epochs <= 0 and train.max_hours <= 0:
        raise ConfigError("no stopping rule: set train.max_steps, train.max_epochs or train.max_hours")
    if train.valid_decode not in ("greedy", "beam"):
        raise ConfigError(f"train.valid_decode={train.valid_decode!r} is unknown; use greedy or beam")
    for key in ("valid_every", "log_every", "max_bad_steps"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(train, key)} must be at least 1")


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


@dataclass
class StepResult:
    """What one update did. ``loss`` and ``nll`` are per target token, over all micro-batches and ranks."""

    loss: float
    nll: float
    n_tokens: int
    grad_norm: float
    skipped: bool  # the loss or the gradient was not finite: no parameter changed


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
    # Under fp16 an overflowing gradient is routine: GradScaler skips that step and lowers the scale.
    # A non-finite loss, or a non-finite gradient without loss scaling, is a real divergence.
    skipped = not bool(torch.isfinite(totals).all()) or (
        not scaler.is_enabled() and not bool(torch.isfinite(grad_norm))
    )
    if not skipped:
        scaler.step(optimizer)
    scaler.update()
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


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: list,
    indices: list[list[int]],
    references: list[str],
    tokenizer,
    train_cfg: TrainConfig,
    autocast: contextlib.AbstractContextManager,
    label_smoothing: float,
    pad_id: int = 0,
) -> dict:
    """Loss, NLL and perplexity over the valid ``batches``, and BLEU/chrF of their translations.

    Args:
        batches: collated valid batches, already on the model's device.
        indices: the dataset rows of each batch, to put translations back in corpus order.
        references: raw target sentences of the valid split, in corpus order. When
            ``train_cfg.valid_max_sentences`` is set, only the first that many are translated.
    """
    from attnmt.decoding import beam_search, greedy_search

    was_training = model.training
    model.eval()
    loss_sum = nll_sum = 0.0
    n_tokens = 0
    limit = train_cfg.valid_max_sentences or len(references)
    hypotheses: dict[int, str] = {}
    for batch, rows in zip(batches, indices):
        with autocast:
            logits = model(batch.src_tokens, batch.src_mask, batch.tgt_in)
        loss, nll = label_smoothed_nll(logits, batch.tgt_out, label_smoothing, pad_id)
        loss_sum += loss.item()
        nll_sum += nll.item()
        n_tokens += batch.n_tgt_tokens
        keep = [j for j, row in enumerate(rows) if row < limit]
        if not keep:
            continue
        keep_t = torch.tensor(keep, device=batch.src_tokens.device)
        src_tokens, src_mask = batch.src_tokens[keep_t], batch.src_mask[keep_t]
        src_len = int(src_mask.sum(1).max())
        src_tokens, src_mask = src_tokens[:, :src_len], src_mask[:, :src_len]
        with autocast:
            if train_cfg.valid_decode == "beam":
                outputs = [h[0].tokens for h in beam_search(model, src_tokens, src_mask, beam_size=train_cfg.beam_size)]
            else:
                outputs = greedy_search(model, src_tokens, src_mask)
        for j, text in zip(keep, tokenizer.decode_tgt(outputs)):
            hypotheses[rows[j]] = text
    model.train(was_training)

    order = sorted(hypotheses)
    hyps = [hypotheses[i] for i in order]
    refs = [references[i] for i in order]
    nll = nll_sum / max(n_tokens, 1)
    return {
        "loss": loss_sum / max(n_tokens, 1),
        "nll": nll,
        "ppl": math.exp(min(nll, 100.0)),
        "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        "n_sentences": len(hyps),
        "examples": list(zip(hyps[:3], refs[:3])),
    }


def log_attention_map(writer, model: nn.Module, tokenizer, src_ids: list[int], tgt_ids: list[int], step: int) -> None:
    """Add one cross-attention heatmap (mean over layers and heads) of a valid pair to TensorBoard.

    The reference is teacher-forced, so the map shows where the model looks while it predicts each
    reference token. Needs matplotlib, an optional extra (``attnmt[plot]``).

    Args:
        src_ids: source ids, EOS included; tgt_ids: reference ids, EOS included.
    """
    from attnmt.evaluation import attention_figure, cross_attention

    was_training = model.training
    model.eval()  # dropout would blur the map
    weights = cross_attention(model, src_ids, tgt_ids[:-1])  # (T, S): rows predict tgt_ids, EOS last
    model.train(was_training)
    fig = attention_figure(weights, tokenizer.src_pieces(src_ids), tokenizer.tgt_pieces(tgt_ids),
                           title=f"valid sentence 1, step {step}: mean over layers and heads")
    writer.add_figure("valid/attention", fig, step)  # closes the figure


# ----------------------------------------------------------------------------------------------------
# Data, signals


def prepare_data(data_cfg, run_dir: Path, tokenizer_state: dict | None = None):
    """The tokenizer and the tokenized train and valid splits.

    The tokenizer comes from the checkpoint being resumed (``tokenizer_state``), else from
    ``<run_dir>/tokenizer`` if an earlier start of this run trained one, else rank 0 trains it on the
    train split and the other ranks load it from there.

    Returns:
        (tokenizer, train dataset, valid dataset); the datasets have ``src_ids`` and ``tgt_ids``.
    """
    from attnmt.data import load_split, tokenize
    from attnmt.tokenizer import Tokenizer

    train_raw = load_split(data_cfg, "train", train=True)
    valid_raw = load_split(data_cfg, "valid", train=False)
    tokenizer_dir = run_dir / "tokenizer"
    if tokenizer_state is not None:
        tokenizer = Tokenizer.from_state(tokenizer_state)
    else:
        if distributed.rank() == 0 and not tokenizer_dir.is_dir():
            logger.info("training the tokenizer on %d sentence pairs into %s", len(train_raw), tokenizer_dir)
            Tokenizer.train(train_raw["src"], train_raw["tgt"], data_cfg.tokenizer, tokenizer_dir)
        distributed.barrier()
        tokenizer = Tokenizer.load(tokenizer_dir)
    return tokenizer, tokenize(train_raw, tokenizer, data_cfg), tokenize(valid_raw, tokenizer, data_cfg)


def install_stop_handlers() -> tuple[dict, dict]:
    """Turn the first SIGINT/SIGTERM into a request to checkpoint and stop; a second one acts as usual.

    Returns:
        (flag, previous handlers): ``flag["signal"]`` is set to the signal's name when one arrives.
    """
    flag: dict = {"signal": None}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, _frame):
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


# ----------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainRunConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` until a ``train.max_*`` limit, early stopping or a signal.

    Works unchanged under ``torchrun``: each rank reads its shard of every epoch's batches, DDP
    synchronises gradients, and rank 0 alone validates, logs and writes checkpoints into
    ``train.run_dir``.

    Returns:
        A summary: ``step``, ``epoch``, ``stop_reason``, ``best_bleu``, the last ``valid`` metrics,
        ``skipped_updates``, ``losses`` (the train loss of each update of this call) and ``checkpoint``
        (the path of ``last.pt``).
    """
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from attnmt.batching import TokenBucketSampler, collate, make_dataloader
    from attnmt.data import load_references
    from attnmt.model import build_model
    from attnmt.tokenizer import PAD_ID

    t = cfg.train
    info = distributed.setup()
    device = resolve_device(t.device, info.local_rank)
    amp_dtype = resolve_precision(t.precision, device)
    check_config(cfg.model, cfg.optim, t, max_sentence_tokens(cfg.data))
    run_dir = Path(t.run_dir)
    resume_from = checkpoint.resume_path(t.resume, run_dir)
    state = checkpoint.load_checkpoint(resume_from) if resume_from else None
    if state is not None and "optimizer" not in state:
        raise checkpoint.CheckpointError(
            f"{resume_from} holds model weights only (an averaged checkpoint?) and cannot be resumed; "
            "resume from the run's last.pt or a step_<N>.pt"
        )
    if info.is_main:  # the config this run trains with, written only once the checks above have passed
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")

    # Data and model. Every rank builds the same initial weights from the same seed.
    seed_everything(t.seed)
    tokenizer, train_ds, valid_ds = prepare_data(cfg.data, run_dir, state["tokenizer"] if state else None)
    model_cfg = replace(cfg.model, src_vocab_size=tokenizer.src_vocab_size, tgt_vocab_size=tokenizer.tgt_vocab_size, pad_id=PAD_ID)
    raw_model = build_model(model_cfg).to(device)
    optimizer = build_optimizer(raw_model, cfg.optim, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = autocast_context(device, amp_dtype)
    sampler = TokenBucketSampler(
        [len(x) for x in train_ds["src_ids"]], [len(x) for x in train_ds["tgt_ids"]], t.max_tokens,
        shuffle=True, seed=t.seed, rank=info.rank, world_size=info.world_size,
    )
    step, epoch, batches_in_epoch, best_bleu, stale, valid_metrics = 0, 1, 0, -1.0, 0, {}
    validation_due = False
    rng_to_restore = None
    seed_everything(t.seed + info.rank)  # ranks differ from here on (dropout)
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state["scaler"]:  # empty when the checkpoint's run had no fp16 scaling
            scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        # The sampler's position, not the checkpoint's count: it is rescaled when the number of ranks changed.
        step, epoch, batches_in_epoch = state["step"], state["epoch"], sampler.batches_consumed
        best_bleu = state["best_bleu"]
        stale, valid_metrics = state["validations_without_improvement"], state["metrics"]
        validation_due = state.get("validation_pending", False)
        if len(state["rng"]) == info.world_size:
            rng_to_restore = state["rng"][info.rank]
        else:
            logger.warning("the checkpoint was written by %d ranks, this run has %d: random streams restart",
                           len(state["rng"]), info.world_size)
            seed_everything(t.seed + info.rank + step)
        logger.info("resumed from %s at step %d, epoch %d", resume_from, step, epoch)
    else:
        sampler.set_epoch(epoch)
    loader = make_dataloader(train_ds, sampler, t.num_workers, device.type == "cuda")
    model = torch.compile(raw_model) if t.compile else raw_model
    if info.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Validation batches (rank 0 only): sorted by length, collated once.
    valid_batches, valid_rows = [], []
    if info.is_main:
        valid_src, valid_tgt = [len(x) for x in valid_ds["src_ids"]], [len(x) for x in valid_ds["tgt_ids"]]
        # Valid sentences are never length-filtered: a longer one than max_tokens gets a batch of its own.
        longest = max(valid_src + valid_tgt, default=0)
        valid_sampler = TokenBucketSampler(valid_src, valid_tgt, max(t.max_tokens, longest), shuffle=False)
        for rows in valid_sampler:
            valid_batches.append(collate([valid_ds[i] for i in rows]).to(device))
            valid_rows.append(list(rows))
    references = load_references(cfg.data, "valid")  # raw text: BLEU compares detokenized output with it

    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1) if info.is_main else None
    plot_attention = writer is not None and importlib.util.find_spec("matplotlib") is not None
    if writer is not None and not plot_attention:
        logger.info("matplotlib is not installed: no attention heatmaps in TensorBoard (pip install attnmt[plot])")
    logger.info("model: %s parameters; device %s, %s; %d ranks; %d train batches per epoch per rank",
                f"{raw_model.num_parameters():,}", device, str(amp_dtype).removeprefix("torch."), info.world_size, len(sampler))
    total_steps = t.max_steps or (math.ceil(len(sampler) / t.update_freq) * t.max_epochs if t.max_epochs else None)
    progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
                    disable=not (info.is_main and t.progress_bar))
    stop_flag, previous_handlers = install_stop_handlers()

    def last_epoch_done(epoch: int, batches_in_epoch: int) -> bool:
        return bool(t.max_epochs) and epoch >= t.max_epochs and batches_in_epoch >= len(sampler)

    start = time.time()
    batch_iter = iter(loader)
    if rng_to_restore is not None:
        # Last: building the model and starting the DataLoader iterator both draw from the torch
        # generator, and the uninterrupted run made those draws before the step the checkpoint follows.
        checkpoint.set_rng_state(rng_to_restore)
    stop_reason = None
    if t.max_steps and step >= t.max_steps:  # a finished run resumed: nothing left to do
        stop_reason = f"train.max_steps={t.max_steps} was already reached"
    elif last_epoch_done(epoch, batches_in_epoch):
        stop_reason = f"train.max_epochs={t.max_epochs} was already reached"
    skipped_in_a_row = skipped_total = 0
    losses: list[float] = []  # per update of this call, for the caller (and the resume test)
    window = {"tokens": 0, "padding": 0, "slots": 0, "loss": 0.0, "nll": 0.0, "steps": 0, "time": time.time()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while True:
            if validation_due:  # set by the previous update, or by a resume that owes one
                validation_due = False
                interrupted = stop_reason is not None and stop_reason.endswith("received")
                is_best = False
                if info.is_main and not interrupted:
                    valid_metrics = validate(raw_model, valid_batches, valid_rows, references, tokenizer, t, autocast,
                                             cfg.optim.label_smoothing, PAD_ID)
                    is_best = valid_metrics["bleu"] > best_bleu
                    best_bleu, stale = (valid_metrics["bleu"], 0) if is_best else (best_bleu, stale + 1)
                    logger.info("valid at step %d: loss %.4f | ppl %.2f | BLEU %.2f | chrF %.2f%s",
                                step, valid_metrics["loss"], valid_metrics["ppl"], valid_metrics["bleu"],
                                valid_metrics["chrf"], " (best)" if is_best else f" (best {best_bleu:.2f})")
                    for hyp, ref in valid_metrics.pop("examples"):
                        logger.info("  hyp: %s\n  ref: %s", hyp, ref)
                    for name in ("loss", "nll", "ppl", "bleu", "chrf"):
                        writer.add_scalar(f"valid/{name}", valid_metrics[name], step)
                    if plot_attention and len(valid_ds):
                        log_attention_map(writer, raw_model, tokenizer, valid_ds[0]["src_ids"], valid_ds[0]["tgt_ids"], step)
                    writer.flush()
                    progress.set_postfix(bleu=f"{valid_metrics['bleu']:.2f}")
                rng = distributed.all_gather_objects(checkpoint.rng_state())
                if info.is_main:
                    state = {
                        "format": checkpoint.FORMAT,
                        "model": raw_model.state_dict(),
                        "model_config": asdict(model_cfg),
                        "tokenizer": tokenizer.to_state(),
                        "config": asdict(cfg),
                        "step": step,
                        "epoch": epoch,
                        "sampler": sampler.state_dict(batches_in_epoch),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": {"step": step, "lr": lr_at(step, cfg.optim, t.max_steps)},
                        "scaler": scaler.state_dict(),
                        "rng": rng,
                        "best_bleu": best_bleu,
                        "validations_without_improvement": stale,
                        "metrics": {k: v for k, v in valid_metrics.items() if isinstance(v, (int, float))},
                        # Stopped by a signal at a validation step: the resumed run validates first.
                        "validation_pending": interrupted and step % t.valid_every == 0,
                    }
                    checkpoint.save_run_checkpoint(state, run_dir, t.keep_last, is_best)
                    state = None
                if t.patience and stop_reason is None:
                    stale = distributed.broadcast_object(stale)
                    if stale >= t.patience:
                        stop_reason = f"no better valid BLEU in {stale} validations (train.patience={t.patience})"
                distributed.barrier()
            if stop_reason is not None:
                break

            # Collect update_freq micro-batches, moving into the next epoch when this one runs out.
            micro = []
            while len(micro) < t.update_freq and not last_epoch_done(epoch, batches_in_epoch):
                if batches_in_epoch >= len(sampler):
                    epoch, batches_in_epoch = epoch + 1, 0
                    sampler.set_epoch(epoch)
                    batch_iter = iter(loader)
                micro.append(next(batch_iter).to(device))
                batches_in_epoch += 1

            lr = lr_at(step + 1, cfg.optim, t.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                result = train_step(model, micro, optimizer, scaler, autocast, cfg.optim.label_smoothing,
                                    cfg.optim.clip_norm, PAD_ID)
            except torch.cuda.OutOfMemoryError as e:
                raise TrainingError(
                    f"{describe_oom(micro, t.max_tokens, t.update_freq)}; checkpoints so far are in "
                    f"{checkpoint.checkpoint_dir(run_dir)}"
                ) from e
            step += 1
            progress.update(1)
            losses.append(result.loss)

            if result.skipped:
                skipped_in_a_row += 1
                skipped_total += 1
                logger.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); update skipped (%d in a row)",
                               step, result.loss, result.grad_norm, skipped_in_a_row)
                if skipped_in_a_row >= t.max_bad_steps:
                    raise TrainingError(
                        f"training stopped at step {step}: {skipped_in_a_row} non-finite losses in a row "
                        f"(train.max_bad_steps={t.max_bad_steps}); checkpoints so far are in "
                        f"{checkpoint.checkpoint_dir(run_dir)}. Lower optim.lr, raise optim.warmup_steps, "
                        "set optim.clip_norm, or use train.precision=bf16/fp32"
                    )
            else:
                skipped_in_a_row = 0
                window["loss"] += result.loss
                window["nll"] += result.nll
                window["steps"] += 1
            window["tokens"] += result.n_tokens
            for b in micro:
                window["padding"] += b.src_tokens.numel() + b.tgt_in.numel() - int(b.src_mask.sum()) - b.n_tgt_tokens
                window["slots"] += b.src_tokens.numel() + b.tgt_in.numel()

            if step % t.log_every == 0 and window["steps"] > 0:
                elapsed = time.time() - window["time"]
                loss, nll = window["loss"] / window["steps"], window["nll"] / window["steps"]
                tokens_per_s = window["tokens"] / max(elapsed, 1e-9)
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", epoch=epoch)
                if writer is not None:
                    scalars = {
                        "train/loss": loss, "train/nll": nll, "train/ppl": math.exp(min(nll, 100.0)), "train/lr": lr,
                        "train/grad_norm": result.grad_norm, "train/tokens_per_s": tokens_per_s,
                        "train/padding_fraction": window["padding"] / max(window["slots"], 1),
                        "train/skipped_updates": skipped_total, "train/epoch": epoch,
                    }
                    if scaler.is_enabled():
                        scalars["train/loss_scale"] = scaler.get_scale()
                    if device.type == "cuda":
                        scalars["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    for name, value in scalars.items():
                        writer.add_scalar(name, value, step)
                logger.info("step %d | epoch %d | loss %.4f | nll %.4f | lr %.3e | grad norm %.3f | %.0f tok/s",
                            step, epoch, loss, nll, lr, result.grad_norm, tokens_per_s)
                window = {"tokens": 0, "padding": 0, "slots": 0, "loss": 0.0, "nll": 0.0, "steps": 0, "time": time.time()}

            # Stop together: every rank must agree, or the next collective would hang.
            limits = [
                (t.max_steps and step >= t.max_steps, f"train.max_steps={t.max_steps} reached"),
                (t.max_hours and time.time() - start >= t.max_hours * 3600, f"train.max_hours={t.max_hours} reached"),
                (stop_flag["signal"] is not None, f"{stop_flag['signal'] or 'a stop signal'} received"),
            ]
            votes = distributed.all_reduce_sum(torch.tensor([float(bool(hit)) for hit, _ in limits], device=device))
            stop_reason = next((reason for (_, reason), vote in zip(limits, votes.tolist()) if vote > 0), None)
            if stop_reason is None and last_epoch_done(epoch, batches_in_epoch):
                stop_reason = f"train.max_epochs={t.max_epochs} reached"

            validation_due = step % t.valid_every == 0 or stop_reason is not None
    finally:
        restore_handlers(previous_handlers)
        progress.close()
        if writer is not None:
            writer.close()

    best = f"best valid BLEU {best_bleu:.2f}" if best_bleu >= 0 else "no validation yet"
    logger.info("stopped at step %d (epoch %d): %s; %s; checkpoints in %s",
                step, epoch, stop_reason, best, checkpoint.checkpoint_dir(run_dir))
    return {
        "step": step,
        "epoch": epoch,
        "stop_reason": stop_reason,
        "interrupted": stop_flag["signal"],
        "best_bleu": best_bleu,
        "valid": valid_metrics,
        "skipped_updates": skipped_total,
        "losses": losses,
        "checkpoint": str(checkpoint.checkpoint_dir(run_dir) / "last.pt"),
    }


def max_sentence_tokens(data_cfg) -> int | None:
    """The longest sentence the data filter allows, EOS included (None when the data config sets none)."""
    max_len = getattr(data_cfg, "max_len", None)
    return max_len + 1 if max_len else None
