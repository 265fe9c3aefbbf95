"""What an update is made of, apart from the loop that runs it: the learning-rate schedule
(:func:`lr_at`), AdamW with weight decay on matrices (:func:`build_optimizer`), the label-smoothed
loss (:func:`label_smoothed_nll`, which validation computes too), the weights' moving average
(:func:`update_ema`, :func:`moving_average`) and ``train.freeze`` (:func:`freeze`)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnmt.config import FREEZABLE, OptimConfig


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


def freeze(model: nn.Module, groups: list[str]) -> int:
    """Keep the parameters of ``groups`` (names of :data:`~attnmt.config.FREEZABLE`) fixed: they get no gradient and no
    optimizer state. Returns the number of parameters frozen."""
    frozen = {module for group in groups for module in FREEZABLE[group]}
    count = 0
    for name, p in model.named_parameters():
        if name.split(".")[0] in frozen:
            p.requires_grad_(False)
            count += p.numel()
    return count


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
