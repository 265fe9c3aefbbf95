"""``attnmt-train [overrides]``: compose ``configs/train.yaml`` with Hydra and train.

    attnmt-train experiment=multi30k_de_en data.root=../shared/data/multi30k
    attnmt-train experiment=multi30k_de_en train.resume=auto          # continue after Ctrl-C
    torchrun --nproc_per_node=4 -m attnmt.cli.train experiment=multi30k_de_en

The run directory (``train.run_dir``) receives ``config.yaml`` (the resolved config), ``train.log``,
``tensorboard/`` and ``checkpoints/``. Ctrl-C (SIGINT) or SIGTERM writes ``checkpoints/last.pt``
before exiting; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from attnmt import distributed
from attnmt.checkpoint import CheckpointError
from attnmt.cli import config_dir
from attnmt.config import ConfigError, register_configs
from attnmt.data import DataError
from attnmt.training import TrainingError, train

logger = logging.getLogger("attnmt.cli.train")


def setup_logging(run_dir: Path, is_main: bool) -> None:
    """INFO to stderr and to ``run_dir/train.log`` on rank 0; warnings only, to stderr, on other ranks."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    rank = os.environ.get("RANK", "0")
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if is_main else f"[rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format=fmt, handlers=handlers, force=True)


register_configs()


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    is_main = int(os.environ.get("RANK", "0")) == 0
    run_dir = Path(cfg.train.run_dir)
    setup_logging(run_dir, is_main)  # train() writes config.yaml once the config has passed its checks
    run_cfg = OmegaConf.to_object(cfg)
    try:
        with logging_redirect_tqdm():
            result = train(run_cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        # A config, corpus or checkpoint the user can fix: one line naming the key or file, no stack trace.
        logger.error("%s", e)
        sys.exit(2)
    except TrainingError as e:
        # Out of memory, or train.max_bad_steps non-finite losses in a row: the message says what to change.
        logger.error("%s", e)
        sys.exit(1)
    finally:
        distributed.cleanup()
    if result["interrupted"]:
        logger.info("resume with the same command and train.resume=auto (train.run_dir=%s)", run_dir)
        sys.exit(128 + signal.Signals[result["interrupted"]].value)


if __name__ == "__main__":
    main()
