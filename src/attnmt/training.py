"""The training loop: :func:`train` is two functions, each read top to bottom.

:func:`start` checks the config and the run directory, reads what the run continues or starts from
(:func:`attnmt.checkpoint.starting_point`), prepares the data (:func:`attnmt.data.prepare_data`),
builds the model and the :class:`~attnmt.checkpoint.TrainState` (restored on resume), and only once
all of that has passed writes anything into the run directory (:class:`attnmt.rundir.RunDir`): a
refused command changes nothing. :func:`run_loop` then alternates updates with validations and
checkpoints until a limit, early stopping or a signal. Its parts: :func:`update` and
:func:`train_step` (one update over ``update_freq`` micro-batches, with :mod:`attnmt.optim`'s
schedule, loss and moving average), :func:`validate_and_save` (:func:`attnmt.validation.validate`
and the checkpoint files), :func:`agreed_stop` (when every rank stops).

Gradients are normalised by the number of target tokens of the whole update, summed over
micro-batches and ranks, so ``update_freq=2`` on one GPU, two GPUs, and one batch twice the size all
make the same update.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from attnmt import checkpoint, distributed
from attnmt.batching import Batch, TokenBucketSampler, make_dataloader
from attnmt.checkpoint import CheckpointError, TrainState
from attnmt.config import TrainRunConfig
from attnmt.data import corpus_fingerprint, prepare_data, streams, token_lengths
from attnmt.device import autocast as autocast_context
from attnmt.device import allow_tf32, resolve_device, resolve_precision
from attnmt.model import build_model
from attnmt.optim import build_optimizer, freeze, label_smoothed_nll, lr_at, moving_average, update_ema
from attnmt.reporting import Meter, log_progress, report_validation
from attnmt.rundir import RunDir, check_writable, install_stop_handlers, restore_handlers, tensorboard_writer
from attnmt.validation import ValidSet, valid_set, validate

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (out of memory, a run of non-finite losses, a full disk); the message says what to change."""


# ----------------------------------------------------------------------------------------------------
# One update


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# The run: set up by start(), driven by run_loop()


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
    cfg.check()
    if run_dir is not None:
        check_writable(run_dir.path)
        if run_dir.path.is_dir():  # refuse a busy run directory before the data is prepared
            run_dir.acquire()
    begin = checkpoint.starting_point(cfg)
    cfg = replace(cfg, model=begin.model)

    # Data and model. Every rank builds the same initial weights from the same seed.
    seed_everything(t.seed)
    # data.cache_dir=null: a cache in the run directory, which every rank shares and a resumed run finds again.
    data_cfg = cfg.data if cfg.data.cache_dir else replace(cfg.data, cache_dir=str(Path(t.run_dir) / "data-cache"))
    tokenizer, train_ds, mix, valid_sets = prepare_data(data_cfg, Path(t.run_dir) / "tokenizer", begin.tokenizer)
    model_cfg = replace(cfg.model, src_vocab_size=tokenizer.src_vocab_size, tgt_vocab_size=tokenizer.tgt_vocab_size,
                        pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    model = build_model(model_cfg).to(device)
    begin.load_weights(model)
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
                       init_from=begin.init_from)
    seed_everything(t.seed + info.rank)  # ranks differ from here on (dropout)
    rng_to_restore = None
    if begin.resumed is not None:
        rngs = state.restore(begin.resumed, begin.resume_from)
        if len(rngs) == info.world_size:
            rng_to_restore = rngs[info.rank]
        else:
            logger.warning("the checkpoint was written by %d ranks, this run has %d: random streams restart",
                           len(rngs), info.world_size)
            seed_everything(t.seed + info.rank + state.step)
        logger.info("resumed from %s at step %d, epoch %d", begin.resume_from, state.step, state.epoch)
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
            logger.warning("%s: %s", begin.resume_from, why)
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
