"""Batched greedy and beam search over ``encode`` + cached ``decode``.

Both return token ids without BOS, EOS or PAD. A sentence's result does not depend on the other
sentences in its batch: each has its own length limits, and a sentence leaves the batch (its rows
are dropped from the cache) as soon as it is finished.

Lengths count generated tokens. A sentence with ``n`` real source tokens (EOS included) may
generate at most ``max_len_a * n + max_len_b`` tokens before EOS is forced (and never more than
the model's positions allow); EOS is forbidden before ``min_len`` tokens. PAD and BOS are never
generated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnmt.model import Transformer
from attnmt.tokenizer import BOS_ID, EOS_ID, PAD_ID


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
    return max(0, min(max_positions - 1, int(max_len_a * src_len + max_len_b)))


def max_lengths(model: Transformer, src_mask: Tensor, max_len_a: float, max_len_b: int) -> list[int]:
    """Per-sentence :func:`max_length` of a batch (B,) for ``src_mask`` (B, S)."""
    src_lens = src_mask.sum(dim=1).tolist()
    return [max_length(n, max_len_a, max_len_b, model.cfg.max_positions) for n in src_lens]


def _next_log_probs(logits: Tensor, step: int, min_len: int, max_len: Tensor) -> Tensor:
    """Log-probabilities (N, V) of the next token, with the length rules and special ids applied.

    ``step`` is the number of tokens generated so far; ``max_len`` (N,) holds each row's limit.
    """
    logp = logits.float().log_softmax(dim=-1)
    logp[:, PAD_ID] = -math.inf
    logp[:, BOS_ID] = -math.inf
    if step < min_len:
        logp[:, EOS_ID] = -math.inf
    at_limit = max_len <= step  # these rows must end now
    if at_limit.any():
        eos = logp[:, EOS_ID].clone()
        logp[at_limit] = -math.inf
        # Keep EOS possible even where min_len asked otherwise: the limit wins.
        logp[at_limit, EOS_ID] = torch.where(torch.isinf(eos[at_limit]), 0.0, eos[at_limit])
    return logp


@torch.no_grad()
def greedy_search(
    model: Transformer,
    src_tokens: Tensor,
    src_mask: Tensor,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    min_len: int = 0,
) -> list[list[int]]:
    """The most probable next token at every step, for a batch of sources.

    Args:
        model: the translation model (put it in eval mode first).
        src_tokens: (B, S) source ids ending with EOS, right-padded.
        src_mask: (B, S) bool, True at real tokens.
        max_len_a, max_len_b, min_len: length rules (see the module docstring).

    Returns:
        B lists of target ids.
    """
    n = src_tokens.size(0)
    device = src_tokens.device
    memory = model.encode(src_tokens, src_mask)
    cache = model.new_cache()
    limits = torch.tensor(max_lengths(model, src_mask, max_len_a, max_len_b), device=device)
    outputs: list[list[int]] = [[] for _ in range(n)]
    active = torch.arange(n, device=device)  # sentences still being decoded, in cache-row order
    tokens = torch.full((n, 1), BOS_ID, dtype=torch.long, device=device)
    step = 0
    while active.numel() > 0:
        logits = model.decode(tokens, memory, src_mask, cache)[:, -1]  # (A, V)
        next_tokens = _next_log_probs(logits, step, min_len, limits).argmax(dim=-1)  # (A,)
        for sent, tok in zip(active.tolist(), next_tokens.tolist()):
            if tok != EOS_ID:
                outputs[sent].append(tok)
        step += 1
        keep = (next_tokens != EOS_ID).nonzero().squeeze(1)
        if keep.numel() < active.numel():
            cache.reorder(keep)
            active, src_mask, limits = active[keep], src_mask[keep], limits[keep]
            next_tokens = next_tokens[keep]
        tokens = next_tokens[:, None]
    return outputs


@torch.no_grad()
def beam_search(
    model: Transformer,
    src_tokens: Tensor,
    src_mask: Tensor,
    beam_size: int = 5,
    len_penalty: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    min_len: int = 0,
    nbest: int = 1,
) -> list[list[Hypothesis]]:
    """Batched beam search with the GNMT length penalty.

    Hypotheses are ranked by ``sum(log p) / length_penalty(len, len_penalty)``. A sentence stops
    only when its ``nbest`` best finished hypotheses cannot be beaten by any live beam, even if that
    beam grew to the maximum length (log-probabilities only fall as a hypothesis grows, so the bound
    is exact): no premature stop.

    Args:
        model: the translation model (put it in eval mode first).
        src_tokens: (B, S) source ids ending with EOS, right-padded.
        src_mask: (B, S) bool, True at real tokens.
        beam_size: live hypotheses kept per sentence.
        len_penalty: the length penalty's exponent alpha; 0 ranks by plain log-probability.
        max_len_a, max_len_b, min_len: length rules (see the module docstring).
        nbest: finished hypotheses returned per sentence, best first (at most ``beam_size``).

    Returns:
        B lists of up to ``nbest`` hypotheses, best first.
    """
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest={nbest} must be between 1 and beam_size={beam_size}")
    n, k = src_tokens.size(0), beam_size
    device = src_tokens.device
    lp = lambda length: length_penalty(length, len_penalty)  # noqa: E731

    # Encode and take the first step once per sentence; then every sentence gets k rows.
    memory = model.encode(src_tokens, src_mask)
    cache = model.new_cache()
    bos = torch.full((n, 1), BOS_ID, dtype=torch.long, device=device)
    logits = model.decode(bos, memory, src_mask, cache)[:, -1]  # (N, V)
    rows = torch.arange(n, device=device).repeat_interleave(k)  # (N*k,)
    cache.reorder(rows)
    logits, src_mask = logits[rows], src_mask[rows]
    sent_limits = max_lengths(model, src_mask[::k], max_len_a, max_len_b)  # per sentence
    limits = torch.tensor(sent_limits, device=device).repeat_interleave(k)  # per row
    # Only beam 0 of each sentence is live at first: the k rows are copies of one prefix.
    scores = torch.full((n, k), -math.inf, device=device)
    scores[:, 0] = 0.0
    prefixes = torch.empty(n * k, 0, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]
    active = list(range(n))  # sentence of each group of k rows
    step = 0
    while True:
        logp = _next_log_probs(logits, step, min_len, limits)  # (A*k, V)
        a, vocab = len(active), logp.size(-1)
        candidates = (scores[:, :, None] + logp.view(a, k, vocab)).view(a, k * vocab)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=1)  # (A, 2k)
        top_beam, top_token = top_index // vocab, top_index % vocab
        top_rows = torch.arange(a, device=device)[:, None] * k + top_beam  # (A, 2k) cache rows

        # EOS among the k best candidates finishes a hypothesis.
        is_eos = top_token == EOS_ID
        ends = (is_eos[:, :k] & torch.isfinite(top_scores[:, :k])).nonzero().tolist()
        if ends:
            ended_prefixes = prefixes[top_rows[:, :k][is_eos[:, :k] & torch.isfinite(top_scores[:, :k])]].tolist()
            for (g, j), tokens in zip(ends, ended_prefixes):
                finished[active[g]].append(Hypothesis(tokens, top_scores[g, j].item() / lp(step + 1)))

        # The k best candidates that do not end become the live beams.
        live_scores, order = top_scores.masked_fill(is_eos, -math.inf).topk(k, dim=1)  # (A, k)
        live_rows = top_rows.gather(1, order).view(-1)  # (A*k,)
        live_tokens = top_token.gather(1, order).view(-1)
        step += 1

        # A sentence is done when no live beam can still beat its nbest-th finished hypothesis.
        done = []
        best_live = live_scores[:, 0].tolist()
        for g, sent in enumerate(active):
            hyps = finished[sent]
            if math.isinf(best_live[g]):
                done.append(True)
                continue
            if len(hyps) < nbest:
                done.append(False)
                continue
            hyps.sort(key=lambda h: h.score, reverse=True)
            # The best a live beam could reach: its score only falls, the penalty's divisor is
            # largest at the longest length it may still grow to (for alpha >= 0).
            longest = max(step + 1, sent_limits[sent] + 1)
            divisor = max(lp(step + 1), lp(longest))
            done.append(hyps[nbest - 1].score >= best_live[g] / divisor)
        keep_groups = [g for g, d in enumerate(done) if not d]
        if not keep_groups:
            break
        if len(keep_groups) < a:
            groups = torch.tensor(keep_groups, device=device)
            live_rows = live_rows.view(a, k)[groups].view(-1)
            live_tokens = live_tokens.view(a, k)[groups].view(-1)
            live_scores = live_scores[groups]
            active = [active[g] for g in keep_groups]

        prefixes = torch.cat([prefixes[live_rows], live_tokens[:, None]], dim=1)
        scores = live_scores
        cache.reorder(live_rows)
        src_mask, limits = src_mask[live_rows], limits[live_rows]
        logits = model.decode(live_tokens[:, None], memory, src_mask, cache)[:, -1]

    for hyps in finished:
        hyps.sort(key=lambda h: h.score, reverse=True)
    return [hyps[:nbest] for hyps in finished]
