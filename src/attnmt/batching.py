"""Token-bucket batches: a resumable, DDP-sharded batch sampler and the collate function.

Mask convention (the one used across attnmt): boolean, ``True`` at real tokens ("may attend").
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from attnmt.tokenizer import BOS_ID, PAD_ID

logger = logging.getLogger(__name__)

_PACK_CHUNK = 1 << 16


@dataclass
class Batch:
    """A padded batch of sentence pairs.

    Attributes:
        src_tokens: (B, S) long, source ids + EOS, padded with ``PAD_ID``.
        src_mask: (B, S) bool, True at real source tokens.
        tgt_in: (B, T) long, BOS + target ids (the decoder input).
        tgt_out: (B, T) long, target ids + EOS (what the decoder predicts), padded with ``PAD_ID``.
        n_tgt_tokens: the number of non-pad tokens in ``tgt_out``.
    """

    src_tokens: torch.Tensor
    src_mask: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    n_tgt_tokens: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.src_tokens.to(device, non_blocking=non_blocking), self.src_mask.to(device, non_blocking=non_blocking),
            self.tgt_in.to(device, non_blocking=non_blocking), self.tgt_out.to(device, non_blocking=non_blocking),
            self.n_tgt_tokens,
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies, so ``to(cuda, non_blocking=True)`` overlaps with compute (DataLoader calls this)."""
        return Batch(self.src_tokens.pin_memory(), self.src_mask.pin_memory(), self.tgt_in.pin_memory(),
                     self.tgt_out.pin_memory(), self.n_tgt_tokens)

    def __len__(self) -> int:
        return self.src_tokens.shape[0]


def pad(sequences: Sequence[Sequence[int]], width: int | None = None,
        pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id sequences with ``pad_id`` (the model's: ``model.pad_id``): ids (B, T) long and their
    mask (B, T), True at real tokens.

    The one padding routine of attnmt: training batches, validation and translation all pad here.
    ``width`` defaults to the longest sequence. The mask comes from the lengths, not from the ids: in
    Marian the decoder starts from the padding id.
    """
    width = max((len(s) for s in sequences), default=0) if width is None else width
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return tokens, torch.arange(width)[None, :] < lengths[:, None]


def collate(examples: list[dict], pad_id: int = PAD_ID, bos_id: int = BOS_ID) -> Batch:
    """Pad examples with ``src_ids`` and ``tgt_ids`` (each ending in EOS) into a :class:`Batch`.

    ``tgt_out`` is ``tgt_ids``; ``tgt_in`` is ``[bos_id] + tgt_ids[:-1]``. ``pad_id`` and ``bos_id`` are
    the model's (``model.pad_id``, ``model.bos_id``: attnmt's own by default).
    """
    src_tokens, src_mask = pad([ex["src_ids"] for ex in examples], pad_id=pad_id)
    targets = [ex["tgt_ids"] for ex in examples]
    tgt_out, tgt_real = pad(targets, pad_id=pad_id)
    tgt_in, _ = pad([[bos_id, *t[:-1]] for t in targets], pad_id=pad_id)
    return Batch(src_tokens, src_mask, tgt_in, tgt_out, int(tgt_real.sum()))


def pack(order: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut ``order`` into consecutive batches of at most ``max_tokens`` padded tokens.

    A batch costs its size times the longest ``lengths`` in it. Sorting ``order`` by length first
    keeps the padding small. A sentence longer than ``max_tokens`` on its own gets a batch of its own.
    """
    batches, begin, width = [], 0, 0
    for start in range(0, len(order), _PACK_CHUNK):  # a chunk at a time: no Python int per sentence held
        for i, length in enumerate(lengths[order[start : start + _PACK_CHUNK]].tolist(), start):
            width = max(width, length)
            if i > begin and (i - begin + 1) * width > max_tokens:
                batches.append(order[begin:i])
                begin, width = i, length
    if begin < len(order):
        batches.append(order[begin:])
    return batches


def length_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length for translation, each at most ``max_tokens``
    counting padding (a single longer sentence gets a batch of its own); zero lengths are left out."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    return [batch.tolist() for batch in pack(order[lengths[order] > 0], lengths, max_tokens)]


class TokenBucketSampler:
    """Batches of at most ``max_tokens`` padded tokens, shuffled per epoch, sharded over ranks, resumable.

    A batch's cost is ``batch size x the longest source or target in it`` (padding included).

    **What an update holds.** One update takes ``update_freq`` batches on each of ``world_size``
    ranks: ``G = update_freq x world_size`` micro-batches. Each epoch, the sentences are shuffled
    (from ``(seed, epoch)``) and cut into windows of about ``window`` updates' worth of sentences;
    each window is sorted by length and packed greedily into ``G x u`` batches (so a batch holds
    sentences of similar length and padding stays small). The window's sorted batches are cut into
    ``G`` length strata of ``u`` batches, and each of its ``u`` updates takes one batch, drawn at
    random, from every stratum. So:

    - ``window=1``: every update is a random sample of the corpus, sorted and cut into its ``G``
      micro-batches: updates alike in length (as random batches) at the padding of sorted ones.
    - larger windows: less padding (each micro-batch is cut from more sentences), and each update still
      spans the lengths of its window in ``G`` strata.
    - ``window=0``: the whole epoch is one window; with ``G=1`` each update is one length class
      (fairseq's order: shuffled batches of length-sorted sentences).

    A window's batch count is kept a multiple of ``G`` by carrying a few of its batches' sentences
    (drawn at random) into the next window, so update boundaries and windows stay aligned; the
    epoch's last window splits its largest batches instead. Rank ``r`` takes every
    ``world_size``-th batch from ``r``: ranks get disjoint batches, the same number of them, and
    together cover every sentence exactly once per epoch. With ``shuffle=False`` (validation) the
    whole set is sorted once and the order is fixed.

    Resuming exactly: the checkpoint must hold :meth:`state_dict` called with the number of batches
    the training loop has taken from the DataLoader in the current epoch,
    ``sampler.state_dict(batches_in_epoch)``. (DataLoader workers pull batches ahead of the loop, so the
    sampler's own count of batches it has yielded, used when the argument is left out, is exact only
    with ``num_workers=0``.) After :meth:`load_state_dict`, the next iteration yields exactly the
    remaining batches of that epoch; call :meth:`set_epoch` before each later epoch.

    Mixing (``streams``): the sentences are consecutive runs of several streams (corpora, directions)
    of the given sizes, and each epoch takes ``round(share * total)`` sentences of each: all of a
    stream as often as that fits, then a seeded sample of the rest. An epoch thus holds as many
    sentences as the streams together, in the proportions of ``shares``, as a function of
    ``(seed, epoch)`` alone, so resuming stays exact.

    Args:
        src_lens: length of each source sentence in tokens (EOS included).
        tgt_lens: length of each target sentence in tokens (EOS included).
        max_tokens: the padded-token budget of one batch (per rank).
        shuffle: reshuffle every epoch; False for validation.
        seed: with the epoch, fixes the order.
        rank: this process's rank.
        world_size: the number of ranks.
        update_freq: batches per update on each rank (gradient accumulation).
        window: updates whose sentences are sorted together; 0 = the whole epoch.
        streams: the sizes of the consecutive runs of sentences that are mixed; None = every sentence
            once per epoch.
        shares: each stream's share of an epoch (they sum to 1), e.g. :func:`attnmt.data.shares`.
    """

    def __init__(self, src_lens: Sequence[int], tgt_lens: Sequence[int], max_tokens: int, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, update_freq: int = 1, window: int = 0,
                 streams: Sequence[int] | None = None, shares: Sequence[float] | None = None):
        # int32: with the int32 order below, 16 bytes per sentence pair at any corpus size.
        self.src_lens = np.asarray(src_lens, dtype=np.int32)
        self.tgt_lens = np.asarray(tgt_lens, dtype=np.int32)
        if self.src_lens.shape != self.tgt_lens.shape:
            raise ValueError(f"{len(self.src_lens)} source lengths but {len(self.tgt_lens)} target lengths")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if update_freq < 1 or window < 0:
            raise ValueError(f"update_freq={update_freq} must be at least 1 and window={window} at least 0")
        if len(self.src_lens) < world_size:
            raise ValueError(f"{len(self.src_lens)} sentences cannot be shared among {world_size} ranks")
        longest = np.maximum(self.src_lens, self.tgt_lens)
        if len(longest) and longest.max() > max_tokens:
            i = int(longest.argmax())
            raise ValueError(
                f"sentence pair {i} has {int(longest[i])} tokens (source {int(self.src_lens[i])}, target "
                f"{int(self.tgt_lens[i])}), more than max_tokens={max_tokens}: raise train.max_tokens or lower data.max_len"
            )
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.rank, self.world_size, self.update_freq, self.window = rank, world_size, update_freq, window
        if streams is not None:
            if sum(streams) != len(self.src_lens) or shares is None or len(shares) != len(streams):
                raise ValueError(f"streams {list(streams)} must cover the {len(self.src_lens)} sentences, with one "
                                 "share each")
            if not shuffle:
                raise ValueError("mixing streams needs shuffle=True")
        self.streams = None if streams is None else [int(n) for n in streams]
        self.shares = None if shares is None else [float(x) for x in shares]
        self.epoch = 0
        self._resume_at = 0  # batches of self.epoch to skip on the next iteration
        self._yielded = 0  # batches of self.epoch handed out so far
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: its order comes from ``(seed, epoch)``; iteration starts at its first batch."""
        self.epoch, self._resume_at, self._yielded = epoch, 0, 0

    def __len__(self) -> int:
        """The number of batches this rank gets in the current epoch."""
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for batch in batches[start:]:
            self._yielded += 1
            yield batch.tolist()

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, int | bool]:
        """The position to resume from: the epoch and the batches of it the training loop has consumed.

        Args:
            batches_consumed: batches of the current epoch the loop has taken from the DataLoader;
                None uses the number this sampler has yielded (exact only without DataLoader workers).
        """
        consumed = self._yielded if batches_consumed is None else batches_consumed
        return {"epoch": self.epoch, "batches_consumed": int(consumed), "seed": self.seed, "shuffle": self.shuffle,
                "max_tokens": self.max_tokens, "n_sentences": len(self.src_lens), "world_size": self.world_size,
                "update_freq": self.update_freq, "window": self.window, "streams": self.streams,
                "shares": self.shares}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: the next iteration yields the rest of that epoch."""
        # Checkpoints written before the window existed sorted each epoch whole, one batch per update.
        old = {"update_freq": 1, "window": 0} if "window" not in state else {}
        for key, mine in (("n_sentences", len(self.src_lens)), ("max_tokens", self.max_tokens),
                          ("seed", self.seed), ("shuffle", self.shuffle), ("update_freq", self.update_freq),
                          ("window", self.window), ("streams", self.streams), ("shares", self.shares)):
            theirs = old.get(key, state.get(key))
            if theirs != mine:
                raise ValueError(f"cannot resume the batch order: the checkpoint's sampler has {key}={theirs}, "
                                 f"this run has {mine}; resume with the same data and batching settings")
        consumed = state["batches_consumed"]
        if state["world_size"] != self.world_size:
            consumed = consumed * state["world_size"] // self.world_size
            logger.warning("resuming with %d ranks from a checkpoint of %d: the position in the epoch is approximate",
                           self.world_size, state["world_size"])
        self.epoch = state["epoch"]
        self._resume_at = self._yielded = min(consumed, len(self))

    @property
    def batches_consumed(self) -> int:
        """Batches of the current epoch handed out, or skipped by a resume: where the epoch stands."""
        return self._yielded

    # ------------------------------------------------------------------------------------------

    def _rank_batches(self) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = None  # the last epoch's batches go before this one's are made
            self._cache = (self.epoch, self._epoch_batches(self.epoch)[self.rank :: self.world_size])
            release_free_memory()
        return self._cache[1]

    def _mixed_rows(self, rng: np.random.Generator) -> np.ndarray:
        """This epoch's sentences of every stream, by their shares, shuffled (int32 row ids)."""
        total = len(self.src_lens)
        wanted = np.asarray(self.shares) * total
        counts = np.floor(wanted).astype(np.int64)
        counts[np.argsort(counts - wanted)[: total - counts.sum()]] += 1  # largest remainders: the counts sum to total
        rows, offset = [], 0
        for size, count in zip(self.streams, counts.tolist()):
            full, rest = divmod(count, size) if size else (0, 0)
            rows.append(np.tile(np.arange(size, dtype=np.int32), full) + offset)
            rows.append(np.sort(rng.choice(size, rest, replace=False)).astype(np.int32) + offset if rest else
                        np.empty(0, np.int32))
            offset += size
        order = np.concatenate(rows)
        rng.shuffle(order)  # in place: order[rng.permutation(len(order))] without its int64 copy
        return order

    def _sorted(self, rows: np.ndarray, longest: np.ndarray) -> np.ndarray:
        """``rows`` by the longer side, then by each side, so both source and target padding stay small;
        the stable sort keeps the shuffled order among equal lengths.

        The three lengths (each at most ``max_tokens`` < 2**21) are packed into one int64 key, sorted
        once: np.lexsort's order without its three gathered keys (30 instead of 34 bytes a pair at
        the peak of an epoch's start, 3M pairs)."""
        if self.max_tokens >= 1 << 21:
            return rows[np.lexsort((self.src_lens[rows], self.tgt_lens[rows], longest[rows]))]
        key = longest[rows].astype(np.int64)
        for lengths in (self.tgt_lens, self.src_lens):
            key <<= 21
            key |= lengths[rows]
        return rows[np.argsort(key, kind="stable")]

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """All ranks' batches of ``epoch``, in order: the same on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        longest = np.maximum(self.src_lens, self.tgt_lens)
        if not self.shuffle:
            return _split_for_ranks(pack(self._sorted(np.arange(len(longest), dtype=np.int32), longest), longest,
                                         self.max_tokens), self.world_size)
        order = self._mixed_rows(rng) if self.streams is not None else _permutation(rng, len(longest))
        group = self.update_freq * self.world_size  # micro-batches in one update, all ranks together
        # Sentences per window, from the mean length and updated with each window's packing, so that a
        # window fills about `window` updates; a function of (seed, epoch) alone, as resuming needs.
        # window=0: the whole epoch is one window (the loop below runs once).
        wanted = self.window * group
        per_window = len(order) if self.window == 0 else max(
            group, int(wanted * self.max_tokens * 0.9 / max(float(longest[order].mean()), 1.0)))
        batches: list[np.ndarray] = []
        carried = np.empty(0, np.int32)
        start = 0
        while start < len(order) or len(carried):
            take = max(per_window - len(carried), 1)
            rows = np.concatenate([carried, order[start : start + take]]) if len(carried) else order[start : start + take]
            start += take
            window = pack(self._sorted(rows, longest), longest, self.max_tokens)
            per_window = max(group, round(len(rows) * wanted / len(window)))
            if start >= len(order):  # the last window: no next one to carry into
                window, carried = _split_to_multiple(window, group), np.empty(0, np.int32)
            else:
                extra = len(window) % group
                out = set(rng.choice(len(window), extra, replace=False).tolist()) if extra else set()
                carried = np.concatenate([window[j] for j in sorted(out)]) if out else np.empty(0, np.int32)
                window = [b for j, b in enumerate(window) if j not in out]
            batches += _deal(window, group, rng)
        return _split_for_ranks(batches, self.world_size)


def _permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """``rng.permutation(n)`` as int32, without its int64 copy: the same order (one shuffle, the same draws)."""
    order = np.arange(n, dtype=np.int32)
    rng.shuffle(order)
    return order


def release_free_memory() -> None:
    """Hand the heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    An epoch's order is made of arrays of 4 to 8 bytes a sentence pair; once freed, glibc keeps them
    in the heap (its threshold for giving large blocks back rises with each one freed), which added
    about 12 bytes a pair to the process's resident memory at 3M pairs (docs/BENCHMARKS.md, "Memory
    per pair")."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _split_to_multiple(batches: list[np.ndarray], group: int) -> list[np.ndarray]:
    """Split the batches with the most sentences until their number is a multiple of ``group`` (as far
    as one-sentence batches allow); the split halves stay next to each other in length order."""
    batches = list(batches)
    while len(batches) % group:
        big = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[big]) < 2:
            break
        half = len(batches[big]) // 2
        batches[big : big + 1] = [batches[big][:half], batches[big][half:]]
    return batches


def _deal(batches: list[np.ndarray], group: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Length-sorted ``batches`` in update order: cut into ``group`` strata of consecutive batches, each
    update takes one batch, drawn at random, from every stratum (a count that is not a multiple of
    ``group`` leaves its remainder at the end, shuffled)."""
    updates, rest = divmod(len(batches), group)
    strata = [rng.permutation(updates) + s * updates for s in range(group)]
    order = [int(strata[s][u]) for u in range(updates) for s in range(group)]
    order += [int(j) + updates * group for j in rng.permutation(rest)]
    return [batches[j] for j in order]


def _split_for_ranks(batches: list[np.ndarray], world_size: int) -> list[np.ndarray]:
    """Equal batch counts on every rank without dropping or repeating a sentence."""
    batches = _split_to_multiple(batches, world_size)
    if len(batches) % world_size:
        raise ValueError(f"{len(batches)} one-sentence batches cannot be shared equally among "
                         f"{world_size} ranks; raise max_tokens")
    return batches


def make_dataloader(dataset, sampler: TokenBucketSampler, num_workers: int = 0, pin_memory: bool = False,
                    prefetch_factor: int = 4, pad_id: int = PAD_ID, bos_id: int = BOS_ID) -> DataLoader:
    """A DataLoader of :class:`Batch` objects over ``sampler``'s batches (:func:`collate` with the model's
    ``pad_id`` and ``bos_id``); workers prefetch ahead.

    Only the ``src_ids`` and ``tgt_ids`` columns of a HF dataset are read. See
    :class:`TokenBucketSampler` for what the training loop must save to resume exactly.
    """
    if hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns(["src_ids", "tgt_ids"])
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=functools.partial(collate, pad_id=pad_id, bos_id=bos_id),
        num_workers=num_workers, pin_memory=pin_memory,
        # Workers live as long as the loader: a new epoch's iterator reuses them instead of forking
        # anew (the batch sampler runs in this process, so each epoch still gets its own order).
        prefetch_factor=prefetch_factor if num_workers > 0 else None, persistent_workers=num_workers > 0,
    )
