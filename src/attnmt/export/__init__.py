"""Export a trained model to other inference libraries.

``attnmt.export.ctranslate2`` writes a CTranslate2 model directory (and translates with one: the
``engine=ctranslate2`` of ``attnmt-translate`` and ``attnmt-evaluate``); ``attnmt.export.hf`` writes
a folder that ``transformers`` loads with ``AutoModelForSeq2SeqLM`` and ``AutoTokenizer``. Each
imports its library only when called, so ``import attnmt.export`` stays cheap.

Both write their output directory atomically (:func:`write_directory`): a crash never leaves a
half-written model where a complete one is expected.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path


class ExportError(ValueError):
    """A model or an export request that cannot work; the message names the option or path and what to do."""


def write_directory(out: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``out`` by ``fill(tmp)`` into a temporary directory beside it, then a rename.

    ``out`` must not exist or be empty. If another process creates ``out`` meanwhile, its directory
    wins and this one is discarded (both hold the same model when both come from the same input).

    Raises:
        ExportError: ``out`` exists and is not empty.
    """
    out = check_new_directory(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        try:
            os.rename(tmp, out)  # replaces an empty directory; fails on a full one
        except OSError:
            if not (out.is_dir() and any(out.iterdir())):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_new_directory(out: str | Path) -> Path:
    """``out`` as a Path, if it does not exist or is an empty directory.

    Raises:
        ExportError: ``out`` exists and is not an empty directory.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"out={out} already exists and is not an empty directory; remove it or choose another out=")
    return out


def checkpoint_hash(paths: Sequence[str | Path]) -> str:
    """SHA-256 of the checkpoint files' contents, in order: the key of converted-model caches."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        h.update(b"\x00next\x00")
    return h.hexdigest()
