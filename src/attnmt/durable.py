"""Durable writes: a file replaces its old version whole or not at all, and survives a power cut.

The files attnmt writes that another run or command reads back (checkpoints, the data cache's files
and seals, a run's config, a command's output) go through :func:`replacing`: written under a
temporary name beside it (``.NAME.tmpPID``, which the folders' owners recognise and remove after a
kill), fsynced, renamed over the old name, and the rename made durable by an fsync of the folder.
Whole folders (a tokenizer, an ``attnmt-export`` output) go through :func:`replacing_folder`, the same
steps for a folder and every file in it.
:func:`disk_full` says whether a write failed for want of space, the same way for every caller.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def temporary_name(path: Path) -> Path:
    """The temporary name beside ``path`` that this process writes before renaming."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; once the block ends without an error, the
    file is fsynced, renamed over ``path`` and the folder fsynced. On an error (or a kill) ``path`` is
    as it was, and the temporary file is removed (a kill leaves it for the folder's owner to remove).

        with durable.replacing(path) as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing_folder(path: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """:func:`replacing` for a folder: a temporary folder beside ``path`` to fill; once the block ends
    without an error, everything in it is fsynced and it takes ``path``'s place (an old folder there
    is moved aside first, then removed: a rename cannot replace a folder that holds files), and the
    parent folder is fsynced. On an error ``path`` is as it was and the temporary folder is removed.

    Args:
        keep_existing: where ``path`` is a folder with files in it by then (another process wrote it
            meanwhile), keep that one and discard this one, instead of replacing it.
    """
    path = Path(path)
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a killed process of the same pid's
    tmp.mkdir()
    try:
        yield tmp
        for entry in [*tmp.rglob("*"), tmp]:
            if not entry.is_symlink():
                fsync(entry)
        _rename_folder(tmp, path, keep_existing)
        fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rename_folder(tmp: Path, path: Path, keep_existing: bool) -> None:
    try:
        os.rename(tmp, path)  # takes the place of a missing or empty folder
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not path.is_dir():
            raise
    if keep_existing:
        return
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def fsync(path: str | Path) -> None:
    """Flush ``path`` (a file, or a folder: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it was raised from: datasets' workers re-raise theirs) says the disk
    or the quota is full."""
    while err is not None:
        if (isinstance(err, OSError) and err.errno in _FULL) or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
