"""Every config in configs/ composes with Hydra, converts to its dataclasses, and passes the start checks
(the idea of lightning-hydra-template's tests/test_configs.py); a misspelt key fails at compose time."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from attnmt.cli.common import UserError, compose_cli
from attnmt.config import ConfigError, EvaluateConfig, ServeConfig, TrainRunConfig, TranslateConfig, config_dir, register_configs
from attnmt.config import compose as compose_shipped
from attnmt.config import check_config, max_sentence_tokens

CONFIG_DIR = config_dir()


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.fixture
def hydra_config_dir():
    """Initialise Hydra on the repository's config tree; leave it clean afterwards."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        yield CONFIG_DIR
    GlobalHydra.instance().clear()


def compose_train(overrides: list[str]) -> TrainRunConfig:
    cfg = compose(config_name="train", overrides=overrides)
    run_cfg = OmegaConf.to_object(cfg)
    assert isinstance(run_cfg, TrainRunConfig)
    return run_cfg


def written_values(path: Path) -> dict:
    """What a shipped YAML file sets, read here without Hydra: its own keys over those of the files its
    ``defaults`` list names (``- adamw`` in its group, ``decode@_here_: beam``), interpolations resolved;
    schemas, ``hydra`` and Hydra's own overrides left out."""
    raw = OmegaConf.load(path)
    merged = OmegaConf.create()
    for entry in raw.get("defaults", []):
        if isinstance(entry, str) and entry not in ("_self_",) and not entry.endswith("schema"):
            merged = OmegaConf.merge(merged, OmegaConf.create(written_values(path.parent / f"{entry}.yaml")))
        elif not isinstance(entry, str):
            (key, option), = entry.items()
            if key.endswith("@_here_"):
                group = key.removesuffix("@_here_")
                merged = OmegaConf.merge(merged, OmegaConf.create(written_values(CONFIG_DIR / group / f"{option}.yaml")))
    own = OmegaConf.masked_copy(raw, [k for k in raw if k not in ("defaults", "hydra")])
    return OmegaConf.to_container(OmegaConf.merge(merged, own), resolve=True)


def assert_carries(obj, values: dict, where: str) -> None:
    """Every value in ``values`` is the one the composed dataclass ``obj`` holds."""
    for key, value in values.items():
        got = getattr(obj, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(got):
            assert_carries(got, value, f"{where}.{key}")
        elif isinstance(value, list):
            assert list(got) == value, f"{where}.{key}: {got!r}, the file says {value!r}"
        else:
            assert got == value, f"{where}.{key}: {got!r}, the file says {value!r}"


def test_every_group_has_options():
    # A glob that silently matched nothing would make the parametrised tests below vacuous.
    for group in ("experiment", "model", "data", "optim"):
        assert group_options(group), f"no configs in {CONFIG_DIR / group}"


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_train_with_each_experiment(hydra_config_dir, experiment):
    run_cfg = compose_train([f"experiment={experiment}"])
    check_config(run_cfg.model, run_cfg.optim, run_cfg.train, max_sentence_tokens(run_cfg.data))
    # Recipes fix their run directory, so train.resume=auto finds the run again.
    assert "${" not in run_cfg.train.run_dir and "now" not in run_cfg.train.run_dir
    assert run_cfg.train.max_steps > 0
    assert run_cfg.data.src_lang != run_cfg.data.tgt_lang


def test_language_direction_of_the_multi30k_recipes(hydra_config_dir):
    de_en = compose_train(["experiment=multi30k_de_en"])
    en_de = compose_train(["experiment=multi30k_en_de"])
    assert (de_en.data.src_lang, de_en.data.tgt_lang) == ("de", "en")
    assert (en_de.data.src_lang, en_de.data.tgt_lang) == ("en", "de")
    assert de_en.train.run_dir != en_de.train.run_dir


@pytest.mark.parametrize("model", group_options("model"))
def test_train_with_each_model(hydra_config_dir, model):
    run_cfg = compose_train([f"model={model}"])
    check_config(run_cfg.model, run_cfg.optim, run_cfg.train, max_sentence_tokens(run_cfg.data))
    assert run_cfg.model.src_vocab_size == run_cfg.model.tgt_vocab_size == 0  # filled in from the tokenizer


@pytest.mark.parametrize("data", group_options("data"))
def test_train_with_each_data_config(hydra_config_dir, data):
    run_cfg = compose_train([f"data={data}"])
    check_config(run_cfg.model, run_cfg.optim, run_cfg.train, max_sentence_tokens(run_cfg.data))
    values = written_values(CONFIG_DIR / "data" / f"{data}.yaml")
    assert {"train", "valid", "test"} <= set(values["splits"]) and values["src_lang"] != values["tgt_lang"]
    assert values["tokenizer"]["vocab_size"] >= 1000  # a real vocabulary, not a test's
    assert_carries(run_cfg.data, values, f"data={data}")


@pytest.mark.parametrize("optim", group_options("optim"))
def test_train_with_each_optim(hydra_config_dir, optim):
    run_cfg = compose_train([f"optim={optim}"])
    check_config(run_cfg.model, run_cfg.optim, run_cfg.train, max_sentence_tokens(run_cfg.data))
    values = written_values(CONFIG_DIR / "optim" / f"{optim}.yaml")
    assert values["schedule"] in ("inverse_sqrt", "cosine") and values["lr"] > 0
    assert_carries(run_cfg.optim, values, f"optim={optim}")


@pytest.mark.parametrize("freeze, said", [
    ("[embeddings,encoder]", None),
    ("[embedding]", r"embedding is no parameter group; use embeddings, encoder, decoder"),
    ("[encoder,encoder,decoder,embeddings]", r"freezes every parameter: nothing would train"),
])
def test_freeze_takes_parameter_groups_and_leaves_something_to_train(hydra_config_dir, freeze, said):
    run_cfg = compose_train([f"train.freeze={freeze}"])
    check = lambda: check_config(run_cfg.model, run_cfg.optim, run_cfg.train, max_sentence_tokens(run_cfg.data))  # noqa: E731
    if said is None:
        check()
    else:
        with pytest.raises(ConfigError, match=said):
            check()


def test_hydra_writes_nothing_and_leaves_the_run_dir_to_attnmt(hydra_config_dir):
    cfg = compose(config_name="train", overrides=["train.run_dir=/tmp/somewhere"], return_hydra_config=True)
    assert cfg.hydra.run.dir == "."  # attnmt creates train.run_dir, with its own errors
    assert cfg.hydra.output_subdir is None  # attnmt writes config.yaml itself
    assert cfg.hydra.job.chdir is False  # relative data paths stay relative to where the command started


def test_command_line_overrides_reach_the_dataclasses(hydra_config_dir):
    run_cfg = compose_train(["model=tiny", "model.n_heads=4", "optim.lr=7e-4", "train.max_tokens=2048",
                             "data.root=/data/x", "data.tokenizer.vocab_size=3000"])
    assert run_cfg.model.n_heads == 4 and run_cfg.model.d_model == 64
    assert run_cfg.optim.lr == pytest.approx(7e-4)
    assert run_cfg.train.max_tokens == 2048
    assert run_cfg.data.root == "/data/x" and run_cfg.data.tokenizer.vocab_size == 3000


@pytest.mark.parametrize("name, schema", [("evaluate", EvaluateConfig), ("translate", TranslateConfig),
                                          ("serve", ServeConfig)])
def test_evaluate_and_translate_compose(hydra_config_dir, name, schema):
    cfg = compose(config_name=name, overrides=["ckpt=runs/x/checkpoints/best.pt"])
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, schema)
    assert obj.ckpt == "runs/x/checkpoints/best.pt"
    values = written_values(CONFIG_DIR / f"{name}.yaml")
    assert values["beam_size"] == 5 and values["beam_stop"] == "finished"  # decode/beam.yaml: the shipped search
    values.pop("ckpt")  # ???: given above
    assert_carries(obj, values, name)


@pytest.mark.parametrize("override", ["train.max_step=10", "model.d_modle=64", "optim.learning_rate=1e-3",
                                      "data.tokenizer.vocab=100", "beam=4"])
def test_misspelt_key_on_the_command_line_fails_at_compose(hydra_config_dir, override):
    key = override.split("=")[0].rsplit(".", 1)[-1]
    with pytest.raises(ConfigCompositionException, match=key):
        compose(config_name="train", overrides=[override])


def test_wrong_type_fails_at_compose(hydra_config_dir):
    with pytest.raises(ConfigCompositionException, match="max_steps"):
        compose(config_name="train", overrides=["train.max_steps=many"])


@pytest.fixture
def config_tree_with_a_typo(tmp_path) -> Path:
    tree = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, tree)
    (tree / "experiment" / "typo.yaml").write_text("# @package _global_\ntrain:\n  max_step: 500\n")
    return tree


def test_misspelt_key_in_a_yaml_file_fails_at_compose(config_tree_with_a_typo):
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_tree_with_a_typo), version_base=None):
            with pytest.raises(ConfigCompositionException, match=r"experiment/typo(.|\n)*train\.max_step"):
                compose(config_name="train", overrides=["experiment=typo"])
    finally:
        GlobalHydra.instance().clear()


def test_missing_checkpoint_fails_at_conversion(hydra_config_dir):
    cfg = compose(config_name="translate")
    with pytest.raises(MissingMandatoryValue, match="ckpt"):
        OmegaConf.to_object(cfg)


@pytest.mark.parametrize("override, key", [
    ("model.activation=swish", "model.activation"), ("model.positions=rotary", "model.positions"),
    ("optim.schedule=linear", "optim.schedule"), ("data.tokenizer.model_type=wordpiece", "data.tokenizer.model_type"),
    ("data.format=csv", "data.format"), ("train.precision=fp8", "train.precision"),
])
def test_a_value_outside_an_options_set_fails_when_the_config_is_converted(hydra_config_dir, override, key):
    from attnmt.config import ConfigError

    cfg = compose(config_name="train", overrides=[override])
    with pytest.raises(ConfigError, match=rf"{key}='\w+' is unknown; use one of "):
        OmegaConf.to_object(cfg)


def test_defaults_live_in_the_yaml_files_only():
    """No schema carries a default of its own, so what Python code and tests build is what users get."""
    import dataclasses

    from attnmt import config

    schemas = [config.ModelConfig, config.OptimConfig, config.TokenizerConfig, config.DataConfig, config.DecodeConfig,
               config.TrainConfig, config.TrainRunConfig, config.TranslateConfig, config.EvaluateConfig]
    for schema in schemas:
        with_default = [f.name for f in dataclasses.fields(schema)
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not with_default, (schema.__name__, with_default)


def test_a_data_mix_entry_needs_only_its_source_and_languages(hydra_config_dir):
    """The items of data.mix get no defaults from a YAML file (CorpusConfig, the one schema with defaults
    of its own, holds them): an entry names its folder and languages, and bad ones fail with the key."""
    from attnmt.config import ConfigError, CorpusConfig

    cfg = OmegaConf.to_object(compose(config_name="train", overrides=["data.mix=[{root: bt, src_lang: en, tgt_lang: de}]"]))
    assert cfg.data.mix == [CorpusConfig(src_lang="en", tgt_lang="de", format="folder", root="bt", hub_id=None,
                                         hub_config=None, split="train", weight=1.0, tag=None)]
    for entry, message in (("{src_lang: en, tgt_lang: de}", r"data.mix\[0\]: format=folder reads from a folder"),
                           ("{format: hub, src_lang: en, tgt_lang: de}", r"data.mix\[0\]: format=hub needs hub_id"),
                           ("{root: bt, src_lang: en, tgt_lang: de, tag: '<bt>'}", r"data.mix\[0\].tag='<bt>' must be"),
                           ("{root: bt, src_lang: en, tgt_lang: de, weight: -1}", r"data.mix\[0\].weight=-1.0 must not")):
        with pytest.raises(ConfigError, match=message):
            OmegaConf.to_object(compose(config_name="train", overrides=[f"data.mix=[{entry}]"]))


@pytest.mark.parametrize("tag", ["a,b", "s", "unk", "pad", "/s", "2de", "0x41", "b t", "bt\u00e9"])
def test_a_data_mix_tag_that_is_no_plain_identifier_or_names_a_special_token_is_refused(hydra_config_dir, tag):
    # "a,b" would be split by SentencePiece's list of symbols, "s" becomes <s> (BOS), "2de" a language tag,
    # "0x41" a byte piece.
    from attnmt.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.mix\[0\]\.tag=.* must be a plain identifier"):
        OmegaConf.to_object(compose(config_name="train", overrides=[
            f"data.mix=[{{root: bt, src_lang: en, tgt_lang: de, tag: '{tag}'}}]"]))
    ok = OmegaConf.to_object(compose(config_name="train", overrides=[
        "data.mix=[{root: bt, src_lang: en, tgt_lang: de, tag: bt_2}]"]))
    assert ok.data.mix[0].tag == "bt_2"


@pytest.mark.parametrize("override, key", [
    ("optim.lr=nan", "optim.lr"), ("optim.betas=[0.9,nan]", "optim.betas"), ("model.dropout=inf", "model.dropout"),
    ("data.temperature=nan", "data.temperature"), ("data.max_len_ratio=-inf", "data.max_len_ratio"),
    ("train.ema_decay=nan", "train.ema_decay"), ("train.max_hours=inf", "train.max_hours"),
    ("data.mix=[{root: bt, src_lang: en, tgt_lang: de, weight: nan}]", r"data.mix\[0\].weight"),
    ("data.mix=[{root: bt, src_lang: en, tgt_lang: de, weight: inf}]", r"data.mix\[0\].weight"),
    ("train.valid_decode.len_penalty=nan", "train.valid_decode.len_penalty"),
])
def test_a_non_finite_training_value_is_refused_before_any_work(hydra_config_dir, override, key):
    # nan passes every range check (nan < 0 is false): each float is checked for finiteness by itself.
    from attnmt.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^{key}=.*(nan|inf).* must (be a finite number|hold finite numbers only)"):
        run_cfg = OmegaConf.to_object(compose(config_name="train", overrides=[override]))
        check_config(run_cfg.model, run_cfg.optim, run_cfg.train, max_sentence_tokens(run_cfg.data))


@pytest.mark.parametrize("overrides, key", [
    (["sampling=true", "temperature=inf"], "temperature"), (["len_penalty=nan"], "len_penalty"),
    (["max_len_a=nan"], "max_len_a"), (["sampling=true", "top_p=nan"], "top_p"),
])
def test_a_non_finite_decoding_value_is_refused_at_check(hydra_config_dir, overrides, key):
    from attnmt.config import ConfigError

    for name in ("translate", "evaluate"):
        cfg = OmegaConf.to_object(compose(config_name=name, overrides=["ckpt=x.pt", *overrides]))
        with pytest.raises(ConfigError, match=rf"^{key}=(nan|inf) must be a finite number"):
            cfg.check()


def test_a_length_penalty_that_overflows_is_refused_and_one_at_the_edge_is_not(hydra_config_dir):
    from attnmt.config import ConfigError

    with pytest.raises(ConfigError, match=r"len_penalty=1e\+30 is out of range"):
        OmegaConf.to_object(compose(config_name="translate", overrides=["ckpt=x.pt", "len_penalty=1e30"])).check()
    OmegaConf.to_object(compose(config_name="translate", overrides=["ckpt=x.pt", "len_penalty=-100"])).check()


def test_epoch_shares_stay_finite_at_extreme_weights_and_temperatures():
    from attnmt.data import shares

    for weights, temperature in (([1.0, 1e308], 1.0), ([1.0, 1.0], 0.001), ([1e-300, 1.0], 1e6), ([0.0, 2.0], 5.0)):
        got = shares([29_000, 1_000], weights, temperature)
        assert np.isfinite(got).all() and got.sum() == pytest.approx(1.0), (weights, temperature, got)
    assert shares([29_000, 1_000], [1.0, 1.0], 0.001)[0] == pytest.approx(1.0)  # T -> 0: the largest takes all
    assert shares([29_000, 1_000], [1.0, 1.0], 1.0) == pytest.approx([0.9667, 0.0333], abs=1e-4)


def test_best_metric_names_a_direction_of_the_data(hydra_config_dir):
    from attnmt.config import ConfigError

    ok = OmegaConf.to_object(compose(config_name="train", overrides=["data.langs=[en,de]", "train.best_metric=de-en"]))
    assert ok.train.best_metric == "de-en"
    with pytest.raises(ConfigError, match="train.best_metric='en_de' is neither mean nor a direction of the data: de-en"):
        OmegaConf.to_object(compose(config_name="train", overrides=["train.best_metric=en_de"]))


def test_python_code_composes_what_the_command_gets(hydra_config_dir):
    from attnmt.config import compose as compose_config

    GlobalHydra.instance().clear()  # compose() initialises Hydra itself
    ours = compose_config("train", ["model=tiny", "train.max_steps=7"])
    assert isinstance(ours, TrainRunConfig) and ours.train.max_steps == 7 and ours.model.d_model == 64
    assert ours.train.valid_decode.beam_size == 1  # validation searches greedily by default
    translate = compose_config("translate", ["ckpt=x.pt"])
    assert translate.beam_size == 5 and translate.ckpt == "x.pt"


FAST_COMMAND_LINES = [
    ["ckpt=runs/x/checkpoints/best.pt"],
    ["ckpt=[a.pt,b.pt]", "beam_size=2", "nbest=2", "len_penalty=0.6", "max_tokens=100"],
    ["ckpt=x.pt", "input=in.de", "output=null", "device=cpu", "attention_layer=1", "max_len_a=0", "min_len=3"],
    ["ckpt='my model.pt'", "buffer_lines=7", "attention_plot=/tmp/plots", "max_len_b=20"],
]


@pytest.mark.parametrize("overrides", FAST_COMMAND_LINES)
def test_translate_composes_without_hydra_as_hydra_does(overrides):
    fast = compose_cli("translate", TranslateConfig, overrides)
    assert fast is not None, "the shipped translate.yaml must take the fast path"
    assert OmegaConf.to_object(fast) == compose_shipped("translate", overrides)


@pytest.mark.parametrize("overrides", [["ckpt=x.pt"], ["ckpt=[a.pt,b.pt]", "port=0", "host=0.0.0.0", "beam_size=2",
                                                        "batch_wait_ms=0.5", "max_lines=10", "engine=ctranslate2"],
                                       ["ckpt=x.pt", "batching=continuous", "max_rows=64"]])
def test_serve_composes_without_hydra_as_hydra_does(overrides):
    fast = compose_cli("serve", ServeConfig, overrides)
    assert fast is not None, "the shipped serve.yaml must take the fast path (attnmt-serve starts without Hydra)"
    assert OmegaConf.to_object(fast) == compose_shipped("serve", overrides)


@pytest.mark.parametrize("name, schema, overrides", [
    ("evaluate", "EvaluateConfig", ["ckpt=x.pt", "src=a.de", "ref=a.en", "beam_size=2", "bleu_tokenize=intl"]),
    ("evaluate", "EvaluateConfig", ["ckpt=[a.pt,b.pt]", "split=test", "engine=ctranslate2", "tgt_lang=en"]),
    ("export", "ExportConfig", ["ckpt=x.pt", "to=ctranslate2", "out=dir", "quantization=int8"]),
    ("average", "AverageConfig", ["ckpt=[a.pt,b.pt]", "out=avg.pt"]),
    ("average", "AverageConfig", ["ckpt=runs/x", "last=3", "out=avg.pt"]),
])
def test_evaluate_export_and_average_compose_without_hydra_as_hydra_does(name, schema, overrides):
    from attnmt import config

    fast = compose_cli(name, getattr(config, schema), overrides)
    assert fast is not None, f"the shipped {name}.yaml must take the fast path"
    assert OmegaConf.to_object(fast) == compose_shipped(name, overrides)


def test_fast_composition_follows_a_group_options_own_defaults(tmp_path, monkeypatch):
    # decode/greedy.yaml lists beam, then itself: the fast path merges both, in Hydra's order.
    tree = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, tree)
    primary = tree / "translate.yaml"
    primary.write_text(primary.read_text().replace("decode@_here_: beam", "decode@_here_: greedy"))
    monkeypatch.setenv("ATTNMT_CONFIGS", str(tree))
    fast = OmegaConf.to_object(compose_cli("translate", TranslateConfig, ["ckpt=x.pt", "nbest=1"]))
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(tree), version_base=None):
            assert fast == OmegaConf.to_object(compose(config_name="translate", overrides=["ckpt=x.pt", "nbest=1"]))
    finally:
        GlobalHydra.instance().clear()
    assert fast.beam_size == 1 and fast.len_penalty == 1.0


@pytest.mark.parametrize("argv", [["--help"], ["--cfg", "job", "ckpt=x.pt"], ["ckpt=x.pt", "hydra.verbose=true"],
                                  ["ckpt=x.pt", "+extra=1"], ["~nbest"], ["decode@_global_=greedy"]])
def test_command_lines_for_hydra_itself_are_left_to_hydra(argv):
    assert compose_cli("translate", TranslateConfig, argv) is None


@pytest.mark.parametrize("override, message", [
    ("beamsize=3", r"beamsize=3: translate.yaml has no key 'beamsize'; did you mean beam_size\?"),
    ("beam_size=many", r"beam_size=many: Value 'many' of type 'str' could not be converted to Integer"),
    ("max_tokens=[1", r"max_tokens=\[1: "),
    ("nbest=1,2", r"nbest=1,2: one value per key"),
])
def test_fast_composition_errors_are_one_line(override, message):
    with pytest.raises(UserError, match=message) as err:
        compose_cli("translate", TranslateConfig, ["ckpt=x.pt", override])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["batching=continuous", "engine=ctranslate2"], "batching=continuous needs engine=native"),
    (["batching=streaming"], "batching='streaming' is unknown; use per_call or continuous"),
    (["max_rows=8"], "max_rows=8 is below max_beam_size=16"),
])
def test_serve_refuses_batching_it_cannot_do_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_shipped("serve", ["ckpt=x.pt", *overrides]).check()
