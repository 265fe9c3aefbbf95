"""Token-bucket batches: a resumable, DDP-sharded batch sampler and the collate function.

Mask convention (the one used across attnmt): boolean, ``True`` at real tokens ("may attend").
"""

from __future__ import annotations

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


def pad(sequences: Sequence[Sequence[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id sequences with ``PAD_ID``: ids (B, T) long and their mask (B, T), True at real tokens.

    The one padding routine of attnmt: training batches, validation and translation all pad here.
    ``width`` defaults to the longest sequence.
    """
    width = max((len(s) for s in sequences), default=0) if width is None else width
    tokens = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return tokens, tokens != PAD_ID


def collate(examples: list[dict]) -> Batch:
    """Pad examples with ``src_ids`` and ``tgt_ids`` (each ending in EOS) into a :class:`Batch`.

    ``tgt_out`` is ``tgt_ids``; ``tgt_in`` is ``[BOS] + tgt_ids[:-1]``.
    """
    src_tokens, src_mask = pad([ex["src_ids"] for ex in examples])
    targets = [ex["tgt_ids"] for ex in examples]
    tgt_out, tgt_real = pad(targets)
    tgt_in, _ = pad([[BOS_ID, *t[:-1]] for t in targets])
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

    A batch's cost is ``batch size x the longest source or target in it`` (padding included). Each
    epoch, the sentences are shuffled (from ``(seed, epoch)``), cut into windows of ``window``
    sentences, sorted by length inside each window (so batches hold sentences of similar length) and
    packed greedily; the batch order is then shuffled. With ``shuffle=False`` the whole set is sorted
    once and the order is fixed. Batches are split until their number is a multiple of
    ``world_size``, and rank ``r`` takes every ``world_size``-th one from ``r``: ranks get disjoint
    batches, the same number of them, and together cover every sentence exactly once per epoch.

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
        window: sentences sorted together; larger means less padding and less randomness.
        streams: the sizes of the consecutive runs of sentences that are mixed; None = every sentence
            once per epoch.
        shares: each stream's share of an epoch (they sum to 1), e.g. :func:`attnmt.data.shares`.
    """

    def __init__(self, src_lens: Sequence[int], tgt_lens: Sequence[int], max_tokens: int, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, window: int = 100_000,
                 streams: Sequence[int] | None = None, shares: Sequence[float] | None = None):
        # int32: with the int32 order below, 16 bytes per sentence pair at any corpus size.
        self.src_lens = np.asarray(src_lens, dtype=np.int32)
        self.tgt_lens = np.asarray(tgt_lens, dtype=np.int32)
        if self.src_lens.shape != self.tgt_lens.shape:
            raise ValueError(f"{len(self.src_lens)} source lengths but {len(self.tgt_lens)} target lengths")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
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
        self.rank, self.world_size, self.window = rank, world_size, window
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
                "streams": self.streams, "shares": self.shares}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: the next iteration yields the rest of that epoch."""
        for key, mine in (("n_sentences", len(self.src_lens)), ("max_tokens", self.max_tokens),
                          ("seed", self.seed), ("shuffle", self.shuffle), ("streams", self.streams),
                          ("shares", self.shares)):
            if state.get(key) != mine:
                raise ValueError(f"cannot resume the batch order: the checkpoint's sampler has {key}={state.get(key)}, "
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
            self._cache = (self.epoch, self._epoch_batches(self.epoch)[self.rank :: self.world_size])
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
        return order[rng.permutation(len(order))]

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """All ranks' batches of ``epoch``, in order: the same on every rank."""
        n = len(self.src_lens)
        rng = np.random.default_rng([self.seed, epoch])
        if self.streams is not None:
            order = self._mixed_rows(rng)
            n = len(order)
        else:
            order = (rng.permutation(n) if self.shuffle else np.arange(n)).astype(np.int32)
        window = self.window if self.shuffle else max(n, 1)
        # Sort by the longer side, then by each side, so both source and target padding stay small;
        # the stable sort keeps the shuffled order among equal lengths.
        longest = np.maximum(self.src_lens, self.tgt_lens)
        for start in range(0, n, window):
            chunk = order[start : start + window]
            order[start : start + window] = chunk[np.lexsort((self.src_lens[chunk], self.tgt_lens[chunk], longest[chunk]))]

        batches = pack(order, longest, self.max_tokens)

        # Equal batch counts on every rank without dropping or repeating a sentence: halve the batches
        # with the most sentences until the count divides evenly.
        while len(batches) % self.world_size:
            big = max(range(len(batches)), key=lambda j: len(batches[j]))
            if len(batches[big]) < 2:
                raise ValueError(f"{len(batches)} one-sentence batches cannot be shared equally among "
                                 f"{self.world_size} ranks; raise max_tokens")
            half = len(batches[big]) // 2
            batches[big : big + 1] = [batches[big][:half], batches[big][half:]]
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches


def make_dataloader(dataset, sampler: TokenBucketSampler, num_workers: int = 0, pin_memory: bool = False,
                    prefetch_factor: int = 4) -> DataLoader:
    """A DataLoader of :class:`Batch` objects over ``sampler``'s batches; workers prefetch ahead.

    Only the ``src_ids`` and ``tgt_ids`` columns of a HF dataset are read. See
    :class:`TokenBucketSampler` for what the training loop must save to resume exactly.
    """
    if hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns(["src_ids", "tgt_ids"])
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None, persistent_workers=False,
    )
