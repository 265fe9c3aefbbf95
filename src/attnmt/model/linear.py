"""Linear layers whose inference on the CPU runs on oneDNN with a pre-packed weight.

torch sends fp32 matmuls on the CPU to MKL. For the shapes of a decoding step (a few hundred to a
few thousand rows of width 256-512, times a weight of up to 32k rows) oneDNN with its weight
reordered once into its blocked layout is 10-40% faster on the 2-core AMD EPYC we benchmark on,
and the matmuls are over half of beam search's time (docs/BENCHMARKS.md, "Decoding on the CPU").
It is what CTranslate2 runs on AMD processors, and what ``torch.compile`` emits for a frozen CPU
model (``torch.ops.mkldnn._linear_pointwise`` on a weight from ``_reorder_linear_weight``).

The packed path is taken only where it cannot touch training: no autograd, fp32, CPU, no autocast,
not under ``torch.compile``. Everywhere else (training, GPUs, bf16) it is ``F.linear``. A packed
weight is rebuilt whenever its weight changes (its storage or its version counter, which every
in-place update such as an optimizer step bumps), so validation during training decodes with the
current weights. Set ``attnmt.model.linear.USE_ONEDNN = False`` to compare with plain ``F.linear``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

USE_ONEDNN = True


@functools.cache
def _onednn_works() -> bool:
    """Whether this torch build has the oneDNN ops and they compute a linear layer (probed once)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return torch.allclose(y, F.linear(x, w, b), atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class PackedWeight:
    """``F.linear(x, weight, bias)``, on a oneDNN-packed copy of ``weight`` where that is safe (see
    the module docstring). One per weight: it keeps the packed copy between calls."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._packed: Tensor | None = None

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not (USE_ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and _onednn_works()):
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
        if key != self._key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self._key = key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        return PackedWeight()  # a copy packs its own weight when first used

    def __getstate__(self) -> dict:
        return {"_key": None, "_packed": None}


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose inference on the CPU is packed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed = PackedWeight()

    def forward(self, x: Tensor) -> Tensor:
        return self.packed(x, self.weight, self.bias)
