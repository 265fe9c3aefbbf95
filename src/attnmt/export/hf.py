"""transformers: a folder that ``AutoModelForSeq2SeqLM`` and ``AutoTokenizer`` load with no custom code.

The model becomes one of two architectures of the BART family, whose weight names they share, so
one mapping (:func:`state_dict`) serves both:

- **pre-norm** (``model.norm_first=true``) with ``model.positions=sinusoidal_fairseq`` becomes
  **M2M100**: pre-norm layers with a closing LayerNorm per stack, embeddings scaled by sqrt(d_model),
  and the fairseq sin/cos table that ``sinusoidal_fairseq`` reproduces bit for bit;
- **post-norm** with ``model.positions=sinusoidal`` becomes **Marian**: post-norm layers, scaled
  embeddings, and Vaswani's sin/cos table with its sines and cosines in halves rather than
  interleaved. The hidden dimensions are permuted (evens first, then odds) in every weight, which
  turns attnmt's interleaved table into Marian's and leaves the function unchanged: LayerNorm and
  the output logits do not depend on the order of the hidden dimensions.

Shared or separate embeddings and a tied or untied output projection map onto both exactly;
ReLU, GELU (erf) and SiLU are transformers' ``relu``, ``gelu`` and ``swish``; the output bias
(``model.output_bias``) is Marian's ``final_logits_bias`` (M2M100 has none). The special ids are the
model's (``model.pad_id``, ``bos_id`` as the decoder's start, ``eos_id``). Refused, with a line naming the option:
the other position tables (M2M100 and Marian compute their own table and do not load one), separate
SentencePiece models (``data.tokenizer.joint=false``: a transformers tokenizer is one vocabulary)
and SentencePiece models a ``tokenizers`` Unigram model cannot reproduce (BPE, a normaliser other
than ``identity``).

A model imported by ``attnmt-import`` goes back as the architecture it came from, with the
tokenizer files it came with (:func:`export`). For attnmt's own models the tokenizer (:func:`hf_tokenizer`) is a ``tokenizers`` Unigram model with the SentencePiece pieces
and scores and byte fallback, behind attnmt's normalisation (NFKC, whitespace collapsed and trimmed)
and a Metaspace pre-tokenizer, with ``</s>`` appended; ``generation_config.json`` makes
``generate()`` search as attnmt does (start with ``<s>``, never emit ``<pad>`` or ``<s>``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnmt import install_hint
from attnmt.config import ModelConfig
from attnmt.decoding import never_generated
from attnmt.export import ExportError, check_model_options, check_new_directory, write_directory
from attnmt.model import Transformer
from attnmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

# Characters str.split() splits at: attnmt.tokenizer.normalize collapses runs of these.
_WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


# Every model option this exporter converts, with the values M2M100 or Marian express (None: any;
# positions and norm_first are checked together by architecture()). A model option added later is not
# here, and check_model_options refuses it until its conversion is written here: for this exporter alone
# (the CTranslate2 exporter lists its own).
EXPRESSIBLE: dict[str, tuple | None] = dict.fromkeys((
    "d_model", "n_heads", "ffn_dim", "encoder_layers", "decoder_layers", "activation", "norm_first", "positions",
    "max_positions", "share_embeddings", "tie_output", "src_vocab_size", "tgt_vocab_size", "pad_id", "bos_id",
    "eos_id", "output_bias", "dropout", "attention_dropout", "activation_dropout"))  # dropouts: nothing to convert
HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "swish"}  # attnmt's name -> transformers


def architecture(cfg: ModelConfig, tokenizer: Tokenizer) -> str:
    """``"m2m_100"`` or ``"marian"``: the transformers architecture that computes what ``cfg`` does.

    Raises:
        ExportError: one line naming the option that has no exact equivalent, and what to do.
    """
    check_model_options(cfg, EXPRESSIBLE, "hf")
    if not tokenizer.joint and tokenizer.vocab is None:
        raise ExportError("data.tokenizer.joint=false: a transformers tokenizer holds one vocabulary, this model "
                          "has one per language; export it to=ctranslate2 (or translate with engine=ctranslate2) "
                          "or train with a joint tokenizer")
    if cfg.norm_first and cfg.positions == "sinusoidal_fairseq":
        if cfg.output_bias:
            raise ExportError("model.output_bias=true: M2M100, the pre-norm architecture, has no output bias; "
                              "export it to=ctranslate2")
        return "m2m_100"
    if not cfg.norm_first and cfg.positions == "sinusoidal" and cfg.d_model % 2 == 0:
        return "marian"
    if cfg.norm_first:
        raise ExportError(f"model.positions={cfg.positions} with pre-norm: M2M100, the pre-norm architecture, builds "
                          "its own fairseq sin/cos table; train with model.positions=sinusoidal_fairseq "
                          "(the default of configs/model/) or export to=ctranslate2")
    raise ExportError(f"model.positions={cfg.positions} with post-norm (model.norm_first=false): Marian, the post-norm "
                      "architecture, builds its own sin/cos table (model.positions=sinusoidal, even model.d_model); "
                      "export to=ctranslate2 instead")


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer):
    """The ``M2M100Config`` or ``MarianConfig`` of ``cfg`` (see :func:`architecture`)."""
    from transformers import M2M100Config, MarianConfig

    common = dict(
        d_model=cfg.d_model, encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim, activation_function=HF_ACTIVATIONS[cfg.activation],
        dropout=cfg.dropout, attention_dropout=cfg.attention_dropout, activation_dropout=cfg.dropout if cfg.activation_dropout is None else cfg.activation_dropout,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, max_position_embeddings=cfg.max_positions,
        scale_embedding=True, pad_token_id=cfg.pad_id, bos_token_id=_bos_token(cfg, tokenizer), eos_token_id=cfg.eos_id,
        decoder_start_token_id=cfg.bos_id, forced_eos_token_id=None,
    )
    if architecture(cfg, tokenizer) == "m2m_100":
        # transformers 5 ties M2M100's encoder and decoder embeddings and output projection all
        # together or not at all; untied, each gets its own copy of attnmt's tensor(s).
        return M2M100Config(vocab_size=cfg.tgt_vocab_size, tie_word_embeddings=cfg.share_embeddings and cfg.tie_output,
                            **common)
    return MarianConfig(vocab_size=cfg.src_vocab_size, decoder_vocab_size=cfg.tgt_vocab_size,
                        share_encoder_decoder_embeddings=cfg.share_embeddings, tie_word_embeddings=cfg.tie_output,
                        **common)


def hidden_order(d_model: int, permute: bool) -> torch.Tensor:
    """The hidden dimensions in transformers' order: evens first, then odds, for Marian's position
    table (``permute``); else unchanged."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)]) if permute else torch.arange(d_model)


def weight_pairs(model: Transformer) -> list[tuple[str, torch.Tensor, bool, bool]]:
    """Each transformers weight of the BART family (``model.encoder.layers.0.self_attn.q_proj.weight``,
    ...) with the attnmt tensor that holds it (a view, where attnmt fuses keys and values into one
    projection) and whether its columns and its rows are hidden dimensions. The export reads these
    tensors; ``attnmt-import`` (:mod:`attnmt.pretrained`) writes into them."""
    pairs: list[tuple[str, torch.Tensor, bool, bool]] = []

    def linear(name: str, weight: torch.Tensor, bias: torch.Tensor | None, d_in: bool, d_out: bool) -> None:
        pairs.append((f"{name}.weight", weight, d_in, d_out))
        if bias is not None:
            pairs.append((f"{name}.bias", bias, False, d_out))

    def norm(name: str, layer_norm: torch.nn.LayerNorm) -> None:
        pairs.append((f"{name}.weight", layer_norm.weight, False, True))
        pairs.append((f"{name}.bias", layer_norm.bias, False, True))

    def attention(name: str, attn) -> None:
        k, v = attn.kv_proj.weight.chunk(2)
        k_bias, v_bias = attn.kv_proj.bias.chunk(2)
        linear(f"{name}.q_proj", attn.q_proj.weight, attn.q_proj.bias, d_in=True, d_out=False)
        linear(f"{name}.k_proj", k, k_bias, d_in=True, d_out=False)
        linear(f"{name}.v_proj", v, v_bias, d_in=True, d_out=False)
        linear(f"{name}.out_proj", attn.out_proj.weight, attn.out_proj.bias, d_in=False, d_out=True)

    def ffn(name: str, layer) -> None:
        linear(f"{name}.fc1", layer.ffn.fc1.weight, layer.ffn.fc1.bias, d_in=True, d_out=False)
        linear(f"{name}.fc2", layer.ffn.fc2.weight, layer.ffn.fc2.bias, d_in=False, d_out=True)
        norm(f"{name}.final_layer_norm", layer.ffn_block.norm)

    for i, layer in enumerate(model.encoder_layers):
        name = f"model.encoder.layers.{i}"
        attention(f"{name}.self_attn", layer.self_attn)
        norm(f"{name}.self_attn_layer_norm", layer.attn_block.norm)
        ffn(name, layer)
    for i, layer in enumerate(model.decoder_layers):
        name = f"model.decoder.layers.{i}"
        attention(f"{name}.self_attn", layer.self_attn)
        norm(f"{name}.self_attn_layer_norm", layer.self_block.norm)
        attention(f"{name}.encoder_attn", layer.cross_attn)
        norm(f"{name}.encoder_attn_layer_norm", layer.cross_block.norm)
        ffn(name, layer)
    if model.cfg.norm_first:
        norm("model.encoder.layer_norm", model.encoder_norm)
        norm("model.decoder.layer_norm", model.decoder_norm)
    src, tgt = model.src_embed.tokens.weight, model.tgt_embed.tokens.weight
    pairs += [("model.shared.weight", src, True, False), ("model.encoder.embed_tokens.weight", src, True, False),
              ("model.decoder.embed_tokens.weight", tgt, True, False)]
    pairs.append(("lm_head.weight", tgt if model.output_proj is None else model.output_proj.weight, True, False))
    if model.output_bias is not None:
        pairs.append(("final_logits_bias", model.output_bias[None, :], False, False))  # (1, V)
    return pairs


def state_dict(model: Transformer, permute: bool) -> dict[str, torch.Tensor]:
    """attnmt's weights under the BART family's names (see :func:`weight_pairs`).

    Args:
        model: the attnmt model.
        permute: reorder the hidden dimensions evens first, then odds (for Marian's position table).
    """
    order = hidden_order(model.cfg.d_model, permute)
    weights = {}
    for name, tensor, d_in, d_out in weight_pairs(model):
        tensor = tensor[:, order] if d_in else tensor
        weights[name] = (tensor[order] if d_out else tensor).detach().to("cpu", torch.float32)
    return weights


def hf_model(model: Transformer, tokenizer: Tokenizer):
    """A transformers ``M2M100ForConditionalGeneration`` or ``MarianMTModel`` computing what ``model`` does."""
    from transformers import M2M100ForConditionalGeneration, MarianMTModel

    config = hf_config(model.cfg, tokenizer)
    is_marian = config.model_type == "marian"
    hf = (MarianMTModel if is_marian else M2M100ForConditionalGeneration)(config).eval()
    weights = state_dict(model, permute=is_marian)
    target = hf.state_dict()
    if "model.shared.weight" not in target:  # Marian with separate embeddings has no shared table
        del weights["model.shared.weight"]
    # Computed by transformers itself (Marian's sin/cos table) or all zero (Marian's output bias).
    derived = {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight", "final_logits_bias"}
    derived -= set(weights)
    unfilled = set(target) - set(weights) - derived
    if unfilled or set(weights) - set(target):
        import transformers

        raise ExportError(f"transformers {transformers.__version__}'s {config.model_type} does not have the weights "
                          f"attnmt fills (unfilled: {sorted(unfilled)[:3]}, unknown: {sorted(set(weights) - set(target))[:3]}); "
                          f"install transformers 5 ({install_hint('hf')})")
    with torch.no_grad():
        for name, tensor in weights.items():
            target[name].copy_(tensor)
    return hf


def hf_tokenizer(tokenizer: Tokenizer, max_positions: int):
    """A ``PreTrainedTokenizerFast`` whose ids are attnmt's source ids with ``</s>`` appended.

    Raises:
        ExportError: the SentencePiece model is not one a Unigram model with attnmt's
            normalisation reproduces (BPE, or a normaliser other than ``identity``).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as FastTokenizer
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.to_state()["models"]["joint"])
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise ExportError("data.tokenizer.model_type=bpe: only unigram SentencePiece models are rebuilt exactly as a "
                          "transformers tokenizer; export it to=ctranslate2 or train with model_type=unigram")
    spec = proto.normalizer_spec
    if spec.name != "identity" or not spec.add_dummy_prefix or spec.precompiled_charsmap:
        raise ExportError(f"the SentencePiece model normalises text itself (rule {spec.name!r}); a transformers "
                          "tokenizer is rebuilt only from models trained with normalization_rule_name=identity, "
                          "as attnmt trains them")
    fast = FastTokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=UNK_ID,
                                        byte_fallback=proto.trainer_spec.byte_fallback))
    fast.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Replace(Regex(f"[{_WHITESPACE}]+"), " "), normalizers.Strip(),
    ])
    fast.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    eos = proto.pieces[EOS_ID].piece
    fast.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A $B {eos}",
                                                        special_tokens=[(eos, EOS_ID)])
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    # Tags (<2de>, <bt>) are special tokens, as </s> is: "<2de> A dog." gives attnmt's ids for "A dog."
    # with the tag before them (SentencePiece never makes a tag from text; transformers has no such piece).
    return PreTrainedTokenizerFast(
        tokenizer_object=fast, model_max_length=max_positions, unk_token=proto.pieces[UNK_ID].piece,
        pad_token=proto.pieces[PAD_ID].piece, bos_token=proto.pieces[BOS_ID].piece, eos_token=eos,
        additional_special_tokens=list(tokenizer.tags),
    )


def _bos_token(cfg: ModelConfig, tokenizer: Tokenizer) -> int:
    """transformers' ``bos_token_id``: ``<s>`` where the vocabulary has one (M2M100's 0), else the start token."""
    if tokenizer.vocab is None:
        return cfg.bos_id
    bos = tokenizer.tgt_piece_ids(["<s>"])[0]
    return bos if bos != tokenizer.unk_id else cfg.bos_id


def generation_config(cfg: ModelConfig, tokenizer: Tokenizer):
    """``generate()``'s defaults: greedy search as attnmt's, from the start token to ``</s>``, never
    ``<pad>`` (nor ``<s>`` where that is the start token)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=cfg.bos_id, bos_token_id=_bos_token(cfg, tokenizer), eos_token_id=cfg.eos_id,
        pad_token_id=cfg.pad_id, forced_bos_token_id=None, forced_eos_token_id=None, suppress_tokens=never_generated(cfg.pad_id, cfg.bos_id, cfg.eos_id),
        num_beams=1, do_sample=False, max_length=cfg.max_positions,
    )


def export(model: Transformer, tokenizer: Tokenizer, out: str | Path) -> Path:
    """Write ``model`` and its tokenizer as a transformers folder ``out`` (atomically).

    Raises:
        ExportError: an option without an exact equivalent (see :func:`architecture`), or ``out``
            exists and is not empty.
    """
    check_new_directory(out)
    hf = hf_model(model, tokenizer)
    fast = hf_tokenizer(tokenizer, model.cfg.max_positions) if tokenizer.vocab is None else None
    generation = generation_config(model.cfg, tokenizer)

    def fill(tmp: Path) -> None:
        hf.generation_config = generation
        hf.save_pretrained(tmp)
        if fast is not None:
            fast.save_pretrained(tmp)
            # The SentencePiece model itself, beside tokenizer.json: what attnmt-import reads the pieces with.
            (tmp / "sentencepiece.model").write_bytes(tokenizer.to_state()["models"]["joint"])
            (tmp / "README.md").write_text(_readme(Path(out).name, hf.config.model_type, tokenizer.tags))
            return
        for name, data in tokenizer.vocab["files"].items():  # an imported model's own tokenizer files
            (tmp / name).write_bytes(bytes(data))

    return write_directory(out, fill)


def _readme(name: str, model_type: str, tags: list[str]) -> str:
    tagged = "" if not tags else f"""
This model reads a tag before each source: {", ".join(f"`{t}`" for t in tags)} (`<2xx>` asks for
language xx). The tokenizer reads them as special tokens: write the tag before the text,
`tokenizer(["{tags[0]} Ein Hund rennt durch das Gras."], ...)`.
"""
    return f"""# {name}: an attnmt model for transformers ({model_type})

Written by `attnmt-export to=hf`. It loads with no custom code:

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")  # attnmt's normalisation and pieces, </s> appended
model = AutoModelForSeq2SeqLM.from_pretrained("{name}")
batch = tokenizer(["Ein Hund rennt durch das Gras."], return_tensors="pt", padding=True)
output = model.generate(**batch)  # greedy, as attnmt's beam_size=1; num_beams=5 for beam search
print(tokenizer.batch_decode(output, skip_special_tokens=True))
```
{tagged}
The logits equal attnmt's. `generate()` limits lengths by `max_length` (or `max_new_tokens`) rather than
attnmt's `1.5 * source tokens + 10`, and its beam search ranks by log P / length ** length_penalty
rather than GNMT's penalty.
"""
