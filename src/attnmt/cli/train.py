"""``attnmt-train [overrides]``: compose ``configs/train.yaml`` with Hydra and train.

    attnmt-train experiment=multi30k_de_en data.root=../shared/data/multi30k
    attnmt-train experiment=multi30k_de_en train.resume=auto          # continue after Ctrl-C
    torchrun --nproc_per_node=4 -m attnmt.cli.train experiment=multi30k_de_en

The run directory (``train.run_dir``) receives ``config.yaml`` (the resolved config), ``train.log``,
``tensorboard/``, ``tokenizer/`` and ``checkpoints/``. Ctrl-C (SIGINT) or SIGTERM writes
``checkpoints/last.pt`` before exiting; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.contrib.logging import logging_redirect_tqdm

from attnmt import distributed
from attnmt.checkpoint import CheckpointError
from attnmt.config import ConfigError, config_dir, register_configs
from attnmt.data import DataError
from attnmt.tokenizer import TokenizerError
from attnmt.training import LOG_FORMAT, TrainingError, train

logger = logging.getLogger("attnmt.cli.train")


def setup_logging(is_main: bool) -> None:
    """INFO to stderr on rank 0 (training adds ``train.log`` once the start is accepted); warnings
    only, on the other ranks. Progress bars only at a terminal: redrawn into a file they fill it."""
    rank = os.environ.get("RANK", "0")
    fmt = LOG_FORMAT if is_main else f"[rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format=fmt, stream=sys.stderr, force=True)
    if not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()


register_configs()


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    is_main = int(os.environ.get("RANK", "0")) == 0
    setup_logging(is_main)
    try:
        try:
            run_cfg = OmegaConf.to_object(cfg)
        except OmegaConfBaseException as err:  # e.g. a data.mix entry without src_lang
            raise ConfigError(str(err).splitlines()[0] + (f" ({err.full_key})" if getattr(err, "full_key", None) else "")) from None
        with logging_redirect_tqdm():
            result = train(run_cfg)
    except (ConfigError, DataError, CheckpointError, TokenizerError) as e:
        # A config, corpus or checkpoint the user can fix: one line naming the key or file, no stack trace.
        logger.error("%s", e)
        sys.exit(2)
    except TrainingError as e:
        # Out of memory, train.max_bad_steps non-finite losses in a row, a full disk: the message says what to do.
        logger.error("%s", e)
        sys.exit(1)
    finally:
        distributed.cleanup()
    if result["interrupted"]:
        logger.info("resume with the same command and train.resume=auto (train.run_dir=%s)", cfg.train.run_dir)
        sys.exit(128 + signal.Signals[result["interrupted"]].value)


if __name__ == "__main__":
    main()
