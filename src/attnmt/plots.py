"""Figures: cross-attention heatmaps (``attnmt-translate attention_plot=`` and TensorBoard's images).
matplotlib is imported when a figure is drawn (``pip install -e '.[plot]'``)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import Tensor


def attention_figure(weights: Tensor, src_pieces: list[str], tgt_pieces: list[str], title: str = ""):
    """A matplotlib heatmap of ``weights`` (T, S): target pieces down, source pieces across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, s = weights.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * s, 40), min(1.5 + 0.3 * t, 40)), dpi=100)
    ax.imshow(weights.numpy(), cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(s), src_pieces, rotation=90, fontsize=8)
    ax.set_yticks(range(t), tgt_pieces, fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    if title:
        ax.set_title(title, fontsize=9)
    with missing_glyphs_allowed():
        fig.tight_layout()
    return fig


@contextlib.contextmanager
def missing_glyphs_allowed() -> Iterator[None]:
    """Draw pieces in scripts the plot font lacks (CJK, say) as boxes, without a warning per glyph."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        yield
