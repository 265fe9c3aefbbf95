"""The encoder-decoder Transformer (see ``transformer.py``; it reads top to bottom)."""

from attnmt.model.attention import KVCache, MultiHeadAttention
from attnmt.model.transformer import Transformer, build_model

__all__ = ["KVCache", "MultiHeadAttention", "Transformer", "build_model"]
