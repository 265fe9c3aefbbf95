"""SentencePiece tokenization, with attnmt's fixed special ids or an imported vocabulary's.

Every tokenizer attnmt trains, joint or per language, has its special pieces at the same ids (pad,
unk, bos, eos at 0, 1, 2, 3: :data:`PAD_ID` ...). An imported model (:mod:`attnmt.pretrained`) keeps
its own vocabulary and its own special ids; so the model, the batches and the decoders are given them
by the tokenizer (``pad_id``, ``bos_id``, ``eos_id``, ``unk_id``); the constants are the ids of
attnmt's own vocabularies (and the defaults of :func:`attnmt.batching.collate`).

A :class:`Tokenizer` holds one SentencePiece model (joint: source and target share a vocabulary) or
two (one per language). It never normalises text itself: the data pipeline applies
:func:`normalize` before encoding, and the SentencePiece models are trained with the ``identity``
rule, so that decoding an encoded normalised line gives that line back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece as spm

from attnmt import durable

if TYPE_CHECKING:
    from attnmt.config import TokenizerConfig

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

STATE_FORMAT = 1
SETTINGS_FILE = "tokenizer.json"

logger = logging.getLogger(__name__)


def language_tag(lang: str) -> str:
    """The tag that asks a model of several target languages for ``lang``: ``<2de>`` (Johnson et al., 2017)."""
    return f"<2{lang}>"


def tag_language(tag: str) -> str | None:
    """The language a tag of :func:`language_tag` asks for (``"de"`` for ``<2de>``); None for another tag."""
    return tag[2:-1] if tag.startswith("<2") and tag.endswith(">") else None


class TokenizerError(ValueError):
    """Settings SentencePiece rejects, or a tokenizer file that cannot be used; the message names the key or file."""


# Every character str.splitlines() breaks at, mapped to a space.
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def normalize(text: str) -> str:
    """The text normalisation of the whole pipeline: Unicode NFKC, then whitespace trimmed and collapsed.

    Training data, evaluation sources and translation input all go through this one function.
    """
    return " ".join(unicodedata.normalize("NFKC", text).split())


class Tokenizer:
    """One joint SentencePiece model, or one per language, with pad/unk/bos/eos at ids 0/1/2/3 (an
    imported vocabulary: the ids its ``vocab`` table names).

    ``encode_*`` return ids only (no BOS/EOS); ``decode_*`` drop pad, bos and eos ids.
    """

    def __init__(self, src_model: bytes, tgt_model: bytes | None = None, settings: dict | None = None,
                 fingerprint: str | None = None, vocab: dict | None = None):
        """Build from serialized SentencePiece models; ``tgt_model=None`` means joint.

        ``vocab`` is set for an imported model's tokenizer (:mod:`attnmt.pretrained`): the pretrained
        vocabulary, whose ids are not SentencePiece's. Its keys: ``src`` (the source pieces, by id),
        ``tgt`` (the target's, or None: the same), ``special`` (``pad``, ``unk``, ``bos``, ``eos`` ids;
        ``bos`` is the token the decoder starts from), ``control`` (ids that are never text: language
        codes, ``<mask>``, unused rows), ``languages`` (language code -> its piece, put before the
        source and before the target as M2M100 and NLLB do), ``family`` and ``files`` (the model's
        own tokenizer files, written back by ``attnmt-export to=hf``).
        """
        self.joint = tgt_model is None
        self.settings = dict(settings or {})
        self.vocab = vocab
        self._src_bytes = src_model
        self._tgt_bytes = tgt_model
        check = vocab is None  # attnmt's own models hold the fixed special ids; a pretrained one has its own table
        self._src_sp = _processor(src_model, "source" if tgt_model is not None else "joint", check)
        self._tgt_sp = self._src_sp if tgt_model is None else _processor(tgt_model, "target", check)
        special = vocab["special"] if vocab else {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (int(special[k]) for k in ("pad", "unk", "bos", "eos"))
        src_table = vocab["src"] if vocab else None
        tgt_table = (vocab.get("tgt") or vocab["src"]) if vocab else None
        self._src = _Pieces(self._src_sp, src_table, self.unk_id)
        self._tgt = _Pieces(self._tgt_sp, tgt_table, self.unk_id)
        # Ids that decoding drops: never text.
        self.control_ids = frozenset({self.pad_id, self.bos_id, self.eos_id, *(vocab.get("control", []) if vocab else [])})
        self.languages: dict[str, str] = dict(vocab.get("languages", {})) if vocab else {}
        extra = b"" if vocab is None else json.dumps({k: vocab.get(k) for k in _VOCAB_TABLES}).encode()
        self.fingerprint = fingerprint or hashlib.sha256(src_model + (tgt_model or b"") + extra).hexdigest()

    # ------------------------------------------------------------------------------------------
    # Training, saving, loading

    @classmethod
    def train(cls, src_texts: Sequence[str], tgt_texts: Sequence[str], cfg: TokenizerConfig,
              out_dir: str | Path, fingerprint: str | None = None, tags: Sequence[str] = ()) -> Tokenizer:
        """Train SentencePiece on (a sample of) the training pairs and save it in ``out_dir``.

        If ``out_dir`` already holds a tokenizer trained on the same texts with the same settings (the
        hash in ``tokenizer.json`` matches), that one is loaded instead. With ``cfg.model`` set, that
        user-supplied model is copied to ``out_dir`` and nothing is trained.

        Args:
            src_texts: normalised source sentences of the training split.
            tgt_texts: normalised target sentences, aligned with ``src_texts``.
            cfg: a :class:`~attnmt.config.TokenizerConfig`.
            out_dir: the folder the tokenizer is saved in (created).
            fingerprint: what identifies the training data and settings, when the caller knows it
                (:func:`attnmt.data.train_tokenizer` names its cached splits); by default a hash of
                the texts and the settings.
            tags: tag tokens placed before sources (``<2de>`` for a target language, ``<bt>`` for a
                corpus), given pieces of their own in the source vocabulary as SentencePiece control
                symbols: found by :meth:`tag_id`, never produced from text, dropped when decoding.
        """
        out_dir = Path(out_dir)
        if cfg.model:
            tokenizer = cls.load(cfg.model)
            missing = [tag for tag in tags if tag not in tokenizer.tags]
            if missing:
                raise TokenizerError(f"data.tokenizer.model={cfg.model} has no tag {', '.join(missing)}, which the data "
                                     "needs (data.langs, data.mix[].tag): tags are fixed when a tokenizer is trained; "
                                     "leave data.tokenizer.model unset to train one with them")
            tokenizer.save(out_dir)
            return tokenizer
        if len(src_texts) != len(tgt_texts):
            raise ValueError(f"{len(src_texts)} source but {len(tgt_texts)} target sentences; they must be aligned")
        settings = tokenizer_settings(cfg) | ({"tags": list(tags)} if tags else {})
        fingerprint = fingerprint or _data_hash(src_texts, tgt_texts, settings)
        if saved_fingerprint(out_dir) == fingerprint:
            logger.info("reusing the tokenizer in %s (same data and settings)", out_dir)
            return cls.load(out_dir)
        if out_dir.exists():
            logger.info("the tokenizer in %s was trained on other data or settings (or is incomplete): "
                        "training a new one", out_dir)

        sample = _sample_indices(len(src_texts), cfg.sample_size, cfg.seed)
        if cfg.joint:
            texts = [src_texts[i] for i in sample] + [tgt_texts[i] for i in sample]
            tokenizer = cls(_train_model(texts, cfg, tags), None, settings, fingerprint)
        else:
            src_model = _train_model([src_texts[i] for i in sample], cfg, tags)
            tgt_model = _train_model([tgt_texts[i] for i in sample], cfg)
            tokenizer = cls(src_model, tgt_model, settings, fingerprint)
        tokenizer.save(out_dir)
        logger.info("trained a %s %s tokenizer (vocabulary %d/%d) on %d pairs into %s",
                    "joint" if cfg.joint else "per-language", cfg.model_type,
                    tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, len(sample), out_dir)
        return tokenizer

    def save(self, out_dir: str | Path) -> None:
        """Write ``joint.model`` (or ``src.model`` and ``tgt.model``) and ``tokenizer.json`` into ``out_dir``.

        Atomically (:func:`attnmt.durable.replacing_folder`): the files go into a temporary folder beside
        ``out_dir``, which then replaces it, so a crash leaves either the previous folder or the complete
        new one, never a half-written one.
        """
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with durable.replacing_folder(out_dir) as tmp:
            if self.joint:
                (tmp / "joint.model").write_bytes(self._src_bytes)
            else:
                (tmp / "src.model").write_bytes(self._src_bytes)
                (tmp / "tgt.model").write_bytes(self._tgt_bytes)
            meta = {"joint": self.joint, "settings": self.settings, "fingerprint": self.fingerprint}
            (tmp / SETTINGS_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a folder written by :meth:`save`, or a SentencePiece ``.model`` file (used as a joint model)."""
        path = Path(path)
        if path.is_file():
            return cls(path.read_bytes(), None, {"model": str(path)})
        meta_file = path / SETTINGS_FILE
        if not meta_file.is_file():
            raise TokenizerError(
                f"no tokenizer at {path}: expected a SentencePiece .model file or a folder with {SETTINGS_FILE} "
                "(written by Tokenizer.save)"
            )
        try:
            meta = json.loads(meta_file.read_text())
            if meta["joint"]:
                return cls((path / "joint.model").read_bytes(), None, meta["settings"], meta["fingerprint"])
            return cls((path / "src.model").read_bytes(), (path / "tgt.model").read_bytes(), meta["settings"],
                       meta["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            if isinstance(err, TokenizerError):
                raise
            raise TokenizerError(f"the tokenizer in {path} is incomplete or damaged ({type(err).__name__}: {err}); "
                                 "delete that folder to train a new one") from None

    def to_state(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer, as plain types (``torch.load(weights_only=True)`` safe)."""
        models = {"joint": self._src_bytes} if self.joint else {"src": self._src_bytes, "tgt": self._tgt_bytes}
        state = {"format": STATE_FORMAT, "joint": self.joint, "models": models,
                 "settings": dict(self.settings), "fingerprint": self.fingerprint}
        return state if self.vocab is None else {**state, "vocab": self.vocab}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from :meth:`to_state`'s dictionary."""
        models = state["models"]
        src, tgt = (models["joint"], None) if state["joint"] else (models["src"], models["tgt"])
        return cls(bytes(src), None if tgt is None else bytes(tgt), state.get("settings"), state.get("fingerprint"),
                   state.get("vocab"))

    def __getstate__(self) -> dict[str, Any]:  # for datasets.map(num_proc=...) and DataLoader workers
        return self.to_state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(Tokenizer.from_state(state).__dict__)

    # ------------------------------------------------------------------------------------------
    # Encoding and decoding

    @property
    def src_vocab_size(self) -> int:
        return self._src.size

    @property
    def tgt_vocab_size(self) -> int:
        return self._tgt.size

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        """Source sentences to ids (no BOS/EOS)."""
        return self._src.encode(list(texts))

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        """Target sentences to ids (no BOS/EOS)."""
        return self._tgt.encode(list(texts))

    def decode_src(self, ids: list[list[int]]) -> list[str]:
        """Source ids to text; pad, bos, eos and control ids are dropped."""
        return self._src.decode([self._text_ids(x) for x in ids])

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        """Target ids to text on one line each; pad, bos, eos and control ids (language codes) are dropped.

        Byte fallback can spell a line break (``<0x0A>``); it becomes a space, so one translation
        stays one output line.
        """
        return [text.translate(_LINE_BREAKS) for text in self._tgt.decode([self._text_ids(x) for x in ids])]

    def _text_ids(self, ids: Iterable[int]) -> list[int]:
        return [int(i) for i in ids if int(i) not in self.control_ids]

    @property
    def tags(self) -> list[str]:
        """The tag tokens this tokenizer was trained with (e.g. ``["<2de>", "<2fr>", "<bt>"]``)."""
        return list(self.settings.get("tags", []))

    def tag_id(self, tag: str) -> int:
        """The source id of ``tag`` (one of :attr:`tags`).

        Raises:
            TokenizerError: the tokenizer has no such tag; the message lists the ones it has.
        """
        if tag not in self.tags:
            raise TokenizerError(f"this model has no tag {tag}; its tags are {', '.join(self.tags) or 'none'}")
        return self._src.piece_ids([tag])[0]

    def language_id(self, lang: str) -> int:
        """The id of language ``lang``'s code (``__de__`` in M2M100, ``deu_Latn`` in NLLB).

        Raises:
            TokenizerError: the model has no such code; the message lists some it has.
        """
        if lang not in self.languages:
            known = sorted(self.languages)
            listed = ", ".join(known[:12]) + (f" and {len(known) - 12} more" if len(known) > 12 else "")
            raise TokenizerError(f"this model has no language {lang!r}; it knows {listed or 'none'}")
        return self._src.piece_ids([self.languages[lang]])[0]

    def direction_ids(self, src_lang: str | None, tgt_lang: str | None,
                      tags: Sequence[str] = ()) -> tuple[list[int], list[int]]:
        """The ids put before a source and before its target, for a pair from ``src_lang`` into ``tgt_lang``.

        attnmt's own tokenizers put ``tags`` (``<2de>``, ``<bt>``) before the source and nothing before
        the target. A tokenizer with language codes (M2M100, NLLB) puts the source language's code
        before the source and the target language's before the target (the decoder is made to start
        with it), in place of the ``<2xx>`` tags; its other tags must exist in its vocabulary.

        Raises:
            TokenizerError: an unknown tag or language.
        """
        if not self.languages:
            return [self.tag_id(tag) for tag in tags], []
        others = [self.tag_id(tag) for tag in tags if tag_language(tag) is None]
        return [self.language_id(src_lang), *others], [self.language_id(tgt_lang)]

    def src_pieces(self, ids: list[int]) -> list[str]:
        """The source pieces of an id sequence, e.g. ``['▁Ein', '▁Hund', '</s>']`` (special ids as in
        :meth:`tgt_pieces`)."""
        return self._src.pieces(ids)

    def tgt_pieces(self, ids: list[int]) -> list[str]:
        """The target pieces of an id sequence (special ids become ``<s>``, ``</s>``, ``<pad>``)."""
        return self._tgt.pieces(ids)

    def tgt_piece_ids(self, pieces: list[str]) -> list[int]:
        """The target ids of pieces (the inverse of :meth:`tgt_pieces`; a piece not in the vocabulary is UNK)."""
        return self._tgt.piece_ids(pieces)


def saved_fingerprint(folder: str | Path) -> str | None:
    """The fingerprint in ``folder``'s ``tokenizer.json``; None where there is none (or it is unreadable)."""
    try:
        return json.loads((Path(folder) / SETTINGS_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tokenizer_settings(cfg: TokenizerConfig) -> dict[str, Any]:
    """The settings a trained tokenizer records (a :class:`~attnmt.config.TokenizerConfig` without
    ``model``): two tokenizers trained on the same data with equal settings are the same."""
    return {k: v for k, v in asdict(cfg).items() if k != "model"}


# The parts of an imported vocabulary that decide its ids (what its fingerprint hashes).
_VOCAB_TABLES = ("src", "tgt", "special", "control", "languages")


class _Pieces:
    """One side's vocabulary: SentencePiece's own ids, or (an imported model) a table of pieces by id,
    looked up from the pieces SentencePiece cuts (a piece not in the table is ``unk_id``)."""

    def __init__(self, sp: spm.SentencePieceProcessor, table: list[str] | None, unk_id: int) -> None:
        self.sp, self.table, self.unk_id = sp, table, unk_id
        self.index = None if table is None else {piece: i for i, piece in reversed(list(enumerate(table)))}
        self.size = sp.get_piece_size() if table is None else len(table)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.table is None:
            return self.sp.encode(texts, out_type=int)
        return [[self.index.get(p, self.unk_id) for p in pieces] for pieces in self.sp.encode(texts, out_type=str)]

    def decode(self, ids: list[list[int]]) -> list[str]:
        if self.table is None:
            return self.sp.decode(ids)
        return self.sp.decode([self.pieces(x) for x in ids])

    def pieces(self, ids: Iterable[int]) -> list[str]:
        if self.table is None:
            return self.sp.id_to_piece([int(i) for i in ids])  # one call: a call per id costs 3x
        return [self.table[int(i)] if 0 <= int(i) < self.size else self.table[self.unk_id] for i in ids]

    def piece_ids(self, pieces: list[str]) -> list[int]:
        if self.table is None:
            return self.sp.piece_to_id(list(pieces))
        return [self.index.get(p, self.unk_id) for p in pieces]


def _processor(model: bytes, name: str, check_ids: bool = True) -> spm.SentencePieceProcessor:
    try:
        sp = spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError as err:
        raise TokenizerError(f"the {name} SentencePiece model cannot be loaded (corrupt?): {err}") from None
    ids = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
    if check_ids and ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        raise TokenizerError(
            f"the {name} SentencePiece model has pad/unk/bos/eos ids {ids}; attnmt needs "
            f"({PAD_ID}, {UNK_ID}, {BOS_ID}, {EOS_ID}). Retrain it with --pad_id=0 --unk_id=1 --bos_id=2 --eos_id=3"
        )
    return sp


def _data_hash(src_texts: Iterable[str], tgt_texts: Iterable[str], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for texts in (src_texts, tgt_texts):
        h.update(b"\x00side\x00")
        for text in texts:
            h.update(text.encode("utf-8"))
            h.update(b"\n")
    return h.hexdigest()


def _sample_indices(n: int, sample_size: int, seed: int) -> list[int]:
    if sample_size <= 0 or n <= sample_size:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), sample_size))


def _train_model(texts: list[str], cfg: TokenizerConfig, tags: Sequence[str] = ()) -> bytes:
    """Train one SentencePiece model on ``texts`` and return its serialized bytes."""
    texts = [t for t in texts if t]
    if not texts:
        raise TokenizerError("no non-empty sentences to train the tokenizer on")
    # A temp file rather than sentence_iterator: the trainer then reads the sample in its own threads.
    with tempfile.TemporaryDirectory(prefix="attnmt-spm-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("".join(t.replace("\n", " ") + "\n" for t in texts), encoding="utf-8")
        prefix = Path(tmp) / "spm"
        try:
            _run_trainer(corpus, prefix, cfg, tags)
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            extra = " (byte_fallback adds 256 byte pieces)" if cfg.byte_fallback else ""
            raise TokenizerError(f"SentencePiece cannot train with data.tokenizer.vocab_size={cfg.vocab_size}{extra}: "
                                 f"{reason}") from None
        model = Path(f"{prefix}.model").read_bytes()
    pieces = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    if pieces < cfg.vocab_size:  # hard_vocab_limit=False: a small corpus gets what it can hold
        # A few pieces short is SentencePiece's rounding; far short, a vocab_size the corpus cannot fill.
        logger.log(logging.WARNING if pieces < 0.9 * cfg.vocab_size else logging.INFO,
                   "data.tokenizer.vocab_size=%d, but %d training sentences hold only %d pieces: the vocabulary has %d",
                   cfg.vocab_size, len(texts), pieces, pieces)
    return model


# SentencePiece's trainer, run by _run_trainer in a Python process of its own.
_TRAINER = "import json, sys, sentencepiece as spm; spm.SentencePieceTrainer.train(**json.loads(sys.argv[1]))"


def _run_trainer(corpus: Path, prefix: Path, cfg: TokenizerConfig, tags: Sequence[str] = ()) -> None:
    """Train on ``corpus`` into ``prefix.model``, in a process of its own: the trainer's memory (some
    twenty times the sample's text) goes back to the system when it ends instead of raising the
    training run's peak for good, and a trainer that aborts (it does on some inputs) ends that process,
    not this one.

    Raises:
        RuntimeError: the trainer failed; the message is its last line of output.
    """
    options = dict(
        input=str(corpus), model_prefix=str(prefix), model_type=cfg.model_type, vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage, byte_fallback=cfg.byte_fallback,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        normalization_rule_name="identity",  # attnmt.tokenizer.normalize already ran
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary instead of an error
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    if tags:
        options["control_symbols"] = ",".join(tags)
    proc = subprocess.run([sys.executable, "-c", _TRAINER, json.dumps(options)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1].removeprefix("RuntimeError: ") if lines else f"exit status {proc.returncode}"
        if proc.returncode < 0:
            reason = f"the trainer was killed by signal {-proc.returncode} ({reason})"
        raise RuntimeError(reason)
