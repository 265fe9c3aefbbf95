"""attnmt.durable: the one way attnmt replaces a file."""

from __future__ import annotations

import errno
import os

import pytest

from attnmt import durable


def test_a_replaced_file_is_whole_and_its_rename_fsynced(tmp_path, monkeypatch) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    synced = []
    fsync = os.fsync
    proc = os.path.isdir("/proc/self/fd")  # where the names of open files can be read
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}") if proc else fd) or fsync(fd))
    with durable.replacing(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f".out.txt.tmp{os.getpid()}"
        tmp.write_text("new\n")
        assert path.read_text() == "old\n"  # nothing replaced before the end of the block
    assert path.read_text() == "new\n"
    if proc:
        assert synced == [str(tmp_path / tmp.name), str(tmp_path)]  # the file, then the folder (the rename)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="midway"):
        with durable.replacing(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("midway")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


@pytest.mark.parametrize("error, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (OSError(errno.EFBIG, "File too large"), True),
    (RuntimeError("PytorchStreamWriter failed writing file: No space left on device"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (ValueError("bad"), False),
])
def test_disk_full_is_told_the_same_way_everywhere(error: Exception, full: bool) -> None:
    assert durable.disk_full(error) is full
    try:  # however deep in the chain: datasets' workers re-raise their errors
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("a worker failed") from inner
    except RuntimeError as outer:
        assert durable.disk_full(outer) is full
