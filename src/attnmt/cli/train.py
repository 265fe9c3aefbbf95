"""``attnmt-train [overrides]``: compose ``configs/train.yaml`` with Hydra and train.

    attnmt-train experiment=multi30k_de_en data.root=../shared/data/multi30k
    attnmt-train experiment=multi30k_de_en train.resume=auto          # continue after Ctrl-C
    torchrun --nproc_per_node=4 -m attnmt.cli.train experiment=multi30k_de_en

The run directory (``train.run_dir``) receives ``config.yaml`` (the resolved config), ``train.log``,
``tensorboard/``, ``tokenizer/`` and ``checkpoints/``. Ctrl-C (SIGINT) or SIGTERM writes
``checkpoints/last.pt`` before exiting; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import difflib
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
from attnmt.cli.common import UserError, apply_overrides
from attnmt.config import ConfigError, config_dir, register_configs
from attnmt.data import DataError
from attnmt.tokenizer import TokenizerError
from attnmt.rundir import LOG_FORMAT
from attnmt.training import TrainingError, train

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


def check_command_line(argv: list[str]) -> None:
    """What Hydra would refuse with its own many lines (exit status 1, advising ``+key=``), refused in
    attnmt's one line: an option no ``configs/GROUP/`` folder holds, a key no config has (with the
    closest ones: "did you mean"), a value of the wrong type. Command lines for Hydra itself (flags,
    ``hydra.*``, ``+``/``~`` or ``@package`` overrides) are left to it.

    Raises:
        UserError: naming the argument and what to write instead.
    """
    if any(arg.startswith("-") for arg in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(argv)
    except OverrideParseException as err:
        raise UserError(str(err).splitlines()[0]) from None
    if any(o.type != OverrideType.CHANGE or o.package is not None or o.is_sweep_override()
           or o.key_or_group.split(".")[0] == "hydra" for o in parsed):
        return
    root = config_dir()
    groups = {path.name for path in root.iterdir() if path.is_dir() and any(path.glob("*.yaml"))}
    chosen = [o for o in parsed if o.key_or_group in groups]
    for override in chosen:
        group, option = override.key_or_group, override.value()
        options = sorted(path.stem for path in (root / group).glob("*.yaml"))
        if option is not None and str(option) not in options:
            close = difflib.get_close_matches(str(option), options, n=1)
            hint = f"did you mean {group}={close[0]}? " if close else ""
            raise UserError(f"{override.input_line}: configs/{group}/ has no {option}.yaml; {hint}the options are "
                            f"{', '.join(options)}")
    try:
        with initialize_config_dir(config_dir=str(root), version_base=None):
            cfg = compose(config_name="train", overrides=[o.input_line for o in chosen])
    except Exception:  # a choice Hydra composes otherwise (e.g. decode@...): Hydra itself says what is wrong
        return
    apply_overrides(cfg, [o for o in parsed if o.key_or_group not in groups], "train")


def main() -> None:
    """``attnmt-train``: the command line checked in one line each, then composed and run by Hydra."""
    try:
        check_command_line(sys.argv[1:])
    except UserError as err:  # the line every attnmt command gives a misspelt key (attnmt.cli.common.run_command)
        print(f"attnmt-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="train")
def hydra_main(cfg: DictConfig) -> None:
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
