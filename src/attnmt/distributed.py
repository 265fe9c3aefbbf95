"""torchrun setup and rank helpers.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in each process's
environment; a plain ``python`` launch sets none of them and runs as the single rank 0. The same
training command therefore runs on one device or many. NCCL carries the collectives between GPUs,
gloo between CPU processes. Every helper here is a no-op when no process group is initialised, so
library code calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attnmt.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, validates on its own and writes checkpoints."""
        return self.rank == 0


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (if any) and return this rank.

    Args:
        device: the run's device setting (``train.device``): NCCL carries the collectives when it
            resolves to a GPU, gloo when it resolves to the CPU, whether or not the machine has GPUs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        stop_with_parent()
    if world_size > 1 and not dist.is_initialized():
        resolved = resolve_device(device, info.local_rank)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(resolved)
        # A long timeout: rank 0 validates (BLEU over the whole valid split) while the others wait.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    return info


# Sent by Linux to a torchrun worker when the agent that started it dies (:func:`stop_with_parent`).
PARENT_DIED = signal.SIGUSR2


def stop_with_parent() -> None:
    """Have Linux send this process :data:`PARENT_DIED` when its parent (the torchrun agent) dies: a
    kill -9 of the agent would otherwise leave its workers training on. The training loop turns it
    into a checkpoint and a stop, agreed by every rank; before the loop, its default action ends the
    process. Elsewhere than Linux: nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, PARENT_DIED)
    if os.getppid() == 1:  # the parent died before the request was made
        os.kill(os.getpid(), PARENT_DIED)


def cleanup() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


@contextlib.contextmanager
def local_rank_zero_first() -> Iterator[None]:
    """Run the block on each machine's local rank 0 first, then on the other ranks.

    For work that fills a cache: rank 0 of each machine writes it, the others find it there and
    only read it (a shared cache folder is written once; a per-machine one once per machine).
    """
    if local_rank() != 0:
        barrier()
    yield
    if local_rank() == 0:
        barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
