"""``attnmt-export``: write a checkpoint for another inference library.

    attnmt-export ckpt=runs/quickstart/checkpoints/best.pt to=ctranslate2 out=quickstart-ct2 [quantization=int8]
    attnmt-export ckpt=runs/quickstart/checkpoints/best.pt to=hf out=quickstart-hf

``to=ctranslate2`` writes a CTranslate2 model directory (``attnmt.export.ctranslate2``), ``to=hf`` a
folder that ``transformers``' ``AutoModelForSeq2SeqLM`` and ``AutoTokenizer`` load
(``attnmt.export.hf``); each holds a README saying how to run it. A model option the target cannot
express ends the command with one line naming it, before anything is written.
"""

from __future__ import annotations

import logging

import sys
from omegaconf import DictConfig, OmegaConf

from attnmt import install_hint
from attnmt.checkpoint import CheckpointError, load_for_inference
from attnmt.cli.common import UserError, config_command, setup_logging, to_config
from attnmt.config import ExportConfig
from attnmt.export import ExportError, check_new_directory

log = logging.getLogger("attnmt.export")

TARGETS = {"ctranslate2": ("ctranslate2", "ct2"), "hf": ("transformers", "hf")}  # to= -> (package, extra)


def run(cfg: ExportConfig) -> None:
    if cfg.to not in TARGETS:
        raise UserError(f"to={cfg.to} is unknown; use to=ctranslate2 or to=hf")
    if cfg.quantization is not None and cfg.to != "ctranslate2":
        raise UserError(f"quantization={cfg.quantization} applies to to=ctranslate2 only")
    check_new_directory(cfg.out)  # before the checkpoint is read: a refusal should come at once
    package, extra = TARGETS[cfg.to]
    try:
        __import__(package)
    except ImportError:
        raise UserError(f"to={cfg.to} needs {package}: {install_hint(extra)}") from None
    paths = list(cfg.ckpt) if isinstance(cfg.ckpt, (list, tuple)) else [cfg.ckpt]
    model, tokenizer, run_config = load_for_inference(paths, "cpu")
    if cfg.to == "ctranslate2":
        from attnmt.export import ctranslate2

        out = ctranslate2.export(model, tokenizer, cfg.out, cfg.quantization, checkpoints=paths, run_config=run_config)
    else:
        from attnmt.export import hf

        out = hf.export(model, tokenizer, cfg.out)
    log.info("wrote %s (see its README.md)", out)


def export_config(cfg: DictConfig) -> ExportConfig:
    for key, example in (("to", "to=ctranslate2"), ("out", "out=quickstart-ct2")):
        if OmegaConf.is_missing(cfg, key):
            raise UserError(f"{key}= is required, e.g. {example}")
    return to_config(cfg)


def main() -> None:
    setup_logging()
    config_command("export", ExportConfig, lambda cfg: run(export_config(cfg)), sys.argv[1:],
                   (CheckpointError, ExportError))


if __name__ == "__main__":
    main()
