"""Argument types shared by the scripts in this folder: a bad value fails in argparse's one line
(``usage: ...`` and ``error: argument --calls: must be a whole number of at least 1, got 0``), not in a
traceback halfway through a benchmark. A script run as ``python scripts/NAME.py`` finds this module
beside it."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path


def at_least(low: int) -> Callable[[str], int]:
    """A whole number of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {low}, got {value}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


positive = at_least(1)


def positive_list(text: str) -> list[int]:
    """Comma-separated whole numbers of at least 1, one or more: ``1250,300,60``."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError("must list one or more whole numbers, comma-separated, e.g. 1,2,3")
    return [positive(item) for item in items]


def non_negative_float(text: str) -> float:
    """A finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


def folder_with(*names: str) -> Callable[[str], Path]:
    """An existing folder that holds every file of ``names`` (e.g. ``train.de``)."""

    def parse(text: str) -> Path:
        path = Path(text)
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is not a folder")
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise argparse.ArgumentTypeError(f"{path} lacks {', '.join(missing)}")
        return path

    parse.__name__ = "folder"
    return parse


def new_or_folder(text: str) -> Path:
    """A folder to write into: an existing folder, or a path that can become one (not a file)."""
    path = Path(text)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"{path} cannot be a folder: {probe} is a file")
    return path


def without_keys(overrides: Sequence[str], replaced: Sequence[str]) -> list[str]:
    """Hydra ``overrides`` but those whose key one of ``replaced`` sets (Hydra refuses a key given twice):
    a script's own settings, with the user's ``--train-overrides`` taking their place."""
    keys = {item.split("=", 1)[0] for item in replaced}
    return [item for item in overrides if item.split("=", 1)[0] not in keys]


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a file")
    return path
