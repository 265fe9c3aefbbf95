"""``attnmt-average``: average the weights of a run's newest checkpoints into one checkpoint.

    attnmt-average runs/multi30k_de_en --last 5 --out runs/multi30k_de_en/checkpoints/avg_last5.pt
    attnmt-average a.pt b.pt c.pt --out avg.pt

The result is a normal checkpoint (model config, tokenizer, run config) without optimizer or RNG
state: evaluate or translate with it; do not resume from it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from attnmt.checkpoint import CheckpointError, average_checkpoints, checkpoint_dir, numbered_checkpoints

logger = logging.getLogger("attnmt.cli.average")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="attnmt-average", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="checkpoint files, or one run directory (with --last)")
    parser.add_argument("--last", type=int, default=5, help="with a run directory: average its newest N step_*.pt")
    parser.add_argument("--out", required=True, help="where to write the averaged checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if len(args.inputs) == 1 and Path(args.inputs[0]).is_dir():
            paths = numbered_checkpoints(checkpoint_dir(args.inputs[0]))[-args.last :]
            if not paths:
                raise CheckpointError(f"no step_*.pt checkpoints in {checkpoint_dir(args.inputs[0])}")
        else:
            paths = [Path(p) for p in args.inputs]
        average_checkpoints(paths, args.out)
    except CheckpointError as e:
        print(f"attnmt-average: error: {e}", file=sys.stderr)
        sys.exit(2)
    logger.info("averaged %d checkpoints (%s) into %s", len(paths), ", ".join(p.name for p in paths), args.out)


if __name__ == "__main__":
    main()
