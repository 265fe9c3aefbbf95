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
    install made before an extra gained a package, or raised a version, does not have it); on Python
    3.10, which has no tomllib, as the installed package's metadata lists them."""
    try:
        import tomllib
    except ImportError:
        listed = metadata.requires("attnmt") or []
        wanted = [r.partition(";") for r in listed]
        return [name.strip() for name, _, marker in wanted
                if not marker or any(re.search(rf"""extra\s*==\s*["']{re.escape(e)}["']""", marker) for e in extras)]
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    return [*project.get("dependencies", []), *(r for e in sorted(extras) for r in optional.get(e, []))]


def missing(extras: set[str]) -> list[str]:
    """The requirements of ``extras`` (and the package itself) that are not installed here."""
    spec = find_spec("attnmt")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parents[1] != CHECKOUT / "src":
        return ["attnmt (this checkout)"]
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip carries its own copy
        from pip._vendor.packaging.requirements import Requirement
    absent = []
    for text in requirements(extras):
        requirement = Requirement(text)
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            absent.append(text)
            continue
        if not requirement.specifier.contains(version, prereleases=True):  # too old (or too new)
            absent.append(f"{text} (installed: {version})")
    return absent


if __name__ == "__main__":
    sys.exit(1 if missing(set(sys.argv[1].split(",")) if len(sys.argv) > 1 else set()) else 0)
