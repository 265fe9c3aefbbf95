"""Properties of greedy and beam search: beam 1 = greedy, beam = exhaustive search when it cannot
prune, batch independence, length rules, and scores that match the model's own probabilities."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnmt.config import ConfigError
from attnmt.decoding import STRATEGIES, beam_search, greedy_search, length_penalty, search, strategy
from attnmt.model import build_model
from attnmt.tokenizer import BOS_ID, EOS_ID, PAD_ID
from conftest import decode_config, tiny_config
from test_model import padded_batch


def settings(**fields):
    """The shipped search settings with ``fields``; the exact stop unless a test chooses, since these
    properties (beam = exhaustive search, ...) are about a search that never stops early."""
    return decode_config(**{"beam_stop": "exact", **fields})


def greedy(model, src, src_mask, **fields) -> list[list[int]]:
    return [hyps[0].tokens for hyps in greedy_search(model, src, src_mask, settings(**fields))]


def beam(model, src, src_mask, **fields):
    return beam_search(model, src, src_mask, settings(**fields))


def sequence_log_prob(model, src: torch.Tensor, src_mask: torch.Tensor, tokens: list[int]) -> float:
    """log P(tokens + EOS | src) by teacher forcing: a scorer independent of the search code."""
    tgt_in = torch.tensor([[BOS_ID] + tokens])
    logp = model(src, src_mask, tgt_in)[0].double().log_softmax(-1)
    targets = tokens + [EOS_ID]
    return sum(logp[t, y].item() for t, y in enumerate(targets))


@pytest.fixture
def model():
    return build_model(tiny_config()).eval()


@pytest.fixture
def eager_model():
    """A model that wants to stop early in some sentences and not in others (its EOS output row scaled
    up), so that the stopping rules and min_len decide outputs. The tests that use it check that it does."""
    torch.manual_seed(0)
    model = build_model(tiny_config(share_embeddings=False, tie_output=False)).eval()
    with torch.no_grad():
        model.output_proj.weight[EOS_ID] *= 5.0
    return model


@pytest.mark.parametrize("which", ["model", "eager_model"])
def test_beam_size_one_equals_greedy(which, request) -> None:
    model = request.getfixturevalue(which)
    src, src_mask = padded_batch([5, 2, 8, 6, 3, 7])
    greedy_out = greedy(model, src, src_mask)
    # With alpha = 0, a finished hypothesis is final for beam 1 (every live extension scores lower),
    # which is exactly greedy's stopping rule.
    beam_out = beam(model, src, src_mask, beam_size=1, len_penalty=0.0)
    assert [hyps[0].tokens for hyps in beam_out] == greedy_out
    if which == "eager_model":  # EOS, not the length limit, ended some sentences
        limits = [int(1.5 * n + 10) for n in src_mask.sum(1).tolist()]
        assert any(len(out) < limit for out, limit in zip(greedy_out, limits)), greedy_out


def test_beam_search_finds_the_exhaustive_best() -> None:
    # Vocabulary: pad, unk, bos, eos, 4, 5, 6; generable tokens are unk, 4, 5, 6 and EOS. An untied,
    # sharpened output layer gives distributions whose best sequence varies with the source.
    model = build_model(tiny_config(src_vocab_size=7, tgt_vocab_size=7, share_embeddings=False, tie_output=False)).eval()
    model.output_proj.weight.data.mul_(2.0)
    max_tokens, greedy_misses = 3, 0
    for alpha in [0.0, 1.0, 2.0]:
        for trial in range(4):
            src, src_mask = padded_batch([4], vocab=7)
            best_tokens, best_score = None, -math.inf
            for n in range(max_tokens + 1):
                for tokens in itertools.product([1, 4, 5, 6], repeat=n):
                    score = sequence_log_prob(model, src, src_mask, list(tokens)) / length_penalty(n + 1, alpha)
                    if score > best_score:
                        best_tokens, best_score = list(tokens), score
            # 4^3 live prefixes x 5 continuations = 320 candidates at most: a beam of 512 never prunes.
            hyp = beam(model, src, src_mask, beam_size=512, len_penalty=alpha, max_len_a=0.0, max_len_b=max_tokens)[0][0]
            assert hyp.tokens == best_tokens, (alpha, trial)
            assert hyp.score == pytest.approx(best_score, abs=1e-4)
            greedy_misses += greedy(model, src, src_mask, max_len_a=0.0, max_len_b=max_tokens)[0] != best_tokens
    assert greedy_misses > 0, "the search problem is too easy to tell exhaustive search from greedy"


def test_beam_scores_are_the_models_normalised_log_probs(model) -> None:
    src, src_mask = padded_batch([6, 4])
    for i, hyps in enumerate(beam(model, src, src_mask, beam_size=4, len_penalty=0.6, nbest=4)):
        assert len(hyps) == 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 4
        s = int(src_mask[i].sum())
        for h in hyps:
            expected = sequence_log_prob(model, src[i : i + 1, :s], src_mask[i : i + 1, :s], h.tokens)
            assert h.score == pytest.approx(expected / length_penalty(len(h.tokens) + 1, 0.6), abs=1e-4)


@pytest.mark.parametrize("which", ["model", "eager_model"])
@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_batched_equals_one_by_one(which: str, search: str, request) -> None:
    # With eager_model, sentences finish at different steps: their rows leave the batch mid-way.
    model = request.getfixturevalue(which)
    lengths = [9, 3, 6, 1, 7]
    src, src_mask = padded_batch(lengths)

    def run(s, m):
        if search == "greedy":
            return [(tokens, []) for tokens in greedy(model, s, m)]
        hyps = beam(model, s, m, beam_size=3, nbest=2)
        return [([h.tokens for h in sent], [h.score for h in sent]) for sent in hyps]

    batched = run(src, src_mask)
    alone = [run(src[i : i + 1, :n], src_mask[i : i + 1, :n])[0] for i, n in enumerate(lengths)]
    assert [tokens for tokens, _ in batched] == [tokens for tokens, _ in alone]
    # Scores agree up to float rounding: matmuls block differently for other batch sizes.
    for (_, batched_scores), (_, alone_scores) in zip(batched, alone):
        assert batched_scores == pytest.approx(alone_scores, abs=1e-4)


@pytest.mark.parametrize("stop", ["exact", "finished"])
def test_beam_search_in_blocks_of_rows_equals_all_rows_at_once(eager_model, monkeypatch, stop: str) -> None:
    """Beam search projects, normalises and ranks the logits a block of rows at a time (so that a big
    batch's logits stay in the processor's cache): blocks of any size give the same search. The
    length limits, which rows of one block hit and others not, end some sentences here."""
    import attnmt.decoding

    src, src_mask = padded_batch([9, 3, 6, 1, 7, 2, 5])
    cfg = settings(beam_size=3, nbest=3, beam_stop=stop, max_len_a=0.5, max_len_b=3)
    whole = beam_search(eager_model, src, src_mask, cfg)
    for rows in (1, 2, 5):  # a block that splits a sentence's beams, and a last block shorter than the rest
        monkeypatch.setattr(attnmt.decoding, "_ROWS_PER_BLOCK", rows)
        blocks = beam_search(eager_model, src, src_mask, cfg)
        assert [[h.tokens for h in sent] for sent in blocks] == [[h.tokens for h in sent] for sent in whole]
        for sent_blocks, sent_whole in zip(blocks, whole):
            assert [h.score for h in sent_blocks] == pytest.approx([h.score for h in sent_whole], abs=1e-5)


def test_outputs_hold_no_special_ids_and_respect_lengths(eager_model) -> None:
    model = eager_model
    src, src_mask = padded_batch([5, 2, 8, 6, 3, 7])
    src_lens = src_mask.sum(1).tolist()
    unconstrained = greedy(model, src, src_mask, max_len_a=1.0, max_len_b=20)
    assert any(len(out) < 3 for out in unconstrained), "min_len would change nothing for this model"
    for a, b, min_len in [(1.0, 2, 0), (0.0, 4, 3), (0.5, 1, 2), (1.0, 20, 3)]:
        outputs = {
            "greedy": greedy(model, src, src_mask, max_len_a=a, max_len_b=b, min_len=min_len),
            "beam": [hyps[0].tokens for hyps in beam(model, src, src_mask, beam_size=3, max_len_a=a, max_len_b=b,
                                                     min_len=min_len)],
        }
        for name, outs in outputs.items():
            for out, n in zip(outs, src_lens):
                limit = int(a * n + b)
                assert len(out) <= limit, (name, out, limit)
                assert len(out) >= min(min_len, limit), (name, out, min_len)
                assert not {PAD_ID, BOS_ID, EOS_ID} & set(out), (name, out)


def test_nbest_above_beam_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="nbest=3 needs beam_size >= 3"):
        settings(beam_size=2, nbest=3).check()


def test_search_runs_the_strategy_the_config_asks_for(eager_model, model) -> None:
    src, src_mask = padded_batch([5, 2, 8])
    asked = {"greedy": settings(beam_size=1), "beam": settings(beam_size=3, nbest=2),
             "sampling": settings(sampling="true", nbest=2, seed=3)}
    assert {strategy(cfg).name for cfg in asked.values()} == {s.name for s in STRATEGIES} == set(asked)
    for name, cfg in asked.items():
        own = next(s for s in STRATEGIES if s.name == name).search(eager_model, src, src_mask, cfg)
        via = search(eager_model, src, src_mask, cfg)
        assert [[h.tokens for h in sent] for sent in via] == [[h.tokens for h in sent] for sent in own], name
    tokens = [[h.tokens for h in sent] for sent in search(model, src, src_mask, settings(beam_size=1))]
    drawn = search(model, src, src_mask, settings(beam_size=1, nbest=1, sampling="true", seed=3))
    assert [[h.tokens for h in sent] for sent in drawn] != tokens  # sampling=true wins over beam_size=1


def test_decoding_never_exceeds_model_positions() -> None:
    model = build_model(tiny_config(max_positions=12)).eval()
    src, src_mask = padded_batch([10])
    out = greedy(model, src, src_mask, max_len_a=5.0, max_len_b=50, min_len=100)
    assert len(out[0]) == 11  # BOS + 11 tokens fill the 12 positions; EOS is implied at the limit
    hyp = beam(model, src, src_mask, beam_size=2, max_len_a=5.0, max_len_b=50, min_len=100)[0][0]
    assert len(hyp.tokens) == 11


def test_stopping_once_beam_size_have_ended_never_beats_the_exact_stop(trained_checkpoint, monkeypatch) -> None:
    from attnmt.batching import pad
    from attnmt.checkpoint import load_for_inference
    from attnmt.inference import encode_sources
    from attnmt.model import Transformer
    from conftest import FIXTURE_CORPUS

    model, tokenizer, _ = load_for_inference(trained_checkpoint)
    lines = (FIXTURE_CORPUS / "valid.de").read_text(encoding="utf-8").splitlines()
    src, src_mask = pad(encode_sources(tokenizer, lines, model.cfg.max_positions))
    steps, results = {}, {}
    real_decode = Transformer.decode_states

    def counted(self, *args, **kwargs):
        steps[mode] = steps.get(mode, 0) + 1
        return real_decode(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "decode_states", counted)
    for mode in ("exact", "finished"):
        results[mode] = beam(model, src, src_mask, beam_size=4, len_penalty=1.0, nbest=2, beam_stop=mode)
    for exact, early in zip(results["exact"], results["finished"]):
        assert len(early) == 2 and early[0].score <= exact[0].score + 1e-6  # the exact stop searched on from there
    # A trained model ends its best beams early; only the exact bound keeps the others going.
    assert steps["finished"] < steps["exact"], steps
    with pytest.raises(ConfigError, match="beam_stop='soon' is unknown"):
        settings(beam_stop="soon")
