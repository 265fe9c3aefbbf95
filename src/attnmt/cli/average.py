"""``attnmt-average``: average the weights of a run's newest checkpoints into one checkpoint.

    attnmt-average ckpt=runs/multi30k_de_en last=5 out=runs/multi30k_de_en/checkpoints/avg_last5.pt
    attnmt-average ckpt=[a.pt,b.pt,c.pt] out=avg.pt

The result is a normal checkpoint (model config, tokenizer, run config) without optimizer or RNG
state: evaluate or translate with it; do not resume from it. The command line is the other commands'
(``configs/average.yaml``); the argparse form of earlier versions (``attnmt-average PATHS --last N
--out FILE``) still works, with a line saying what to write instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from attnmt.checkpoint import CheckpointError, average_checkpoints, checkpoint_dir, numbered_checkpoints
from attnmt.cli.common import config_command, setup_logging, to_config
from attnmt.config import AverageConfig, ConfigError

logger = logging.getLogger("attnmt.cli.average")


def run(cfg: AverageConfig) -> None:
    cfg.check()
    inputs = [str(p) for p in cfg.ckpt] if isinstance(cfg.ckpt, (list, tuple)) else [str(cfg.ckpt)]
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        paths = numbered_checkpoints(checkpoint_dir(inputs[0]))[-cfg.last :]
        if not paths:
            raise CheckpointError(f"no step_*.pt checkpoints in {checkpoint_dir(inputs[0])}")
    else:
        paths = [Path(p) for p in inputs]
    average_checkpoints(paths, cfg.out)
    logger.info("averaged %d checkpoints (%s) into %s", len(paths), ", ".join(p.name for p in paths), cfg.out)


def old_form(argv: list[str]) -> list[str] | None:
    """The overrides meaning what an argparse command line of earlier versions (``PATHS --last N --out
    FILE``) meant, or None where ``argv`` is not one."""
    if all("=" in arg or arg.startswith("-") for arg in argv) and not {"--last", "--out"} & {
            arg.split("=")[0] for arg in argv}:
        return None
    parser = argparse.ArgumentParser(prog="attnmt-average")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--last", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    quoted = [f"'{path}'" for path in args.inputs]  # any path, whatever characters Hydra's grammar gives a meaning
    inputs = quoted[0] if len(quoted) == 1 else f"[{','.join(quoted)}]"
    return [f"ckpt={inputs}", f"last={args.last}", f"out={args.out}"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    overrides = old_form(argv)
    if overrides is not None:
        logger.warning("attnmt-average PATHS --last N --out FILE is the form of earlier versions; write "
                       "attnmt-average %s", " ".join(overrides))
        argv = overrides
    config_command("average", AverageConfig, lambda cfg: run(to_config(cfg, ("ckpt", "out"))), argv,
                   (CheckpointError, ConfigError))


if __name__ == "__main__":
    main()
