"""Command-line entry points: thin ``@hydra.main`` wrappers around the library.

Only this package sees a ``DictConfig``: each command converts it into the dataclasses of
:mod:`attnmt.config` and passes those down.
"""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> Path:
    """The Hydra config tree (``configs/`` with ``train.yaml``, ``model/``, ``data/``, ...).

    The tree lives at the repository's top level, beside ``src/``, and is not copied into the
    package. Looked up, in order:

    1. ``$ATTNMT_CONFIGS``, if set: a config tree of one's own;
    2. ``<repository>/configs`` relative to this file's source (``src/attnmt/cli`` -> three levels
       up). ``pip install -e .`` keeps the package in the checkout, so this works from any working
       directory.

    Raises:
        FileNotFoundError: neither exists (e.g. a non-editable install without ``$ATTNMT_CONFIGS``).
    """
    env = os.environ.get("ATTNMT_CONFIGS")
    candidates = [Path(env)] if env else [Path(__file__).resolve().parents[3] / "configs"]
    for path in candidates:
        if (path / "train.yaml").is_file():
            return path
    raise FileNotFoundError(
        f"attnmt's config tree was not found at {candidates[0]}; install the package editable "
        "(pip install -e .) from the repository, or set ATTNMT_CONFIGS to the repository's configs/ folder"
    )
