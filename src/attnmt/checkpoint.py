"""Checkpoints: self-describing, written atomically, loadable with ``weights_only=True``.

A checkpoint is one ``torch.save``'d dict holding only tensors, dicts, lists, tuples, strings, numbers
and None, so ``torch.load(path, weights_only=True)`` reads it without unpickling any class. Its keys:

    format          "attnmt-checkpoint-1"
    model           the model's state_dict (unwrapped: no DDP ``module.`` or compile prefixes)
    model_config    ModelConfig as a dict (vocabulary sizes filled in)
    tokenizer       ``Tokenizer.to_state()``: the SentencePiece model(s) and their settings
    config          the resolved run config (model, data, optim, train) as a dict
    step, epoch     updates done; the epoch in progress
    sampler         the batch sampler's position: the batches of that epoch already trained on
                    (``TokenBucketSampler.state_dict()``)
    optimizer       ``optimizer.state_dict()``
    scheduler       ``{"step": int, "lr": float}``: the schedule is a pure function of the step
    scaler          ``GradScaler.state_dict()`` (empty without fp16)
    rng             one dict per rank: python, numpy, torch and CUDA generator states
    best_bleu, validations_without_improvement, metrics   early-stopping state, latest valid metrics
    validation_pending  True when a signal stopped the run at a validation step: resuming validates first

A run's ``checkpoints/`` folder holds ``last.pt``, ``best.pt`` (highest valid BLEU) and the newest
``keep_last`` numbered ``step_<N>.pt``.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from attnmt.config import ModelConfig

FORMAT = "attnmt-checkpoint-1"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or not an attnmt checkpoint; the message says which."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file beside it, fsync, then rename.

    A crash mid-write leaves the previous file at ``path`` intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (with ``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or holds something else.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt?)") from None
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers, so it is not an attnmt "
            "checkpoint (and loading it would run arbitrary code)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({path.stat().st_size} bytes; truncated or corrupt?): {first_line}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an attnmt checkpoint (expected format {FORMAT!r})")
    return state


def rng_state() -> dict:
    """This process's python, numpy, torch and CUDA generator states, as tensors, lists and numbers."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generator states that :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_run_checkpoint(state: dict, run_dir: str | Path, keep_last: int, is_best: bool) -> Path:
    """Write ``step_<N>.pt`` and ``last.pt`` (and ``best.pt`` when ``is_best``), then delete numbered
    checkpoints beyond the newest ``keep_last``. Returns the numbered file's path."""
    folder = checkpoint_dir(run_dir)
    numbered = folder / f"step_{state['step']}.pt"
    save_checkpoint(state, numbered)
    # Hard links would save the copy, but a copy survives someone editing one of the files.
    save_checkpoint(state, folder / "last.pt")
    if is_best:
        save_checkpoint(state, folder / "best.pt")
    for old in numbered_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return numbered


def numbered_checkpoints(folder: str | Path) -> list[Path]:
    """The ``step_<N>.pt`` files in ``folder``, oldest (smallest N) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def resume_path(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint that ``train.resume`` names: ``none`` -> None; ``auto`` -> ``last.pt`` of the run if
    it exists, else None (a fresh start); anything else is a path that must exist.

    A fresh start (``none``) refuses a run directory that already holds checkpoints rather than
    overwrite them.
    """
    if resume == "none":
        last = checkpoint_dir(run_dir) / "last.pt"
        if last.is_file():
            raise CheckpointError(
                f"train.run_dir={run_dir} already holds checkpoints ({last}); continue that run with "
                "train.resume=auto, or start a new one in another train.run_dir"
            )
        return None
    if resume == "auto":
        last = checkpoint_dir(run_dir) / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"train.resume={resume!r}: no such checkpoint; use 'auto', 'none' or an existing file")
    return path


def average_model_states(paths: list[str | Path]) -> dict:
    """The element-wise mean of the ``model`` weights in ``paths`` (summed in float64, returned in the original dtypes).

    The checkpoints must come from the same model: same parameter names and shapes.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    first = None
    for path in paths:
        model = load_checkpoint(path)["model"]
        if first is None:
            first = model
            total = {k: v.detach().to(torch.float64 if v.is_floating_point() else v.dtype).clone() for k, v in model.items()}
            continue
        if model.keys() != first.keys() or any(model[k].shape != first[k].shape for k in first):
            raise CheckpointError(f"{path} holds a different model than {paths[0]}; only checkpoints of one run can be averaged")
        for k, v in model.items():
            if v.is_floating_point():
                total[k] += v
    return {k: (v / len(paths)).to(first[k].dtype) if first[k].is_floating_point() else v for k, v in total.items()}


def average_checkpoints(paths: list[str | Path], out: str | Path) -> Path:
    """Write a checkpoint to ``out`` whose weights are the mean of ``paths``' weights; everything else
    (config, tokenizer, step) comes from the last of ``paths``. Optimizer and RNG states are dropped:
    an averaged model is for evaluation, not for resuming."""
    state = load_checkpoint(paths[-1])
    state["model"] = average_model_states(paths)
    state["averaged_from"] = [str(p) for p in paths]
    for key in ("optimizer", "scaler", "rng", "sampler"):
        state.pop(key, None)
    save_checkpoint(state, out)
    return Path(out)


def load_for_inference(path: str | Path | list[str | Path], device: str | torch.device = "cpu"):
    """Rebuild ``(model, tokenizer, config)`` from a checkpoint for evaluation or translation.

    Args:
        path: one checkpoint, or a list whose weights are averaged on the fly.
        device: where the model goes.

    Returns:
        The model (in eval mode, on ``device``), the :class:`~attnmt.tokenizer.Tokenizer`, and the
        run config as a dict (keys ``model``, ``data``, ``optim``, ``train``).
    """
    from attnmt.model import build_model
    from attnmt.tokenizer import Tokenizer

    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    state = load_checkpoint(paths[-1])
    model = build_model(ModelConfig(**state["model_config"]))
    weights = average_model_states(paths) if len(paths) > 1 else state["model"]
    model.load_state_dict(weights)
    model.to(device).eval()
    return model, Tokenizer.from_state(state["tokenizer"]), state["config"]
