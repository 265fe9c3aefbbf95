"""Sampling (``sampling=true``): its limits are greedy search, its draws follow the model's
distribution under temperature, top-k and top-p, and a line's draws do not depend on its batch."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from attnmt.config import ConfigError
from attnmt.decoding import _filter, sample_search, uniform_noise
from attnmt.model import build_model
from attnmt.tokenizer import BOS_ID, EOS_ID
from conftest import decode_config, native_engine, tiny_config
from test_decoding import greedy, sequence_log_prob
from test_model import padded_batch


def sample(model, src, src_mask, line_ids, **fields):
    """One draw per source (``nbest=1``) with the shipped settings and ``fields``."""
    return [hyps[0] for hyps in sample_search(model, src, src_mask, decode_config(sampling="true", **fields), line_ids)]


@pytest.fixture
def eager_model():
    """A tiny random model whose sentences end by EOS at different steps (EOS row scaled up: some end at once, others at their length limit)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(share_embeddings=False, tie_output=False)).eval()
    with torch.no_grad():
        model.output_proj.weight[EOS_ID] *= 1.3
    return model


@pytest.fixture
def small_vocab_model():
    """Vocabulary of 7 (4 generable tokens and EOS) with distributions far from uniform, so that
    frequencies can be compared with probabilities token by token."""
    torch.manual_seed(2)
    return build_model(tiny_config(src_vocab_size=7, tgt_vocab_size=7, share_embeddings=False,
                                   tie_output=False)).eval()


def ids(n: int) -> torch.Tensor:
    return torch.arange(n)


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1e-6), dict(temperature=1e-300), dict(top_k=1),
                                      dict(top_p=1e-9)])
def test_the_limits_of_sampling_are_greedy_search(eager_model, settings) -> None:
    src, src_mask = padded_batch([5, 2, 8, 6, 3, 7])
    greedy_out = greedy(eager_model, src, src_mask)
    sampled = sample(eager_model, src, src_mask, ids(6), seed=7, **settings)
    assert [h.tokens for h in sampled] == greedy_out
    assert len({len(tokens) for tokens in greedy_out}) > 1, greedy_out  # sentences ended at different steps


def test_draws_are_reproducible_and_independent_of_the_batch(eager_model) -> None:
    lengths = [9, 3, 6, 1, 7]
    src, src_mask = padded_batch(lengths)
    line_ids = torch.tensor([10, 11, 12, 13, 14])
    batched = sample(eager_model, src, src_mask, line_ids, seed=5, top_p=0.9)
    alone = [sample(eager_model, src[i : i + 1, :n], src_mask[i : i + 1, :n], line_ids[i : i + 1],
                    seed=5, top_p=0.9)[0] for i, n in enumerate(lengths)]
    assert [h.tokens for h in batched] == [h.tokens for h in alone]
    assert [h.score for h in batched] == pytest.approx([h.score for h in alone], abs=1e-4)
    reordered = sample(eager_model, src.flip(0), src_mask.flip(0), line_ids.flip(0), seed=5, top_p=0.9)
    assert [h.tokens for h in reordered][::-1] == [h.tokens for h in batched]
    # Another seed draws other translations (the model is random enough that some differ).
    other = sample(eager_model, src, src_mask, line_ids, seed=6, top_p=0.9)
    assert [h.tokens for h in other] != [h.tokens for h in batched]


def test_a_draw_is_scored_by_its_log_probability_under_the_model(eager_model) -> None:
    src, src_mask = padded_batch([6, 4, 8])
    for h, i in zip(sample(eager_model, src, src_mask, ids(3), seed=2, temperature=1.5), range(3)):
        n = int(src_mask[i].sum())
        expected = sequence_log_prob(eager_model, src[i : i + 1, :n], src_mask[i : i + 1, :n], h.tokens)
        assert h.score == pytest.approx(expected, abs=1e-4)


def reference_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                            forbidden: set[int]) -> torch.Tensor:
    """The distribution of the next token, computed here independently of the sampler: ``softmax(logits /
    temperature)`` over the tokens not ``forbidden``, kept to the ``top_k`` most probable (0 = all), then to
    the nucleus (the fewest most probable tokens whose renormalised mass reaches ``top_p``), renormalised."""
    values = [float(x) for x in logits]
    allowed = [t for t in range(len(values)) if t not in forbidden]
    weights = {t: math.exp((values[t] - max(values[u] for u in allowed)) / temperature) for t in allowed}
    ranked = sorted(allowed, key=lambda t: weights[t], reverse=True)
    if top_k:
        ranked = ranked[:top_k]
    total = sum(weights[t] for t in ranked)
    nucleus, mass = [], 0.0
    for t in ranked:
        if mass >= top_p:
            break
        nucleus.append(t)
        mass += weights[t] / total
    total = sum(weights[t] for t in nucleus)
    return torch.tensor([weights[t] / total if t in nucleus else 0.0 for t in range(len(values))])


def first_token_frequencies(model, draws: int, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies of the first token over ``draws`` samples of one source (each a line of its own),
    and the model's probabilities for it under the same settings, computed by :func:`reference_probabilities`."""
    src, src_mask = padded_batch([5], vocab=7)
    logits = model.decode(torch.tensor([[BOS_ID]]), model.encode(src, src_mask), src_mask)[0, -1].double()
    forbidden = {model.cfg.pad_id, model.cfg.bos_id} - {model.cfg.eos_id}  # never generated; EOS may come first
    probs = reference_probabilities(logits, settings.get("temperature", 1.0), settings.get("top_k", 0),
                                    settings.get("top_p", 1.0), forbidden)
    hyps = sample(model, src.expand(draws, -1), src_mask.expand(draws, -1), ids(draws), seed=11,
                  max_len_a=0.0, max_len_b=1, **settings)  # one token, then EOS
    counts = Counter(h.tokens[0] if h.tokens else EOS_ID for h in hyps)
    frequencies = torch.tensor([counts[t] / draws for t in range(probs.numel())])
    return frequencies, probs


@pytest.mark.parametrize("settings", [dict(), dict(temperature=2.0), dict(temperature=0.5),
                                      dict(top_k=2), dict(top_p=0.8), dict(top_k=3, top_p=0.7, temperature=1.5)])
def test_frequencies_match_the_models_probabilities(small_vocab_model, settings) -> None:
    draws = 4000
    with torch.no_grad():
        frequencies, probs = first_token_frequencies(small_vocab_model, draws, **settings)
    # Several tokens are likely, so that the comparison says something.
    assert (probs > 0.05).sum() >= 2, probs
    # 4.5 standard errors of a frequency at p = 1/2 over 4000 draws: a fair sampler fails this about once in 10^5.
    tolerance = 4.5 * math.sqrt(0.25 / draws)
    assert (frequencies - probs).abs().max() < tolerance, (frequencies, probs)
    assert frequencies[probs == 0].sum() == 0  # what top-k and top-p cut is never drawn


def test_filter_keeps_the_top_k_and_the_nucleus() -> None:
    logits = torch.tensor([[math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]])
    assert torch.isfinite(_filter(logits, 1.0, 2, 1.0)).tolist() == [[True, True, False, False]]
    # The nucleus: the fewest tokens whose mass reaches top_p (0.5 + 0.3 >= 0.8; 0.5 < 0.6).
    assert torch.isfinite(_filter(logits, 1.0, 0, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(_filter(logits, 1.0, 0, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(_filter(logits, 1.0, 0, 0.5)).tolist() == [[True, False, False, False]]


def test_noise_is_uniform_and_depends_on_its_counter_alone() -> None:
    noise = uniform_noise(3, torch.arange(200), 4, 500)
    assert noise.min() > 0 and noise.max() < 1
    assert noise.mean().item() == pytest.approx(0.5, abs=0.005)
    assert noise.var().item() == pytest.approx(1 / 12, abs=0.002)
    assert torch.equal(uniform_noise(3, torch.tensor([57]), 4, 500)[0], noise[57])
    assert not torch.equal(uniform_noise(3, torch.arange(200), 5, 500), noise)  # another step
    assert not torch.equal(uniform_noise(4, torch.arange(200), 4, 500), noise)  # another seed


def test_translations_of_a_line_are_the_same_whatever_the_batching(trained_checkpoint) -> None:
    from conftest import FIXTURE_CORPUS

    engine = native_engine(trained_checkpoint)
    lines = (FIXTURE_CORPUS / "valid.de").read_text(encoding="utf-8").splitlines()[:12]
    cfg = decode_config(sampling="true", nbest=3, top_p=0.95, seed=1)
    whole = engine.translate(lines, cfg)
    one_by_one = [engine.translate([line], replace(cfg, max_tokens=1), first_line=i + 1)[0]
                  for i, line in enumerate(lines)]
    assert [t.texts for t in whole] == [t.texts for t in one_by_one]
    for t in whole:  # nbest draws per line, best first
        assert len(t.texts) == 3 and t.scores == sorted(t.scores, reverse=True)
    # The draws of a line are several: sampling does not collapse onto one translation.
    assert any(len(set(t.texts)) > 1 for t in whole)
    # Reproducible from run to run.
    again = engine.translate(lines, cfg)
    assert [t.texts for t in again] == [t.texts for t in whole]


def test_sampling_settings_that_cannot_work_are_refused() -> None:
    base = dict(beam_size=1, nbest=8, sampling="true")
    decode_config(**base).check()  # nbest draws need no beams
    for key, value in (("temperature", -1.0), ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5), ("seed", -1)):
        with pytest.raises(ConfigError, match=f"{key}={value}"):
            decode_config(**{**base, key: value}).check()


def test_sampling_is_refused_by_the_engines_that_cannot_reproduce_it() -> None:
    from attnmt.inference import ENGINES, capabilities_of, check_capabilities

    cfg = decode_config(sampling="true")
    check_capabilities("native", capabilities_of("native"), cfg)
    for engine in set(ENGINES) - {"native"}:
        with pytest.raises(ConfigError, match=f"sampling=true asks for sampling, which engine={engine} does not run.*use engine=native$"):
            check_capabilities(engine, capabilities_of(engine), cfg)


def test_the_command_line_draws_the_same_whatever_its_buffer(trained_checkpoint) -> None:
    from conftest import FIXTURE_CORPUS
    from test_cli import run

    lines = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines()[:10]
    stdin = "".join(line + "\n" for line in lines)
    outputs = []
    for buffer in (3, 1000):  # chunks of 3 lines translated one by one, or all at once
        result = run("translate", f"ckpt={trained_checkpoint}", "sampling=true", "seed=4", f"buffer_lines={buffer}",
                     stdin=stdin)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout.split("\n")[:-1])
    assert outputs[0] == outputs[1] and len(outputs[0]) == len(lines)
    beam = run("translate", f"ckpt={trained_checkpoint}", stdin=stdin).stdout.split("\n")[:-1]
    assert outputs[0] != beam  # it did sample


def test_evaluate_reports_the_sampling_settings_that_reproduce_its_score(trained_checkpoint) -> None:
    import json
    from dataclasses import fields

    from attnmt.config import DecodeConfig

    from test_cli import run

    reports = []
    for _ in range(2):
        result = run("evaluate", f"ckpt={trained_checkpoint}", "split=test", "sampling=true", "top_k=5", "seed=3")
        assert result.returncode == 0, result.stderr
        reports.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert reports[0]["bleu"] == reports[1]["bleu"]
    # Every search setting is reported (the decode block has each DecodeConfig field), and the strategy by name.
    assert reports[0]["strategy"] == "sampling" and set(reports[0]["decode"]) == {f.name for f in fields(DecodeConfig)}
    assert {k: reports[0]["decode"][k] for k in ("sampling", "temperature", "top_k", "top_p", "seed")} == {
        "sampling": True, "temperature": 1.0, "top_k": 5, "top_p": 1.0, "seed": 3}
    searched = json.loads(run("evaluate", f"ckpt={trained_checkpoint}", "split=test", "beam_size=1").stdout
                          .strip().splitlines()[-1])
    assert searched["strategy"] == "greedy" and searched["decode"]["sampling"] is False
