"""SentencePiece tokenization with fixed special ids.

Every attnmt tokenizer, joint or per language, uses the same ids for its special pieces, so the
model, the batches and the decoders can rely on them without looking anything up.
"""

from __future__ import annotations

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
