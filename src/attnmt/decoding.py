"""Batched greedy search, beam search and sampling over ``encode`` + cached ``decode``.

Each strategy is a function ``(model, src_tokens, src_mask, cfg, line_numbers) -> hypotheses`` and an
entry of :data:`STRATEGIES`, which says when a :class:`~attnmt.config.DecodeConfig` asks for it;
:func:`search` runs the one it asks for. Engines declare the strategies they run by these names
(:class:`attnmt.inference.Capabilities`). Every setting comes from the config: there are no defaults
here (they live in ``configs/decode/``).

All return token ids without BOS, EOS or PAD, the model's own (``model.bos_id`` and so on). A
sentence's result does not depend on the other sentences in its batch: each has its own length
limits, and a sentence leaves the batch (its rows are dropped from the cache) as soon as it is finished.

Lengths count generated tokens. A sentence with ``n`` real source tokens (EOS included) may
generate at most ``max_len_a * n + max_len_b`` tokens before EOS is forced (and never more than
the model's positions allow); EOS is forbidden before ``min_len`` tokens. PAD and the start token
are never generated (:func:`never_generated`).

A target prefix (``tgt_prefix``: the target language's code for M2M100 and NLLB) is forced as the
first tokens of every hypothesis, with log-probability 0, as transformers' ``forced_bos_token_id``
does; it counts as generated tokens and stays in the returned ids (the tokenizer drops it from text).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnmt.config import DecodeConfig
from attnmt.model import Transformer


@dataclass
class Hypothesis:
    """One finished translation: its ids and its length-normalised log-probability."""

    tokens: list[int]
    score: float


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ``((5 + length) / 6) ** alpha``; ``length`` counts the generated tokens, EOS included."""
    return ((5.0 + length) / 6.0) ** alpha


def max_length(src_len: int, max_len_a: float, max_len_b: int, max_positions: int) -> int:
    """The limit on generated tokens (EOS excluded) for a source of ``src_len`` tokens (EOS included):
    ``a * src_len + b``, capped so that BOS + tokens + EOS fit ``max_positions``. Every engine
    (attnmt's search, CTranslate2, the benchmarks) limits lengths with this function."""
    # min before int: a * src_len may overflow to inf for huge a (a request's value, say), which int() refuses.
    return max(0, int(min(max_positions - 1, max_len_a * src_len + max_len_b)))


def max_lengths(model: Transformer, src_mask: Tensor, max_len_a: float, max_len_b: int) -> list[int]:
    """Per-sentence :func:`max_length` of a batch (B,) for ``src_mask`` (B, S)."""
    src_lens = src_mask.sum(dim=1).tolist()
    return [max_length(n, max_len_a, max_len_b, model.cfg.max_positions) for n in src_lens]


def never_generated(pad_id: int, bos_id: int, eos_id: int) -> list[int]:
    """The ids no search generates, for a model with these special ids: the padding, and the start
    token unless it is EOS (M2M100 and NLLB start from ``</s>``). Every engine suppresses these."""
    return [pad_id] + ([bos_id] if bos_id != eos_id else [])


def _forbid(logits: Tensor, model: Transformer, step: int, min_len: int, forced: Sequence[int]) -> None:
    """Set the logits (N, V) of tokens that may not come next to -inf, in place: :func:`never_generated`
    always, EOS before ``min_len`` tokens; at a step of the forced prefix, every token but
    ``forced[step]``, which gets 0."""
    if step < len(forced):
        logits.fill_(-math.inf)
        logits[:, forced[step]] = 0.0
        return
    cfg = model.cfg
    for token in never_generated(cfg.pad_id, cfg.bos_id, cfg.eos_id):
        logits[:, token] = -math.inf
    if step < min_len:
        logits[:, cfg.eos_id] = -math.inf


# Rows of logits projected, normalised and ranked at a time in beam search: a block of (1024, V)
# float32 logits stays in the processor's cache between the three, where (rows, V) for thousands
# of rows would go to memory and back (bigger batches ran up to 1.7x slower per row without it).
_ROWS_PER_BLOCK = 1024


def _top_tokens(model: Transformer, states: Tensor, step: int, min_len: int, max_len: Tensor,
                count: int, forced: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The ``count`` best next tokens of each row and their log-probabilities, (N, count) each, best
    first, under the length rules.

    ``states`` (N, D) are the decoder's output states (:meth:`Transformer.decode_states`); ``step``
    is the number of tokens generated so far; ``max_len`` (N,) holds each row's limit; ``forced`` is
    the target prefix. Beam search needs no more than its 2k best candidates per row, so the
    candidates of a sentence are combined from these instead of from all k x V.
    """
    tops, tokens = [], []
    eos = model.cfg.eos_id
    for start in range(0, states.size(0), _ROWS_PER_BLOCK):
        logp = model.project(states[start : start + _ROWS_PER_BLOCK]).float().log_softmax(dim=-1)  # (n, V)
        _forbid(logp, model, step, min_len, forced)
        top, top_tokens = logp.topk(count, dim=-1)  # (n, count)
        at_limit = max_len[start : start + _ROWS_PER_BLOCK] <= step  # these rows must end now
        if at_limit.any():
            # EOS is their one continuation, even where min_len asked otherwise: the limit wins (with
            # log-probability 0 where min_len had ruled EOS out).
            top[at_limit] = -math.inf
            top[at_limit, 0] = logp[at_limit, eos] if step >= min_len else 0.0
            top_tokens[at_limit, 0] = eos
        tops.append(top)
        tokens.append(top_tokens)
    return torch.cat(tops), torch.cat(tokens)


@torch.no_grad()
def greedy_search(model: Transformer, src_tokens: Tensor, src_mask: Tensor, cfg: DecodeConfig,
                  line_numbers: Tensor | None = None, tgt_prefix: Sequence[int] = ()) -> list[list[Hypothesis]]:
    """The most probable next token at every step, for a batch of sources.

    Args:
        model: the translation model (put it in eval mode first).
        src_tokens: (B, S) source ids ending with EOS, right-padded.
        src_mask: (B, S) bool, True at real tokens.
        cfg: the length rules ``max_len_a``, ``max_len_b``, ``min_len`` (see the module docstring).
        line_numbers: unused (greedy search draws nothing).
        tgt_prefix: ids forced at the start of every translation (see the module docstring).

    Returns:
        B lists of one hypothesis, unscored (NaN): greedy search computes no log-probabilities.
    """
    tokens, _ = _one_token_a_step(model, src_tokens, src_mask, lambda logits, step, active: logits.argmax(dim=-1),
                                  cfg, scored=False, forced=tgt_prefix)
    return [[Hypothesis(t, math.nan)] for t in tokens]


def _one_token_a_step(
    model: Transformer,
    src_tokens: Tensor,
    src_mask: Tensor,
    choose: Callable[[Tensor, int, Tensor], Tensor],
    cfg: DecodeConfig,
    scored: bool,
    forced: Sequence[int],
) -> tuple[list[list[int]], list[float]]:
    """The loop of greedy search and sampling: one hypothesis per source, extended by
    ``choose(logits, step, active)`` ((A, V) logits with the forbidden tokens at -inf, and the (A,)
    batch indices of the live rows) until EOS or the length limit; a sentence's rows leave the
    cache as it ends. Returns the B token lists and, with ``scored``, their log-probabilities under
    the model (else empty), counted as beam search counts them (the forced prefix ``forced`` at 0)."""
    n = src_tokens.size(0)
    device = src_tokens.device
    sent_limits = max_lengths(model, src_mask, cfg.max_len_a, cfg.max_len_b)
    min_len = cfg.min_len
    limits = torch.tensor(sent_limits, device=device)
    memory = model.encode(src_tokens, src_mask)
    cache = model.new_cache(max_len=max(sent_limits) + 1)  # BOS and every token but the last
    eos = model.cfg.eos_id
    outputs = torch.full((n, max(sent_limits) + 1), eos, device=device)  # (B, T): each row ends with EOS
    scores = torch.zeros(n, dtype=torch.float64, device=device)
    active = torch.arange(n, device=device)  # sentences still being decoded, in cache-row order
    tokens = torch.full((n, 1), model.cfg.bos_id, dtype=torch.long, device=device)
    step = 0
    while active.numel() > 0:
        logits = model.decode(tokens, memory, src_mask, cache)[:, -1]  # (A, V)
        log_probs = logits.float().log_softmax(dim=-1) if scored else None  # before the length rules, as beam search
        _forbid(logits, model, step, min_len, forced)
        next_tokens = choose(logits, step, active)  # (A,)
        at_limit = limits[active] <= step
        next_tokens[at_limit] = eos
        if scored and step >= len(forced):
            logp = log_probs.gather(1, next_tokens[:, None])[:, 0].double()
            # Where min_len had ruled EOS out, the length limit still ends the sentence, at no cost (as in beam search).
            scores[active] += logp.masked_fill(at_limit, 0.0) if step < min_len else logp
        outputs[active, step] = next_tokens
        step += 1
        ended = next_tokens == eos
        if ended.any():
            keep = (~ended).nonzero().squeeze(1)
            cache.reorder(keep)
            active, next_tokens = active[keep], next_tokens[keep]
        tokens = next_tokens[:, None]
    return [row[: row.index(eos)] for row in outputs.tolist()], scores.tolist() if scored else []


# splitmix64's constants as signed 64-bit integers (torch's int64 arithmetic wraps like C's unsigned).
_GOLDEN, _MUL1, _MUL2 = (c - 2**64 if c >= 2**63 else c for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser of ``x + golden``: int64 to well-spread int64, element by element."""
    x = x + _GOLDEN
    x = (x ^ _shift(x, 30)) * _MUL1
    x = (x ^ _shift(x, 27)) * _MUL2
    return x ^ _shift(x, 31)


def uniform_noise(seed: int, sentence_ids: Tensor, step: int, vocab: int) -> Tensor:
    """Uniform numbers in (0, 1), (N, V) float64, that depend on (seed, sentence, step, token) alone:
    a splitmix64 hash of each in turn, so a sentence's draws are the same whatever its batch, its
    position in it or the device, and no two counters share their numbers."""
    device = sentence_ids.device
    x = _mix(torch.tensor(seed, dtype=torch.long, device=device))
    x = _mix(_mix(x + sentence_ids.long()) + step)  # (N,)
    x = _mix(x[:, None] + torch.arange(vocab, device=device))  # (N, V)
    return (_shift(x, 11).double() + 0.5) * 2.0**-53


def _filter(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """``logits / temperature`` with all but the ``top_k`` best tokens, and all past the smallest set whose
    probability reaches ``top_p``, set to -inf (0 and 1.0 turn either off). The best token's logit is
    subtracted first (which changes no draw): a tiny temperature then sends the others to -inf rather
    than every logit to +-inf."""
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        beyond = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reached top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(beyond, -math.inf))
    return logits


@torch.no_grad()
def sample_search(model: Transformer, src_tokens: Tensor, src_mask: Tensor, cfg: DecodeConfig,
                  line_numbers: Tensor | None = None, tgt_prefix: Sequence[int] = ()) -> list[list[Hypothesis]]:
    """``cfg.nbest`` translations per source drawn from the model, best first: each next token from
    ``softmax(logits / temperature)``, restricted to the ``top_k`` most probable tokens and to the
    nucleus of mass ``top_p`` (Holtzman et al., 2020), under the length rules.

    Reproducible: the draw of a sentence at a step is a Gumbel-max over :func:`uniform_noise` of
    ``(cfg.seed, draw id, step)``, where draw ``j`` of source ``i`` has id ``line_numbers[i] * nbest + j``,
    so a sentence's samples do not depend on its batch. ``temperature=0`` is greedy search.

    Args:
        model: the translation model (put it in eval mode first).
        src_tokens: (B, S) source ids ending with EOS, right-padded.
        src_mask: (B, S) bool, True at real tokens.
        cfg: ``nbest``, ``seed``, ``temperature``, ``top_k``, ``top_p`` and the length rules.
        line_numbers: (B,) a number per source that, with ``cfg.seed``, fixes its draws; None = 0..B-1.
        tgt_prefix: ids forced at the start of every translation (see the module docstring).

    Returns:
        B lists of ``nbest`` hypotheses, each scored by its log-probability under the model (no
        temperature, no penalty), best first.
    """
    n, k = src_tokens.size(0), cfg.nbest
    device = src_tokens.device
    if line_numbers is None:
        line_numbers = torch.arange(n, device=device)
    draw_ids = line_numbers.repeat_interleave(k) * k + torch.arange(k, device=device).repeat(n)

    def draw(logits: Tensor, step: int, active: Tensor) -> Tensor:
        if cfg.temperature == 0:
            return logits.argmax(dim=-1)
        gumbel = -torch.log(-torch.log(uniform_noise(cfg.seed, draw_ids[active], step, logits.size(-1))))
        return (_filter(logits.float(), cfg.temperature, cfg.top_k, cfg.top_p).double() + gumbel).argmax(dim=-1)

    tokens, scores = _one_token_a_step(model, src_tokens.repeat_interleave(k, 0), src_mask.repeat_interleave(k, 0),
                                       draw, cfg, scored=True, forced=tgt_prefix)
    draws = [Hypothesis(t, score) for t, score in zip(tokens, scores)]
    return [sorted(draws[i * k : (i + 1) * k], key=lambda h: h.score, reverse=True) for i in range(n)]


@torch.no_grad()
def beam_search(model: Transformer, src_tokens: Tensor, src_mask: Tensor, cfg: DecodeConfig,
                line_numbers: Tensor | None = None, tgt_prefix: Sequence[int] = ()) -> list[list[Hypothesis]]:
    """Batched beam search with the GNMT length penalty.

    Hypotheses are ranked by ``sum(log p) / length_penalty(len, len_penalty)``. With ``beam_stop=exact``
    a sentence stops only when its ``nbest`` best finished hypotheses cannot be beaten by any live
    beam, even if that beam grew to the maximum length (log-probabilities only fall as a hypothesis
    grows, so the bound is exact): no premature stop. With ``beam_stop=finished`` it stops as soon as
    ``beam_size`` of its hypotheses have finished, as fairseq, CTranslate2 and transformers'
    ``early_stopping=True`` do: a live beam that might still have won is dropped, and the search ends
    far earlier (the exact bound keeps most sentences going to their length limit).

    The bookkeeping is on tensors, for all sentences at once: each live sentence has ``beam_size``
    consecutive rows in the cache, and keeps its ``nbest`` best finished hypotheses so far.

    Args:
        model: the translation model (put it in eval mode first).
        src_tokens: (B, S) source ids ending with EOS, right-padded.
        src_mask: (B, S) bool, True at real tokens.
        cfg: ``beam_size`` (live hypotheses kept per sentence), ``len_penalty`` (the penalty's exponent
            alpha; 0 ranks by plain log-probability), ``nbest`` (finished hypotheses returned per
            sentence, at most ``beam_size``: :meth:`~attnmt.config.DecodeConfig.check`), ``beam_stop``
            and the length rules.
        line_numbers: unused (beam search draws nothing).
        tgt_prefix: ids forced at the start of every translation (see the module docstring).

    Returns:
        B lists of up to ``nbest`` hypotheses, best first.
    """
    n, k, nbest, len_penalty, min_len = src_tokens.size(0), cfg.beam_size, cfg.nbest, cfg.len_penalty, cfg.min_len
    device = src_tokens.device
    sent_limits = max_lengths(model, src_mask, cfg.max_len_a, cfg.max_len_b)
    max_tokens = max(sent_limits)
    limits = torch.tensor(sent_limits, device=device)  # (B,)

    def lp(length: Tensor | int) -> Tensor:
        return ((5.0 + torch.as_tensor(length, dtype=torch.float64, device=device)) / 6.0) ** len_penalty

    # The first step runs once per sentence (its k beams would be copies of one prefix); the cache
    # takes k rows per sentence at the first reorder.
    memory = model.encode(src_tokens, src_mask)
    cache = model.new_cache(max_len=max_tokens + 1)  # BOS and every token but the last
    eos = model.cfg.eos_id
    bos = torch.full((n, 1), model.cfg.bos_id, dtype=torch.long, device=device)
    states = model.decode_states(bos, memory, src_mask, cache)[:, -1]  # (B, D)
    count = min(2 * k, model.cfg.tgt_vocab_size)  # candidates per row: 2k cover the k best that do not end
    active = torch.arange(n, device=device)  # (A,) the sentence of each group of rows
    scores = torch.full((n, k), -math.inf, device=device)  # (A, k) log-probabilities of the live beams
    scores[:, 0] = 0.0  # only beam 0 is live at first
    prefixes = torch.empty(n, 0, dtype=torch.long, device=device)  # (rows, step): tokens so far, per cache row
    best_scores = torch.full((n, nbest), -math.inf, dtype=torch.float64, device=device)  # (B, nbest) finished, best first
    best_tokens = torch.full((n, nbest, max_tokens), model.cfg.pad_id, dtype=torch.long, device=device)
    best_lens = torch.zeros(n, nbest, dtype=torch.long, device=device)
    n_finished = torch.zeros(n, dtype=torch.long, device=device)  # hypotheses that have ended, per sentence
    step = 0
    while True:
        a, beams = active.numel(), cache.beams  # beams: cache rows per sentence (1 at the first step)
        logp, tokens = _top_tokens(model, states, step, min_len, limits[active].repeat_interleave(beams), count,
                                   tgt_prefix)
        if beams < k:  # the first step: every beam of a sentence continues its one row
            logp, tokens = logp.repeat_interleave(k, dim=0), tokens.repeat_interleave(k, dim=0)
        candidates = (scores[:, :, None] + logp.view(a, k, count)).view(a, k * count)
        top_scores, top_index = candidates.topk(min(2 * k, k * count), dim=1)  # (A, 2k)
        top_beam = top_index // count
        top_token = tokens.view(a, k * count).gather(1, top_index)
        parent = top_beam if beams == k else torch.zeros_like(top_beam)
        top_rows = torch.arange(a, device=device)[:, None] * beams + parent  # (A, 2k) cache rows

        # EOS among the k best candidates finishes a hypothesis: it joins the sentence's nbest best.
        is_eos = top_token == eos
        ends = is_eos[:, :k] & torch.isfinite(top_scores[:, :k])  # (A, k)
        n_finished[active] += ends.sum(dim=1)
        if ends.any():
            ended = torch.where(ends, top_scores[:, :k].double() / lp(step + 1), -math.inf)
            pool_scores = torch.cat([best_scores[active], ended], dim=1)  # (A, nbest + k)
            ended_tokens = torch.full((a, k, max_tokens), model.cfg.pad_id, dtype=torch.long, device=device)
            ended_tokens[:, :, :step] = prefixes[top_rows[:, :k]]
            pool_tokens = torch.cat([best_tokens[active], ended_tokens], dim=1)  # (A, nbest + k, T)
            pool_lens = torch.cat([best_lens[active], torch.full((a, k), step, device=device)], dim=1)
            best_scores[active], order = pool_scores.topk(nbest, dim=1)
            best_tokens[active] = pool_tokens[torch.arange(a, device=device)[:, None], order]
            best_lens[active] = pool_lens.gather(1, order)

        # The k best candidates that do not end become the live beams.
        live_scores, order = top_scores.masked_fill(is_eos, -math.inf).topk(k, dim=1)  # (A, k)
        live_rows = top_rows.gather(1, order)
        live_tokens = top_token.gather(1, order)
        step += 1

        # A sentence is done when no live beam can still beat its nbest-th finished hypothesis. The
        # best a live beam could reach: its score only falls, and the penalty's divisor is largest at
        # the longest length it may still grow to (for alpha >= 0).
        best_live = live_scores[:, 0].double()
        longest = (limits[active] + 1).clamp(min=step + 1)
        bound = best_live / torch.maximum(lp(step + 1), lp(longest))
        done = torch.isinf(best_live) | (best_scores[active, nbest - 1] >= bound)  # -inf while < nbest finished
        if cfg.beam_stop == "finished":
            done |= n_finished[active] >= k
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if keep.numel() < a:
            live_rows, live_tokens, live_scores = live_rows[keep], live_tokens[keep], live_scores[keep]
            active = active[keep]

        live_rows = live_rows.view(-1)
        prefixes = torch.cat([prefixes[live_rows], live_tokens.view(-1, 1)], dim=1)
        scores = live_scores
        cache.reorder(live_rows, beams=k)
        states = model.decode_states(live_tokens.view(-1, 1), memory, src_mask, cache)[:, -1]  # (A*k, D)

    results = []
    for sent_scores, sent_tokens, sent_lens in zip(best_scores.tolist(), best_tokens.tolist(), best_lens.tolist()):
        results.append([Hypothesis(tokens[:length], score)
                        for score, tokens, length in zip(sent_scores, sent_tokens, sent_lens) if score > -math.inf])
    return results


@dataclass(frozen=True)
class Strategy:
    """A decoding strategy: its name (engines declare the names they run), whether a config asks for
    it, and its search function."""

    name: str
    chosen: Callable[[DecodeConfig], bool]
    search: Callable[[Transformer, Tensor, Tensor, DecodeConfig, Tensor | None, Sequence[int]], list[list[Hypothesis]]]


# The first strategy whose `chosen` holds runs. A new strategy is its function, an entry here, and
# its config key (DecodeConfig and configs/decode/beam.yaml); engines other than attnmt's own refuse
# it until they declare its name.
STRATEGIES: tuple[Strategy, ...] = (
    Strategy("sampling", lambda cfg: cfg.sampling, sample_search),
    Strategy("greedy", lambda cfg: cfg.beam_size == 1 and cfg.nbest == 1, greedy_search),
    Strategy("beam", lambda cfg: True, beam_search),
)


def strategy(cfg: DecodeConfig) -> Strategy:
    """The strategy ``cfg`` asks for."""
    return next(s for s in STRATEGIES if s.chosen(cfg))


def search(model: Transformer, src_tokens: Tensor, src_mask: Tensor, cfg: DecodeConfig,
           line_numbers: Tensor | None = None, tgt_prefix: Sequence[int] = ()) -> list[list[Hypothesis]]:
    """The hypotheses of each source (best first) by the strategy ``cfg`` asks for; the arguments are
    its function's (``line_numbers`` fix each source's draws when sampling, ``tgt_prefix`` is forced
    at the start of each translation)."""
    return strategy(cfg).search(model, src_tokens, src_mask, cfg, line_numbers, tgt_prefix)
