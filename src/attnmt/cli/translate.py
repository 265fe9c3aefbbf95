"""``attnmt-translate``: translate sentences from stdin, a file, or the command line.

Exactly one output line per input line, in input order (an empty line gives an empty line). With
``nbest=N`` each input line gives N lines ``INDEX ||| TRANSLATION ||| SCORE``, INDEX counting input
lines from 0 and SCORE being the length-normalised log-probability, best first.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig

from attnmt.checkpoint import CheckpointError, load_for_inference
from attnmt.cli.common import (
    UserError, available_chunks, check_engine, ctranslate2_engine, iter_lines, open_input, run_command, setup_logging,
    take_arguments, to_config,
)
from attnmt.config import ConfigError, TranslateConfig, config_dir, register_configs
from attnmt.export import ExportError
from attnmt.device import resolve_device
from attnmt.evaluation import (
    Translation, attention_figure, cross_attention, encode_sources, missing_glyphs_allowed, translate,
)
from attnmt.tokenizer import EOS_ID

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


def plot_attention(cfg: TranslateConfig, model, tokenizer, line_number: int, line: str, translation: Translation) -> None:
    src_ids = encode_sources(tokenizer, [line], model.cfg.max_positions, line_number)[0]
    tgt_ids = translation.tokens[0]
    if not src_ids:
        return
    weights = cross_attention(model, src_ids, tgt_ids, cfg.attention_layer)
    layer = "mean over layers and heads" if cfg.attention_layer is None else f"layer {cfg.attention_layer}, mean over heads"
    # Labels from the ids the model saw (normalised, truncated), EOS last on both axes.
    fig = attention_figure(weights, tokenizer.src_pieces(src_ids), tokenizer.tgt_pieces(tgt_ids + [EOS_ID]),
                           title=f"line {line_number}: {layer}")
    with missing_glyphs_allowed():
        fig.savefig(Path(cfg.attention_plot) / f"line{line_number:06d}.png")
    import matplotlib.pyplot as plt

    plt.close(fig)


def run(cfg: TranslateConfig) -> None:
    cfg.check()
    check_engine(cfg.engine, cfg.compute_type)
    if cfg.attention_plot is not None and cfg.engine != "native":
        raise UserError(f"attention_plot needs engine=native (engine={cfg.engine} returns no attention weights)")
    if cfg.buffer_lines < 1:
        raise UserError(f"buffer_lines={cfg.buffer_lines} must be at least 1")
    if cfg.attention_plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("attention_plot needs matplotlib: pip install 'attnmt[plot]'") from None
        Path(cfg.attention_plot).mkdir(parents=True, exist_ok=True)
    lines, interactive = input_lines(cfg)
    device = resolve_device(cfg.device, key="device")
    paths = list(cfg.ckpt) if isinstance(cfg.ckpt, (list, tuple)) else [cfg.ckpt]
    if cfg.engine == "ctranslate2":
        translate_lines = ctranslate2_engine(paths, device, cfg.compute_type).translate
    else:
        model, tokenizer, _ = load_for_inference(paths, device)
        translate_lines = partial(translate, model, tokenizer)
        if cfg.attention_plot is not None and cfg.attention_layer is not None and not 0 <= cfg.attention_layer < len(model.decoder_layers):
            raise UserError(f"attention_layer={cfg.attention_layer} is not a layer of this {len(model.decoder_layers)}-layer decoder")

    out = sys.stdout if cfg.output is None else open(cfg.output, "w", encoding="utf-8")
    n_lines = 0
    try:
        for chunk in available_chunks(lines, 1 if interactive else cfg.buffer_lines):
            translations = translate_lines(chunk, cfg, first_line=n_lines + 1)
            for offset, (line, translation) in enumerate(zip(chunk, translations)):
                out.write(format_translation(n_lines + offset, translation, cfg.nbest) + "\n")
                if cfg.attention_plot is not None:
                    plot_attention(cfg, model, tokenizer, n_lines + offset + 1, line, translation)
            out.flush()  # each chunk is out as soon as it is translated
            n_lines += len(chunk)
    finally:
        if out is not sys.stdout:
            out.close()
    log.info("translated %d lines", n_lines)


# The text= arguments of this command line, set by main(): each is one input line exactly as typed,
# which Hydra's override grammar would read as a value of its own language.
_texts: list[str] = []


@hydra.main(config_path=str(config_dir()), config_name="translate", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    setup_logging()

    def body() -> None:
        translate_cfg = to_config(cfg)
        if _texts:
            translate_cfg.text = list(_texts)
        run(translate_cfg)

    run_command("attnmt-translate", body, (CheckpointError, ConfigError, ExportError))


def main() -> None:
    global _texts
    sys.argv[1:], texts = take_arguments(sys.argv[1:], "text=")
    _texts = [arg.removeprefix("text=") for arg in texts]
    _main()


register_configs()

if __name__ == "__main__":
    main()
