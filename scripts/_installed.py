"""Exit 0 when this Python has this checkout's attnmt installed with every package of the extras named
in the argument (comma-separated, e.g. ``dev,ct2``), else 1 (quietly: the caller installs them).
Used by ``scripts/_setup.sh``, so that the quickstart and the test command install only what is missing.

usage: python scripts/_installed.py EXTRAS
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def requirements(extras: set[str]) -> list[str]:
    """The package's dependencies and those of ``extras``, as pyproject.toml lists them now (an
    install made before an extra gained a package still lacks it); on Python 3.10, which has no
    tomllib, as the installed package's metadata lists them."""
    try:
        import tomllib
    except ImportError:
        listed = metadata.requires("attnmt") or []
        wanted = [r.partition(";") for r in listed]
        return [name for name, _, marker in wanted
                if not marker or any(re.search(rf"""extra\s*==\s*["']{re.escape(e)}["']""", marker) for e in extras)]
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    return [*project.get("dependencies", []), *(r for e in sorted(extras) for r in optional.get(e, []))]


def missing(extras: set[str]) -> list[str]:
    """The requirements of ``extras`` (and the package itself) that are not installed here."""
    spec = find_spec("attnmt")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parents[1] != CHECKOUT / "src":
        return ["attnmt (this checkout)"]
    absent = []
    for requirement in requirements(extras):
        package = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)
        try:
            metadata.version(package)
        except metadata.PackageNotFoundError:
            absent.append(package)
    return absent


if __name__ == "__main__":
    sys.exit(1 if missing(set(sys.argv[1].split(",")) if len(sys.argv) > 1 else set()) else 0)
