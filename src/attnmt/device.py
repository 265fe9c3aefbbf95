"""Devices and mixed precision: where a command runs, and the one autocast setup every path uses.

Training, validation, evaluation, translation and the benchmarks all enter :func:`autocast` with a
dtype chosen here, so a change of precision policy is one edit.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from attnmt.config import ConfigError

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The tests' stand-in for CUDA's fp16 path: fp16 autocast and an enabled GradScaler("cpu") on the CPU,
# set by tests only (monkeypatch). Users get the refusal below: the CPU gains nothing from fp16.
_CPU_FP16 = False


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


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` computes in bfloat16 in hardware: compute capability 8.0 (Ampere) or
    newer, or any ROCm GPU. ``torch.cuda.is_bf16_supported()`` is not the question: it also counts GPUs
    that only emulate bf16 (V100, T4: slower than fp16 with loss scaling), and it asks about the
    current device, not the run's."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def resolve_precision(precision: str, device: torch.device, key: str = "train.precision") -> torch.dtype:
    """The autocast dtype: ``auto`` is bf16 on GPUs that compute in it natively, fp16 (with loss
    scaling) on older GPUs, fp32 on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is unknown; use one of auto, {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        if not torch.cuda.is_bf16_supported(including_emulation=True):
            raise ConfigError(f"{key}=bf16 but {name} does not support bfloat16; use {key}=fp16 (with loss "
                              "scaling) or auto")
        logger.warning("%s=bf16: %s only emulates bfloat16 (slower than fp16); %s=auto would choose fp16 with "
                       "loss scaling", key, name, key)
    if precision == "fp16" and device.type == "cpu" and not _CPU_FP16:
        raise ConfigError(f"{key}=fp16 needs a CUDA device; on the CPU use fp32 or bf16")
    return PRECISIONS[precision]


def inference_dtype(device: torch.device) -> torch.dtype:
    """What evaluation and translation compute in: bf16 on GPUs that compute in it natively, else fp32.

    fp16 is left out: without training's loss scaling its narrow range can overflow in long beams.
    """
    return torch.bfloat16 if device.type == "cuda" and native_bf16(device) else torch.float32


def allow_tf32(device: torch.device, enabled: bool) -> None:
    """Let fp32 matrix products on ``device`` run in TensorFloat-32 (a 10-bit mantissa, on Ampere and
    newer GPUs; PyTorch's default is off). A process-wide switch, so it is set from the run's config
    every time; nothing to set on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The mixed-precision context for ``dtype`` on ``device`` (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
