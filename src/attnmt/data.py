"""Parallel corpora through HF ``datasets``: read, clean, tokenize, each step cached on disk as
memory-mapped Arrow, so memory stays flat in the corpus size and a second run starts in seconds.

Sources (``data.format``):

- ``folder``: line-aligned text files ``{root}/{split}.{lang}``, e.g. ``train.de`` and ``train.en``;
- ``tsv``: ``{root}/{split}.tsv`` with ``src<TAB>tgt`` on each line;
- ``jsonl``: ``{root}/{split}.jsonl``, one object per line, ``{"de": ..., "en": ...}`` or
  ``{"translation": {"de": ..., "en": ...}}``;
- ``hub``: ``datasets.load_dataset(hub_id, hub_config, split=...)`` with a ``translation`` column
  (or one column per language);
- ``disk``: a ``DatasetDict`` written with ``save_to_disk`` in ``root``, columns as for the hub.

The three steps, each a function of its own and a file in ``data.cache_dir`` named by what it was
made from (the source files' paths, sizes and modification times, or the hub dataset's fingerprint;
the settings; the tokenizer), so that a changed input or setting makes a new file and an unchanged
one is memory-mapped again, whatever the run directory:

1. :func:`read_split`: the raw pairs, read in chunks (never whole files) into ``raw-*.arrow``;
2. :func:`load_split`: Unicode NFKC and whitespace trimming (:func:`~attnmt.tokenizer.normalize`)
   on every split, in parallel; on the train split only, pairs with an empty side are dropped, and
   exact duplicates with ``dedup``. Each rule is counted in the log, from per-row flags kept in
   ``clean-*.arrow``, so a second run logs the same counts without reading the text;
3. :func:`tokenize`: ids and lengths (``tokenized-*.arrow``); on the train split, pairs longer than
   ``max_len`` tokens or with a length ratio above ``max_len_ratio`` are dropped.

Rows are dropped by index (an index file beside the data), never by copying. Valid and test splits
keep every line in its order, so they stay aligned with their references. The cache itself (keys,
seals, the lock, what a killed process left) is :mod:`attnmt.datacache`; :func:`prepare_data` runs
the steps for a training job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from attnmt import datacache, distributed, durable
from attnmt.config import DATA_FORMATS, DataConfig
from attnmt.textfiles import DataError, line_chunks, read_lines
from attnmt.tokenizer import Tokenizer, language_tag, normalize, saved_fingerprint

logger = logging.getLogger(__name__)

# Rows per Arrow record batch of the cached files (a map writes one batch per call of its function).
# Large: opening a file reads each batch's header, and with datasets' default of 1000 rows the headers
# are close enough that the kernel's read-ahead pages in most of the file (60 bytes a pair of resident
# memory at 4.5M pairs, for nothing). A batch's Python lists are transient memory of the map workers.
_BATCH_ROWS = 50_000  # raw files, written by attnmt itself from Arrow arrays
_MAP_ROWS = 10_000  # cleaned and tokenized files
_INDEX_ROWS = 1 << 20  # rows per record batch of a kept-row index file
_PARALLEL_FROM = 10_000  # splits with fewer rows are processed in one process

# Per-row flags of load_split, one bit each.
_SRC_CHANGED, _TGT_CHANGED, _SRC_NOT_NFKC, _TGT_NOT_NFKC, _EMPTY = 1, 2, 4, 8, 16

__all__ = ["DataError", "Stream", "corpus_fingerprint", "direction", "load_references", "load_split", "prepare_data", "read_lines",
           "read_split", "shares", "streams", "tags", "token_lengths", "tokenize", "train_tokenizer"]


def _procs(cfg: DataConfig, rows: int) -> int | None:
    """Processes for a ``datasets.map`` over ``rows`` rows: ``data.num_proc`` (0 = every core)."""
    if rows < _PARALLEL_FROM:
        return None
    n = cfg.num_proc or os.cpu_count() or 1
    return n if n > 1 else None


def _numpy(ds: datasets.Dataset, column: str) -> np.ndarray:
    """One fixed-width column of ``ds`` (its index mapping applied) as a NumPy array.

    Taken by Arrow from the memory-mapped table and index file, not through ``ds[:]``: datasets turns
    an index mapping into a Python list of ints there, which cost about 640 bytes a pair of anonymous
    memory that the process then kept (docs/BENCHMARKS.md, "Memory per pair")."""
    values = ds.data.column(column).to_numpy()
    if ds._indices is None:
        return values
    # A chunk of the memory-mapped index at a time: no copy of the whole index is made.
    return np.concatenate([values[chunk.to_numpy()] for chunk in ds._indices.column(0).chunks] or [values[:0]])


# ----------------------------------------------------------------------------------------------------
# Reading


def _rebatch(chunks: Iterable[list[str]], size: int) -> Iterator[list[str]]:
    """The lines of ``chunks`` regrouped into lists of ``size`` (the last one shorter)."""
    pending: list[str] = []
    for chunk in chunks:
        pending.extend(chunk)
        while len(pending) >= size:
            yield pending[:size]
            del pending[:size]
    if pending:
        yield pending


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
    if not root.is_dir():
        raise DataError(f"data.root={cfg.root} is a file; data.format={cfg.format} reads a folder (of {{split}}.{{lang}} "
                        "files, {split}.tsv or {split}.jsonl, or a saved dataset): give the folder that holds it")
    return root


def _file_identity(paths: list[Path]) -> list:
    """What a cached copy of ``paths`` is valid for: each file's absolute path, size and modification time."""
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


# A reader checks the source and returns (its identity, a function yielding (src, tgt) batches).
Reader = Callable[[DataConfig, str], tuple[list, Callable[[], Iterator[tuple[list[str], list[str]]]]]]


def _read_folder(cfg: DataConfig, name: str):
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

    def batches():
        sides = [_rebatch(line_chunks(p), _BATCH_ROWS) for p in paths]
        done = 0
        for src in sides[0]:
            tgt = next(sides[1], [])
            if len(src) != len(tgt):
                n_src = done + len(src) + sum(map(len, sides[0]))
                n_tgt = done + len(tgt) + sum(map(len, sides[1]))
                raise DataError(f"{paths[0]} has {n_src} lines but {paths[1]} has {n_tgt}; "
                                "line-aligned files must have the same number of lines")
            done += len(src)
            yield src, tgt
        rest = sum(map(len, sides[1]))
        if rest:
            raise DataError(f"{paths[0]} has {done} lines but {paths[1]} has {done + rest}; "
                            "line-aligned files must have the same number of lines")

    return _file_identity(paths), batches


def _split_file(cfg: DataConfig, name: str, ext: str) -> Path:
    root = _root(cfg)
    path = root / (name if name.endswith(f".{ext}") else f"{name}.{ext}")
    if not path.is_file():
        there = sorted(p.name for p in root.glob(f"*.{ext}")) if root.is_dir() else []
        raise DataError(f"split {name!r} not found: looked for {path}; {ext} files there: "
                        f"{', '.join(there) or 'none'} (data.splits maps attnmt's names to file names)")
    return path


def _line_pairs(path: Path, parse: Callable[[str, int], tuple[str, str] | None]):
    """Batches of (sources, targets) of a file of one pair a line: ``parse(line, number)`` gives the
    pair of line ``number`` (1-based), or None to skip it, or raises a DataError naming the line."""

    def batches():
        number = 0
        for lines in _rebatch(line_chunks(path), _BATCH_ROWS):
            src, tgt = [], []
            for line in lines:
                number += 1
                pair = parse(line, number)
                if pair is not None:
                    src.append(pair[0])
                    tgt.append(pair[1])
            yield src, tgt

    return batches


def _read_tsv(cfg: DataConfig, name: str):
    path = _split_file(cfg, name, "tsv")

    def parse(line: str, number: int) -> tuple[str, str]:
        fields = line.split("\t") if line else ["", ""]  # an empty pair keeps the line numbering
        if len(fields) != 2:
            raise DataError(f"{path}, line {number}: {len(fields)} tab-separated fields, expected 2 "
                            f"({cfg.src_lang}<TAB>{cfg.tgt_lang}); a tab inside a sentence must be removed")
        return fields[0], fields[1]

    return _file_identity([path]), _line_pairs(path, parse)


def _read_jsonl(cfg: DataConfig, name: str):
    path = _split_file(cfg, name, "jsonl")

    def parse(line: str, number: int) -> tuple[str, str] | None:
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not JSON ({err.msg})") from None
        pair = record.get("translation", record) if isinstance(record, dict) else None
        if not isinstance(pair, dict) or cfg.src_lang not in pair or cfg.tgt_lang not in pair:
            keys = sorted(pair) if isinstance(pair, dict) else type(record).__name__
            raise DataError(f"{path}, line {number}: expected keys {cfg.src_lang!r} and {cfg.tgt_lang!r} "
                            f"(at the top level or in 'translation'), found {keys}")
        return str(pair[cfg.src_lang]), str(pair[cfg.tgt_lang])

    return _file_identity([path]), _line_pairs(path, parse)


def _arrow_pairs(ds: datasets.Dataset, cfg: DataConfig, origin: str):
    """Source and target text of a hub-shaped dataset (a ``translation`` struct column, or one column per
    language), batch by batch, read by Arrow without a Python object per sentence."""
    if "translation" in ds.column_names:
        langs = [f.name for f in ds.data.schema.field("translation").type]
        if not {cfg.src_lang, cfg.tgt_lang} <= set(langs):
            raise DataError(f"{origin}: the translation column has languages {sorted(langs)}; "
                            f"data.src_lang={cfg.src_lang} and data.tgt_lang={cfg.tgt_lang} must be among them")
        columns = lambda t: (pc.struct_field(t["translation"], cfg.src_lang), pc.struct_field(t["translation"], cfg.tgt_lang))  # noqa: E731
    elif cfg.src_lang in ds.column_names and cfg.tgt_lang in ds.column_names:
        columns = lambda t: (t[cfg.src_lang], t[cfg.tgt_lang])  # noqa: E731
    else:
        raise DataError(f"{origin}: expected a 'translation' column or columns {cfg.src_lang!r} and "
                        f"{cfg.tgt_lang!r}; found {ds.column_names}")

    def batches():
        for table in ds.with_format("arrow").iter(batch_size=_BATCH_ROWS):
            yield columns(table)

    return [ds._fingerprint, len(ds)], batches


def _read_hub(cfg: DataConfig, name: str):
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
    return _arrow_pairs(ds, cfg, origin)


def _read_disk(cfg: DataConfig, name: str):
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
    return _arrow_pairs(saved[name], cfg, f"{root} split {name!r}")


_READERS: dict[str, Reader] = {"folder": _read_folder, "tsv": _read_tsv, "jsonl": _read_jsonl, "hub": _read_hub,
                               "disk": _read_disk}
_RAW_SCHEMA = pa.schema([("src", pa.string()), ("tgt", pa.string())])
_INDEX_SCHEMA = pa.schema([("indices", pa.uint64())])


def _write_pairs(path: Path, batches: Iterable[tuple], desc: str) -> tuple[int, dict]:
    """Write (src, tgt) batches to the Arrow file ``path``, atomically (a temporary file, then a rename),
    with a progress bar at a terminal; return the number of pairs and the SHA-256 of each side's text
    (what :func:`corpus_fingerprint` compares: the text itself, not the files' dates)."""
    rows, digests = 0, {"src": _TextDigest(), "tgt": _TextDigest()}
    with durable.replacing(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, _RAW_SCHEMA) as writer, \
                tqdm(desc=desc, unit=" pairs", unit_scale=True, disable=None) as bar:
            for src, tgt in batches:
                batch = pa.record_batch([_strings(src), _strings(tgt)], schema=_RAW_SCHEMA)
                for side, column in zip(("src", "tgt"), batch.columns):
                    digests[side].update(column)
                writer.write_batch(batch)
                rows += batch.num_rows
                bar.update(batch.num_rows)
    return rows, {side: digest.hexdigest() for side, digest in digests.items()}


class _TextDigest:
    """SHA-256 of a column of sentences, the same however they are cut into batches: the lengths and
    the bytes go into two digests, combined at the end."""

    def __init__(self) -> None:
        self.lengths, self.data = hashlib.sha256(), hashlib.sha256()

    def update(self, column: pa.StringArray) -> None:
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
        self.lengths.update(np.diff(offsets).astype("<i8").tobytes())
        if column.buffers()[2] is not None:
            self.data.update(memoryview(column.buffers()[2])[offsets[0] : offsets[-1]])

    def hexdigest(self) -> str:
        return hashlib.sha256(self.lengths.digest() + self.data.digest()).hexdigest()


def _strings(values) -> pa.Array:
    """A list of str, or an Arrow column, as one Arrow string array (a missing value becomes "")."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pc.fill_null(pc.cast(values, pa.string()), "")
        return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return pa.array(values, pa.string())


def _read(cfg: DataConfig, split: str) -> tuple[datasets.Dataset, str, dict]:
    """The raw pairs of a split (memory-mapped), where they come from in words, and the seal of their
    cache file (with the SHA-256 of each side's text)."""
    if cfg.format not in _READERS:
        raise DataError(f"data.format={cfg.format!r}: expected one of {', '.join(DATA_FORMATS)}")
    if cfg.src_lang == cfg.tgt_lang:
        raise DataError(f"data.src_lang and data.tgt_lang are both {cfg.src_lang!r}")
    name = _source_name(cfg, split)
    identity, batches = _READERS[cfg.format](cfg, name)
    where = cfg.hub_id if cfg.format == "hub" else cfg.root
    origin = f"{split} split ({name!r}, {cfg.src_lang}-{cfg.tgt_lang}, in {where})"
    key = datacache.key("raw", cfg.format, identity, cfg.src_lang, cfg.tgt_lang)
    path = datacache.cache_root(cfg) / f"raw-{key}.arrow"
    # A file source's identity is (path, size, mtime) per file; a hub or disk dataset's is its fingerprint.
    sources = [entry for entry in identity if isinstance(entry, (list, tuple)) and len(entry) == 3]

    def build():
        rows, sha256 = _write_pairs(path, batches(), f"reading the {split} split")
        return [path], rows, {"sha256": sha256, "source_files": [p for p, _, _ in sources], "origin": origin}

    def load() -> datasets.Dataset:
        ds = datasets.Dataset.from_file(str(path))
        # Named by what it was made from, not by where the cache lies (datasets' own fingerprint of a
        # file is its path): every entry keyed after it is then found again in a copied, moved or
        # mounted cache.
        ds._fingerprint = key
        return ds

    needs = sum(size for _, size, _ in sources) or 1 << 20
    ds, seal = datacache.cached(path, build, load, needs)
    return ds, origin, seal


def corpus_fingerprint(cfg: DataConfig, split: str = "train") -> dict:
    """What a split's text is, to tell another corpus from this one on resume: its origin, its files
    (for a folder, tsv or jsonl source), its number of pairs and the SHA-256 of each side's text.

    The source is read again only when a file's size or modification time changed; the cached copy
    is hashed again each time (memory-mapped, about 0.1 s per million pairs), and one that no longer
    holds the text its seal records (changed after it was sealed) is rebuilt from the source, with a
    warning naming it."""
    ds, origin, seal = _read(cfg, split)
    if _text_digests(ds) != seal["sha256"]:
        path = Path(ds.cache_files[0]["filename"])
        del ds  # its memory map, before the file is removed
        datacache.discard(path, "does not hold the text its seal records (changed after it was written)")
        _, origin, seal = _read(cfg, split)
    return {"origin": origin, "files": seal.get("source_files", []), "pairs": seal["rows"], "sha256": seal["sha256"]}


def _text_digests(ds: datasets.Dataset) -> dict:
    """The SHA-256 of each side's text in a raw pairs dataset, as :func:`_write_pairs` computed it."""
    table = ds.data.table
    digests = {"src": _TextDigest(), "tgt": _TextDigest()}
    for side in ("src", "tgt"):
        for chunk in table.column(side).chunks:
            digests[side].update(chunk)
    return {side: digest.hexdigest() for side, digest in digests.items()}


def read_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    """The split's sentence pairs exactly as stored: string columns ``src`` and ``tgt``, memory-mapped.

    The source is read once, a chunk at a time, into ``data.cache_dir``; later calls map that file
    while the source is unchanged (for files: the same size and modification time).

    Args:
        cfg: where the corpus is.
        split: a key of ``cfg.splits`` (``train``, ``valid``, ``test``) or a split name of the source.

    Raises:
        DataError: a missing file or split, misaligned files, bad UTF-8 or JSON, an unknown language.
    """
    return _read(cfg, split)[0]


def load_references(cfg: DataConfig, split: str) -> list[str]:
    """The split's target side exactly as stored (not normalised): the references for BLEU."""
    return list(read_split(cfg, split)["tgt"])


# ----------------------------------------------------------------------------------------------------
# Hygiene


def _clean(batch: dict, dedup: bool) -> dict:
    src, tgt, flags, hashes = [], [], [], []
    for s, t in zip(batch["src"], batch["tgt"]):
        cs, ct = normalize(s), normalize(t)
        src.append(cs)
        tgt.append(ct)
        flags.append((_SRC_CHANGED if cs != s else 0) | (_TGT_CHANGED if ct != t else 0)
                     | (0 if unicodedata.is_normalized("NFKC", s) else _SRC_NOT_NFKC)
                     | (0 if unicodedata.is_normalized("NFKC", t) else _TGT_NOT_NFKC)
                     | (_EMPTY if not cs or not ct else 0))
        if dedup:
            hashes.append(int.from_bytes(hashlib.blake2b(f"{cs}\t{ct}".encode(), digest_size=8).digest(), "little", signed=True))
    out = {"src": src, "tgt": tgt, "flags": flags}
    if dedup:
        out["pair_hash"] = hashes
    return out


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
    raw, origin, _ = _read(cfg, split)
    if len(raw) == 0:
        raise DataError(f"{origin} has no lines; point data.splits.{split} at a split with sentence pairs")
    dedup = train and cfg.dedup
    key = datacache.key("clean", raw._fingerprint, dedup)
    features = {"src": datasets.Value("string"), "tgt": datasets.Value("string"), "flags": datasets.Value("uint8")}
    if dedup:
        features["pair_hash"] = datasets.Value("int64")
    ds = _map(raw, cfg, datacache.cache_root(cfg) / f"clean-{key}.arrow", _clean, 1.1, fn_kwargs={"dedup": dedup},
              features=datasets.Features(features), new_fingerprint=key, desc=f"cleaning the {split} split")

    flags = _numpy(ds, "flags")
    keep = (flags & _EMPTY) == 0 if train else np.ones(len(ds), bool)
    n_duplicates = 0
    if dedup:
        first = np.zeros(len(ds), bool)
        kept = np.flatnonzero(keep)
        first[kept[np.unique(_numpy(ds, "pair_hash")[kept], return_index=True)[1]]] = True
        n_duplicates = int(keep.sum() - first.sum())
        keep = first
    changed = int(np.count_nonzero(flags & _SRC_CHANGED) + np.count_nonzero(flags & _TGT_CHANGED))
    not_nfkc = int(np.count_nonzero(flags & _SRC_NOT_NFKC) + np.count_nonzero(flags & _TGT_NOT_NFKC))
    n_empty = int(np.count_nonzero(flags & _EMPTY))
    n_kept = int(keep.sum())
    logger.info("%s: %d pairs read; %d lines changed by NFKC, %d by normalisation in all (NFKC, whitespace); "
                "%s; %d pairs kept", origin, len(raw), not_nfkc, changed,
                (f"{n_empty} empty pairs dropped, {n_duplicates} duplicates dropped"
                 if train else f"{n_empty} empty pairs kept (not a training split)"), n_kept)
    if train and not n_kept:
        raise DataError(f"{origin}: no training pairs left: {len(raw)} read, {n_empty} dropped as "
                        f"empty, {n_duplicates} as duplicates (data.dedup)")
    return _keep(ds, keep, key)


def _map(ds: datasets.Dataset, cfg: DataConfig, path: Path, function: Callable, growth: float,
         **kwargs) -> datasets.Dataset:
    """``ds.map(function, batched=True, **kwargs)`` into the cache entry ``path`` (one file per process
    with ``data.num_proc``), sealed: a second call, or another rank, memory-maps what the first wrote.
    ``growth`` is about how many times the input's bytes the result takes (for a full disk's message)."""
    options = dict(batched=True, batch_size=_MAP_ROWS, writer_batch_size=_MAP_ROWS, cache_file_name=str(path), **kwargs)

    def build():
        out = ds.map(function, num_proc=_procs(cfg, len(ds)), **options)
        return [Path(f["filename"]) for f in out.cache_files], len(out), {}

    def load():  # with the number of processes that wrote the files, whatever data.num_proc is now
        written = len(datacache.files_of(path))
        return ds.map(function, num_proc=written if written > 1 else None, **options)

    needs = int(growth * sum(Path(f["filename"]).stat().st_size for f in ds.cache_files))
    return datacache.cached(path, build, load, needs)[0]


def _keep(ds: datasets.Dataset, keep: np.ndarray, key: str) -> datasets.Dataset:
    """The rows of ``ds`` where ``keep`` is True, by an index file beside the data (nothing is copied),
    sealed, and only read once it is there (a warm cache may be read-only)."""
    if keep.all():
        return ds
    assert ds._indices is None, "rows are kept of a dataset file, not of a selection"
    kept_key = datacache.key("kept", key)
    path = Path(ds.cache_files[0]["filename"]).with_name(f"kept-{kept_key}.arrow")

    def build():  # the index file datasets itself writes for a selection: one uint64 column "indices"
        rows = pa.array(np.flatnonzero(keep).astype(np.uint64))
        with durable.replacing(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
                pa.ipc.new_stream(sink, _INDEX_SCHEMA) as writer:
            writer.write_table(pa.table([rows], schema=_INDEX_SCHEMA), max_chunksize=_INDEX_ROWS)
        return [path], len(rows), {}

    load = lambda: ds._new_dataset_with_indices(indices_cache_file_name=str(path), fingerprint=kept_key)  # noqa: E731
    return datacache.cached(path, build, load, needs=8 * len(keep) + (1 << 16))[0]


# ----------------------------------------------------------------------------------------------------
# Directions and corpora


@dataclass(frozen=True)
class Stream:
    """One direction of one corpus: the unit an epoch mixes and validation scores.

    ``cfg`` reads it (the data config with this corpus's source and these two languages); ``tags``
    go before each of its sources: ``<2de>`` when the model translates into several languages
    (Johnson et al., 2017), ``<bt>`` for a corpus tagged so (Caswell et al., 2019).
    """

    name: str  # "en-de", or "en-de (data.mix[0], bt)"
    cfg: DataConfig
    tags: tuple[str, ...]
    weight: float


def streams(cfg: DataConfig) -> list[Stream]:
    """The training streams: each direction of the main corpus (``data.langs``/``data.directions``, or
    ``data.src_lang``-``data.tgt_lang``), then each corpus of ``data.mix``."""
    one = dict(langs=None, directions=None, mix=[])
    lang_tags = len(cfg.target_languages()) > 1
    out = [Stream(f"{src}-{tgt}", replace(cfg, src_lang=src, tgt_lang=tgt, **one),
                  (language_tag(tgt),) if lang_tags else (), 1.0) for src, tgt in cfg.pairs()]
    for i, corpus in enumerate(cfg.mix):
        corpus_cfg = replace(cfg, format=corpus.format, root=corpus.root, hub_id=corpus.hub_id,
                             hub_config=corpus.hub_config, src_lang=corpus.src_lang, tgt_lang=corpus.tgt_lang,
                             splits={"train": corpus.split}, **one)
        tags = ((f"<{corpus.tag}>",) if corpus.tag else ()) + ((language_tag(corpus.tgt_lang),) if lang_tags else ())
        name = f"{corpus.src_lang}-{corpus.tgt_lang} (data.mix[{i}]{', ' + corpus.tag if corpus.tag else ''})"
        out.append(Stream(name, corpus_cfg, tags, corpus.weight))
    return out


def tags(cfg: DataConfig) -> list[str]:
    """Every tag token of the streams of ``cfg``, for the tokenizer's vocabulary."""
    return sorted({tag for stream in streams(cfg) for tag in stream.tags})


def direction(cfg: DataConfig, src: str | None, tgt: str | None) -> Stream:
    """The main corpus's direction ``src``-``tgt`` as a stream (to evaluate or validate it); either
    language may be left out where the corpus has one direction that fits.

    Raises:
        DataError: the corpus has no such direction; the message lists the ones it has.
    """
    main = streams(cfg)[: len(cfg.pairs())]  # the data.mix corpora come after the main corpus's directions
    fitting = [s for s in main if (src is None or s.cfg.src_lang == src) and (tgt is None or s.cfg.tgt_lang == tgt)]
    if len(fitting) != 1:
        have = ", ".join(s.name for s in main)
        asked = f"{src or '?'}-{tgt or '?'}"
        raise DataError(f"the data config has directions {have}; {asked} names "
                        f"{'none' if not fitting else 'several'} of them: give src_lang= and tgt_lang=")
    return fitting[0]


def shares(sizes: Sequence[int], weights: Sequence[float], temperature: float) -> np.ndarray:
    """Each stream's share of an epoch: ``size ** (1 / temperature) * weight``, normalised (M2M-100's
    temperature sampling: 1 = proportional to sizes, larger = flatter)."""
    sizes, weights = np.asarray(sizes, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    used = (sizes > 0) & (weights > 0)
    if not used.any():
        raise DataError("every corpus in the mix has weight 0 or no pairs; give one a positive data.mix[].weight")
    # In logarithms: size ** (1 / T) overflows a float at T = 0.001, as a weight of 1e308 does times a size.
    log = np.full(len(sizes), -np.inf)
    log[used] = np.log(sizes[used]) / temperature + np.log(weights[used])
    raw = np.exp(log - log.max())
    return raw / raw.sum()


# ----------------------------------------------------------------------------------------------------
# The tokenizer


def train_tokenizer(splits: list[datasets.Dataset], cfg: DataConfig, run_copy: Path | None = None,
                    tags: Sequence[str] = ()) -> Tokenizer:
    """The SentencePiece tokenizer of the cleaned train splits (:func:`load_split`) of every stream.

    Trained on a seeded sample of at most ``data.tokenizer.sample_size`` pairs of them all (its time
    does not grow with the corpus past the sample), with ``tags`` as pieces of their own, into
    ``data.cache_dir/tokenizers/``, named by the splits and the settings: a later run on the same data
    with the same settings, in any run directory, reuses it, as it reuses ``run_copy`` (a run's own
    ``tokenizer/``) when that was made the same way.

    Raises:
        TokenizerError: settings SentencePiece rejects, or an unusable ``data.tokenizer.model``.
    """
    key = datacache.key("spm", [ds._fingerprint for ds in splits], asdict(cfg.tokenizer), list(tags))
    cached = datacache.cache_root(cfg) / "tokenizers" / key
    for folder in (run_copy, cached):
        if folder is not None and saved_fingerprint(folder) == key:
            logger.info("reusing the tokenizer in %s (same data and settings)", folder)
            return Tokenizer.load(folder)
    src = tgt = []
    if not cfg.tokenizer.model:
        train = splits[0] if len(splits) == 1 else datasets.concatenate_datasets(splits)
        rows = _sample(len(train), cfg.tokenizer.sample_size, cfg.tokenizer.seed)
        sample = train.select(rows).select_columns(["src", "tgt"]).to_dict()
        src, tgt = sample["src"], sample["tgt"]
        logger.info("training the tokenizer on %d of %d sentence pairs into %s", len(rows), len(train), cached)
    return Tokenizer.train(src, tgt, cfg.tokenizer, cached, fingerprint=key, tags=tags)


_SAMPLE_BLOCK = 256  # consecutive pairs drawn together into the tokenizer's sample


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` of ``n`` rows, sorted: seeded random blocks of consecutive rows, so that reading the
    sample pages in a few hundred stretches of the memory-mapped file, not all of it (single rows,
    one in 15 at 4.5M pairs, would touch every page)."""
    if size <= 0 or n <= size:
        return np.arange(n)
    full, wanted = n // _SAMPLE_BLOCK, -(-size // _SAMPLE_BLOCK)
    if full < wanted:  # the corpus is barely larger than the sample
        return np.arange(size)
    blocks = np.sort(np.random.default_rng(seed).choice(full, wanted, replace=False))
    return (blocks[:, None] * _SAMPLE_BLOCK + np.arange(_SAMPLE_BLOCK)).ravel()[:size]


# ----------------------------------------------------------------------------------------------------
# Tokenization


def _encode(batch: dict, tokenizer: Tokenizer, prefix: list[int], tgt_prefix: list[int]) -> dict:
    eos = tokenizer.eos_id
    src = [prefix + ids + [eos] for ids in tokenizer.encode_src(batch["src"])]
    tgt = [tgt_prefix + ids + [eos] for ids in tokenizer.encode_tgt(batch["tgt"])]
    return {"src_ids": src, "tgt_ids": tgt, "src_len": [len(x) for x in src], "tgt_len": [len(x) for x in tgt]}


def tokenize(ds: datasets.Dataset, tokenizer: Tokenizer, cfg: DataConfig, train: bool,
             prefix: Sequence[int] = (), name: str = "train split", tgt_prefix: Sequence[int] = ()) -> datasets.Dataset:
    """Add ``src_ids`` and ``tgt_ids`` (token ids + EOS, int16 where the vocabulary fits) and their
    lengths ``src_len`` and ``tgt_len`` to a split; ``prefix`` (tag ids) goes before every source and
    ``tgt_prefix`` (the target language's code, for M2M100 and NLLB) before every target.

    The result is cached under ``cfg.cache_dir`` by the split, the tokenizer and the settings, so a
    second run does not tokenize again. On a training split (``train``) pairs with a side over
    ``cfg.max_len`` tokens or a length ratio above ``cfg.max_len_ratio`` are dropped (the sentences'
    own tokens count: neither the tags nor EOS), with counts logged under ``name``.
    """
    dtype = "int16" if max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) <= 2**15 else "int32"
    features = ds.features.copy()
    features["src_ids"] = datasets.Sequence(datasets.Value(dtype))
    features["tgt_ids"] = datasets.Sequence(datasets.Value(dtype))
    features["src_len"] = features["tgt_len"] = datasets.Value("int32")
    # The target prefix joins the key only where there is one: the caches of attnmt's own models stay valid.
    key = datacache.key("tok", ds._fingerprint, tokenizer.fingerprint, dtype, list(prefix),
               *([list(tgt_prefix)] if tgt_prefix else []))
    ds = _map(ds, cfg, datacache.cache_root(cfg) / f"tokenized-{key}.arrow", _encode, 1.8,
              fn_kwargs={"tokenizer": tokenizer, "prefix": list(prefix), "tgt_prefix": list(tgt_prefix)},
              features=features, new_fingerprint=key, desc="tokenizing")
    if train:
        ds = _filter_lengths(ds, cfg, key, len(prefix), name, len(tgt_prefix))
    return ds


def token_lengths(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The lengths of ``src_ids`` and ``tgt_ids`` (EOS included) of a tokenized split: two int32 arrays,
    read from their own columns (4 bytes a row), not from the ids."""
    return _numpy(ds, "src_len"), _numpy(ds, "tgt_len")


def _filter_lengths(ds: datasets.Dataset, cfg: DataConfig, key: str, n_tags: int, name: str,
                    n_tgt_tags: int = 0) -> datasets.Dataset:
    src_len, tgt_len = token_lengths(ds)
    src_len, tgt_len = src_len - 1 - n_tags, tgt_len - 1 - n_tgt_tags  # neither the tags nor EOS are part of the sentence
    longer = np.maximum(src_len, tgt_len)
    too_long = (longer > cfg.max_len) if cfg.max_len > 0 else np.zeros(len(ds), bool)
    ratio = longer / np.maximum(np.minimum(src_len, tgt_len), 1)
    bad_ratio = (ratio > cfg.max_len_ratio) & ~too_long if cfg.max_len_ratio > 0 else np.zeros(len(ds), bool)
    keep = ~(too_long | bad_ratio)
    n_kept = int(keep.sum())
    logger.info("%s: %d pairs over data.max_len=%d tokens dropped, %d with a length ratio above "
                "data.max_len_ratio=%g dropped; %d pairs kept", name, int(too_long.sum()), cfg.max_len,
                int(bad_ratio.sum()), cfg.max_len_ratio, n_kept)
    if n_kept == 0:
        raise DataError(f"no training pairs left after the length rules: {int(too_long.sum())} of {len(ds)} over "
                        f"data.max_len={cfg.max_len} tokens, {int(bad_ratio.sum())} with a length ratio above "
                        f"data.max_len_ratio={cfg.max_len_ratio}; raise these limits")
    return _keep(ds, keep, datacache.key(key, cfg.max_len, cfg.max_len_ratio, n_tags))


# ----------------------------------------------------------------------------------------------------
# A training job's data


def prepare_data(data_cfg: DataConfig, tokenizer_dir: Path, tokenizer: Tokenizer | None = None):
    """The tokenizer, every stream's tokenized train split, and each direction's tokenized valid
    split, prepared once per job.

    Under torchrun, local rank 0 of each machine reads, cleans and tokenizes into ``data.cache_dir``
    first; the other ranks then memory-map what it wrote. The tokenizer is ``tokenizer`` (a
    checkpoint's), else global rank 0's (reused from ``tokenizer_dir`` or the cache when it was made
    from the same data and settings, else trained), sent to every rank.

    Returns:
        (tokenizer, train, mix, valid): ``train`` holds the pairs of every stream
        (:func:`streams`), one stream after another, with ``src_ids``, ``tgt_ids`` and
        their lengths; ``mix`` is ``(sizes, shares)`` of those streams, or None for a single one;
        ``valid`` lists ``(stream, valid dataset, (source prefix, target prefix))`` of each direction
        of the main corpus.
    """
    train_streams = streams(data_cfg)
    valid_streams = train_streams[: len(data_cfg.pairs())]
    with distributed.local_rank_zero_first():
        # With several streams, each one's log lines and errors start with its name.
        names = [stream.name if len(train_streams) > 1 else None for stream in train_streams]
        cleaned = [_named(name, load_split, stream.cfg, "train", train=True) for stream, name in zip(train_streams, names)]
        valid_clean = [load_split(stream.cfg, "valid", train=False) for stream in valid_streams]
    if tokenizer is None:
        state = (train_tokenizer(cleaned, data_cfg, tokenizer_dir, tags(data_cfg)).to_state()
                 if distributed.rank() == 0 else None)
        tokenizer = Tokenizer.from_state(distributed.broadcast_object(state))
    prefixes = [tokenizer.direction_ids(stream.cfg.src_lang, stream.cfg.tgt_lang, stream.tags) for stream in train_streams]
    with distributed.local_rank_zero_first():
        train_sets = [_named(name, tokenize, ds, tokenizer, stream.cfg, train=True, prefix=prefix,
                             name=name or "train split", tgt_prefix=tgt_prefix)
                      for stream, name, ds, (prefix, tgt_prefix) in zip(train_streams, names, cleaned, prefixes)]
        valid = [(stream, tokenize(ds, tokenizer, stream.cfg, train=False, prefix=prefix, tgt_prefix=tgt_prefix),
                  (prefix, tgt_prefix))
                 for stream, ds, (prefix, tgt_prefix) in zip(valid_streams, valid_clean, prefixes)]
    if len(train_sets) == 1:
        return tokenizer, train_sets[0], None, valid
    sizes = [len(ds) for ds in train_sets]
    mix = (sizes, shares(sizes, [s.weight for s in train_streams], data_cfg.temperature).tolist())
    logger.info("mixing %s", ", ".join(f"{s.name}: {n} pairs, {share:.1%} of an epoch"
                                       for s, n, share in zip(train_streams, *mix)))
    return tokenizer, datasets.concatenate_datasets(train_sets), mix, valid


def _named(label: str | None, step, *args, **kwargs):
    """``step(*args, **kwargs)`` on a stream; a :class:`DataError` starts with ``label`` where one is
    given, e.g. ``en-de (data.mix[0], bt)``, whose entry the ``data.*`` keys it names stand for."""
    try:
        return step(*args, **kwargs)
    except DataError as err:
        if label is None:
            raise
        raise DataError(f"{label}: {err}") from None
