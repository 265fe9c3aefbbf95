"""``attnmt-evaluate``: a checkpoint's sacreBLEU BLEU and chrF on a test set.

Either ``src=FILE ref=FILE`` or ``split=NAME`` (a split of the checkpoint's own data config, whose
keys ``data.KEY=...`` override, e.g. ``data.root=``). Prints a readable summary and, as the last line
on stdout, one JSON object with ``bleu``, ``chrf``, their signatures, ``n_sentences`` and
``sentences_per_second``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import fields

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from attnmt.checkpoint import CheckpointError, run_config
from attnmt.cli.common import UserError, config_command, output_file, setup_logging, take_arguments, to_config
from attnmt.config import ConfigError, DecodeConfig, EvaluateConfig, trained_data_config
from attnmt.decoding import strategy
from attnmt.device import resolve_device
from attnmt.evaluation import translate_and_score
from attnmt.export import ExportError
from attnmt.inference import capabilities_of, check_capabilities, open_engine
from attnmt.textfiles import DataError, read_lines
from attnmt.tokenizer import TokenizerError

log = logging.getLogger("attnmt.evaluate")


def test_set(cfg: EvaluateConfig, trained_config: dict, data_overrides: list[str],
             ) -> tuple[list[str], list[str], str, tuple[str | None, str | None]]:
    """Sources, raw references, a name for the summary, and the direction (source and target
    language, None where unknown).

    ``data_overrides`` are the command line's ``data.KEY=VALUE`` items, applied to the checkpoint's
    own data config when a ``split`` is evaluated; ``src_lang``/``tgt_lang`` pick the split's
    direction where the config has several.
    """
    trained = trained_config["data"]
    if cfg.split is None:
        if cfg.src is None or cfg.ref is None:
            raise UserError("give src=FILE and ref=FILE, or split=NAME (a split of the checkpoint's data config)")
        sources, references = read_lines(cfg.src), read_lines(cfg.ref)
        if len(sources) != len(references):
            raise UserError(f"src={cfg.src} has {len(sources)} lines but ref={cfg.ref} has {len(references)}; "
                            "they must be line-aligned")
        if trained is None:  # an imported model (attnmt-import) was trained on no data of ours
            return sources, references, cfg.src, (cfg.src_lang, cfg.tgt_lang)
        data_cfg = trained_data_config(trained)
        own = [langs[0] if len(langs) == 1 else None
               for langs in (data_cfg.source_languages(), data_cfg.target_languages())]
        return sources, references, cfg.src, (cfg.src_lang or own[0], cfg.tgt_lang or own[1])
    if cfg.src is not None or cfg.ref is not None:
        raise UserError("give either split=NAME or src=/ref= files, not both")
    if trained is None:
        raise UserError(f"split={cfg.split}: this checkpoint was imported (attnmt-import) and has no data config; "
                        "give src=FILE ref=FILE")
    try:
        overrides = OmegaConf.from_dotlist([item.removeprefix("data.") for item in data_overrides])
        data_cfg = trained_data_config(trained, overrides)
    except OmegaConfBaseException as err:
        raise UserError(f"{' '.join(data_overrides)}: {str(err).splitlines()[0]} (the keys are those of DataConfig, "
                        "e.g. data.root=FOLDER)") from None
    from attnmt.data import direction, load_references, load_split  # HF datasets: only for a split

    stream = direction(data_cfg, cfg.src_lang, cfg.tgt_lang)
    split = load_split(stream.cfg, cfg.split, train=False)
    return (list(split["src"]), load_references(stream.cfg, cfg.split), f"split {cfg.split}",
            (stream.cfg.src_lang, stream.cfg.tgt_lang))


def run(cfg: EvaluateConfig, data_overrides: list[str]) -> None:
    cfg.check()
    check_capabilities(cfg.engine, capabilities_of(cfg.engine), cfg)  # before the checkpoint and test set are read
    device = resolve_device(cfg.device, key="device")
    paths = list(cfg.ckpt) if isinstance(cfg.ckpt, (list, tuple)) else [cfg.ckpt]
    sources, references, name, (src_lang, tgt_lang) = test_set(cfg, run_config(paths[-1]), data_overrides)
    if not sources:
        raise UserError(f"{name} has no lines to evaluate")
    pair = f"{src_lang or '?'}-{tgt_lang or '?'}"
    # Entered before the model loads: a hyp= that would destroy an input is refused before any work.
    hyp_file = (contextlib.nullcontext() if cfg.hyp is None
                else output_file(cfg.hyp, "hyp", {"src": cfg.src, "ref": cfg.ref, "ckpt": paths}))
    with hyp_file as f:
        engine = open_engine(cfg, paths, device, src_lang=src_lang, tgt_lang=tgt_lang)
        with tqdm(total=len(sources), unit="sent", desc="translating", file=sys.stderr, disable=None) as bar:
            hypotheses, scores, seconds = translate_and_score(engine, sources, references, cfg, tgt_lang,
                                                              cfg.bleu_tokenize, on_batch=bar.update)
        if f is not None:
            f.writelines(h + "\n" for h in hypotheses)

    result = {
        **scores,
        "bleu": round(scores["bleu"], 2),
        "chrf": round(scores["chrf"], 2),
        "n_sentences": len(sources),
        "sentences_per_second": round(len(sources) / seconds, 2),
        "ckpt": paths,
        "test_set": name,
        "direction": pair,
        "beam_size": cfg.beam_size,
        "len_penalty": cfg.len_penalty,
        "engine": cfg.engine,
        "strategy": strategy(cfg).name,
        "decode": {f.name: getattr(cfg, f.name) for f in fields(DecodeConfig)},  # every search setting
    }
    print(f"{name} ({pair}): {len(sources)} sentences in {seconds:.1f} s ({result['sentences_per_second']} sent/s)")
    print(f"BLEU = {scores['bleu']:.2f}  ({scores['bleu_signature']})")
    print(f"chrF = {scores['chrf']:.2f}  ({scores['chrf_signature']})")
    if cfg.hyp is not None:
        print(f"hypotheses written to {cfg.hyp}")
    print(json.dumps(result, ensure_ascii=False))


def main() -> None:
    # data.KEY=VALUE items override keys of the checkpoint's data config, which is not composed here:
    # taken before the rest is, and checked against DataConfig by test_set().
    argv, data_overrides = take_arguments(sys.argv[1:], "data.")
    setup_logging()
    config_command("evaluate", EvaluateConfig, lambda cfg: run(to_config(cfg), data_overrides), argv,
                   (CheckpointError, ConfigError, DataError, ExportError, TokenizerError))


if __name__ == "__main__":
    main()
