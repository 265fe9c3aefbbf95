"""Checkpoints: self-describing, written atomically, loadable with ``weights_only=True``.

A checkpoint is one ``torch.save``'d dict holding only tensors, dicts, lists, tuples, strings, numbers
and None, so ``torch.load(path, weights_only=True)`` reads it without unpickling any class. Its keys
are written and read here alone: :class:`TrainState` writes and restores a run,
:func:`save_imported` writes an imported model, :func:`starting_point` reads what a run continues or
starts from, and the functions below read what other modules need of a checkpoint
(:func:`model_config`, :func:`tokenizer_of`, :func:`load_model_weights`, :func:`run_config`).

A run's ``checkpoints/`` folder holds ``last.pt``, ``best.pt`` (highest valid BLEU) and the newest
``keep_last`` numbered ``step_<N>.pt``.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from attnmt import __version__, durable
from attnmt.config import MODEL_KEYS_ADDED, ConfigError, DataConfig, ModelConfig, TokenizerConfig, unknown_keys
from attnmt.model import build_model
from attnmt.tokenizer import Tokenizer, tokenizer_settings

if TYPE_CHECKING:
    from attnmt.batching import TokenBucketSampler
    from attnmt.config import TrainRunConfig

logger = logging.getLogger(__name__)

FORMAT = "attnmt-checkpoint-1"
INFERENCE_KEYS = ("model", "model_config", "tokenizer", "config")  # what evaluation and translation read
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")

# What a killed write leaves: durable's ".NAME.tmpPID" files and folders and ".NAME.oldPID" folders,
# the run directory's write probes.
_TMP_NAME = re.compile(r"^\.(.+\.(tmp|old)\w+|attnmt-probe\w+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or not an attnmt checkpoint; the message says which."""


@dataclass
class TrainState:
    """Everything a checkpoint holds to continue a run exactly: the format of a trained checkpoint (an
    imported model's is written by :func:`save_imported`, without the training keys).

    :meth:`to_checkpoint` writes the dict and :meth:`restore` reads it back: saving and resuming a new
    field is an edit of this class, besides where the loop creates and changes it (the EMA of the
    weights, ``ema``, took this class plus its creation and its update, ``training.py`` calling
    :mod:`attnmt.optim`). The checkpoint's keys:

        format          "attnmt-checkpoint-1"
        model           the weights to translate with, as a state_dict (unwrapped: no DDP ``module.`` or
                        compile prefixes): with ``train.ema_decay``, their exponential moving average
        trained_model   with ``train.ema_decay`` only: the weights the optimizer updates
        model_config    ModelConfig as a dict (vocabulary sizes filled in)
        tokenizer       ``Tokenizer.to_state()``: the SentencePiece model(s) and their settings
        config          the resolved run config (model, data, optim, train) as a dict
        step, epoch     updates done; the epoch in progress
        sampler         the batch sampler's position in that epoch (``TokenBucketSampler.state_dict``)
        optimizer       ``optimizer.state_dict()``
        scaler          ``GradScaler.state_dict()`` (empty without fp16)
        scheduler       ``{"step": int, "lr": float}``, for reading: the schedule is a function of the step
        rng             one dict per rank: python, numpy, torch and (on a GPU) its device's generator states
        best_bleu, validations_without_improvement, metrics   early stopping; the latest valid metrics
        validation_pending  a signal stopped the run at a validation step: the resumed run validates first
        corpus          each training stream's text: its files and the SHA-256 of each side (a resumed run
                        refuses other text, whatever the files' dates)
        init_from       the checkpoint the run's weights started from (``train.init_from`` of its first
                        start; None for random weights), kept across every resume: such a run takes its
                        model's shape from the checkpoint, not from ``model=``
        attnmt_version  the version that wrote it

    Evaluation and translation read only :data:`INFERENCE_KEYS`.
    """

    model: nn.Module
    model_config: ModelConfig
    tokenizer: Tokenizer
    config: dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: TokenBucketSampler
    step: int = 0
    epoch: int = 1
    batches_in_epoch: int = 0  # batches of this epoch the loop has taken (DataLoader workers run ahead)
    lr: float = 0.0
    best_bleu: float = -1.0
    stale_validations: int = 0
    metrics: dict = field(default_factory=dict)
    validation_pending: bool = False
    ema: nn.Module | None = None  # the moving average of model's weights (train.ema_decay); None = off
    corpus: list = field(default_factory=list)  # each training stream's attnmt.data.corpus_fingerprint
    init_from: str | None = None  # the checkpoint the run started from (train.init_from), kept across resumes

    RESUME_KEYS: ClassVar[tuple[str, ...]] = ("optimizer", "scaler", "sampler", "rng")

    def check_same_corpus(self, saved: list | None, path: str | Path) -> None:
        """Refuse to continue on text other than the checkpoint's, naming the file that changed (a
        checkpoint written before the fingerprints were kept is compared by the sampler's counts only)."""
        if saved is None:
            return
        if len(saved) != len(self.corpus):
            raise CheckpointError(f"{path} was trained on {len(saved)} corpora or directions, this run has "
                                  f"{len(self.corpus)}; resume with the data config it was trained with")
        for theirs, mine in zip(saved, self.corpus):
            for i, side in enumerate(("src", "tgt")):
                if theirs["sha256"][side] != mine["sha256"][side]:
                    files = mine["files"]
                    what = files[min(i, len(files) - 1)] if files else f"the {side} side of the {mine['origin']}"
                    raise CheckpointError(
                        f"{path} was trained on other text: {what} has changed since ({mine['pairs']} pairs now, "
                        f"{theirs['pairs']} then; the SHA-256 of its sentences differs); resume with the corpus it "
                        f"was trained on, or start a new run from these weights with train.init_from={path} in "
                        "another train.run_dir")

    @property
    def translation_model(self) -> nn.Module:
        """The weights that validation scores and checkpoints keep to translate with: the EMA when on."""
        return self.model if self.ema is None else self.ema

    def to_checkpoint(self, rng: list[dict]) -> dict:
        """The checkpoint dict; ``rng`` holds every rank's :func:`rng_state`, in rank order."""
        return {
            "format": FORMAT,
            "attnmt_version": __version__,
            "model": self.translation_model.state_dict(),
            **({} if self.ema is None else {"trained_model": self.model.state_dict()}),
            "model_config": asdict(self.model_config),
            "tokenizer": self.tokenizer.to_state(),
            "config": self.config,
            "step": self.step,
            "epoch": self.epoch,
            "sampler": self.sampler.state_dict(self.batches_in_epoch),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"step": self.step, "lr": self.lr},
            "rng": rng,
            "best_bleu": self.best_bleu,
            "validations_without_improvement": self.stale_validations,
            "metrics": _numbers(self.metrics),
            "validation_pending": self.validation_pending,
            "corpus": self.corpus,
            "init_from": self.init_from,
        }

    def restore(self, state: dict, path: str | Path) -> list[dict]:
        """Continue from a checkpoint that :meth:`to_checkpoint` wrote (read from ``path``); returns its
        per-rank RNG states, which the caller restores last (building the model draws from them).

        Raises:
            CheckpointError: naming ``path`` and what to do, when the checkpoint cannot continue this
                run (weights only, another model, another corpus or batch size).
        """
        if any(key not in state for key in self.RESUME_KEYS):
            raise CheckpointError(
                f"{path} holds model weights only (an averaged checkpoint?) and cannot be resumed; resume from "
                f"the run's last.pt or a step_<N>.pt, or start a new run from these weights with train.init_from={path}"
            )
        require(state, (*INFERENCE_KEYS, "step", "epoch", "best_bleu", "validations_without_improvement",
                        "metrics"), path, "resuming")
        what = "the model this run builds (model.* settings)"
        load_weights(self.model, state.get("trained_model", state["model"]), path, what)
        if self.ema is not None and "trained_model" in state:
            load_weights(self.ema, state["model"], path, what)
        elif self.ema is not None:  # EMA switched on at this resume
            self.ema.load_state_dict(self.model.state_dict())
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: its optimizer state does not fit this model ({err})") from None
        if self.scaler.is_enabled() and state["scaler"]:  # empty when the checkpoint's run had no fp16 scaling
            self.scaler.load_state_dict(state["scaler"])
        self.check_same_corpus(state.get("corpus"), path)
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as err:
            raise CheckpointError(
                f"{path}: {err}, or start a new run from these weights with train.init_from={path} "
                "(a fresh optimizer, schedule and batch order) in another train.run_dir"
            ) from None
        # The sampler's position, not the checkpoint's count: it is rescaled when the number of ranks changed.
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], self.sampler.batches_consumed
        self.lr = state.get("scheduler", {}).get("lr", 0.0)
        self.best_bleu = state["best_bleu"]
        self.stale_validations = state["validations_without_improvement"]
        self.metrics = dict(state["metrics"])
        self.validation_pending = state.get("validation_pending", False)
        return state["rng"]


def started_from(state: dict) -> str | None:
    """The checkpoint a training checkpoint's run started from (``train.init_from`` of its first start),
    however many times it was resumed since; None for a run from random weights. Checkpoints written
    before the ``init_from`` key kept it only in the config of the start that set it."""
    if "init_from" in state:
        return state["init_from"]
    return ((state.get("config") or {}).get("train") or {}).get("init_from")


DROPOUTS = ("dropout", "attention_dropout", "activation_dropout")  # the model keys a fine-tuning run sets


def init_model_config(model: ModelConfig, state: dict, path: str | Path) -> ModelConfig:
    """The model config of a run that starts from an imported checkpoint ``state`` (or continues one
    started from a checkpoint): the checkpoint's shape, vocabulary and special ids, with this run's
    dropouts (the only model keys such a run chooses)."""
    saved = model_config(state, path)
    changed = [f.name for f in fields(saved) if f.name not in DROPOUTS and getattr(saved, f.name) != getattr(model, f.name)]
    if changed:
        logger.info("the model's shape comes from %s: %s", path,
                    ", ".join(f"model.{key}={getattr(saved, key)!r}" for key in changed[:8]))
    return replace(saved, **{key: getattr(model, key) for key in DROPOUTS})


@dataclass
class Start:
    """What a training run starts from (:func:`starting_point`): random weights and a new tokenizer, a
    run to continue (``train.resume``), or a checkpoint whose weights and tokenizer a new run takes
    (``train.init_from``)."""

    model: ModelConfig  # the run's model config: the checkpoint's shape where the run must keep it
    tokenizer: Tokenizer | None  # the checkpoint's; None: the run makes one from its data
    init_from: str | None  # the checkpoint the run's weights started from, kept in every checkpoint it writes
    resume_from: Path | None = None
    resumed: dict | None = None  # the checkpoint continued, restored by TrainState.restore
    init: dict | None = None  # train.init_from's checkpoint

    def load_weights(self, model: nn.Module) -> None:
        """``train.init_from``'s weights into the model the run builds (nothing otherwise)."""
        if self.init is not None:
            load_model_weights(model, self.init, self.init_from, "the model this run builds (model.* settings)")
            logger.info("weights and tokenizer from %s (train.init_from); a fresh optimizer and schedule",
                        self.init_from)


def starting_point(cfg: TrainRunConfig) -> Start:
    """Read and check the checkpoint a run continues (``train.resume``) or starts from (``train.init_from``).

    An imported model's shape is no ``model=`` of ours: a run started from one takes the checkpoint's
    shape (:func:`init_model_config`), and so does such a run each time it continues; any other
    checkpoint must hold the model ``cfg.model`` describes, and a resumed one the same tokenizer settings.
    """
    t = cfg.train
    resume_from = resume_path(t.resume, t.run_dir)
    resumed = load_checkpoint(resume_from) if resume_from else None
    init = load_checkpoint(t.init_from) if t.init_from else None
    source, source_path = (resumed, resume_from) if resumed else (init, t.init_from)
    init_from = t.init_from if resumed is None else started_from(resumed)
    model = cfg.model
    if source is not None:
        require(source, INFERENCE_KEYS, source_path, "train.resume and train.init_from")
        if (init is not None and init.get("imported_from")) or (resumed is not None and init_from):
            model = init_model_config(cfg.model, source, source_path)
        else:
            check_same_model(source, cfg.model, source_path)
    if resumed is not None:
        check_same_tokenizer(resumed, cfg.data.tokenizer, resume_from)
    tokenizer = tokenizer_of(source, source_path) if source is not None else None
    return Start(model, tokenizer, None if init_from is None else str(init_from), resume_from, resumed, init)


def save_imported(model: nn.Module, tokenizer: Tokenizer, out: str | Path, source: str) -> Path:
    """Write an imported model (:mod:`attnmt.pretrained`) and its tokenizer as a checkpoint ``out``: the
    inference keys, no training state, and ``imported_from``, which makes a run started from it take its
    shape (:func:`starting_point`)."""
    state = {
        "format": FORMAT,
        "model": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        "model_config": asdict(model.cfg),
        "tokenizer": tokenizer.to_state(),
        "config": {"model": asdict(model.cfg), "data": None, "optim": None, "train": None},
        "step": 0,
        "imported_from": str(source),
        "attnmt_version": __version__,
    }
    save_checkpoint(state, out)
    return Path(out)


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file beside it, fsync, then rename.

    A crash mid-write leaves the previous file at ``path`` intact, never a truncated one; a
    temporary file left behind by a kill is removed by :func:`remove_temporary_files`.

    Raises:
        CheckpointError: the file cannot be written (a full disk, a read-only folder); the message
            names the path and, for a full disk, the bytes needed and free. ``path`` is unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with durable.replacing(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as a RuntimeError
        raise CheckpointError(_write_failure(path, state, err)) from None


def _write_failure(path: Path, state: dict, err: BaseException) -> str:
    needed = _tensor_bytes(state)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = durable.disk_full(err) or (free is not None and free < needed)
    # A training run's checkpoint resumes; another (attnmt-import, attnmt-average) is written again.
    training = "optimizer" in state
    again = "then resume with train.resume=auto" if training else "then run the command again"
    if full:
        room = f"{free / 1e6:.1f} MB free" if free is not None else "free space unknown"
        return (f"cannot write checkpoint {path}: not enough disk space (it needs about {needed / 1e6:.1f} MB, "
                f"{room}); free some space{' or lower train.keep_last' if training else ''}, {again} "
                f"({'the checkpoints already written are' if training else f'{path} if it existed is'} intact)")
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
    return f"cannot write checkpoint {path}: {reason}; make {path.parent} writable, {again}"


def _tensor_bytes(obj) -> int:
    """The bytes of the tensors in a nested state: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def remove_temporary_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders that a killed write left in ``folder``; returns them.

    Call it only while no other process writes into ``folder`` (training holds its run directory's lock).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if _TMP_NAME.match(p.name))
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (with ``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, holds pickled code, or holds
            something other than an attnmt checkpoint; the message says which.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing on odd files
            warnings.simplefilter("ignore")
            # mmap: a tensor is read when it is used, so translation reads the weights but not the
            # optimizer's moments (two thirds of the file).
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        code = re.search(r"\bGLOBAL (\S+)", message)  # torch names the class or function it refused to import
        if code:
            raise CheckpointError(
                f"{path} was refused: it holds objects other than tensors and plain containers (a pickled reference "
                f"to {code.group(1).rstrip('.,;:')}, which loading would run as code), so it is not an attnmt "
                "checkpoint; open it outside attnmt only if you trust its source"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", message)
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated or corrupt, or a pickle that is not a torch checkpoint?)"
            + (f": {detail.group(1).strip()}" if detail else "")
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises KeyError, IndexError, RuntimeError... on files that are not checkpoints
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({path.stat().st_size} bytes; truncated or corrupt, or not a torch "
            f"checkpoint?): {first_line(e)}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an attnmt checkpoint (expected format {FORMAT!r})")
    return state


def first_line(err: BaseException) -> str:
    """An exception as one line for a message: its type and the first line of its text."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def require(state: dict, keys: tuple[str, ...], path: str | Path, purpose: str) -> None:
    """Raise a :class:`CheckpointError` naming the first of ``keys`` that ``state`` lacks."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(repr(k) for k in missing)}, which {purpose} needs; "
                              "it was not written by attnmt-train (or is damaged)")


def rng_state(device: torch.device) -> dict:
    """This process's python, numpy and torch generator states, and the generator of ``device`` where
    it is a GPU (the only CUDA generator the run draws from), as tensors, lists and numbers."""
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
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> str | None:
    """Restore the generator states that :func:`rng_state` returned, the CUDA one onto ``device``.

    Returns:
        None, or why ``device``'s generator could not be restored (a checkpoint written on the CPU,
        or one whose list of every GPU's states has none for ``device``): the run goes on, but its
        dropout no longer draws what an uninterrupted run would.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        return None  # a run on the CPU draws from the torch generator only
    saved = state.get("cuda")
    if isinstance(saved, list):  # before 2026-12, every visible GPU's state; rank r drew from cuda:LOCAL_RANK
        index = device.index or 0
        saved = saved[index] if index < len(saved) else None
    if saved is None:
        return (f"the checkpoint holds no CUDA random state for {device} (it was written on the CPU, or on fewer "
                "GPUs): dropout draws afresh, so this resume does not repeat an uninterrupted run exactly")
    torch.cuda.set_rng_state(saved, device)
    return None


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_run_checkpoint(state: dict, run_dir: str | Path, keep_last: int, is_best: bool) -> Path:
    """Write ``best.pt`` (when ``is_best``), ``step_<N>.pt`` and ``last.pt``, in that order, then delete
    numbered checkpoints beyond the newest ``keep_last``. Returns the numbered file's path.

    The order makes every crash point safe: ``last.pt`` (what a resume reads) is written last, so
    until it is, a resume repeats this validation and writes the other files again. Were ``best.pt``
    written after it, a kill in between would record the new best BLEU without its file, and no
    later validation (never better than its own record) would write it.
    """
    folder = checkpoint_dir(run_dir)
    if is_best:
        save_checkpoint(state, folder / "best.pt")
    numbered = folder / f"step_{state['step']}.pt"
    save_checkpoint(state, numbered)
    # Hard links would save the copy, but a copy survives someone editing one of the files.
    save_checkpoint(state, folder / "last.pt")
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
        state = load_checkpoint(path)
        require(state, ("model",), path, "averaging")
        check_known_keys(state, path)  # as every command that reads a checkpoint: nothing silently ignored
        model = state["model"]
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
    an averaged model is for evaluation, not for resuming.

    Raises:
        CheckpointError: a checkpoint given twice (it would count double), or ``out`` one of ``paths``
            (the average would replace a checkpoint it was made from).
    """
    weights = average_model_states(paths)  # each checkpoint loaded and checked first
    for i, path in enumerate(paths):
        twice = next((earlier for earlier in paths[:i] if os.path.samefile(earlier, path)), None)
        if twice is not None:
            raise CheckpointError(f"{path} is given twice ({twice}); each checkpoint is averaged once")
        if Path(out).exists() and os.path.samefile(out, path):
            raise CheckpointError(f"the output {out} is the input {path}: the average would replace a checkpoint it "
                                  "is made from; write it to another file")
    state = load_checkpoint(paths[-1])
    state["model"] = weights
    state["averaged_from"] = [str(p) for p in paths]
    for key in (*TrainState.RESUME_KEYS, "trained_model"):
        state.pop(key, None)
    save_checkpoint(state, out)
    return Path(out)



def load_weights(model: nn.Module, weights: dict, path: str | Path, what: str = "its model_config") -> None:
    """``model.load_state_dict(weights)``, with a one-line :class:`CheckpointError` naming ``path``
    when they do not fit ``what`` the model was built from (other shapes or names)."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), first_line(err))
        raise CheckpointError(f"{path}: its weights do not match {what} ({detail})") from None


def check_known_keys(state: dict, path: str | Path) -> None:
    """Refuse, in one line naming the keys and both versions, a checkpoint whose model or data config
    has keys this attnmt does not know (written by a newer attnmt, or edited): translating with an
    option ignored would give other output than the model was trained to give."""
    config = state.get("config") or {}
    unknown = unknown_keys(ModelConfig, state.get("model_config"), "model.") + unknown_keys(
        DataConfig, config.get("data"), "data.")
    if unknown:
        written = state.get("attnmt_version")
        by = f"attnmt {written}" if written else "an attnmt that did not record its version"
        raise CheckpointError(f"{path} has config keys attnmt {__version__} does not know: {', '.join(unknown)} "
                              f"(written by {by}); use the attnmt version that wrote it, or a newer one")


def model_config(state: dict, path: str | Path) -> ModelConfig:
    """The checkpoint's :class:`ModelConfig`, keys added to the model since it was written filled in
    with the values that reproduce it (:data:`~attnmt.config.MODEL_KEYS_ADDED`).

    Raises:
        CheckpointError: naming ``path``: keys this attnmt does not know (:func:`check_known_keys`),
            or values that cannot build a model.
    """
    check_known_keys(state, path)
    try:
        return ModelConfig(**{**MODEL_KEYS_ADDED, **state["model_config"]})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its model_config cannot build a model ({err})") from None


def tokenizer_of(state: dict, path: str | Path) -> Tokenizer:
    """The checkpoint's tokenizer.

    Raises:
        CheckpointError: naming ``path``, when it cannot be rebuilt.
    """
    try:
        return Tokenizer.from_state(state["tokenizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: its tokenizer cannot be rebuilt ({first_line(err)})") from None


def load_model_weights(model: nn.Module, state: dict, path: str | Path, what: str = "its model_config") -> None:
    """Load the checkpoint's translation weights into ``model`` (see :func:`load_weights`)."""
    load_weights(model, state["model"], path, what)


def run_config(path: str | Path) -> dict:
    """The run config (``model``, ``data``, ``optim``, ``train``) a checkpoint was trained with.

    Raises:
        CheckpointError: the file is missing, is not a complete attnmt checkpoint, or has config keys
            this attnmt does not know (:func:`check_known_keys`).
    """
    state = load_checkpoint(path)
    require(state, INFERENCE_KEYS, path, "translation")
    check_known_keys(state, path)
    return state["config"]


def step_of(path: str | Path) -> int:
    """The number of updates the checkpoint at ``path`` was written after (0 for one without a step)."""
    return int(load_checkpoint(path).get("step", 0))


def record_metrics(state: dict, metrics: dict) -> dict:
    """``state`` with ``metrics`` (their numbers) as the checkpoint's latest valid metrics."""
    return {**state, "metrics": _numbers(metrics)}


def _numbers(metrics: dict) -> dict:
    """The numeric entries of ``metrics``: what a checkpoint keeps of them (not the examples or signatures)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def trained_weights_checkpoint(state: dict) -> dict | None:
    """With ``train.ema_decay``, a checkpoint for evaluation whose weights are the ones the optimizer
    trained (not their moving average); None for a checkpoint without EMA."""
    if "trained_model" not in state:
        return None
    out = {k: v for k, v in state.items() if k not in (*TrainState.RESUME_KEYS, "trained_model")}
    return {**out, "model": state["trained_model"]}


def check_same_tokenizer(state: dict, cfg_tokenizer: TokenizerConfig, path: str | Path) -> None:
    """A resumed run keeps its checkpoint's tokenizer: refuse, naming the keys, when the config asks for another."""
    if cfg_tokenizer.model:
        return  # a user-supplied model: its settings are whatever that file holds
    saved, wanted = state["tokenizer"].get("settings") or {}, tokenizer_settings(cfg_tokenizer)
    changed = [f"data.tokenizer.{k}={wanted[k]!r} (checkpoint: {saved[k]!r})" for k in wanted
               if k in saved and saved[k] != wanted[k]]
    if changed:
        raise ConfigError(f"{path} was trained with another tokenizer: {', '.join(changed)}; resume with the "
                          f"checkpoint's settings, or start a new run in another train.run_dir")


# Keys of ModelConfig that may change between a checkpoint and the run that continues from it.
_MODEL_KEYS_FREE = ("dropout", "attention_dropout", "activation_dropout", "src_vocab_size", "tgt_vocab_size", "pad_id",
                    "bos_id", "eos_id")


def check_same_model(state: dict, model: ModelConfig, path: str | Path) -> None:
    """Refuse, naming the keys, a checkpoint whose model has another shape than ``model`` (and first, through
    :func:`model_config`, one with config keys this attnmt does not know)."""
    saved = model_config(state, path)
    changed = [f"model.{f.name}={getattr(model, f.name)!r} (checkpoint: {getattr(saved, f.name)!r})"
               for f in fields(model) if f.name not in _MODEL_KEYS_FREE and getattr(saved, f.name) != getattr(model, f.name)]
    if changed:
        raise ConfigError(f"{path} holds another model: {', '.join(changed)}; use the checkpoint's model settings "
                          "(e.g. the same model= and experiment=)")


def build_from_state(state: dict, path: str | Path, weights: dict | None = None) -> nn.Module:
    """The model a checkpoint describes, with its weights (or ``weights``) loaded, on the CPU.

    Raises:
        CheckpointError: naming ``path``, when the model config is not one attnmt can build or the
            weights do not fit it.
    """
    cfg = model_config(state, path)
    try:
        model = build_model(cfg)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its model_config cannot build a model ({err})") from None
    load_weights(model, state["model"] if weights is None else weights, path)
    return model


def load_for_inference(path: str | Path | list[str | Path], device: str | torch.device = "cpu"):
    """Rebuild ``(model, tokenizer, config)`` from a checkpoint for evaluation or translation.

    Args:
        path: one checkpoint, or a list whose weights are averaged on the fly.
        device: where the model goes.

    Returns:
        The model (in eval mode, on ``device``), the :class:`~attnmt.tokenizer.Tokenizer`, and the
        run config as a dict (keys ``model``, ``data``, ``optim``, ``train``).

    Raises:
        CheckpointError: a file is missing or is not a complete attnmt checkpoint.
    """
    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    state = load_checkpoint(paths[-1])
    require(state, INFERENCE_KEYS, paths[-1], "translation")
    model = build_from_state(state, paths[-1], average_model_states(paths) if len(paths) > 1 else None)
    tokenizer = tokenizer_of(state, paths[-1])
    model.to(device).eval()
    return model, tokenizer, state["config"]
