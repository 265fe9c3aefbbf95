"""What a training run tells its user (rank 0): the log line and TensorBoard scalars of the updates
since the last one (:class:`Meter`, :func:`log_progress`) and of each validation
(:func:`report_validation`), and the progress bar's figures. ``run`` is :class:`attnmt.training.Run`."""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from attnmt.batching import Batch
from attnmt.validation import log_attention_map

if TYPE_CHECKING:
    from attnmt.training import Run, StepResult

logger = logging.getLogger("attnmt.training")  # the run's own lines, as train.log has always named them


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
