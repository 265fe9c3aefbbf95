"""Check, in seconds, that this interpreter can run attnmt: before a device call spends its minutes.

    python scripts/gpu/check_env.py [--device cuda|cpu] [--require 'NAME SPEC' ...]

attnmt runs on the GPU machine from ``src/`` (not installed), with hydra-core, omegaconf and datasets
carried as wheels, so nothing has checked that their versions fit together. This script checks:

1. every requirement of attnmt (``pyproject.toml``: its dependencies and the ``hf`` extra, which
   the throughput table needs), pytest, and the requirements of the carried packages themselves
   (hydra-core, omegaconf, datasets: pip would have checked those, but they were unpacked without
   it). A package missing, or older than a requirement allows, is an error; one newer than an upper
   bound only is a warning (such bounds are often caution, and step 3 tries what attnmt does);
2. that each module imports;
3. what attnmt does with them: Hydra composes the train config, datasets maps a column and writes
   Arrow, and with ``--device cuda``, CUDA runs a bf16 matrix product.

It prints the versions found, then ``check_env: ok`` or ``check_env: FAILED: ...`` in one line (exit
status 1).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import platform
import sys
import tempfile
import time
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # what reads every other requirement: without it, say so in the one line
    sys.exit("check_env: FAILED: packaging is not installed here; carry its wheel (../shared/tools/device-wheels "
             "packaging)")

REPO = Path(__file__).resolve().parents[2]
CARRIED = ("hydra-core", "omegaconf", "datasets")  # travel as wheels, unpacked without pip's checks
MODULES = ("torch", "sentencepiece", "datasets", "pyarrow", "sacrebleu", "hydra", "omegaconf", "tensorboard", "tqdm",
           "numpy", "transformers", "pytest", "attnmt", "attnmt.training", "attnmt.inference.native")


def attnmt_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"], *project["optional-dependencies"]["hf"], "pytest>=8"]
    return [Requirement(name) for name in names]


def carried_requirements() -> list[tuple[str, Requirement]]:
    """The requirements of the carried packages (markers evaluated here, extras left out)."""
    found = []
    for name in CARRIED:
        try:
            declared = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # reported as missing by attnmt's own requirement on it
        for line in declared:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                found.append((name, req))
    return found


def check_version(req: Requirement, wanted_by: str) -> tuple[str | None, str | None]:
    """(error, warning) for one requirement: at most one of them is set."""
    try:
        installed = Version(metadata.version(req.name))
    except metadata.PackageNotFoundError:
        return f"{req.name} is not installed ({wanted_by} needs {req}); carry its wheel", None
    if req.specifier.contains(installed, prereleases=True):
        return None, None
    too_old = [s for s in req.specifier if s.operator not in ("<", "<=") and not s.contains(installed, prereleases=True)]
    what = f"{req.name} {installed} is outside {wanted_by}'s {req.specifier}"
    if too_old:
        return f"{what}; carry a wheel that fits (../shared/tools/device-wheels '{req.name}{req.specifier}')", None
    return None, f"{what} (newer than it declares; tried below)"


def try_what_attnmt_does(device: str) -> None:
    """Raise on the first thing attnmt does with these packages that fails."""
    import datasets
    import torch

    from attnmt.config import compose

    cfg = compose("train", ["model=tiny", "train.device=cpu"])
    assert cfg.model.d_model > 0
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as folder:
        ds = datasets.Dataset.from_dict({"src": ["ein Haus", "ein Hund"]}).map(lambda row: {"n": len(row["src"])})
        ds.save_to_disk(folder)
        assert datasets.load_from_disk(folder)["n"] == [8, 8]
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda})")
        x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        assert torch.isfinite(x @ x).all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda: CUDA must work too")
    parser.add_argument("--require", action="append", default=[], metavar="'NAME SPEC'",
                        help="one more requirement to check, e.g. 'pyarrow>=24'")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"python {platform.python_version()} at {sys.executable}; {platform.platform()}")
    errors, warnings = [], []
    checks = [(req, "attnmt") for req in attnmt_requirements()] + [(req, name) for name, req in carried_requirements()]
    checks += [(Requirement(text), "--require") for text in args.require]
    for req, wanted_by in checks:
        error, warning = check_version(req, wanted_by)
        errors += [error] if error else []
        warnings += [warning] if warning else []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # any failure to import is what this script exists to report
            errors.append(f"import {name}: {type(err).__name__}: {err}")
            continue
        if "." not in name:
            print(f"  {name:14} {getattr(module, '__version__', '?'):14} {getattr(module, '__file__', '')}")
    if not errors:
        try:
            try_what_attnmt_does(args.device)
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")
    if not errors and args.device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        print(f"  CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {props.name}, compute capability "
              f"{props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB")
    for warning in warnings:
        print(f"  warning: {warning}")
    seconds = time.perf_counter() - started
    if errors:
        print(f"check_env: FAILED in {seconds:.0f} s: {'; '.join(errors)}", file=sys.stderr)
        return 1
    print(f"check_env: ok in {seconds:.0f} s ({len(checks)} requirements, {len(MODULES)} imports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
