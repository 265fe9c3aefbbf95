"""``attnmt-serve``: translation over HTTP (:mod:`attnmt.serve.app`) with dynamic batching
(:mod:`attnmt.serve.batcher`) and a page that draws the cross-attention (``page.html``).

Needs the ``serve`` extra (FastAPI, uvicorn): ``pip install 'attnmt[serve]'``.
"""
