"""Import pretrained translation models saved by transformers: Marian (OPUS-MT), M2M100 and NLLB-200 (dense).

:func:`import_model` reads a folder written by ``save_pretrained`` (model and tokenizer files), or a
hub id where the network allows, and returns an attnmt model and tokenizer that compute what the
transformers model computes; :func:`save` writes them as an ordinary attnmt checkpoint, which
``attnmt-translate``, ``attnmt-evaluate``, ``attnmt-average``, both exporters and
``attnmt-train train.init_from=`` take.

Each architecture is one entry of :data:`IMPORTERS` (``config.model_type`` -> a function giving the
attnmt :class:`~attnmt.config.ModelConfig`); the weights of both come through the mapping that
``attnmt-export to=hf`` writes them by (:func:`attnmt.export.hf.weight_pairs`), read backwards:

- **Marian**: post-norm, scaled embeddings, Vaswani's sin/cos table with sines and cosines in halves
  (attnmt's ``sinusoidal`` holds them interleaved: the hidden dimensions are permuted back, which
  changes no output), ``swish`` (``model.activation=silu``), ``final_logits_bias``
  (``model.output_bias``), the decoder starting from ``<pad>``;
- **M2M100 / NLLB-200**: pre-norm with a closing LayerNorm per stack, scaled embeddings, fairseq's
  sin/cos table counted after the padding id (``sinusoidal_fairseq`` with ``model.pad_id=1``), the
  decoder starting from ``</s>``, then the target language's code.

The tokenizer keeps the model's own vocabulary (its ids, special ids and language codes: see
:class:`~attnmt.tokenizer.Tokenizer`'s ``vocab``) over its SentencePiece model(s), and its tokenizer
files, which ``attnmt-export to=hf`` writes back. Anything else (another architecture, or an option
without an exact attnmt equivalent) is refused in one line naming it.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch

from attnmt import install_hint
from attnmt.checkpoint import first_line
from attnmt.config import MODEL_KEYS_ADDED, ModelConfig
from attnmt.model import Transformer, build_model
from attnmt.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class PretrainedError(ValueError):
    """A model or folder that cannot be imported; the message names the option or file and what to do."""


# The tokenizer files of a transformers folder, kept in the checkpoint and written back by attnmt-export to=hf.
TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json", "target_vocab.json", "sentencepiece.bpe.model", "sentencepiece.model",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
ATTNMT_SPM = "sentencepiece.model"  # attnmt-export to=hf writes the model's own SentencePiece model beside tokenizer.json
NLLB_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")  # eng_Latn, deu_Latn, ...
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu"}  # transformers' -> attnmt's


def _common(config, **fields) -> dict:
    """The ModelConfig fields that Marian and M2M100 name alike; refuses what attnmt cannot express."""
    for side in ("encoder", "decoder"):
        if getattr(config, f"{side}_layerdrop", 0.0):
            log.info("%s_layerdrop=%s is dropped: attnmt has no layer drop", side, getattr(config, f"{side}_layerdrop"))
    if config.encoder_attention_heads != config.decoder_attention_heads or config.encoder_ffn_dim != config.decoder_ffn_dim:
        raise PretrainedError(f"{config.model_type}: encoder and decoder differ in heads or feed-forward size "
                              f"({config.encoder_attention_heads}/{config.decoder_attention_heads} heads, "
                              f"{config.encoder_ffn_dim}/{config.decoder_ffn_dim}); attnmt's stacks share them")
    if config.activation_function not in ACTIVATIONS:
        raise PretrainedError(f"{config.model_type}: activation_function={config.activation_function!r} has no attnmt "
                              f"equivalent (attnmt has {', '.join(sorted(ACTIVATIONS))})")
    if not getattr(config, "scale_embedding", False):
        raise PretrainedError(f"{config.model_type}: scale_embedding=false; attnmt always scales embeddings by "
                              "sqrt(d_model)")
    # A model option added to attnmt after these importers were written takes the value that reproduces
    # the models attnmt had before it (MODEL_KEYS_ADDED), those Marian and M2M100 compute, unless set here.
    return dict(
        MODEL_KEYS_ADDED,
        d_model=config.d_model, n_heads=config.encoder_attention_heads, ffn_dim=config.encoder_ffn_dim,
        encoder_layers=config.encoder_layers, decoder_layers=config.decoder_layers, dropout=config.dropout,
        attention_dropout=config.attention_dropout, activation_dropout=config.activation_dropout,
        activation=ACTIVATIONS[config.activation_function], max_positions=config.max_position_embeddings,
        pad_id=config.pad_token_id, bos_id=config.decoder_start_token_id, eos_id=config.eos_token_id, **fields,
    )


SIZES = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
         "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size", "max_position_embeddings")
DROPOUTS = ("dropout", "attention_dropout", "activation_dropout")
SPECIAL_IDS = ("pad_token_id", "eos_token_id", "decoder_start_token_id")
LAYER = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.")
POSITION_TABLE = re.compile(r"^model\.(encoder|decoder)\.embed_positions\.weights?$")  # fixed sinusoids: recomputed


def check_config(config, weights: dict[str, torch.Tensor]) -> None:
    """Refuse, naming the key of ``config.json``, a config no model can have or one that does not
    describe ``weights``: sizes that are not whole numbers of at least 1, heads that do not divide
    ``d_model``, a dropout outside [0, 1), a special id outside the vocabulary, and layer counts other
    than the weights hold (checked before any model is built, so a huge size allocates nothing)."""
    where = f"{config.model_type}: config.json"
    for key in SIZES:
        value = getattr(config, key, None)
        if key == "max_position_embeddings" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PretrainedError(f"{where} has {key}={value!r}; it must be a whole number of at least 1")
    for side in ("encoder", "decoder"):
        heads = getattr(config, f"{side}_attention_heads")
        if config.d_model % heads:
            raise PretrainedError(f"{where} has d_model={config.d_model}, which {side}_attention_heads={heads} does not "
                                  "divide")
        held = {int(m.group(2)) for name in weights if (m := LAYER.match(name)) and m.group(1) == side}
        layers = getattr(config, f"{side}_layers")
        if held != set(range(layers)):
            raise PretrainedError(f"{where} has {side}_layers={layers}, but the weights hold {len(held)} {side} layers "
                                  f"({', '.join(map(str, sorted(held)[:6]))}{', ...' if len(held) > 6 else ''}): the "
                                  "config and the weights are of different models")
    for key in DROPOUTS:
        value = getattr(config, key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise PretrainedError(f"{where} has {key}={value!r}; it must be a number in [0, 1)")
    vocab = max(config.vocab_size, getattr(config, "decoder_vocab_size", None) or 0)
    for key in SPECIAL_IDS:
        value = getattr(config, key, None)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise PretrainedError(f"{where} has {key}={value!r}; it must be a token id of the vocabulary (0 to "
                                  f"{vocab - 1})")


def _marian(config, weights: dict[str, torch.Tensor]) -> ModelConfig:
    if getattr(config, "normalize_embedding", False):
        raise PretrainedError("marian: normalize_embedding=true (a LayerNorm on the embeddings) has no attnmt equivalent")
    if config.d_model % 2:
        raise PretrainedError(f"marian: d_model={config.d_model} is odd; Marian's sin/cos table needs an even size")
    tgt_vocab = getattr(config, "decoder_vocab_size", None) or config.vocab_size
    bias = weights.get("final_logits_bias")
    return ModelConfig(**_common(
        config, norm_first=False, positions="sinusoidal", share_embeddings=config.share_encoder_decoder_embeddings,
        tie_output=config.tie_word_embeddings, src_vocab_size=config.vocab_size, tgt_vocab_size=tgt_vocab,
        output_bias=bias is not None and bool(bias.abs().sum() > 0),
    ))


def _m2m_100(config, weights: dict[str, torch.Tensor]) -> ModelConfig:
    return ModelConfig(**_common(
        config, norm_first=True, positions="sinusoidal_fairseq", share_embeddings=True,
        tie_output="lm_head.weight" not in weights or torch.equal(weights["lm_head.weight"],
                                                                   weights["model.shared.weight"]),
        src_vocab_size=config.vocab_size, tgt_vocab_size=config.vocab_size, output_bias=False,
    ))


# config.model_type -> the attnmt model config of that architecture (NLLB-200 dense is m2m_100).
IMPORTERS: dict[str, Callable[..., ModelConfig]] = {"marian": _marian, "m2m_100": _m2m_100}


def resolve(source: str | Path) -> Path:
    """The local folder of ``source``: a folder, or a hub id downloaded to the hub's cache.

    Raises:
        PretrainedError: not a folder, and the hub cannot be reached (one line saying so).
    """
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or str(source).count("/") > 1 or not str(source).strip():
        raise PretrainedError(f"from={source}: not a folder written by save_pretrained, nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source)))
    except Exception as err:  # offline, unknown id, no permission: one line each
        raise PretrainedError(f"from={source}: no such folder, and the hub cannot give it ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no detail'}); download it where the "
                              "network allows (huggingface-cli download ID --local-dir DIR) and pass from=DIR") from None


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files; a file that cannot be read is one line naming it."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        def read(path: Path) -> dict:
            try:
                return load_file(str(path))
            except Exception as err:  # safetensors' own error type: a cut or empty file, not safetensors at all
                raise PretrainedError(f"{path}: not a whole safetensors file ({first_line(err)}); download or copy "
                                      "it again") from None
    else:
        files = sorted(folder.glob("pytorch_model*.bin"))
        if not files:
            raise PretrainedError(f"{folder}: no model.safetensors or pytorch_model.bin; is it a save_pretrained folder?")

        def read(path: Path) -> dict:
            try:  # weights_only: a pickle that would run code is refused, never run
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                raise PretrainedError(f"{path}: refused: it holds objects other than tensors, and a pickle of other "
                                      "objects could run code; get the model as model.safetensors") from None
            except Exception as err:
                raise PretrainedError(f"{path}: not a readable weight file ({first_line(err)}); download or copy it "
                                      "again") from None
    weights = {}
    for path in files:
        tensors = read(path)
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise PretrainedError(f"{path}: holds no dictionary of named tensors; is it a save_pretrained folder?")
        weights.update(tensors)
    return weights


def _tokenizer(folder: Path, config, cfg: ModelConfig) -> Tokenizer:
    """The model's tokenizer over its SentencePiece model(s), with its vocabulary's ids."""
    from transformers import AutoTokenizer

    def read(name: str) -> bytes:
        path = folder / name
        if not path.is_file():
            raise PretrainedError(f"{folder}: no {name}; attnmt tokenizes with the model's SentencePiece file "
                                  f"(the hub's {config.model_type} folders have it): copy it into {folder}")
        return path.read_bytes()

    if config.model_type == "marian" and not (folder / ATTNMT_SPM).is_file():  # MarianTokenizer fails on a
        read("source.spm"), read("target.spm")  # missing file with a TypeError; attnmt's exports hold ATTNMT_SPM
    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # a damaged SentencePiece model, tokenizer_config.json or vocabulary file
        raise PretrainedError(f"{folder}: transformers cannot read its tokenizer ({first_line(err)}); its tokenizer "
                              "files are damaged: download or copy them again") from None
    kind = type(hf).__name__
    if kind.startswith("Marian"):
        src_model, tgt_model, family = read("source.spm"), read("target.spm"), "marian"
    elif kind.startswith("Nllb"):
        src_model, tgt_model, family = read("sentencepiece.bpe.model"), None, "nllb"
    elif kind.startswith("M2M100"):
        src_model, tgt_model, family = read("sentencepiece.bpe.model"), None, "m2m_100"
    elif (folder / ATTNMT_SPM).is_file():  # written by attnmt-export to=hf: its pieces are the model's ids
        src_model, tgt_model, family = read(ATTNMT_SPM), None, "attnmt"
    else:
        raise PretrainedError(f"{folder}: tokenizer {kind} is not one attnmt reads (MarianTokenizer, M2M100Tokenizer, "
                              f"NllbTokenizer, or an attnmt export's {ATTNMT_SPM})")

    def table(vocab: dict[str, int], size: int) -> list[str]:
        pieces = [f"<unused{i}>" for i in range(size)]  # rows of the model no token names (M2M100's madeup words)
        for piece, i in vocab.items():
            if i < size:
                pieces[i] = piece
        return pieces

    src_size, tgt_size = cfg.src_vocab_size, cfg.tgt_vocab_size
    ids = {**hf.get_vocab(), **getattr(hf, "lang_token_to_id", {})}  # M2M100's codes are not in get_vocab()
    src = table(ids, src_size)
    tgt = table(hf.target_encoder, tgt_size) if getattr(hf, "separate_vocabs", False) else None
    named = set(ids.values())
    control = {i for i in hf.all_special_ids if i != hf.unk_token_id} | {i for i in range(src_size) if i not in named}
    if family == "m2m_100":
        languages = {code: token for code, token in hf.lang_code_to_token.items()}
    elif family == "nllb":
        languages = {token: token for token in hf.get_vocab() if NLLB_CODE.match(token)}
    else:
        languages = {}
        tags = [token for token in hf.get_vocab() if token.startswith(">>") and token.endswith("<<")]
        if tags:
            log.warning("this Marian model reads a target-language token before the source (%s, ...): write it at "
                        "the start of each input line yourself; attnmt's tgt_lang= does not choose it", tags[0])
    control |= {ids[token] for token in languages.values() if token in ids}  # codes are never text
    vocab = {
        "family": family, "src": src, "tgt": tgt, "control": sorted(control), "languages": languages,
        "special": {"pad": cfg.pad_id, "unk": hf.unk_token_id, "bos": cfg.bos_id, "eos": cfg.eos_id},
        "files": {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()},
    }
    tags = [t for t in getattr(hf, "additional_special_tokens", None) or [] if t in ids] if family == "attnmt" else []
    return Tokenizer(src_model, tgt_model, {"imported": family, **({"tags": tags} if tags else {})}, vocab=vocab)


def import_model(source: str | Path) -> tuple[Transformer, Tokenizer]:
    """The attnmt model and tokenizer of a transformers translation model (see the module docstring).

    Raises:
        PretrainedError: one line naming what cannot be imported, and what to do.
    """
    folder = resolve(source)
    try:
        from transformers import AutoConfig
    except ImportError:
        raise PretrainedError(f"attnmt-import needs transformers: {install_hint('hf')}") from None
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # missing, not JSON, or refused by transformers' own checks (a size given as a string)
        detail = " ".join(line.strip() for line in str(err).splitlines()[:3]) or type(err).__name__
        raise PretrainedError(f"{folder}: no readable config.json ({detail})") from None
    if config.model_type not in IMPORTERS:
        raise PretrainedError(f"{folder}: model_type={config.model_type!r} cannot be imported; attnmt imports "
                              f"{', '.join(IMPORTERS)} (Marian/OPUS-MT, M2M100 and NLLB-200 dense)")
    weights = _weights(folder)
    check_config(config, weights)
    cfg = IMPORTERS[config.model_type](config, weights)
    permute = config.model_type == "marian"
    with torch.device("meta"):  # every weight matched by name and shape before any memory is taken
        load_hf_weights(build_model(cfg), weights, permute)
    tokenizer = _tokenizer(folder, config, cfg)
    model = build_model(cfg)
    load_hf_weights(model, weights, permute)
    return model.eval(), tokenizer


def load_hf_weights(model: Transformer, weights: dict[str, torch.Tensor], permute: bool) -> None:
    """Copy transformers' weights into ``model`` through :func:`attnmt.export.hf.weight_pairs`, the
    hidden dimensions put back in attnmt's order where the export reorders them (``permute``). On a
    model on the meta device, only check (nothing is copied, nothing allocated).

    Every tensor of ``weights`` is used, or recomputed (the fixed sin/cos position tables), or a
    ``final_logits_bias`` of zeros; two that attnmt holds in one tensor (tied embeddings) must be equal.

    Raises:
        PretrainedError: a weight the model needs is missing or has another shape; a tensor of the
            folder would be dropped; tied tensors differ.
    """
    from attnmt.export.hf import hidden_order, weight_pairs

    inverse = torch.argsort(hidden_order(model.cfg.d_model, permute))
    aliases = {"model.shared.weight": "model.encoder.embed_tokens.weight",
               "model.encoder.embed_tokens.weight": "model.shared.weight",
               "model.decoder.embed_tokens.weight": "model.shared.weight", "lm_head.weight": "model.shared.weight"}
    used: set[str] = set()
    held: dict[int, str] = {}  # attnmt tensor -> the first folder tensor written into it
    with torch.no_grad():
        for name, tensor, d_in, d_out in weight_pairs(model):
            taken = name if name in weights else aliases.get(name, "")
            if taken not in weights:
                raise PretrainedError(f"the model has no weight {name}: the folder holds an incomplete or "
                                      "another model")
            used.add(taken)
            if id(tensor) in held and not torch.equal(weights[held[id(tensor)]], weights[taken]):
                raise PretrainedError(f"{taken} differs from {held[id(tensor)]}, which the config ties to it "
                                      "(tie_word_embeddings / shared embeddings); attnmt would keep only one")
            held.setdefault(id(tensor), taken)
            value = weights[taken]
            if value.shape != tensor.shape:
                raise PretrainedError(f"weight {name} has shape {tuple(value.shape)}, attnmt expects {tuple(tensor.shape)}")
            if tensor.is_meta:
                continue
            value = value.float()
            value = value[:, inverse] if d_in else value
            value = value[inverse] if d_out else value
            tensor.copy_(value)
    dropped = sorted(name for name in set(weights) - used if not POSITION_TABLE.match(name)
                     and not (name == "final_logits_bias" and not bool(weights[name].any())))  # a bias of zeros
    if dropped:
        raise PretrainedError(f"the folder holds {len(dropped)} tensors this model would not use ({', '.join(dropped[:3])}"
                              f"{', ...' if len(dropped) > 3 else ''}): config.json describes another model than its "
                              "weights")


def save(model: Transformer, tokenizer: Tokenizer, out: str | Path, source: str) -> Path:
    """Write ``model`` and ``tokenizer`` as an attnmt checkpoint ``out`` (atomically, ``weights_only``
    loadable), through :func:`attnmt.checkpoint.save_imported`."""
    from attnmt.checkpoint import save_imported

    return save_imported(model, tokenizer, out, source)
