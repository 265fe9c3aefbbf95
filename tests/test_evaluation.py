"""Unit properties of the translation plumbing: batching, order restoration, line input."""

from __future__ import annotations

import io
import random
import threading
import time

import pytest

from attnmt.cli.common import UserError, available_chunks, iter_lines
from attnmt.batching import length_batches
from attnmt.evaluation import corpus_scores


def test_length_batches_cover_every_sentence_once_within_max_tokens() -> None:
    rng = random.Random(0)
    lengths = [rng.choice([0, 0, 1, 3, 7, 12, 40, 90]) for _ in range(500)]
    batches = length_batches(lengths, max_tokens=100)
    seen = sorted(i for batch in batches for i in batch)
    assert seen == [i for i, n in enumerate(lengths) if n > 0]
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 100


def test_a_sentence_longer_than_max_tokens_gets_its_own_batch() -> None:
    assert length_batches([5, 300, 5], max_tokens=100) == [[0, 2], [1]]


@pytest.mark.parametrize("beam_size", [1, 4])
def test_a_translation_does_not_depend_on_max_tokens(trained_checkpoint, beam_size: int) -> None:
    from attnmt.config import compose
    from conftest import FIXTURE_CORPUS, native_engine

    engine = native_engine(trained_checkpoint)
    lines = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines()
    results = []
    for max_tokens in [1, 40, 200, 100_000]:  # one sentence per batch ... all in one batch
        cfg = compose("translate", ["ckpt=unused", f"beam_size={beam_size}", f"nbest={beam_size}", f"max_tokens={max_tokens}"])
        results.append(engine.translate(lines, cfg))
    for other in results[1:]:
        assert [t.texts for t in other] == [t.texts for t in results[0]]
        for a, b in zip(other, results[0]):  # up to float rounding: matmuls block differently per batch size
            assert a.scores == pytest.approx(b.scores, abs=1e-4, nan_ok=True)
    assert all(t.texts[0] for t in results[0])


def test_iter_lines_names_file_and_line_of_bad_utf8() -> None:
    stream = io.BytesIO("gut\nauch gut\n".encode() + b"schlecht \xe4\n")
    lines = iter_lines(stream, "input.de")
    assert next(lines) == "gut"
    assert next(lines) == "auch gut"
    with pytest.raises(UserError, match=r"input.de line 3: invalid UTF-8 \(byte 0xe4 at column 10\)"):
        next(lines)


def test_iter_lines_keeps_empty_and_whitespace_lines() -> None:
    stream = io.BytesIO(b"a\n\n   \r\nlast without newline")
    assert list(iter_lines(stream, "x")) == ["a", "", "   ", "last without newline"]


def test_available_chunks_keep_order_and_fill_up_from_a_fast_source() -> None:
    lines = [f"line {i}" for i in range(1000)]
    chunks = list(available_chunks(iter(lines), max_lines=64))
    assert [line for chunk in chunks for line in chunk] == lines
    assert all(len(c) <= 64 for c in chunks)
    assert len(chunks) < 40  # mostly full chunks, not one line at a time


def test_available_chunks_yield_what_arrived_without_waiting_for_more() -> None:
    more = threading.Event()

    def slow_source():
        yield "first"
        yield "second"
        more.wait(timeout=10)  # the writer pauses: the first chunk must come out anyway
        yield "third"

    chunks = available_chunks(slow_source(), max_lines=64)
    start = time.monotonic()
    assert next(chunks) == ["first", "second"]
    assert time.monotonic() - start < 5
    more.set()
    assert next(chunks) == ["third"]


def test_available_chunks_translate_what_came_before_a_read_error() -> None:
    def failing_source():
        yield "ok"
        raise UserError("x line 2: invalid UTF-8")

    chunks = available_chunks(failing_source(), max_lines=64)
    assert next(chunks) == ["ok"]
    with pytest.raises(UserError, match="line 2"):
        next(chunks)


def test_corpus_scores_are_sacrebleus() -> None:
    import sacrebleu

    hyps = ["A man is riding a bike .", "Two dogs play in the snow", "a woman"]
    refs = ["A man rides a bicycle.", "Two dogs are playing in the snow.", "A woman sings."]
    scores = corpus_scores(hyps, refs, tgt_lang="en")
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=0.01)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=0.01)
    assert "tok:13a" in scores["bleu_signature"] and "case:mixed" in scores["bleu_signature"]
    assert "tok:zh" in corpus_scores(hyps, refs, tgt_lang="zh")["bleu_signature"]
    assert "tok:intl" in corpus_scores(hyps, refs, tgt_lang="en", bleu_tokenize="intl")["bleu_signature"]
