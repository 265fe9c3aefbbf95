"""Export a trained model to other inference libraries.

``attnmt.export.ctranslate2`` writes a CTranslate2 model directory; ``attnmt.export.hf`` writes a
folder that ``transformers`` loads with ``AutoModelForSeq2SeqLM`` and ``AutoTokenizer``. Only writers
live here: the engines that translate with these libraries are in :mod:`attnmt.inference`. Each
imports its library only when called, so ``import attnmt.export`` stays cheap. Each lists the model
options it expresses (``EXPRESSIBLE``), and :func:`check_model_options` refuses any other in one line
before anything is converted.

Both write their output directory atomically (:func:`write_directory`): a crash never leaves a
half-written model where a complete one is expected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from attnmt import durable

if TYPE_CHECKING:
    from attnmt.config import ModelConfig


class ExportError(ValueError):
    """A model or an export request that cannot work; the message names the option or path and what to do."""


def check_model_options(cfg: ModelConfig, expressible: Mapping[str, tuple | None], target: str) -> None:
    """Refuse, in one line, a model whose options ``target`` cannot express, before anything is converted or written.

    Args:
        cfg: the model's config.
        expressible: every model option the exporter handles, with the values it can express (None:
            any value). A model option missing from it (one added to attnmt after the exporter was
            written) is refused, not converted wrongly.
        target: the ``to=`` value, for the message.

    Raises:
        ExportError: the first option it cannot express.
    """
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in expressible:
            raise ExportError(f"model.{f.name}={value!r}: attnmt-export to={target} does not convert this option; "
                              "translate with engine=native, or use an attnmt version whose exporter handles it")
        accepted = expressible[f.name]
        if accepted is not None and value not in accepted:
            raise ExportError(f"model.{f.name}={value!r}: to={target} expresses {', '.join(map(repr, accepted))} only; "
                              "translate with engine=native")


def write_directory(out: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``out`` by ``fill(tmp)`` into a temporary directory beside it, then a rename
    (:func:`attnmt.durable.replacing_folder`).

    ``out`` must not exist or be empty. If another process creates ``out`` meanwhile, its directory
    wins and this one is discarded (both hold the same model when both come from the same input).

    Raises:
        ExportError: ``out`` exists and is not empty.
    """
    out = check_new_directory(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with durable.replacing_folder(out, keep_existing=True) as tmp:
        fill(tmp)
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
