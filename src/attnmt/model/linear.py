"""Linear layers whose inference on the CPU runs on oneDNN with a pre-packed weight.

torch sends fp32 matmuls on the CPU to MKL. For the shapes of a decoding step (a few hundred to a
few thousand rows of width 256-512, times a weight of up to 32k rows) oneDNN with its weight
reordered once into its blocked layout is 10-40% faster on the 2-core AMD EPYC we benchmark on,
and the matmuls are over half of beam search's time (docs/BENCHMARKS.md, "Decoding on the CPU").
It is what CTranslate2 runs on AMD processors, and what ``torch.compile`` emits for a frozen CPU
model (``torch.ops.mkldnn._linear_pointwise`` on a weight from ``_reorder_linear_weight``).

The packed path is taken only where it cannot touch training: no autograd, fp32, CPU, no autocast,
not under ``torch.compile``, oneDNN enabled (``torch.backends.mkldnn.enabled``). Everywhere else
(training, GPUs, bf16) it is ``F.linear``. Packed weights are dropped by ``model.train()`` and
``model.eval()``, which validation calls, so it decodes with the current weights and training holds
no stale copies; one is also rebuilt when its layer gets another weight tensor or the weight's
version counter moves (in-place edits such as ``load_state_dict``). Fused optimizers on the CPU and
edits through ``weight.data`` leave that counter alone: call ``model.eval()`` after them. Set
``attnmt.model.linear.USE_ONEDNN = False`` to compare with plain ``F.linear``.

**Memory.** oneDNN compiles a kernel for each matmul shape it meets (each number of rows: a server's
batches hold every number) and keeps it, about 0.6 MB each; torch keeps them in two caches of 1,024
(oneDNN's primitive cache and ideep's), and past that the process still grew: 2.4 GB over 2,400 row
counts of one layer. :func:`limit_kernel_cache` makes both caches smaller; ``attnmt-serve`` keeps 256
(``kernel_cache=``), which held the same 2,400 shapes to +0.38 GB (docs/BENCHMARKS.md, "Memory under load").
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

USE_ONEDNN = True
# The environment variables that size the caches of compiled kernels (oneDNN's, then ideep's in torch).
KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def limit_kernel_cache(kernels: int) -> dict[str, str]:
    """Keep at most ``kernels`` compiled matmul kernels in each of oneDNN's caches, so that a long-running
    process that meets many shapes levels off instead of growing by 0.6 MB a shape.

    The caches read their size once, at the process's first oneDNN matmul: call this before it (a later
    call changes nothing). A size the environment gives already is kept.

    Returns:
        Each variable and the size in effect, where it did not come from ``kernels``.
    """
    given = {}
    for name in KERNEL_CACHES:
        if os.environ.get(name, "").strip():
            given[name] = os.environ[name]
        else:
            os.environ[name] = str(kernels)
    return given


@functools.cache
def _onednn_works() -> bool:
    """Whether this torch build has the oneDNN ops and they compute a linear layer (probed once)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        # Fixed numbers, not torch.randn: the probe must not move the global random stream, which
        # checkpoints save and resuming restores (the first validation of a run probes).
        x = torch.linspace(-1, 1, 24).view(3, 8)
        w = torch.linspace(-2, 1, 40).view(5, 8)
        b = torch.linspace(0, 1, 5)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return torch.allclose(y, F.linear(x, w, b), atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class PackedWeight:
    """``F.linear(x, weight, bias)``, on a oneDNN-packed copy of ``weight`` where that is safe (see
    the module docstring). One per weight: it keeps the packed copy between calls."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Drop the packed copy (the next packed call makes a new one)."""
        self._weight: Tensor | None = None  # the weight packed, held so that its identity cannot be reused
        self._version = -1
        self._packed: Tensor | None = None

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not (USE_ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and torch.backends.mkldnn.enabled and _onednn_works()):
            return F.linear(x, weight, bias)
        version = -1 if weight.is_inference() else weight._version  # inference tensors have no counter: never cached
        if weight is not self._weight or version != self._version or version < 0:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self._weight, self._version = weight, version
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        return PackedWeight()  # a copy packs its own weight when first used

    def __getstate__(self) -> dict:
        return {"_weight": None, "_version": -1, "_packed": None}


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose inference on the CPU is packed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed = PackedWeight()

    def forward(self, x: Tensor) -> Tensor:
        return self.packed(x, self.weight, self.bias)

    def train(self, mode: bool = True) -> Linear:
        self.packed.reset()  # training changes the weight; eval() after training packs afresh
        return super().train(mode)
