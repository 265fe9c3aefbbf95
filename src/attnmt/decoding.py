"""Batched greedy search, beam search and sampling over ``encode`` + cached ``decode``.

Each strategy is a function ``(model, src_tokens, src_mask, cfg, line_numbers, tgt_prefix) -> hypotheses`` and an
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
from collections import deque
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


def length_penalty(length: int | Tensor, alpha: float) -> float | Tensor:
    """GNMT's ``((5 + length) / 6) ** alpha``; ``length`` counts the generated tokens, EOS included (a
    tensor of lengths: each one's penalty, in the tensor's dtype; beam search passes float64)."""
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


def _forbid(logits: Tensor, model: Transformer, steps: Tensor, min_len: int, forced: Sequence[int],
            fresh: bool) -> None:
    """Set the logits (N, V) of tokens that may not come next to -inf, in place: :func:`never_generated`
    always, EOS before ``min_len`` tokens; in a row still in the forced prefix (``steps`` (N,) holds
    each row's tokens so far), every token but the forced one, which gets 0. ``fresh``: whether any
    row may still be under ``min_len`` or in the prefix (when none is, the per-row rules are skipped)."""
    cfg = model.cfg
    for token in never_generated(cfg.pad_id, cfg.bos_id, cfg.eos_id):
        logits[:, token] = -math.inf
    if not fresh:
        return
    if min_len > 0:
        logits[:, cfg.eos_id].masked_fill_(steps < min_len, -math.inf)
    if forced:
        rows = (steps < len(forced)).nonzero().squeeze(1)
        if rows.numel():
            logits[rows] = -math.inf
            logits[rows, torch.tensor(forced, device=logits.device)[steps[rows]]] = 0.0


# Rows of logits projected, normalised and ranked at a time in beam search: a block of (1024, V)
# float32 logits stays in the processor's cache between the three, where (rows, V) for thousands
# of rows would go to memory and back (bigger batches ran up to 1.7x slower per row without it).
_ROWS_PER_BLOCK = 1024


def _top_tokens(model: Transformer, states: Tensor, steps: Tensor, min_len: int, max_len: Tensor,
                count: int, forced: Sequence[int], fresh: bool) -> tuple[Tensor, Tensor]:
    """The ``count`` best next tokens of each row and their log-probabilities, (N, count) each, best
    first, under the length rules.

    ``states`` (N, D) are the decoder's output states (:meth:`Transformer.decode_states`); ``steps``
    (N,) the number of tokens each row has generated so far; ``max_len`` (N,) each row's limit;
    ``forced`` the target prefix; ``fresh`` as :func:`_forbid`'s. Beam search needs no more than its
    2k best candidates per row, so the candidates of a sentence are combined from these instead of
    from all k x V.
    """
    tops, tokens = [], []
    eos = model.cfg.eos_id
    for start in range(0, states.size(0), _ROWS_PER_BLOCK):
        block = slice(start, start + _ROWS_PER_BLOCK)
        logp = model.project(states[block]).float().log_softmax(dim=-1)  # (n, V)
        _forbid(logp, model, steps[block], min_len, forced, fresh)
        top, top_tokens = logp.topk(count, dim=-1)  # (n, count)
        at_limit = max_len[block] <= steps[block]  # these rows must end now
        if at_limit.any():
            # EOS is their one continuation, even where min_len asked otherwise: the limit wins (with
            # log-probability 0 where min_len had ruled EOS out).
            top[at_limit] = -math.inf
            top[at_limit, 0] = torch.where(steps[block][at_limit] >= min_len, logp[at_limit, eos], 0.0)
            top_tokens[at_limit, 0] = eos
        tops.append(top)
        tokens.append(top_tokens)
    return torch.cat(tops), torch.cat(tokens)


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


def uniform_noise(seed: int, sentence_ids: Tensor, step: int | Tensor, vocab: int) -> Tensor:
    """Uniform numbers in (0, 1), (N, V) float64, that depend on (seed, sentence, step, token) alone:
    a splitmix64 hash of each in turn, so a sentence's draws are the same whatever its batch, its
    position in it or the device, and no two counters share their numbers. ``step`` may be one for
    all or (N,), one per sentence."""
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


class RunningSearch:
    """A search that sentences join and leave at any step: continuous batching.

    :meth:`add` queues a source; each :meth:`step` lets queued sources join while the rows they need
    fit ``max_rows`` (encoding them together, their cross-attention keys and values projected once,
    their self-attention starting empty), runs one decoding step over every row, and returns the
    sources that finished with their hypotheses, best first. Finished sentences leave at once: their
    rows are dropped from the cache. :meth:`cancel` drops a source, queued or running.

    A sentence's result never depends on the sentences beside it or on the step it joined at: its
    length rules, positions, masks and draws are its own, so the static searches
    (:func:`greedy_search`, :func:`beam_search`, :func:`sample_search`) are this search with every
    source joining at the first step. Rows: ``beam_size`` a source in beam search, ``nbest`` in
    sampling (each draw a row of its own), one in greedy search.

    Args:
        model: the translation model, in eval mode; run the steps under ``torch.inference_mode()``
            (and the engine's autocast).
        cfg: the search settings (the strategy it asks for, :func:`strategy`).
        tgt_prefix: ids forced at the start of every translation (see the module docstring).
        max_rows: the most rows decoded at once; None: no limit (every queued source joins).
        kind: the strategy's name, where it is not the one ``cfg`` asks for (``beam`` with
            ``beam_size=1`` runs beam search's bookkeeping, for tests).

    Raises:
        ValueError: ``max_rows`` is smaller than one source's rows, or a strategy it has no step for
            (rather than running it as greedy search).
    """

    def __init__(self, model: Transformer, cfg: DecodeConfig, tgt_prefix: Sequence[int] = (),
                 max_rows: int | None = None, kind: str | None = None) -> None:
        self.model, self.cfg, self.forced = model, cfg, list(tgt_prefix)
        name = kind or strategy(cfg).name
        if name not in ("greedy", "beam", "sampling"):  # a strategy added to STRATEGIES must be taught its step here
            raise ValueError(f"the running search has no step for the {name} strategy; search with greedy, beam or "
                             "sampling")
        self.beam, self.scored = name == "beam", name == "sampling"
        self.beams = cfg.beam_size if self.beam else 1  # rows of a group in the cache
        self.draws = cfg.nbest if self.scored else 1  # groups of a source: each draw its own
        if max_rows is not None and max_rows < self.beams * self.draws:
            raise ValueError(f"max_rows={max_rows} is smaller than one sentence's {self.beams * self.draws} rows "
                             f"({'beam_size' if self.beam else 'nbest'}); raise it or search with fewer")
        self.max_rows = max_rows
        self.device = next(model.parameters()).device
        self.eos = model.cfg.eos_id
        self._waiting: deque[tuple[int, list[int], int]] = deque()  # (ticket, source ids, line number)
        self._tickets = 0
        self._cancelled: set[int] = set()
        self._partial: dict[int, list[Hypothesis]] = {}  # sampling: the draws of a source finished so far
        self._t = 0  # steps run: a group that joined at step j is at its step t - j
        self.last_rows = 0  # rows the last step decoded
        self._cache = model.new_cache()
        self._newest = 0  # the step the most recent group joined at
        # One entry per group, in cache order (tensors (A, ...), rows (A * beams, ...)).
        self._owner: list[int] = []  # each group's ticket
        self._g: dict[str, Tensor] = {}
        self._row_tokens = torch.empty(0, 1, dtype=torch.long, device=self.device)  # (rows, T) generated so far
        self._next = torch.empty(0, dtype=torch.long, device=self.device)  # (rows,) the token each row reads next

    @property
    def rows(self) -> int:
        """Rows being decoded."""
        return len(self._owner) * self.beams

    @property
    def waiting(self) -> int:
        """Sources queued, not yet joined."""
        return len(self._waiting)

    def __bool__(self) -> bool:
        """Whether anything is queued or running."""
        return bool(self._waiting or self._owner)

    def add(self, source: Sequence[int], line_number: int = 0) -> int:
        """Queue ``source`` (ids ending with EOS); ``line_number`` fixes its draws when sampling. Returns
        its ticket, which :meth:`step` gives back with its hypotheses.

        Raises:
            ValueError: the source is empty or longer than the model's positions.
        """
        limit = self.model.cfg.max_positions
        if not source or len(source) > limit:
            raise ValueError(f"a source of {len(source)} tokens: give 1 to model.max_positions={limit} "
                             "(Engine.encode cuts longer lines to fit)")
        ticket = self._tickets
        self._tickets += 1
        self._waiting.append((ticket, list(source), line_number))
        return ticket

    def cancel(self, ticket: int) -> None:
        """Drop source ``ticket``: queued, it never joins; running, its rows leave at the next step."""
        self._cancelled.add(ticket)

    def step(self) -> list[tuple[int, list[Hypothesis]]]:
        """Let queued sources join, decode one step, and return the ``(ticket, hypotheses)`` of the
        sources that finished (hypotheses best first)."""
        self._drop_cancelled()
        self._join()
        self.last_rows = self.rows
        if not self._owner:
            return []
        states = self.model.decode_states(self._next[:, None], None, None, self._cache)[:, -1]  # (rows, D)
        steps = self._t - self._g["joined"]  # (A,) tokens each group has generated
        fresh = self._t - self._newest < max(self.cfg.min_len, len(self.forced))
        done, finished, parents = (self._beam_step if self.beam else self._token_step)(states, steps, fresh)
        self._t += 1
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() < len(self._owner):
            self._keep(keep, parents)
        elif parents is not None:
            self._cache.reorder(parents, beams=self.beams)
        return self._results(finished)

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        self._waiting = deque(w for w in self._waiting if w[0] not in self._cancelled)
        for ticket in self._cancelled:
            self._partial.pop(ticket, None)
        if any(ticket in self._cancelled for ticket in self._owner):
            keep = [i for i, ticket in enumerate(self._owner) if ticket not in self._cancelled]
            self._keep(torch.tensor(keep, dtype=torch.long, device=self.device))
        running = set(self._owner) | {w[0] for w in self._waiting}
        self._cancelled &= running  # a ticket still in flight (a draw group) stays cancelled

    def _join(self) -> None:
        """Move queued sources into the search while their rows fit ``max_rows``."""
        room = None if self.max_rows is None else self.max_rows - self.rows
        take: list[tuple[int, list[int], int]] = []
        per_source = self.beams * self.draws
        while self._waiting and (room is None or room >= per_source):
            take.append(self._waiting.popleft())
            room = None if room is None else room - per_source
        if not take:
            return
        from attnmt.batching import pad

        model, device, k, draws = self.model, self.device, self.beams, self.draws
        src_tokens, src_mask = (t.to(device) for t in pad([source for _, source, _ in take], pad_id=model.cfg.pad_id))
        if draws > 1:
            src_tokens, src_mask = src_tokens.repeat_interleave(draws, 0), src_mask.repeat_interleave(draws, 0)
        memory = model.encode(src_tokens, src_mask)
        cross = [layer.cross_attn.project_kv(memory) for layer in model.decoder_layers]
        j = src_mask.size(0)  # groups joining
        limits = torch.tensor(max_lengths(model, src_mask, self.cfg.max_len_a, self.cfg.max_len_b), device=device)
        if not self._owner:
            self._cache.max_len = int(limits.max()) + 1  # BOS and every token but the last
        # A fresh start takes one row a group: its beams would be copies of one prefix until the
        # first step's reorder makes them k (a step of k copies cost 5-6% of a batch's time).
        self._cache.join(cross, src_mask, k if self._owner else 1)
        rows = j * self._cache.beams
        line_numbers = torch.tensor([line for _, _, line in take], device=device)
        new = {
            "joined": torch.full((j,), self._t, dtype=torch.long, device=device),
            "limit": limits,
            "draw": line_numbers.repeat_interleave(draws) * draws + torch.arange(draws, device=device).repeat(len(take)),
        }
        width = int(limits.max()) + 1
        if self.beam:
            nbest = self.cfg.nbest
            scores = torch.full((j, k), -math.inf, device=device)
            scores[:, 0] = 0.0  # only beam 0 is live at first: the others would repeat it
            new |= {"scores": scores, "finished": torch.zeros(j, dtype=torch.long, device=device),
                    "best_scores": torch.full((j, nbest), -math.inf, dtype=torch.float64, device=device),
                    "best_lens": torch.zeros(j, nbest, dtype=torch.long, device=device),
                    "best_tokens": torch.zeros(j, nbest, width, dtype=torch.long, device=device)}
        else:
            new["scores"] = torch.zeros(j, dtype=torch.float64, device=device)
        for key, value in new.items():
            old = self._g.get(key)
            if old is not None and old.dim() == 3 and old.size(2) != value.size(2):  # best tokens: one width
                grown = max(old.size(2), value.size(2))
                old, value = _widen(old, grown), _widen(value, grown)
            self._g[key] = value if old is None or not self._owner else torch.cat([old, value])
        tokens = self._row_tokens if self._owner else self._row_tokens[:0]
        grown = max(tokens.size(1), width)
        self._row_tokens = torch.cat([_widen(tokens, grown), tokens.new_zeros(rows, grown)])
        bos = torch.full((rows,), model.cfg.bos_id, dtype=torch.long, device=device)
        self._next = torch.cat([self._next, bos]) if self._owner else bos
        self._owner += [ticket for ticket, _, _ in take for _ in range(draws)]
        self._newest = self._t

    def _keep(self, keep: Tensor, parents: Tensor | None = None) -> None:
        """Keep groups ``keep`` (A',) and their rows, in that order; the others leave. ``parents``
        (rows,): the cache row each row continues, where a beam step chose them (the token state is
        in the new order already, the cache not yet)."""
        per = self.beams if parents is not None else self._cache.beams
        rows = (keep[:, None] * per + torch.arange(per, device=self.device)).view(-1)
        self._cache.reorder(rows if parents is None else parents[rows], beams=self.beams)
        self._g = {key: value[keep] for key, value in self._g.items()}
        self._row_tokens, self._next = self._row_tokens[rows], self._next[rows]
        owners = keep.tolist()
        self._owner = [self._owner[i] for i in owners]

    def _token_step(self, states: Tensor, steps: Tensor, fresh: bool) -> tuple[Tensor, list, None]:
        """Greedy search and sampling: each row takes one token (the best, or a draw). Returns the
        groups done (A,), the ``(ticket, hypothesis)`` of each, and None: rows keep their places."""
        cfg, g = self.cfg, self._g
        logits = self.model.project(states)  # (A, V)
        log_probs = logits.float().log_softmax(dim=-1) if self.scored else None  # before the length rules, as beam search
        _forbid(logits, self.model, steps, cfg.min_len, self.forced, fresh)
        if not self.scored or cfg.temperature == 0:
            next_tokens = logits.argmax(dim=-1)
        else:
            gumbel = -torch.log(-torch.log(uniform_noise(cfg.seed, g["draw"], steps, logits.size(-1))))
            next_tokens = (_filter(logits.float(), cfg.temperature, cfg.top_k, cfg.top_p).double() + gumbel).argmax(dim=-1)
        at_limit = g["limit"] <= steps
        next_tokens[at_limit] = self.eos
        if self.scored:
            logp = log_probs.gather(1, next_tokens[:, None])[:, 0].double()
            # The forced prefix scores 0; where min_len had ruled EOS out, the length limit still ends
            # the sentence, at no cost (as in beam search).
            free = (steps >= len(self.forced)) & ~(at_limit & (steps < cfg.min_len))
            g["scores"] += torch.where(free, logp, 0.0)
        self._row_tokens.scatter_(1, steps[:, None], next_tokens[:, None])
        self._next = next_tokens
        done = next_tokens == self.eos
        finished = []
        if done.any():
            ended = done.nonzero().squeeze(1)
            lengths, scores = steps[ended].tolist(), g["scores"][ended].tolist()
            for i, row, length, score in zip(ended.tolist(), self._row_tokens[ended].tolist(), lengths, scores):
                finished.append((self._owner[i], Hypothesis(row[:length], score if self.scored else math.nan)))
        return done, finished, None

    def _beam_step(self, states: Tensor, steps: Tensor, fresh: bool) -> tuple[Tensor, list, Tensor]:
        """Beam search: each group's k live beams become the k best continuations that do not end;
        those among the k best that end join the group's ``nbest`` best finished hypotheses. Returns
        the groups done (A,), the ``(ticket, hypotheses)`` of each, and the row (A * k,) each new
        beam continues, for the cache to follow."""
        cfg, g, k, nbest, device = self.cfg, self._g, self.beams, self.cfg.nbest, self.device
        a = len(self._owner)
        len_penalty = cfg.len_penalty

        def lp(length: Tensor) -> Tensor:
            return length_penalty(length.double(), len_penalty)

        beams = self._cache.beams  # rows a group has now: 1 at a fresh start
        count = min(2 * k, self.model.cfg.tgt_vocab_size)  # candidates per row: 2k cover the k best that do not end
        logp, tokens = _top_tokens(self.model, states, steps.repeat_interleave(beams), cfg.min_len,
                                   g["limit"].repeat_interleave(beams), count, self.forced, fresh)
        if beams < k:  # every beam of a group continues its one row
            logp, tokens = logp.repeat_interleave(k, dim=0), tokens.repeat_interleave(k, dim=0)
        candidates = (g["scores"][:, :, None] + logp.view(a, k, count)).view(a, k * count)
        top_scores, top_index = candidates.topk(min(2 * k, k * count), dim=1)  # (A, 2k)
        top_token = tokens.view(a, k * count).gather(1, top_index)
        parent = top_index // count if beams == k else torch.zeros_like(top_index)
        top_rows = torch.arange(a, device=device)[:, None] * beams + parent  # (A, 2k) rows they continue

        # EOS among the k best candidates finishes a hypothesis: it joins the group's nbest best.
        is_eos = top_token == self.eos
        ends = is_eos[:, :k] & torch.isfinite(top_scores[:, :k])  # (A, k)
        g["finished"] += ends.sum(dim=1)
        if ends.any():
            ended = torch.where(ends, top_scores[:, :k].double() / lp(steps + 1)[:, None], -math.inf)
            pool_scores = torch.cat([g["best_scores"], ended], dim=1)  # (A, nbest + k)
            ended_tokens = self._row_tokens[top_rows[:, :k]]  # (A, k, T): the prefix each ended hypothesis ends
            width = g["best_tokens"].size(2)
            pool_tokens = torch.cat([g["best_tokens"], _widen(ended_tokens, width)[:, :, :width]], dim=1)
            pool_lens = torch.cat([g["best_lens"], steps[:, None].expand(a, k)], dim=1)
            g["best_scores"], order = pool_scores.topk(nbest, dim=1)
            g["best_tokens"] = pool_tokens[torch.arange(a, device=device)[:, None], order]
            g["best_lens"] = pool_lens.gather(1, order)

        # The k best candidates that do not end become the live beams.
        live_scores, order = top_scores.masked_fill(is_eos, -math.inf).topk(k, dim=1)  # (A, k)
        live_rows = top_rows.gather(1, order).view(-1)
        live_tokens = top_token.gather(1, order).view(-1)

        # A group is done when no live beam can still beat its nbest-th finished hypothesis. The best
        # a live beam could reach: its score only falls, and the penalty's divisor is largest at the
        # longest length it may still grow to (for alpha >= 0).
        grown = steps + 1
        best_live = live_scores[:, 0].double()
        longest = (g["limit"] + 1).clamp(min=grown + 1)
        bound = best_live / torch.maximum(lp(grown + 1), lp(longest))
        done = torch.isinf(best_live) | (g["best_scores"][:, nbest - 1] >= bound)  # -inf while < nbest finished
        if cfg.beam_stop == "finished":
            done |= g["finished"] >= k

        g["scores"] = live_scores
        self._row_tokens = self._row_tokens[live_rows]
        self._row_tokens.scatter_(1, steps.repeat_interleave(k)[:, None], live_tokens[:, None])
        self._next = live_tokens
        finished = []
        if done.any():
            ended = done.nonzero().squeeze(1)
            rows = zip(g["best_scores"][ended].tolist(), g["best_tokens"][ended].tolist(), g["best_lens"][ended].tolist())
            for i, (scores, hyp_tokens, lens) in zip(ended.tolist(), rows):
                finished.append((self._owner[i], [Hypothesis(t[:n], s) for s, t, n in zip(scores, hyp_tokens, lens)
                                                  if s > -math.inf]))
        return done, finished, live_rows

    def _results(self, finished: list) -> list[tuple[int, list[Hypothesis]]]:
        """Sources whose every group has finished, with their hypotheses best first."""
        if self.beam:
            return finished
        results = []
        for ticket, hyp in finished:
            if self.draws == 1:
                results.append((ticket, [hyp]))
                continue
            draws = self._partial.setdefault(ticket, [])
            draws.append(hyp)
            if len(draws) == self.draws:
                del self._partial[ticket]
                results.append((ticket, sorted(draws, key=lambda h: h.score, reverse=True)))
        return results


def _widen(tokens: Tensor, width: int) -> Tensor:
    """``tokens`` (..., T) padded with zeros on the right to (..., width) (as it is if T >= width)."""
    if tokens.size(-1) >= width:
        return tokens
    return torch.cat([tokens, tokens.new_zeros(*tokens.shape[:-1], width - tokens.size(-1))], dim=-1)


def _static(kind: str, model: Transformer, src_tokens: Tensor, src_mask: Tensor, cfg: DecodeConfig,
            line_numbers: Tensor | None, tgt_prefix: Sequence[int]) -> list[list[Hypothesis]]:
    """The hypotheses of each source of a batch by strategy ``kind``: a :class:`RunningSearch` that
    every source joins at its first step."""
    run = RunningSearch(model, cfg, tgt_prefix, kind=kind)
    lengths = src_mask.sum(dim=1).tolist()
    numbers = range(src_tokens.size(0)) if line_numbers is None else line_numbers.tolist()
    for ids, n, line in zip(src_tokens.tolist(), lengths, numbers):
        run.add(ids[:n], line)
    results: list[list[Hypothesis]] = [[] for _ in lengths]
    while run:
        for ticket, hyps in run.step():
            results[ticket] = hyps
    return results


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
    return _static("greedy", model, src_tokens, src_mask, cfg, line_numbers, tgt_prefix)


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
    return _static("sampling", model, src_tokens, src_mask, cfg, line_numbers, tgt_prefix)


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
    return _static("beam", model, src_tokens, src_mask, cfg, line_numbers, tgt_prefix)


@dataclass(frozen=True)
class Strategy:
    """A decoding strategy: its name (engines declare the names they run), whether a config asks for
    it, and its search function."""

    name: str
    chosen: Callable[[DecodeConfig], bool]
    search: Callable[[Transformer, Tensor, Tensor, DecodeConfig, Tensor | None, Sequence[int]], list[list[Hypothesis]]]


# The first strategy whose `chosen` holds runs. A new strategy is its function, an entry here, its
# config keys (DecodeConfig, configs/decode/beam.yaml, serve's TranslateRequest) and, for continuous
# batching, its step in RunningSearch (which refuses a strategy it has none for); engines other than
# attnmt's own refuse it until they declare its name.
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
