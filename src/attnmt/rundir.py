"""The run directory as rank 0 holds it while training (:class:`RunDir`): the check that it can be
written (:func:`check_writable`), the lock against a second process, ``config.yaml``, the run's copy
of the tokenizer, ``train.log`` and the TensorBoard writer (:func:`tensorboard_writer`); and the
signal handlers that turn a first Ctrl-C or SIGTERM into "checkpoint, then stop"
(:func:`install_stop_handlers`)."""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from attnmt import checkpoint, distributed, durable
from attnmt.config import ConfigError, TrainRunConfig
from attnmt.tokenizer import Tokenizer, saved_fingerprint

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


def tensorboard_writer(run_dir: Path, step: int):
    """The run's TensorBoard writer, continuing after ``step`` (imported here: a heavy module)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1)
