#!/usr/bin/env python3
"""Training throughput of attnmt, side by side with HF transformers' MarianMTModel, as a markdown table.

Synthetic sentence pairs (random token ids, lengths drawn from a Multi30k-like or a WMT-like
distribution) are packed by attnmt's own ``TokenBucketSampler`` and ``collate``, so batches carry the
padding real training has. Every implementation trains on the same batches: full optimizer steps
(forward, label-smoothed loss, backward, clipping, AdamW) through ``attnmt.training.train_step``.
HF's model goes through the same ``train_step`` behind a three-line adapter, so the loop, the loss
and the optimizer are identical and only the model differs.

For each model x lengths x max_tokens x compile x implementation the table gives target tokens/s,
source+target tokens/s, peak GPU memory and MFU: model FLOPs per second (attnmt's
``Transformer.training_flops`` summed over the real lengths of each sentence pair) divided by the
matmul rate measured on the same device in the same run.

    # GPU (the figures the project aims at)
    python scripts/bench_train.py --models base,big --lengths multi30k,wmt --max-tokens 8192,16384,32768
    # a quick check on a CPU
    python scripts/bench_train.py --device cpu --models tiny --max-tokens 1024,2048 --precision fp32 \\
        --compile off --steps 5 --warmup 2

See docs/BENCHMARKS.md for the set-up (transformers is not a dependency of attnmt) and the figures.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from datetime import date

import numpy as np
import torch
from torch import Tensor, nn

from attnmt.batching import Batch, TokenBucketSampler, collate
from attnmt.config import ModelConfig, compose, config_dir
from attnmt.device import autocast as autocast_context
from attnmt.device import allow_tf32, resolve_precision
from attnmt.model import Transformer, build_model
from attnmt.tokenizer import BOS_ID, EOS_ID, PAD_ID
from attnmt.optim import build_optimizer
from attnmt.training import train_step

from _args import at_least, positive, positive_list

N_SPECIAL = 4  # pad, unk, bos, eos: random ids are drawn above them


# ----------------------------------------------------------------------------------------------------
# Models


def load_model_config(name: str, vocab: int) -> ModelConfig:
    """``configs/model/<name>.yaml`` composed by Hydra (its schema and defaults), with a joint vocabulary."""
    model_cfg = compose("train", [f"model={name}"]).model
    return replace(model_cfg, src_vocab_size=vocab, tgt_vocab_size=vocab, pad_id=PAD_ID)


def check_comparable(cfg: ModelConfig) -> None:
    """HF Marian has one shape of its own; say where attnmt's config differs from it in what costs time.

    Both sinusoidal tables (``sinusoidal``, ``sinusoidal_fairseq``) are a fixed table looked up, as
    Marian's is: their values differ, their cost does not. Learned positions add a trained table.
    """
    if not cfg.share_embeddings or not cfg.tie_output or cfg.positions not in ("sinusoidal", "sinusoidal_fairseq"):
        raise SystemExit(f"the HF comparison needs shared, tied embeddings and fixed sinusoidal positions; model "
                         f"config has share_embeddings={cfg.share_embeddings}, tie_output={cfg.tie_output}, "
                         f"positions={cfg.positions!r}: run with --no-hf")


def build_hf_model(cfg: ModelConfig) -> nn.Module:
    """A randomly initialised ``MarianMTModel`` of ``cfg``'s dimensions, on SDPA attention.

    Marian is post-norm (attnmt defaults to pre-norm: two LayerNorms more, a negligible cost) and
    adds a fixed ``final_logits_bias`` to the logits; everything else that costs time matches:
    widths, depths, heads, vocabulary, tied embeddings, dropout after the residual branches and
    after the feed-forward activation.
    """
    from transformers import MarianConfig, MarianMTModel

    check_comparable(cfg)
    hf_cfg = MarianConfig(
        vocab_size=cfg.tgt_vocab_size, d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim,
        activation_function=cfg.activation, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.dropout if cfg.activation_dropout is None else cfg.activation_dropout,
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        max_position_embeddings=cfg.max_positions, pad_token_id=PAD_ID, decoder_start_token_id=BOS_ID,
        eos_token_id=EOS_ID, forced_eos_token_id=EOS_ID, use_cache=False, attn_implementation="sdpa",
    )
    model = MarianMTModel(hf_cfg)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"MarianMTModel chose {model.config._attn_implementation!r} attention, not sdpa")
    return model


def hf_parameters(cfg: ModelConfig) -> int:
    """Trainable parameters of the HF model of ``cfg``'s dimensions, each shared tensor counted once."""
    return sum(p.numel() for p in build_hf_model(cfg).parameters() if p.requires_grad)


class MarianAdapter(nn.Module):
    """``MarianMTModel`` behind attnmt's ``forward(src_tokens, src_mask, tgt_in) -> logits``.

    No decoder attention mask is passed, as attnmt passes none: target padding sits right of every
    real position, so the causal mask alone keeps it out of every real position's view, and the loss
    skips padded positions. Passing one would make HF build a (B, 1, T, T) mask instead of taking
    SDPA's causal path, extra work attnmt does not do.
    """

    def __init__(self, marian: nn.Module) -> None:
        super().__init__()
        self.marian = marian

    def forward(self, src_tokens: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        return self.marian(input_ids=src_tokens, attention_mask=src_mask.long(), decoder_input_ids=tgt_in,
                           use_cache=False).logits  # (B, T, V)


# ----------------------------------------------------------------------------------------------------
# Synthetic batches


def sample_lengths(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Source and target lengths in subword tokens, EOS included.

    ``multi30k``: short image captions, source ~ N(15.7, 4.9) clipped to [3, 56], target ~ source x
    N(1.04, 0.15), clipped likewise. (Multi30k train with attnmt's 8k joint SentencePiece model, EOS
    included: English 15.7 +- 4.9 tokens, German 16.3 +- 5.7, longest 53 and 56.) ``wmt``: news
    sentences, source lognormal with mean ~28 and a long tail, clipped to [2, 200]; target ~ source
    x 1.05 x lognormal noise (sd 0.12), clipped likewise.
    """
    if kind == "multi30k":
        src = np.clip(np.rint(rng.normal(15.7, 4.9, n)), 3, 56)
        tgt = np.clip(np.rint(src * rng.normal(1.04, 0.15, n)), 3, 56)
    elif kind == "wmt":
        sigma = 0.65
        src = np.clip(np.rint(rng.lognormal(math.log(28.0) - sigma**2 / 2, sigma, n)), 2, 200)
        tgt = np.clip(np.rint(src * 1.05 * rng.lognormal(0.0, 0.12, n)), 2, 200)
    else:
        raise SystemExit(f"--lengths {kind!r} is unknown; use multi30k or wmt")
    return src.astype(np.int64), tgt.astype(np.int64)


# Sentence pairs the sampler sorts together: Multi30k's whole train split (29k pairs); for WMT one
# sampler window (100k of its 4.5M pairs). The pool size sets how similar lengths in a batch are.
POOL_SIZE = {"multi30k": 29_000, "wmt": 100_000}


def make_batches(kind: str, max_tokens: int, n_batches: int, vocab: int, seed: int) -> list[Batch]:
    """``n_batches`` batches as training would see them: a corpus-sized pool of sentence pairs packed
    by ``TokenBucketSampler`` (length-sorted windows, shuffled batch order), epoch after epoch."""
    rng = np.random.default_rng(seed)
    src_lens, tgt_lens = sample_lengths(kind, POOL_SIZE[kind], rng)
    sampler = TokenBucketSampler(src_lens, tgt_lens, max_tokens, shuffle=True, seed=seed)
    batches: list[Batch] = []
    epoch = 0
    while len(batches) < n_batches:
        epoch += 1
        sampler.set_epoch(epoch)
        for rows in sampler:
            examples = [
                {"src_ids": np.append(rng.integers(N_SPECIAL, vocab, src_lens[i] - 1), EOS_ID),
                 "tgt_ids": np.append(rng.integers(N_SPECIAL, vocab, tgt_lens[i] - 1), EOS_ID)}
                for i in rows
            ]
            batches.append(collate(examples))
            if len(batches) == n_batches:
                break
    return batches


# ----------------------------------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one large square matmul (8192 on a GPU, 2048 on the CPU): the MFU denominator."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


@dataclass
class Row:
    model: str
    lengths: str
    max_tokens: int
    compile: bool
    impl: str
    tgt_tok_s: float | None = None
    all_tok_s: float | None = None
    peak_gib: float | None = None
    mfu: float | None = None
    padding: float | None = None
    note: str = ""


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def time_training(model: nn.Module, batches: list[Batch], warmup: int, device: torch.device,
                  amp_dtype: torch.dtype, compile_model: bool) -> tuple[float, float | None]:
    """Seconds for ``len(batches) - warmup`` timed optimizer steps after ``warmup`` untimed ones, and
    the peak GPU memory in GiB (None on the CPU)."""
    model.train()
    cfg = compose("train").optim  # the shipped AdamW settings
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = autocast_context(device, amp_dtype)
    step_model = torch.compile(model) if compile_model else model

    def step(batch: Batch) -> None:
        result = train_step(step_model, [batch], optimizer, scaler, autocast, cfg.label_smoothing, cfg.clip_norm, PAD_ID)
        if result.skipped:
            raise FloatingPointError(f"non-finite loss or gradient (loss {result.loss})")

    for batch in batches[:warmup]:
        step(batch)
    synchronize(device)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()


def batch_flops(model: Transformer, batches: list[Batch]) -> float:
    """Training FLOPs of ``batches`` by attnmt's estimate, from each sentence pair's real lengths.
    HF Marian of the same dimensions does the same matmuls, so the count serves both."""
    return sum(
        model.training_flops(s, t)
        for b in batches for s, t in zip(b.src_mask.sum(1).tolist(), (b.tgt_out != PAD_ID).sum(1).tolist())
    )


def run_config(model_name: str, model_cfg: ModelConfig, lengths: str, max_tokens: int, compile_model: bool,
               impl: str, batches: list[Batch], flops: float, args: argparse.Namespace, device: torch.device,
               amp_dtype: torch.dtype, peak_flops: float) -> Row:
    """One row: build ``impl``'s model, train it on ``batches``, and measure. ``flops`` is the
    training FLOPs of the timed batches (those after ``args.warmup``)."""
    row = Row(model_name, lengths, max_tokens, compile_model, impl)
    timed = batches[args.warmup:]
    tgt_tokens = sum(b.n_tgt_tokens for b in timed)
    all_tokens = tgt_tokens + sum(int(b.src_mask.sum()) for b in timed)
    slots = sum(b.src_tokens.numel() + b.tgt_in.numel() for b in timed)
    row.padding = 1.0 - all_tokens / slots
    free_memory(device)
    torch.manual_seed(args.seed)
    model = None
    try:
        model = build_model(model_cfg) if impl == "attnmt" else MarianAdapter(build_hf_model(model_cfg))
        model.to(device)
        on_device = [b.to(device) for b in batches]
        seconds, row.peak_gib = time_training(model, on_device, args.warmup, device, amp_dtype, compile_model)
        row.tgt_tok_s, row.all_tok_s = tgt_tokens / seconds, all_tokens / seconds
        row.mfu = flops / seconds / peak_flops
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not is_oom(err):
            raise
        row.note = "OOM"
    finally:
        del model
        free_memory(device)
    return row


# ----------------------------------------------------------------------------------------------------
# Output


def fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_tables(rows: list[Row], has_hf: bool) -> None:
    print("\n| model | lengths | max_tokens | compile | impl | tgt tok/s | src+tgt tok/s | peak mem GiB "
          "| MFU (real lengths) | padding |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.note:
            cells = [r.note] * 4
        else:
            cells = [fmt(r.tgt_tok_s, ",.0f"), fmt(r.all_tok_s, ",.0f"), fmt(r.peak_gib, ".2f"), fmt(100 * r.mfu, ".1f") + "%"]
        print(f"| {r.model} | {r.lengths} | {r.max_tokens} | {'on' if r.compile else 'off'} | {r.impl} | "
              + " | ".join(cells) + f" | {100 * r.padding:.1f}% |")
    if not has_hf:
        return
    print("\n| model | lengths | max_tokens | compile | attnmt / HF tgt tok/s |")
    print("|---|---|---:|---|---:|")
    keyed = {(r.model, r.lengths, r.max_tokens, r.compile, r.impl): r for r in rows}
    for r in rows:
        if r.impl != "attnmt":
            continue
        hf = keyed.get((r.model, r.lengths, r.max_tokens, r.compile, "hf-marian"))
        if hf is None:
            continue
        ratio = "n/a (OOM)" if r.note or hf.note else f"{r.tgt_tok_s / hf.tgt_tok_s:.2f}x"
        print(f"| {r.model} | {r.lengths} | {r.max_tokens} | {'on' if r.compile else 'off'} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models", default="base,big", help="names of configs/model/*.yaml, comma-separated")
    parser.add_argument("--lengths", default="multi30k,wmt", help="length distributions: multi30k, wmt")
    parser.add_argument("--max-tokens", type=positive_list, default=[8192, 16384, 32768],
                        help="padded tokens per batch, comma-separated")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--compile", default="both", choices=["both", "on", "off"])
    parser.add_argument("--steps", type=positive, default=30, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=at_least(0), default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--vocab", type=at_least(8), default=32000, help="joint vocabulary size")
    parser.add_argument("--no-hf", action="store_true", help="attnmt only (no transformers needed)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=at_least(0), default=0,
                        help="CPU threads for torch (0: torch's default); 1 steadies figures on a shared CPU")
    args = parser.parse_args()
    known = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))
    if unknown := [m for m in args.models.split(",") if m not in known]:
        parser.error(f"--models: no model config {', '.join(map(repr, unknown))}; configs/model/ has {', '.join(known)}")
    if unknown := [k for k in args.lengths.split(",") if k not in ("multi30k", "wmt")]:
        parser.error(f"--lengths: unknown {', '.join(map(repr, unknown))}; use multi30k, wmt")

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available here; use --device cpu or auto")
    else:
        device = torch.device(args.device)
    amp_dtype = resolve_precision(args.precision, device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    allow_tf32(device, True)  # as training does by default (train.tf32)
    models = [m for m in args.models.split(",") if m]
    length_kinds = [k for k in args.lengths.split(",") if k]
    max_tokens_list = args.max_tokens
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    impls = ["attnmt"] if args.no_hf else ["attnmt", "hf-marian"]

    versions = f"python {platform.python_version()}, torch {torch.__version__}"
    if not args.no_hf:
        import transformers

        versions += f", transformers {transformers.__version__}"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    peak_flops = matmul_rate(device, amp_dtype)
    matmul_n = 8192 if device.type == "cuda" else 2048
    print(f"date {date.today().isoformat()}; device {device_name}; {versions}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"{str(amp_dtype).removeprefix('torch.')} {matmul_n}^3 matmul: {peak_flops / 1e12:.2f} TFLOP/s (the MFU denominator)")
    print(f"{args.warmup} warm-up + {args.steps} timed optimizer steps per row; vocabulary {args.vocab}")

    rows: list[Row] = []
    for model_name in models:
        model_cfg = load_model_config(model_name, args.vocab)
        reference = build_model(model_cfg)  # for its parameter count and FLOP estimate; never trained
        n_params = reference.num_parameters()
        print(f"model={model_name}: d_model {model_cfg.d_model}, ffn {model_cfg.ffn_dim}, heads {model_cfg.n_heads}, "
              f"layers {model_cfg.encoder_layers}+{model_cfg.decoder_layers}; parameters: attnmt {n_params / 1e6:.1f}M"
              + ("" if args.no_hf else f", HF Marian {hf_parameters(model_cfg) / 1e6:.1f}M"))
        for lengths in length_kinds:
            for max_tokens in max_tokens_list:
                batches = make_batches(lengths, max_tokens, args.warmup + args.steps, args.vocab, args.seed)
                flops = batch_flops(reference, batches[args.warmup:])
                for compile_model in compile_modes:
                    for impl in impls:
                        row = run_config(model_name, model_cfg, lengths, max_tokens, compile_model, impl, batches,
                                         flops, args, device, amp_dtype, peak_flops)
                        rows.append(row)
                        speed = row.note or f"{row.tgt_tok_s:,.0f} tgt tok/s"
                        print(f"  {model_name} {lengths} {max_tokens} compile={'on' if compile_model else 'off'} {impl}: {speed}",
                              flush=True)
    print_tables(rows, not args.no_hf)


if __name__ == "__main__":
    main()
