"""``engine=transformers``: ``generate()`` of the transformers model that ``attnmt-export to=hf`` would
write (M2M100 for pre-norm, Marian for post-norm), converted in memory; its logits equal attnmt's.

It runs greedy and beam search, one translation per line, in float32. Beam search is transformers':
its own stopping rule (``early_stopping`` left at its default) and beams ranked by log P / length **
``len_penalty`` (attnmt: GNMT's penalty), so it may pick another hypothesis than attnmt's; greedy
search gives attnmt's output. ``<pad>`` and ``<s>`` are never generated, as in attnmt. Each output is cut to attnmt's length limit of its sentence (``generate()`` has one limit per
batch). For a model of another shape :func:`attnmt.export.hf.architecture` refuses in one line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnmt import install_hint
from attnmt.config import DecodeConfig
from attnmt.decoding import Hypothesis, max_length, never_generated
from attnmt.inference import Capabilities
from attnmt.tokenizer import Tokenizer

CAPABILITIES = Capabilities(strategies=frozenset({"greedy", "beam"}), exact_stop=False, nbest=False, attention=False,
                            compute_type=False)


class TransformersBackend:
    """``generate()`` of a transformers ``AutoModelForSeq2SeqLM`` whose ids are attnmt's (an exported
    folder's model, or :func:`attnmt.export.hf.hf_model`)."""

    capabilities = CAPABILITIES

    def __init__(self, hf_model) -> None:
        self.hf = hf_model.eval()
        self.max_positions = hf_model.config.max_position_embeddings

    @torch.inference_mode()
    def search(self, sources: list[list[int]], line_numbers: list[int], cfg: DecodeConfig,
               tgt_prefix: list[int]) -> list[list[Hypothesis]]:
        if len(tgt_prefix) > 1:
            raise ValueError(f"engine=transformers forces one target token, not {len(tgt_prefix)}")
        config = self.hf.config
        limits = [max_length(len(source), cfg.max_len_a, cfg.max_len_b, self.max_positions) for source in sources]
        width = max(len(source) for source in sources)
        input_ids = torch.tensor([source + [config.pad_token_id] * (width - len(source)) for source in sources],
                                 device=self.hf.device)
        mask = torch.tensor([[True] * len(source) + [False] * (width - len(source)) for source in sources],
                            device=self.hf.device)
        never = never_generated(config.pad_token_id, config.decoder_start_token_id, config.eos_token_id)
        generated = self.hf.generate(input_ids=input_ids, attention_mask=mask, num_beams=cfg.beam_size,
                                     length_penalty=cfg.len_penalty, max_length=None, max_new_tokens=max(limits) + 1,
                                     min_new_tokens=min(cfg.min_len, max(limits) + 1),
                                     forced_bos_token_id=tgt_prefix[0] if tgt_prefix else None,
                                     suppress_tokens=never)  # attnmt never generates them
        hypotheses = []
        eos = config.eos_token_id
        for limit, row in zip(limits, generated[:, 1:].tolist()):  # [:, 1:]: without the start token
            tokens = row[: row.index(eos)] if eos in row else row
            hypotheses.append([Hypothesis(tokens[:limit], math.nan)])
        return hypotheses


def open_backend(paths: Sequence, device: torch.device, compute_type: str) -> tuple[TransformersBackend, Tokenizer, dict]:
    """The backend on checkpoint(s) ``paths`` (weights averaged when several), converted in memory.

    Raises:
        ConfigError: transformers is not installed.
        ExportError: the model has an option transformers cannot express (:func:`attnmt.export.hf.architecture`).
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        from attnmt.config import ConfigError

        raise ConfigError(f"engine=transformers needs transformers: {install_hint('hf')}") from None
    from attnmt.checkpoint import load_for_inference
    from attnmt.export.hf import hf_model

    model, tokenizer, run_config = load_for_inference(list(paths), "cpu")
    return TransformersBackend(hf_model(model, tokenizer).to(device)), tokenizer, run_config
