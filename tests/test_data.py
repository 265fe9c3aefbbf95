"""Data pipeline: every source format, hygiene rules, clear errors on bad input, cached tokenization."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attnmt.config import DataConfig, register_configs
from attnmt.data import DataError, load_references, load_split, read_lines, token_lengths, tokenize
from attnmt.tokenizer import EOS_ID, Tokenizer, normalize
from conftest import data_config, free_port, tokenizer_config

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).parent / "fixtures" / "tiny"


def folder_cfg(root: Path, **kw) -> DataConfig:
    kw.setdefault("cache_dir", None)
    return data_config(format="folder", root=str(root), **kw)


def write_folder(root: Path, split: str, de: list[str], en: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.de").write_text("".join(x + "\n" for x in de), encoding="utf-8")
    (root / f"{split}.en").write_text("".join(x + "\n" for x in en), encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    src, tgt = read_lines(TINY / "train.de"), read_lines(TINY / "train.en")
    return Tokenizer.train(src, tgt, tokenizer_config(vocab_size=400), tmp_path_factory.mktemp("tok"))


# ----------------------------------------------------------------------------------------------------
# Sources


def test_folder_split_keeps_alignment_and_order():
    cfg = folder_cfg(TINY)
    for split, train in (("train", True), ("valid", False), ("test", False)):
        ds = load_split(cfg, split, train=train)
        assert ds["src"] == read_lines(TINY / f"{split}.de")
        assert ds["tgt"] == read_lines(TINY / f"{split}.en")


def test_tsv_jsonl_and_disk_read_the_same_pairs(tmp_path, monkeypatch):
    src, tgt = read_lines(TINY / "valid.de"), read_lines(TINY / "valid.en")
    (tmp_path / "valid.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in zip(src, tgt)), encoding="utf-8")
    flat = "".join(json.dumps({"de": s, "en": t}, ensure_ascii=False) + "\n" for s, t in zip(src, tgt))
    (tmp_path / "valid.jsonl").write_text(flat, encoding="utf-8")
    nested = "".join(json.dumps({"translation": {"de": s, "en": t}}) + "\n" for s, t in zip(src, tgt))
    (tmp_path / "nested.jsonl").write_text(nested, encoding="utf-8")
    hub_shaped = datasets.Dataset.from_dict({"translation": [{"de": s, "en": t} for s, t in zip(src, tgt)]})
    datasets.DatasetDict({"validation": hub_shaped}).save_to_disk(str(tmp_path / "saved"))

    wmt_style = {"train": "train", "valid": "validation", "test": "test"}
    cfgs = [
        data_config(format="tsv", root=str(tmp_path), cache_dir=None),
        data_config(format="jsonl", root=str(tmp_path), cache_dir=None),
        data_config(format="jsonl", root=str(tmp_path), splits={"valid": "nested"}, cache_dir=None),
        data_config(format="disk", root=str(tmp_path / "saved"), splits=wmt_style, cache_dir=None),
    ]
    for cfg in cfgs:
        ds = load_split(cfg, "valid", train=False)
        assert (ds["src"], ds["tgt"]) == (src, tgt), cfg.format
    # Reversed direction: the languages come from the config, not from the column order.
    reverse = data_config(format="disk", root=str(tmp_path / "saved"), splits=wmt_style, src_lang="en", tgt_lang="de")
    assert load_split(reverse, "valid", train=False)["src"] == tgt


def test_hub_dataset_reads_the_translation_column(monkeypatch):
    src, tgt = read_lines(TINY / "test.de"), read_lines(TINY / "test.en")
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"translation": [{"de": s, "en": t} for s, t in zip(src, tgt)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = data_config(format="hub", hub_id="wmt14", hub_config="de-en", src_lang="en", tgt_lang="de")
    ds = load_split(cfg, "test", train=False)
    assert calls == [("wmt14", "de-en", "test")]
    assert (ds["src"], ds["tgt"]) == (tgt, src)


def test_hub_without_network_says_how_to_use_local_files(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = data_config(format="hub", hub_id="wmt14", hub_config="de-en")
    with pytest.raises(DataError, match=r"wmt14.*network.*data\.format=disk"):
        load_split(cfg, "train", train=True)


# ----------------------------------------------------------------------------------------------------
# Hygiene


def test_hygiene_normalises_and_drops_only_training_pairs(tmp_path, caplog):
    de = ["Ein  Hund läuft. ", "", "Ｚwei\tKatzen.", "Ein Hund läuft.", "Ein Mann."]
    en = ["A dog runs.", "Empty source.", "Two cats.", "A dog runs.", ""]
    for split in ("train", "valid"):
        write_folder(tmp_path, split, de, en)
    caplog.set_level("INFO", logger="attnmt.data")
    train = load_split(folder_cfg(tmp_path, dedup=True), "train", train=True)
    assert train["src"] == ["Ein Hund läuft.", "Zwei Katzen."]  # NFKC, whitespace; empty and duplicate gone
    assert "2 empty pairs dropped, 1 duplicates dropped" in caplog.text
    assert "1 lines changed by NFKC" in caplog.text
    assert len(load_split(folder_cfg(tmp_path, dedup=False), "train", train=True)) == 3
    valid = load_split(folder_cfg(tmp_path, dedup=True), "valid", train=False)  # nothing dropped or moved
    assert valid["src"] == [normalize(x) for x in de] and valid["tgt"] == [normalize(x) for x in en]
    assert load_references(folder_cfg(tmp_path), "valid") == en  # references stay as stored


def test_length_rules_apply_to_training_splits_only(tmp_path, tokenizer, caplog):
    de = ["Der Hund läuft.", "Die Katze " + "schläft " * 30 + "im Garten.", "Ja."]
    en = ["The dog runs.", "The cat " + "sleeps " * 30 + "in the garden.", "The children play in the park every evening."]
    for split in ("train", "valid"):
        write_folder(tmp_path, split, de, en)
    cfg = folder_cfg(tmp_path, max_len=40, max_len_ratio=3.0)
    caplog.set_level("INFO", logger="attnmt.data")
    train = tokenize(load_split(cfg, "train", train=True), tokenizer, cfg, train=True)
    assert train["src"] == ["Der Hund läuft."]
    assert "1 pairs over data.max_len=40 tokens dropped, 1 with a length ratio above" in caplog.text
    src_len, tgt_len = token_lengths(train)
    assert max(src_len.max(), tgt_len.max()) <= 40 + 1
    valid = tokenize(load_split(cfg, "valid", train=False), tokenizer, cfg, train=False)
    assert valid["src"] == de


def test_tags_do_not_count_towards_the_length_rules(tmp_path, caplog):
    """A pair is kept or dropped by its sentences' own lengths, whether its source carries tags or not."""
    src, tgt = read_lines(TINY / "train.de"), read_lines(TINY / "train.en")
    tagged = Tokenizer.train(src, tgt, tokenizer_config(vocab_size=400), tmp_path / "tok", tags=["<2en>", "<bt>"])
    cfg = folder_cfg(TINY, max_len=20, max_len_ratio=1.3)
    split = load_split(cfg, "train", train=True)
    caplog.set_level("INFO", logger="attnmt.data")
    plain = tokenize(split, tagged, cfg, train=True, name="de-en")
    prefix = [tagged.tag_id("<bt>"), tagged.tag_id("<2en>")]
    with_tags = tokenize(split, tagged, cfg, train=True, prefix=prefix, name="de-en (data.mix[0], bt)")
    assert 0 < len(plain) < len(split) and with_tags["src"] == plain["src"]
    assert all(ids[:2] == prefix for ids in with_tags["src_ids"])
    assert "de-en: " in caplog.text and "de-en (data.mix[0], bt): " in caplog.text  # the counts name their stream


def test_tokenized_ids_end_with_eos_and_decode_back(tokenizer):
    cfg = folder_cfg(TINY)
    ds = tokenize(load_split(cfg, "valid", train=False), tokenizer, cfg, train=False)
    assert ds.features["src_ids"].feature.dtype == "int16"  # compact: the vocabulary fits
    assert all(ids[-1] == EOS_ID for ids in list(ds["src_ids"]) + list(ds["tgt_ids"]))
    assert tokenizer.decode_src(ds["src_ids"]) == ds["src"]
    assert tokenizer.decode_tgt(ds["tgt_ids"]) == ds["tgt"]


def test_second_tokenize_reads_the_disk_cache(tmp_path, tokenizer, monkeypatch):
    cfg = folder_cfg(TINY, cache_dir=str(tmp_path / "cache"))
    first = tokenize(load_split(cfg, "train", train=True), tokenizer, cfg, train=True)
    assert list((tmp_path / "cache").glob("tokenized-*.arrow"))

    def no_encoding(texts):
        raise AssertionError("tokenized again although the cache holds this split")

    monkeypatch.setattr(tokenizer, "encode_src", no_encoding)
    second = tokenize(load_split(cfg, "train", train=True), tokenizer, cfg, train=True)
    assert list(second["src_ids"]) == list(first["src_ids"])


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_mismatched_line_counts_name_both_files(tmp_path):
    write_folder(tmp_path, "train", ["a", "b", "c"], ["x", "y"])
    with pytest.raises(DataError, match=r"train\.de has 3 lines but .*train\.en has 2"):
        load_split(folder_cfg(tmp_path), "train", train=True)


def test_missing_split_file_and_root_name_what_was_looked_for(tmp_path):
    write_folder(tmp_path, "train", ["a"], ["x"])
    with pytest.raises(DataError, match=r"split 'valid' not found .*valid\.de and valid\.en; splits there: train"):
        load_split(folder_cfg(tmp_path), "valid", train=False)
    (tmp_path / "train.en").unlink()
    with pytest.raises(DataError, match=r"train\.en does not exist"):
        load_split(folder_cfg(tmp_path), "train", train=True)
    with pytest.raises(DataError, match=r"data\.root=.*does not exist.*override it, e\.g\. data\.root="):
        load_split(folder_cfg(tmp_path / "nowhere"), "train", train=True)
    with pytest.raises(DataError, match=r"looked for .*test\.tsv"):
        load_split(data_config(format="tsv", root=str(tmp_path)), "test", train=False)
    with pytest.raises(DataError, match="data.root is not set"):
        load_split(data_config(), "train", train=True)


def test_unknown_language_lists_the_languages_there():
    with pytest.raises(DataError, match=r"unknown language for data\.src_lang=xx.*languages de, en"):
        load_split(folder_cfg(TINY, src_lang="xx"), "train", train=True)


def test_invalid_utf8_names_file_and_line(tmp_path):
    write_folder(tmp_path, "train", ["a", "b", "c"], ["x", "y", "z"])
    (tmp_path / "train.en").write_bytes(b"x\ny\nz \xff\xfe\n")
    with pytest.raises(DataError, match=r"train\.en, line 3: invalid UTF-8"):
        load_split(folder_cfg(tmp_path), "train", train=True)


def test_bad_tsv_and_jsonl_lines_are_named(tmp_path):
    (tmp_path / "train.tsv").write_text("a\tb\nc\td\te\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.tsv, line 2: 3 tab-separated fields"):
        load_split(data_config(format="tsv", root=str(tmp_path)), "train", train=True)
    (tmp_path / "train.jsonl").write_text('{"de": "a", "en": "b"}\n{"de": "c", "fr": "d"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl, line 2: expected keys 'de' and 'en'.*\['de', 'fr'\]"):
        load_split(data_config(format="jsonl", root=str(tmp_path)), "train", train=True)


def test_empty_training_set_says_which_rule_removed_what(tmp_path, tokenizer):
    write_folder(tmp_path, "train", ["", "Hund"], ["dog", ""])
    with pytest.raises(DataError, match="no training pairs left: 2 read, 2 dropped as empty"):
        load_split(folder_cfg(tmp_path), "train", train=True)
    write_folder(tmp_path, "train", ["Der Hund läuft im Park."], ["The dog runs in the park."])
    cfg = folder_cfg(tmp_path, max_len=3)
    with pytest.raises(DataError, match=r"1 of 1 over data\.max_len=3 tokens"):
        tokenize(load_split(cfg, "train", train=True), tokenizer, cfg, train=True)


def test_read_lines_splits_on_newline_only(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes("\ufeffeins\r\nzwei\u2028drei\x1cvier\nfünf".encode())
    assert read_lines(path) == ["eins", "zwei\u2028drei\x1cvier", "fünf"]


# ----------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name", ["multi30k", "wmt14_en_de"])
def test_data_configs_compose_into_the_schema(name):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = OmegaConf.to_object(compose(overrides=[f"+data={name}", "data.root=/somewhere"]).data)
        assert isinstance(cfg, DataConfig) and cfg.root == "/somewhere"
        assert set(cfg.splits) == {"train", "valid", "test"}
        with pytest.raises(Exception, match="max_lenn"):
            compose(overrides=[f"+data={name}", "data.max_lenn=3"])


@pytest.mark.data
def test_multi30k_splits_keep_their_lines(multi30k):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = OmegaConf.to_object(compose(overrides=["+data=multi30k", f"data.root={multi30k}"]).data)
    for split, n in (("valid", 1014), ("test", 1000)):
        ds = load_split(cfg, split, train=False)
        assert len(ds) == n and ds["tgt"] == [normalize(x) for x in read_lines(multi30k / f"{cfg.splits[split]}.en")]
    train = load_split(cfg, "train", train=True)
    assert len(train) == 29000  # nothing empty in Multi30k
    assert all(s == s.strip() and "\t" not in s and "  " not in s for s in train["src"])


# ----------------------------------------------------------------------------------------------------
# One preparation per job


def _prepare_on_rank(rank: int, port: int, cache: str, out: str) -> None:
    import torch.distributed as dist

    from attnmt import data, tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        if rank == 1:  # rank 1 may only read what rank 0 prepared
            def written_twice(*args, **kwargs):
                raise AssertionError("rank 1 prepared data although rank 0 had")

            for module, name in ((data, "_write_pairs"), (data, "_clean"), (data, "_encode"), (tokenizer, "_train_model")):
                setattr(module, name, written_twice)
        cfg = data_config(root=str(TINY), cache_dir=cache, num_proc=1, tokenizer=tokenizer_config(vocab_size=400))
        tok, train, _, valid = data.prepare_data(cfg, Path(out) / f"run{rank}" / "tokenizer")
        src_len, tgt_len = token_lengths(train)
        with open(Path(out) / f"rank{rank}.json", "w") as f:
            json.dump({"fingerprint": tok.fingerprint, "src": src_len.tolist(), "tgt": tgt_len.tolist(),
                       "valid": sum(len(ds) for _, ds, _ in valid)}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_prepare_the_data_once(tmp_path):
    import torch

    cache = tmp_path / "cache"
    torch.multiprocessing.spawn(_prepare_on_rank, args=(free_port(), str(cache), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["valid"] == 40 and len(ranks[0]["src"]) > 300
    assert len(list(cache.glob("raw-*.arrow"))) == 2  # train and valid, once each
    assert len(list(cache.glob("tokenized-*.arrow"))) == 2
    assert len(list((cache / "tokenizers").iterdir())) == 1


# ----------------------------------------------------------------------------------------------------
# Directions, corpora, tags


def test_an_aligned_corpus_gives_its_directions_with_target_tags(tmp_path):
    from attnmt.data import direction, shares, streams, tags

    cfg = data_config(root=str(tmp_path), langs=["en", "de", "fr"], directions=["en-de", "en-fr"])
    assert [(s.name, s.cfg.src_lang, s.cfg.tgt_lang, s.tags) for s in streams(cfg)] == [
        ("en-de", "en", "de", ("<2de>",)), ("en-fr", "en", "fr", ("<2fr>",))]
    every = data_config(root=str(tmp_path), langs=["en", "de", "fr"])
    assert len(streams(every)) == 6 and tags(every) == ["<2de>", "<2en>", "<2fr>"]
    one = data_config(root=str(tmp_path), src_lang="de", tgt_lang="en")
    assert [(s.name, s.tags) for s in streams(one)] == [("de-en", ())]  # one target language: no tags
    assert direction(cfg, "en", "fr").name == "en-fr" and direction(cfg, None, "de").name == "en-de"
    with pytest.raises(DataError, match=r"directions en-de, en-fr; de-en names none"):
        direction(cfg, "de", "en")
    with pytest.raises(DataError, match="names several"):
        direction(cfg, "en", None)
    # A back-translated corpus mixed in: its own tag, before the language tag; temperature flattens.
    from attnmt.config import CorpusConfig

    bt = CorpusConfig(src_lang="en", tgt_lang="de", root=str(tmp_path), split="bt", weight=0.5, tag="bt")
    mixed = data_config(root=str(tmp_path), langs=["en", "de", "fr"], directions=["en-de", "en-fr"], mix=[bt])
    assert [s.tags for s in streams(mixed)][-1] == ("<bt>", "<2de>") and "<bt>" in tags(mixed)
    np.testing.assert_allclose(shares([100, 400], [1, 1], 1.0), [0.2, 0.8])
    np.testing.assert_allclose(shares([100, 400], [1, 1], 2.0), [1 / 3, 2 / 3])
    np.testing.assert_allclose(shares([100, 400], [2, 1], 1.0), [1 / 3, 2 / 3])


def test_directions_must_name_two_of_the_languages(tmp_path):
    from attnmt.config import ConfigError

    for langs, directions in ((["en"], None), (["en", "de", "en"], None), (["en", "de"], ["en-de", "en-de"]),
                              (["en", "de"], [])):
        with pytest.raises(ConfigError, match="each once"):
            data_config(root=str(tmp_path), langs=langs, directions=directions)
    # A tsv file's columns have no language names: every direction would read the same two columns.
    with pytest.raises(ConfigError, match="a tsv file's two columns are data.src_lang and data.tgt_lang"):
        data_config(format="tsv", root=str(tmp_path), langs=["en", "de"])

    with pytest.raises(ConfigError, match=r"'en-es' is not SRC-TGT with two of data.langs"):
        data_config(root=str(tmp_path), langs=["en", "de"], directions=["en-es"])
    with pytest.raises(ConfigError, match="data.directions needs data.langs"):
        data_config(root=str(tmp_path), directions=["en-de"])


def test_an_error_in_a_mixed_corpus_names_its_entry(tmp_path):
    from attnmt.config import CorpusConfig
    from attnmt.data import prepare_data

    missing = CorpusConfig(src_lang="de", tgt_lang="en", root=str(tmp_path / "synthetic"), tag="bt")
    cfg = folder_cfg(TINY, mix=[missing])
    with pytest.raises(DataError, match=r"^de-en \(data.mix\[0\], bt\): data.root=\S+synthetic does not exist"):
        prepare_data(cfg, tmp_path / "tokenizer")


def test_every_data_format_the_config_accepts_has_a_reader() -> None:
    from attnmt import data
    from attnmt.config import DATA_FORMATS

    assert set(data._READERS) == set(DATA_FORMATS)  # a format added to one list alone would pass the config check
