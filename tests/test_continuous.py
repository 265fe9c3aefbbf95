"""Continuous batching (:class:`attnmt.decoding.RunningSearch`): lines that join a running search at
any step get what they get alone, rows leave as lines finish, and the row budget holds."""

from __future__ import annotations

import random

import pytest
import torch

from attnmt.decoding import RunningSearch, search
from attnmt.model import build_model
from attnmt.tokenizer import EOS_ID
from conftest import decode_config, tiny_config

SETTINGS = {
    "greedy": dict(beam_size=1),
    "beam5 exact": dict(beam_size=5, beam_stop="exact"),
    "beam5 finished": dict(beam_size=5, beam_stop="finished"),
    "beam3 nbest3": dict(beam_size=3, nbest=3),
    "sampling nbest2": dict(sampling="true", nbest=2, seed=11, temperature=0.8, top_p=0.9),
    "min_len": dict(beam_size=4, min_len=3, max_len_a=0.5, max_len_b=2),
    "greedy min_len": dict(beam_size=1, min_len=4, max_len_a=0.0, max_len_b=6),
}


@pytest.fixture(scope="module")
def model():
    """A tiny random model whose lines end at different steps (its EOS row scaled up), some at once,
    others at their length limit: rows leave while others run."""
    torch.manual_seed(2)
    model = build_model(tiny_config(share_embeddings=False, tie_output=False)).eval()
    with torch.no_grad():
        model.output_proj.weight[EOS_ID] *= 1.1
    return model


def random_sources(n: int, seed: int, prefix: tuple[int, ...] = ()) -> list[list[int]]:
    rng = random.Random(seed)
    return [[*prefix, *(rng.randrange(4, 24) for _ in range(rng.randrange(1, 12))), EOS_ID] for _ in range(n)]


def alone(model, sources, cfg, tgt_prefix=()) -> list[list]:
    """Each source searched on its own, in a batch of one (line number i + 1)."""
    results = []
    for i, source in enumerate(sources):
        src = torch.tensor([source])
        results.append(search(model, src, torch.ones_like(src, dtype=torch.bool), cfg, torch.tensor([i + 1]),
                              tgt_prefix)[0])
    return results


def joining_at_random_steps(model, sources, cfg, max_rows, seed, tgt_prefix=()) -> tuple[list[list], dict]:
    """The sources fed to one running search in a random order, a random number (0-3) joining at
    each step, under ``max_rows``; also what happened (the most rows of a step, steps where lines
    finished while others joined)."""
    rng = random.Random(seed)
    order = list(range(len(sources)))
    rng.shuffle(order)
    run = RunningSearch(model, cfg, tgt_prefix, max_rows)
    tickets, results = {}, {}
    seen = {"most_rows": 0, "finish_and_join": 0, "steps": 0}
    with torch.inference_mode():
        while order or run:
            for _ in range(rng.randrange(4)):
                if order:
                    i = order.pop()
                    tickets[run.add(sources[i], i + 1)] = i
            waiting = run.waiting
            finished = run.step()
            seen["steps"] += 1
            seen["most_rows"] = max(seen["most_rows"], run.last_rows)
            if finished and waiting > run.waiting:  # lines left in the step others joined
                seen["finish_and_join"] += 1
            for ticket, hyps in finished:
                assert tickets[ticket] not in results
                results[tickets[ticket]] = hyps
    return [results[i] for i in range(len(sources))], seen


def assert_same(got: list[list], expected: list[list], name: str) -> None:
    assert [[h.tokens for h in hyps] for hyps in got] == [[h.tokens for h in hyps] for hyps in expected], name
    for g, e in zip(got, expected):
        # Greedy search computes no scores (NaN in both).
        assert [h.score for h in g] == pytest.approx([h.score for h in e], abs=1e-4, nan_ok=True), name


@pytest.mark.parametrize("name", list(SETTINGS))
def test_lines_joining_at_random_steps_get_what_they_get_alone(model, name: str) -> None:
    cfg = decode_config(**SETTINGS[name])
    sources = random_sources(24, seed=1)
    expected = alone(model, sources, cfg)
    lengths = {len(hyps[0].tokens) for hyps in expected}
    assert len(lengths) > 1, f"the lines should end at different steps: {sorted(lengths)}"
    rows_a_line = cfg.nbest if cfg.sampling else cfg.beam_size
    for max_rows, seed in [(None, 2), (4 * rows_a_line, 3), (rows_a_line, 4)]:
        got, seen = joining_at_random_steps(model, sources, cfg, max_rows, seed)
        assert_same(got, expected, f"{name}, max_rows={max_rows}")
        if max_rows is not None:
            assert seen["most_rows"] <= max_rows
    # The search did what continuous batching is for: lines finished in steps where others joined.
    _, seen = joining_at_random_steps(model, sources, cfg, 6 * rows_a_line, 5)
    assert seen["finish_and_join"] > 0, seen
    # And the static search (every line joining at the first step) agrees with both.
    src = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in sources], batch_first=True)
    static = search(model, src, src != 0, cfg, torch.arange(1, len(sources) + 1))
    assert_same(static, expected, f"{name}, static")


@pytest.mark.parametrize("name", ["greedy", "beam5 finished", "sampling nbest2"])
def test_forced_target_prefix_and_language_tags(model, name: str) -> None:
    """A forced target prefix (M2M100's and NLLB's target language) and a tag before the source
    (attnmt's multilingual models) keep working for lines that join late."""
    cfg = decode_config(**SETTINGS[name])
    sources = random_sources(16, seed=6, prefix=(5,))
    expected = alone(model, sources, cfg, tgt_prefix=(7, 9))
    assert all(h.tokens[:2] == [7, 9] for hyps in expected for h in hyps if len(h.tokens) >= 2)
    got, _ = joining_at_random_steps(model, sources, cfg, 3 * (cfg.nbest if cfg.sampling else cfg.beam_size), 7,
                                     tgt_prefix=(7, 9))
    assert_same(got, expected, name)


def test_a_budget_below_one_lines_rows_is_refused_in_one_line(model) -> None:
    with pytest.raises(ValueError, match=r"max_rows=4 is smaller than one sentence's 5 rows \(beam_size\)"):
        RunningSearch(model, decode_config(beam_size=5), max_rows=4)
    with pytest.raises(ValueError, match=r"max_rows=1 is smaller than one sentence's 2 rows \(nbest\)"):
        RunningSearch(model, decode_config(sampling="true", nbest=2), max_rows=1)


def test_a_strategy_without_a_running_step_is_refused_not_run_as_greedy(model, monkeypatch) -> None:
    from attnmt import decoding

    nucleus = decoding.Strategy("nucleus", lambda cfg: cfg.top_p < 1, decoding.sample_search)
    monkeypatch.setattr(decoding, "STRATEGIES", [nucleus, *decoding.STRATEGIES])
    with pytest.raises(ValueError, match="the running search has no step for the nucleus strategy"):
        RunningSearch(model, decode_config(top_p=0.9))
    RunningSearch(model, decode_config(beam_size=1))  # greedy, beam and sampling have theirs


def test_a_source_longer_than_the_positions_is_refused(model) -> None:
    run = RunningSearch(model, decode_config(beam_size=1))
    limit = model.cfg.max_positions
    with pytest.raises(ValueError, match=f"a source of {limit + 1} tokens: give 1 to model.max_positions={limit}"):
        run.add([4] * limit + [EOS_ID])
    with pytest.raises(ValueError, match="a source of 0 tokens"):
        run.add([])
    assert not run  # nothing was queued


def test_a_cancelled_line_frees_its_rows_at_the_next_step_and_others_are_unchanged(model) -> None:
    cfg = decode_config(beam_size=4, beam_stop="exact", max_len_a=0.0, max_len_b=12)
    sources = random_sources(6, seed=8)
    expected = alone(model, sources, cfg)
    run = RunningSearch(model, cfg, max_rows=100)
    tickets = [run.add(source, i + 1) for i, source in enumerate(sources)]
    results = {}
    with torch.inference_mode():
        results.update(run.step())
        results.update(run.step())
        assert tickets[2] not in results and run.rows == 4 * (len(sources) - len(results))
        rows = run.rows
        run.cancel(tickets[2])
        results.update(run.step())
        assert run.last_rows == rows - 4  # its rows were gone for that step
        while run:
            results.update(run.step())
    assert tickets[2] not in results
    for i in (0, 1, 3, 4, 5):
        assert [h.tokens for h in results[tickets[i]]] == [h.tokens for h in expected[i]]
    # A line cancelled while it waits never joins.
    run = RunningSearch(model, cfg, max_rows=4)
    first, second = run.add(sources[0], 1), run.add(sources[1], 2)
    run.cancel(second)
    with torch.inference_mode():
        done = dict(run.step())
        while run:
            done.update(run.step())
            assert run.last_rows <= 4
    assert set(done) == {first}


def test_the_cache_drops_the_columns_no_line_uses(model) -> None:
    """Under a steady stream the self-attention cache stays as wide as the oldest line's prefix, not
    the whole run: columns before every kept line's start are dropped as lines leave."""
    cfg = decode_config(beam_size=1, max_len_a=0.0, max_len_b=5)
    run = RunningSearch(model, cfg, max_rows=3)
    with torch.inference_mode():
        for i, source in enumerate(random_sources(60, seed=9)):
            run.add(source, i + 1)
        while run:
            run.step()
            assert run._cache.seq_len <= 7  # BOS + 5 tokens + the step's own, whatever the run's length
