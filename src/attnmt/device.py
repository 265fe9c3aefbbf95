"""Devices and mixed precision: where a command runs, and the one autocast setup every path uses.

Training, validation, evaluation, translation and the benchmarks all enter :func:`autocast` with a
dtype chosen here, so a change of precision policy is one edit.
"""

from __future__ import annotations

import contextlib

import torch

from attnmt.config import ConfigError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """``auto`` -> this rank's GPU if CUDA is available, else the CPU; anything else as given.

    ``key`` is the config key that errors name (evaluate and translate call theirs ``device``).
    """
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError as e:
        raise ConfigError(f"{key}={name!r} is not a device: {e}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():  # name as given, not the rank's cuda:N
        raise ConfigError(f"{key}={name!r} but CUDA is not available here; use {key}=cpu or auto")
    return device


def resolve_precision(precision: str, device: torch.device, key: str = "train.precision") -> torch.dtype:
    """The autocast dtype: ``auto`` is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is unknown; use one of auto, {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"{key}=bf16 but {torch.cuda.get_device_name(device)} does not support bfloat16; "
            f"use {key}=fp16 (with loss scaling) or auto"
        )
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(f"{key}=fp16 needs a CUDA device; on the CPU use fp32 or bf16")
    return PRECISIONS[precision]


def inference_dtype(device: torch.device) -> torch.dtype:
    """What evaluation and translation compute in: bf16 on GPUs that support it, else fp32.

    fp16 is left out: without training's loss scaling its narrow range can overflow in long beams.
    """
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The mixed-precision context for ``dtype`` on ``device`` (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
