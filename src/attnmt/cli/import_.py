"""``attnmt-import``: a pretrained translation model from transformers as an attnmt checkpoint.

    attnmt-import from=opus-mt-en-de out=models/opus-mt-en-de.pt            # a save_pretrained folder
    attnmt-import from=Helsinki-NLP/opus-mt-en-de out=opus-mt-en-de.pt      # a hub id, where the network allows

Marian (OPUS-MT), M2M100 and NLLB-200 (dense) are read (:mod:`attnmt.pretrained`); the checkpoint
translates, evaluates, averages, exports and fine-tunes (``attnmt-train train.init_from=``) as any
attnmt checkpoint. Another architecture, or an option attnmt cannot compute exactly, ends the command
with one line naming it, before anything is written.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from attnmt.cli.common import UserError, run_command, setup_logging, unknown_key

log = logging.getLogger("attnmt.import")

USAGE = "usage: attnmt-import from=FOLDER_OR_HUB_ID out=FILE.pt [overwrite=true]"
KEYS = ("from", "out", "overwrite")


def arguments(argv: list[str]) -> dict[str, str]:
    """``from``, ``out`` and ``overwrite`` (``true`` or ``false``) of ``key=value`` arguments.

    Raises:
        UserError: a missing, unknown or malformed argument.
    """
    values = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key not in KEYS:  # the other commands' line for a misspelt key
            raise unknown_key(arg, key, list(KEYS), "attnmt-import")
        if not sep or not value:
            raise UserError(f"{arg!r} is not an argument of attnmt-import; {USAGE}")
        if key == "overwrite" and value not in ("true", "false"):
            raise UserError(f"overwrite={value}: write overwrite=true or overwrite=false")
        values[key] = value
    missing = [key for key in ("from", "out") if key not in values]
    if missing:
        raise UserError(f"{' and '.join(k + '=' for k in missing)} required; {USAGE}")
    return values


def run(argv: list[str]) -> None:
    from attnmt.checkpoint import CheckpointError
    from attnmt.pretrained import PretrainedError, import_model, save

    args = arguments(argv)
    out = Path(args["out"])
    if out.is_dir():
        raise UserError(f"out={out} is a folder; give the checkpoint's file name, e.g. out={out / 'model.pt'}")
    if out.exists() and args.get("overwrite") != "true":
        raise UserError(f"out={out} exists; choose another out=, or replace it with overwrite=true")
    try:
        model, tokenizer = import_model(args["from"])
    except PretrainedError as err:
        raise UserError(str(err)) from None
    try:
        save(model, tokenizer, out, args["from"])
    except CheckpointError as err:  # a full disk or a folder that cannot be written
        raise UserError(str(err)) from None
    c = model.cfg
    log.info("imported %s (%s: %d+%d layers, d_model %d, vocabulary %d, %s parameters) into %s",
             args["from"], tokenizer.vocab["family"], c.encoder_layers, c.decoder_layers, c.d_model, c.tgt_vocab_size,
             f"{model.num_parameters():,}", out)
    if tokenizer.languages:
        log.info("languages: %s; translate with src_lang= and tgt_lang=", ", ".join(sorted(tokenizer.languages)[:8])
                 + (f" and {len(tokenizer.languages) - 8} more" if len(tokenizer.languages) > 8 else ""))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        run_command("attnmt-import", lambda: print(f"{USAGE}\n{__doc__}"))  # a reader that leaves (| head) is no error
        return
    setup_logging()
    run_command("attnmt-import", lambda: run(argv))


if __name__ == "__main__":
    main()
