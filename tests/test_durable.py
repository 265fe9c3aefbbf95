"""attnmt.durable: the one way attnmt replaces a file or a folder."""

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


def test_a_replaced_folder_is_whole_every_file_fsynced_and_the_old_one_gone(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "old.model").write_text("old")
    synced = []
    real = durable.fsync
    monkeypatch.setattr(durable, "fsync", lambda path: synced.append(os.path.relpath(path, tmp_path)) or real(path))
    with durable.replacing_folder(folder) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f".tokenizer.tmp{os.getpid()}"
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_text("a")
        (tmp / "joint.model").write_text("new")
        assert (folder / "old.model").exists()  # nothing replaced before the end of the block
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == ["joint.model", "sub", "sub/a.bin"]
    assert sorted(synced[:-2]) == sorted(f"{tmp.name}/{name}" for name in ("joint.model", "sub", "sub/a.bin"))
    assert synced[-2:] == [tmp.name, "."]  # the folder itself, then its parent (the rename)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]  # no temporary, no old copy


def test_a_failed_folder_write_leaves_the_old_folder_and_no_temporary(tmp_path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "model.bin").write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with durable.replacing_folder(folder) as tmp:
            (tmp / "model.bin").write_text("half")
            raise RuntimeError("midway")
    assert (folder / "model.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_keep_existing_keeps_a_folder_another_process_wrote_meanwhile(tmp_path) -> None:
    folder = tmp_path / "export"
    with durable.replacing_folder(folder, keep_existing=True) as tmp:
        (tmp / "model.bin").write_text("mine")
        folder.mkdir()  # the other process's, finished first
        (folder / "model.bin").write_text("theirs")
    assert (folder / "model.bin").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with durable.replacing_folder(tmp_path / "empty", keep_existing=True) as tmp:
        (tmp_path / "empty").mkdir()  # an empty folder is taken over
        (tmp / "model.bin").write_text("mine")
    assert (tmp_path / "empty" / "model.bin").read_text() == "mine"


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
