"""``attnmt-serve``: translation over HTTP (:mod:`attnmt.serve.app`) with dynamic batching
(:mod:`attnmt.serve.batcher`) and a page that draws the cross-attention (``page.html``).

Needs the ``serve`` extra (FastAPI, uvicorn): ``pip install -e '.[serve]'``.
"""

import os


def engine_threads(threads: int = 0) -> int:
    """The threads attnmt-serve gives its engine: ``threads``, or with 0 (the default) all cores but one,
    which is left to the event loop (HTTP, JSON). Sharing every core with it made each engine call 1.6x
    slower under 32 clients (docs/BENCHMARKS.md)."""
    return threads or max(1, (os.cpu_count() or 1) - 1)
