"""``attnmt-translate``: translate sentences from stdin, a file, or the command line.

Exactly one output line per input line, in input order (an empty line gives an empty line). With
``nbest=N`` each input line gives N lines ``INDEX ||| TRANSLATION ||| SCORE``, INDEX counting input
lines from 0 and SCORE being the length-normalised log-probability, best first.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from attnmt import install_hint
from attnmt.checkpoint import CheckpointError
from attnmt.cli.common import (
    UserError, available_chunks, config_command, exit_at_once, iter_lines, open_input, output_file, setup_logging,
    take_arguments, to_config,
)
from attnmt.config import ConfigError, TranslateConfig
from attnmt.device import resolve_device
from attnmt.export import ExportError
from attnmt.inference import Engine, Translation, capabilities_of, check_capabilities, encode_sources, open_engine
from attnmt.tokenizer import TokenizerError

log = logging.getLogger("attnmt.translate")


def format_translation(index: int, translation: Translation, nbest: int) -> str:
    """The output line(s) of one input line, without the final newline."""
    if nbest == 1:
        return translation.texts[0]
    return "\n".join(f"{index} ||| {text} ||| {score:.4f}" for text, score in zip(translation.texts, translation.scores))


def input_lines(cfg: TranslateConfig) -> tuple[Iterator[str], bool]:
    """The input's lines, and whether a person is typing them."""
    if cfg.text is not None:
        texts = [cfg.text] if isinstance(cfg.text, str) else [str(t) for t in cfg.text]
        return iter(texts), False
    if cfg.input is not None:
        return iter_lines(open_input(cfg.input), cfg.input), False
    if sys.stdin.isatty():
        return prompt_lines(), True
    return iter_lines(sys.stdin.buffer, "<stdin>"), False


def prompt_lines() -> Iterator[str]:
    """Lines typed at a ``> `` prompt (on stderr, so stdout stays clean) until end of input."""
    print("attnmt-translate: type a sentence and press Enter; Ctrl-D ends.", file=sys.stderr)
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def plot_attention(cfg: TranslateConfig, engine: Engine, line_number: int, line: str, translation: Translation) -> None:
    from attnmt.plots import attention_figure, missing_glyphs_allowed

    tokenizer = engine.tokenizer
    src_ids = encode_sources(tokenizer, [line], engine.backend.max_positions, line_number, engine.prefix)[0]
    tgt_ids = translation.tokens[0]
    if not src_ids:
        return
    weights = engine.backend.cross_attention(src_ids, tgt_ids, cfg.attention_layer)
    layer = "mean over layers and heads" if cfg.attention_layer is None else f"layer {cfg.attention_layer}, mean over heads"
    # Labels from the ids the model saw (normalised, truncated), EOS last on both axes.
    fig = attention_figure(weights, tokenizer.src_pieces(src_ids), tokenizer.tgt_pieces(tgt_ids + [tokenizer.eos_id]),
                           title=f"line {line_number}: {layer}")
    with missing_glyphs_allowed():
        fig.savefig(Path(cfg.attention_plot) / f"line{line_number:06d}.png")
    import matplotlib.pyplot as plt

    plt.close(fig)


def run(cfg: TranslateConfig) -> None:
    cfg.check()
    check_capabilities(cfg.engine, capabilities_of(cfg.engine), cfg)  # before anything is read, made or loaded
    if cfg.buffer_lines < 1:
        raise UserError(f"buffer_lines={cfg.buffer_lines} must be at least 1")
    if cfg.attention_plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError(f"attention_plot needs matplotlib: {install_hint('plot')}") from None
        Path(cfg.attention_plot).mkdir(parents=True, exist_ok=True)
    lines, interactive = input_lines(cfg)
    device = resolve_device(cfg.device, key="device")
    paths = list(cfg.ckpt) if isinstance(cfg.ckpt, (list, tuple)) else [cfg.ckpt]
    # A file appears whole, once every line is translated (a failure leaves an existing one as it was);
    # stdout gets each chunk as soon as it is translated.
    output = (contextlib.nullcontext(sys.stdout) if cfg.output is None
              else output_file(cfg.output, "output", {"input": cfg.input, "ckpt": paths}))
    n_lines = 0
    with output as out:  # entered first: an output that would destroy an input is refused before any work
        engine = open_engine(cfg, paths, device)
        if cfg.attention_plot is not None and cfg.attention_layer is not None:
            layers = len(engine.backend.model.decoder_layers)
            if not 0 <= cfg.attention_layer < layers:
                raise UserError(f"attention_layer={cfg.attention_layer} is not a layer of this {layers}-layer decoder")
        for chunk in available_chunks(lines, 1 if interactive else cfg.buffer_lines):
            translations = engine.translate(chunk, cfg, first_line=n_lines + 1)
            for offset, (line, translation) in enumerate(zip(chunk, translations)):
                out.write(format_translation(n_lines + offset, translation, cfg.nbest) + "\n")
                if cfg.attention_plot is not None:
                    plot_attention(cfg, engine, n_lines + offset + 1, line, translation)
            out.flush()
            n_lines += len(chunk)
    log.info("translated %d lines%s", n_lines, "" if cfg.output is None else f" into {cfg.output}")


def main() -> None:
    # text= arguments are input lines exactly as typed, which Hydra's grammar would read as values of
    # its own language: taken before the rest is composed.
    argv, texts = take_arguments(sys.argv[1:], "text=")
    setup_logging()
    config_command("translate", TranslateConfig, lambda cfg: run(with_texts(to_config(cfg), texts)), argv,
                   (CheckpointError, ConfigError, ExportError, TokenizerError))


def with_texts(cfg: TranslateConfig, texts: list[str]) -> TranslateConfig:
    """``cfg`` translating the ``text=...`` arguments, if there are any."""
    if texts:
        cfg.text = [arg.removeprefix("text=") for arg in texts]
    return cfg


console_main = exit_at_once(main)  # attnmt-translate; tests call main() in-process

if __name__ == "__main__":
    console_main()
