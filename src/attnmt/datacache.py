"""The on-disk cache of :mod:`attnmt.data`: each step's Arrow files in ``data.cache_dir``, named by what
they were made from (:func:`key`), proved whole by a seal, built under the folder's lock
(:func:`cached`), and cleaned of what a killed process left.

Every file in the cache proves it is whole by a seal written after it: ``NAME.seal`` beside
``NAME.arrow`` records the size of each of its files (a map over several processes writes one file
each) and its number of rows. Writing order: the files, fsynced; the seal, atomically
(:func:`attnmt.durable.replacing`). A file without a seal, or whose size or row count is not the
seal's (cut by a crash or a full disk, emptied by a power cut), is rebuilt, with a warning naming it.
A warm, sealed cache is only read, so it can be read-only. Building holds the cache folder's lock
(``.lock``), so two runs never build the same file, and the first to hold it removes the temporary
files a killed run left.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import pyarrow as pa

from attnmt import durable
from attnmt.config import DataConfig
from attnmt.textfiles import DataError

logger = logging.getLogger("attnmt.data")  # the cache's warnings are the data's, as the log has always named them

CACHE_VERSION = "2"  # part of every key: a change of what the files hold makes new ones


_temporary_cache: Path | None = None
_TEMPORARY_PREFIX = "attnmt-data-"
_swept: set[Path] = set()  # cache folders whose stale temporary files this process has removed


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, created; with ``data.cache_dir=null`` a temporary folder of this process,
    removed when it exits (the data are still memory-mapped, never held in memory whole). Training
    puts the null cache in its run directory instead (:func:`attnmt.training.train`), which every rank
    shares and a resumed run finds again."""
    global _temporary_cache
    if cfg.cache_dir:
        root = Path(cfg.cache_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"data.cache_dir={cfg.cache_dir} cannot be created ({err.strerror}); choose another "
                            "folder, or data.cache_dir=null for a temporary one") from None
        if root not in _swept:
            _swept.add(root)
            _remove_stale_temporaries(root)
        return root
    if _temporary_cache is None:
        _remove_orphaned_temporary_caches()
        _temporary_cache = Path(tempfile.mkdtemp(prefix=f"{_TEMPORARY_PREFIX}{os.getpid()}-"))
        atexit.register(shutil.rmtree, _temporary_cache, ignore_errors=True)
    return _temporary_cache


def _remove_orphaned_temporary_caches() -> None:
    """Remove the temporary caches (``data.cache_dir=null``) of processes that no longer run: a kill
    -9 skips the removal at exit."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_TEMPORARY_PREFIX}*-*"):
        pid = folder.name[len(_TEMPORARY_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _seal_path(path: Path) -> Path:
    return path.with_name(path.with_suffix("").name + ".seal")


def _read_seal(path: Path) -> tuple[dict | None, str]:
    """What the seal of the cache file ``path`` records, when every file it lists is there with the size
    it lists; else None and why not."""
    try:
        record = json.loads(_seal_path(path).read_text())
        listed = dict(record["files"])
    except FileNotFoundError:
        return None, "has no seal (cut by a crash or a full disk, or written before attnmt sealed its cache)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, "has a damaged seal"
    try:
        sizes = {name: (path.parent / name).stat().st_size for name in listed}
    except OSError:
        return None, "lacks a file its seal lists"
    if sizes != listed or not isinstance(record.get("rows"), int):
        return None, "is not the size its seal records (cut by a crash, a full disk or a power cut)"
    return record, ""


def _write_seal(path: Path, files: Sequence[Path], rows: int, **extra) -> dict:
    for file in files:
        durable.fsync(file)
    record = {"rows": rows, "files": {file.name: file.stat().st_size for file in files}, **extra}
    with durable.replacing(_seal_path(path)) as tmp, open(tmp, "w") as f:
        json.dump(record, f)
    return record


def files_of(path: Path) -> list[Path]:
    """The files of the cache entry ``path`` (``NAME.arrow``, and ``NAME_00000_of_00004.arrow`` shards)."""
    stem = path.with_suffix("").name
    return [p for p in path.parent.glob(f"{stem}*{path.suffix}") if p.name == path.name or p.name.startswith(f"{stem}_")]


def discard(path: Path, why: str) -> None:
    """Remove the files of the cache entry ``path`` and its seal; warn when there were files to remove."""
    files = files_of(path)
    if files:
        logger.warning("cache file %s %s; rebuilding it", path, why)
    for file in files:
        file.unlink(missing_ok=True)
    seal = _seal_path(path)
    if seal.is_dir() and not seal.is_symlink():  # a folder by the seal's name, in the cache's own namespace
        shutil.rmtree(seal)
    else:
        seal.unlink(missing_ok=True)


_TEMPORARY_NAME = re.compile(r"^(tmp[a-z0-9_]{8}|\..+\.tmp\d+)$")  # datasets' tempfile names; attnmt's .NAME.tmpPID


def _is_temporary(name: str) -> bool:
    return bool(_TEMPORARY_NAME.match(name))


def _remove_temporaries(root: Path) -> None:
    """Remove the temporary files in ``root``: only with its lock held, when no one else writes there."""
    stale = [p for p in root.iterdir() if _is_temporary(p.name) and p.is_file()]
    if stale:
        logger.warning("removing %d temporary files (%.1f MB) that a stopped process left in %s", len(stale),
                       sum(p.stat().st_size for p in stale) / 1e6, root)
        for p in stale:
            p.unlink(missing_ok=True)


def _remove_stale_temporaries(root: Path) -> None:
    """At a process's first use of a cache folder: the temporary files a killed run left there, removed
    when no other process holds the folder's lock (one that does is writing, and cleans up itself)."""
    try:
        with open(root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _remove_temporaries(root)
    except OSError:  # a read-only cache (nothing to clean there), or another process is writing
        pass


@contextlib.contextmanager
def _building(path: Path, needs: int):
    """Hold the cache folder's lock while the entry ``path`` is built (about ``needs`` bytes); the first
    holder removes stale temporary files. A folder that cannot be written, or a disk that fills, ends
    in one :class:`DataError` naming the file, with no partial or temporary file left.
    """
    root = path.parent
    try:
        lock = open(root / ".lock", "a+")
    except OSError as err:
        raise DataError(f"{path} is not in the cache (or not whole) and data.cache_dir={root} cannot be written "
                        f"({err.strerror}): a read-only cache must hold every file a run needs, sealed, from a run "
                        "with the same data and settings; point data.cache_dir at a writable folder") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logger.info("waiting for another process that writes into data.cache_dir=%s", root)
            fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_temporaries(root)
        try:
            yield
        except BaseException as err:
            for p in [*files_of(path), _seal_path(path)] + [p for p in root.iterdir() if _is_temporary(p.name)]:
                p.unlink(missing_ok=True)
            if durable.disk_full(err):
                free = shutil.disk_usage(root).free
                raise DataError(f"cannot write {path}: not enough disk space (it needs about {needs / 1e6:.1f} MB, "
                                f"{free / 1e6:.1f} MB free); free some space or set data.cache_dir to a larger "
                                "disk") from None
            raise


def _check(path: Path, load: Callable[[], datasets.Dataset]) -> tuple[datasets.Dataset | None, dict | None, str]:
    """The cache entry ``path`` loaded and its seal, when it is whole; else (None, seal, why not)."""
    seal, why = _read_seal(path)
    if seal is None:
        return None, None, why
    try:
        ds = load()
    except (OSError, ValueError, IndexError, pa.ArrowException) as err:  # ArrowInvalid is a ValueError
        return None, seal, f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    if len(ds) != seal["rows"]:
        return None, seal, f"has {len(ds)} rows where its seal says {seal['rows']}"
    return ds, seal, ""


def cached(path: Path, build: Callable[[], tuple[list[Path], int, dict]], load: Callable[[], datasets.Dataset],
            needs: int) -> tuple[datasets.Dataset, dict]:
    """The cache entry ``path``, loaded, and its seal; built first when it is missing, unsealed or
    damaged: ``build`` writes it and returns its files, its row count and what else the seal records."""
    ds, seal, why = _check(path, load)
    if ds is not None:
        return ds, seal
    with _building(path, needs):
        ds, seal, why = _check(path, load)  # another process may have built it while this one waited
        if ds is None:
            discard(path, why)
            files, rows, extra = build()
            seal = _write_seal(path, files, rows, **extra)
            ds = load()
    return ds, seal


def key(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:20]
