"""Parallel corpora through HF ``datasets``: read, clean, tokenize (cached on disk).

Sources (``data.format``):

- ``folder``: line-aligned text files ``{root}/{split}.{lang}``, e.g. ``train.de`` and ``train.en``;
- ``tsv``: ``{root}/{split}.tsv`` with ``src<TAB>tgt`` on each line;
- ``jsonl``: ``{root}/{split}.jsonl``, one object per line, ``{"de": ..., "en": ...}`` or
  ``{"translation": {"de": ..., "en": ...}}``;
- ``hub``: ``datasets.load_dataset(hub_id, hub_config, split=...)`` with a ``translation`` column
  (or one column per language);
- ``disk``: a ``DatasetDict`` written with ``save_to_disk`` in ``root``, columns as for the hub.

Hygiene, each rule counted in the log: Unicode NFKC and whitespace trimming (:func:`normalize`) on
every split; on the train split only, pairs with an empty side are dropped, exact duplicates
optionally (``dedup``), and at tokenization pairs longer than ``max_len`` tokens or with a length
ratio above ``max_len_ratio``. Valid and test splits keep every line in its order, so they stay
aligned with their references.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

from attnmt.config import DATA_FORMATS, DataConfig
from attnmt.tokenizer import EOS_ID, Tokenizer, normalize

logger = logging.getLogger(__name__)

_CACHE_VERSION = "1"

__all__ = ["DataError", "load_split", "load_references", "read_lines", "token_lengths", "tokenize"]


class DataError(ValueError):
    """Bad input data or data config; the message names the file, line or key and what to do."""


# ----------------------------------------------------------------------------------------------------
# Reading


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file, without line endings (``\\n`` or ``\\r\\n``; a leading BOM dropped).

    Only ``\\n`` ends a line: other Unicode line separators inside a line do not split it, so
    line-aligned files stay aligned.

    Raises:
        DataError: the file is missing, or is not valid UTF-8 (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}: invalid UTF-8 (byte {data[err.start]:#04x} at byte column {column}: {err.reason}); "
            "convert the file to UTF-8, e.g. with iconv"
        ) from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _source_name(cfg: DataConfig, split: str) -> str:
    """The split's name in the source: ``cfg.splits[split]``, or ``split`` itself if it is no key there."""
    return cfg.splits.get(split, split)


def _root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(f"data.root is not set; data.format={cfg.format} reads from a folder: set data.root=FOLDER")
    root = Path(cfg.root)
    if not root.exists():
        raise DataError(f"data.root={cfg.root} does not exist (resolved: {root.resolve()}); "
                        "override it, e.g. data.root=../shared/data/multi30k")
    return root


def _read_folder(cfg: DataConfig, name: str) -> tuple[list[str], list[str]]:
    root = _root(cfg)
    paths = [root / f"{name}.{lang}" for lang in (cfg.src_lang, cfg.tgt_lang)]
    present = sorted(p.name for p in root.iterdir() if p.is_file())
    for path, key in zip(paths, ("src_lang", "tgt_lang")):
        if path.is_file():
            continue
        langs = sorted({n.split(".", 1)[1] for n in present if n.startswith(f"{name}.")})
        if langs:
            raise DataError(f"unknown language for data.{key}={path.suffix[1:]}: {path} does not exist; "
                            f"split {name!r} in {root} has languages {', '.join(langs)}")
        splits = sorted({n.rsplit(".", 1)[0] for n in present if "." in n and not n.endswith(".md")})
        raise DataError(f"split {name!r} not found in {root}: looked for {paths[0].name} and {paths[1].name}; "
                        f"splits there: {', '.join(splits) or 'none'} (data.splits maps attnmt's names to these)")
    src, tgt = read_lines(paths[0]), read_lines(paths[1])
    if len(src) != len(tgt):
        raise DataError(f"{paths[0]} has {len(src)} lines but {paths[1]} has {len(tgt)}; "
                        "line-aligned files must have the same number of lines")
    return src, tgt


def _split_file(cfg: DataConfig, name: str, ext: str) -> Path:
    root = _root(cfg)
    path = root / (name if name.endswith(f".{ext}") else f"{name}.{ext}")
    if not path.is_file():
        there = sorted(p.name for p in root.glob(f"*.{ext}")) if root.is_dir() else []
        raise DataError(f"split {name!r} not found: looked for {path}; {ext} files there: "
                        f"{', '.join(there) or 'none'} (data.splits maps attnmt's names to file names)")
    return path


def _read_tsv(cfg: DataConfig, name: str) -> tuple[list[str], list[str]]:
    path = _split_file(cfg, name, "tsv")
    src, tgt = [], []
    for number, line in enumerate(read_lines(path), 1):
        fields = line.split("\t")
        if line == "":
            fields = ["", ""]  # an empty pair keeps the line numbering of valid/test sets
        if len(fields) != 2:
            raise DataError(f"{path}, line {number}: {len(fields)} tab-separated fields, expected 2 "
                            f"({cfg.src_lang}<TAB>{cfg.tgt_lang}); a tab inside a sentence must be removed")
        src.append(fields[0])
        tgt.append(fields[1])
    return src, tgt


def _read_jsonl(cfg: DataConfig, name: str) -> tuple[list[str], list[str]]:
    path = _split_file(cfg, name, "jsonl")
    src, tgt = [], []
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not JSON ({err.msg})") from None
        pair = record.get("translation", record) if isinstance(record, dict) else None
        if not isinstance(pair, dict) or cfg.src_lang not in pair or cfg.tgt_lang not in pair:
            keys = sorted(pair) if isinstance(pair, dict) else type(record).__name__
            raise DataError(f"{path}, line {number}: expected keys {cfg.src_lang!r} and {cfg.tgt_lang!r} "
                            f"(at the top level or in 'translation'), found {keys}")
        src.append(str(pair[cfg.src_lang]))
        tgt.append(str(pair[cfg.tgt_lang]))
    return src, tgt


def _columns(ds: datasets.Dataset, cfg: DataConfig, origin: str) -> tuple[list[str], list[str]]:
    """Source and target text of a hub-shaped dataset: a ``translation`` dict column, or one column per language."""
    if "translation" in ds.column_names:
        rows = ds["translation"]
        if len(ds) and not {cfg.src_lang, cfg.tgt_lang} <= set(rows[0]):
            raise DataError(f"{origin}: the translation column has languages {sorted(rows[0])}; "
                            f"data.src_lang={cfg.src_lang} and data.tgt_lang={cfg.tgt_lang} must be among them")
        return [r[cfg.src_lang] for r in rows], [r[cfg.tgt_lang] for r in rows]
    if cfg.src_lang in ds.column_names and cfg.tgt_lang in ds.column_names:
        return list(ds[cfg.src_lang]), list(ds[cfg.tgt_lang])
    raise DataError(f"{origin}: expected a 'translation' column or columns {cfg.src_lang!r} and {cfg.tgt_lang!r}; "
                    f"found {ds.column_names}")


def _read_hub(cfg: DataConfig, name: str) -> tuple[list[str], list[str]]:
    if not cfg.hub_id:
        raise DataError("data.format=hub needs data.hub_id (e.g. wmt14) and usually data.hub_config (e.g. de-en)")
    origin = f"hub dataset {cfg.hub_id!r} (config {cfg.hub_config!r}, split {name!r})"
    try:
        ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=name)
    except Exception as err:  # no network, unknown id/config/split: all say the same to the user
        raise DataError(
            f"could not load {origin}: {type(err).__name__}: {err}. The hub needs network access (or a copy in the "
            "datasets cache). Elsewhere, save it with DatasetDict.save_to_disk and use data.format=disk "
            "data.root=FOLDER, or use local files: data.format=folder|tsv|jsonl data.root=FOLDER"
        ) from err
    return _columns(ds, cfg, origin)


def _read_disk(cfg: DataConfig, name: str) -> tuple[list[str], list[str]]:
    root = _root(cfg)
    try:
        saved = datasets.load_from_disk(str(root))
    except FileNotFoundError as err:
        raise DataError(f"data.root={root} is not a folder written by save_to_disk: {err}") from None
    if not isinstance(saved, datasets.DatasetDict):
        raise DataError(f"{root} holds a single Dataset; data.format=disk needs a DatasetDict with named splits")
    if name not in saved:
        raise DataError(f"split {name!r} not found in {root}: splits there: {', '.join(saved)} "
                        "(data.splits maps attnmt's names to these)")
    return _columns(saved[name], cfg, f"{root} split {name!r}")


_READERS = {"folder": _read_folder, "tsv": _read_tsv, "jsonl": _read_jsonl, "hub": _read_hub, "disk": _read_disk}


def _read_raw(cfg: DataConfig, split: str) -> tuple[list[str], list[str], str]:
    if cfg.format not in _READERS:
        raise DataError(f"data.format={cfg.format!r}: expected one of {', '.join(DATA_FORMATS)}")
    if cfg.src_lang == cfg.tgt_lang:
        raise DataError(f"data.src_lang and data.tgt_lang are both {cfg.src_lang!r}")
    name = _source_name(cfg, split)
    src, tgt = _READERS[cfg.format](cfg, name)
    where = cfg.hub_id if cfg.format == "hub" else cfg.root
    return src, tgt, f"{split} split ({name!r} in {where})"


# ----------------------------------------------------------------------------------------------------
# Hygiene


def load_split(cfg: DataConfig, split: str, train: bool) -> datasets.Dataset:
    """One split as a dataset with string columns ``src`` and ``tgt``, normalised and (train only) filtered.

    Args:
        cfg: where the corpus is and how it is cleaned.
        split: a key of ``cfg.splits`` (``train``, ``valid``, ``test``) or a split name of the source.
        train: drop empty pairs (and duplicates with ``cfg.dedup``). False keeps every line in order.

    Raises:
        DataError: a missing file or split, misaligned files, bad UTF-8 or JSON, an unknown language,
            a split with no lines, or (train) no pairs left after filtering.
    """
    src_raw, tgt_raw, origin = _read_raw(cfg, split)
    if not src_raw:
        raise DataError(f"{origin} has no lines; point data.splits.{split} at a split with sentence pairs")
    counts = {"changed": 0, "nfkc": 0, "empty": 0, "duplicate": 0}
    src, tgt = [], []
    seen: set[bytes] = set()
    for s, t in zip(src_raw, tgt_raw):
        pair = (normalize(s), normalize(t))
        for raw, clean in zip((s, t), pair):
            counts["changed"] += clean != raw
            counts["nfkc"] += not unicodedata.is_normalized("NFKC", raw)
        empty = not pair[0] or not pair[1]
        counts["empty"] += empty
        if train and empty:
            continue
        if train and cfg.dedup:
            key = hashlib.blake2b(f"{pair[0]}\t{pair[1]}".encode(), digest_size=16).digest()
            if key in seen:
                counts["duplicate"] += 1
                continue
            seen.add(key)
        src.append(pair[0])
        tgt.append(pair[1])

    logger.info("%s: %d pairs read; %d lines changed by NFKC, %d by normalisation in all (NFKC, whitespace); "
                "%s; %d pairs kept", origin, len(src_raw), counts["nfkc"], counts["changed"],
                (f"{counts['empty']} empty pairs dropped, {counts['duplicate']} duplicates dropped"
                 if train else f"{counts['empty']} empty pairs kept (not a training split)"), len(src))
    if train and not src:
        raise DataError(f"{origin}: no training pairs left: {len(src_raw)} read, {counts['empty']} dropped as "
                        f"empty, {counts['duplicate']} as duplicates (data.dedup)")
    features = datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")})
    return datasets.Dataset.from_dict({"src": src, "tgt": tgt}, features=features)


def load_references(cfg: DataConfig, split: str) -> list[str]:
    """The split's target side exactly as stored (not normalised): the references for BLEU."""
    return _read_raw(cfg, split)[1]


# ----------------------------------------------------------------------------------------------------
# Tokenization


def _encode(batch: dict, tokenizer: Tokenizer) -> dict:
    return {
        "src_ids": [ids + [EOS_ID] for ids in tokenizer.encode_src(batch["src"])],
        "tgt_ids": [ids + [EOS_ID] for ids in tokenizer.encode_tgt(batch["tgt"])],
    }


def tokenize(ds: datasets.Dataset, tokenizer: Tokenizer, cfg: DataConfig, train: bool) -> datasets.Dataset:
    """Add ``src_ids`` and ``tgt_ids`` (token ids + EOS, int16 where the vocabulary fits) to a split.

    The result is cached under ``cfg.cache_dir`` by the split's content, the tokenizer and the
    settings, so a second run does not tokenize again. On a training split (``train``) pairs with a
    side over ``cfg.max_len`` tokens (EOS not counted) or a length ratio above ``cfg.max_len_ratio``
    are dropped, with counts logged.
    """
    dtype = "int16" if max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) <= 2**15 else "int32"
    features = ds.features.copy()
    features["src_ids"] = datasets.Sequence(datasets.Value(dtype))
    features["tgt_ids"] = datasets.Sequence(datasets.Value(dtype))
    key = hashlib.sha256(f"{_CACHE_VERSION}/{ds._fingerprint}/{tokenizer.fingerprint}/{dtype}".encode()).hexdigest()[:20]
    cache_file = None
    if cfg.cache_dir:
        os.makedirs(cfg.cache_dir, exist_ok=True)
        cache_file = str(Path(cfg.cache_dir) / f"tokenized-{key}.arrow")
    num_proc = cfg.num_proc if cfg.num_proc > 1 and len(ds) >= 10_000 else None
    ds = ds.map(_encode, batched=True, batch_size=1000, fn_kwargs={"tokenizer": tokenizer}, features=features,
                num_proc=num_proc, cache_file_name=cache_file, load_from_cache_file=True, desc="tokenizing")
    if train:
        ds = _filter_lengths(ds, cfg)
    return ds


def token_lengths(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The lengths of ``src_ids`` and ``tgt_ids`` (EOS included) of a tokenized split, read from Arrow."""
    table = ds.with_format("arrow")[:]
    return (pc.list_value_length(table.column("src_ids")).to_numpy(zero_copy_only=False).astype(np.int64),
            pc.list_value_length(table.column("tgt_ids")).to_numpy(zero_copy_only=False).astype(np.int64))


def _filter_lengths(ds: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    src_len, tgt_len = token_lengths(ds)
    src_len, tgt_len = src_len - 1, tgt_len - 1  # EOS is not part of the sentence
    too_long = (np.maximum(src_len, tgt_len) > cfg.max_len) if cfg.max_len > 0 else np.zeros(len(ds), bool)
    ratio = np.maximum(src_len, tgt_len) / np.maximum(np.minimum(src_len, tgt_len), 1)
    bad_ratio = (ratio > cfg.max_len_ratio) & ~too_long if cfg.max_len_ratio > 0 else np.zeros(len(ds), bool)
    keep = np.flatnonzero(~(too_long | bad_ratio))
    logger.info("train split: %d pairs over data.max_len=%d tokens dropped, %d with a length ratio above "
                "data.max_len_ratio=%g dropped; %d pairs kept", int(too_long.sum()), cfg.max_len,
                int(bad_ratio.sum()), cfg.max_len_ratio, len(keep))
    if len(keep) == 0:
        raise DataError(f"no training pairs left after the length rules: {int(too_long.sum())} of {len(ds)} over "
                        f"data.max_len={cfg.max_len} tokens, {int(bad_ratio.sum())} with a length ratio above "
                        f"data.max_len_ratio={cfg.max_len_ratio}; raise these limits")
    return ds if len(keep) == len(ds) else ds.select(keep)
