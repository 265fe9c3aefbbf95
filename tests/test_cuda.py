"""The GPU path on a GPU: what ``tests/test_gpu_path.py`` stands in for on the CPU, run on CUDA itself.

Marked ``gpu`` (left out of the default run). ``scripts/gpu/first_call.sh`` runs them first on a lent
GPU; its ``QUICK=1`` rehearsal runs them on the CPU (``ATTNMT_REHEARSE_GPU=1``: fp16 through the
tests' stand-in, ``torch.compile`` through ``ATTNMT_TEST_COMPILE_BACKEND``, default inductor), so
that a mistake in them shows before a GPU minute is spent.

CUDA's attention and embedding backwards add with atomics, so two runs on a GPU agree to rounding,
not bit for bit: losses are compared within 1e-3 there, exactly on the CPU.
"""

from __future__ import annotations

import functools
import logging
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnmt import device as device_module
from attnmt.model import build_model
from attnmt.optim import build_optimizer
from attnmt.training import train_step
from conftest import tiny_config
from test_training import make_batch, random_pairs, run_config

pytestmark = pytest.mark.gpu


@pytest.fixture
def dev(monkeypatch) -> str:
    """``cuda``; or, for the rehearsal on a CPU (``ATTNMT_REHEARSE_GPU=1``), ``cpu`` with fp16 allowed."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("ATTNMT_REHEARSE_GPU") != "1":
        pytest.skip("needs CUDA (ATTNMT_REHEARSE_GPU=1 rehearses these on the CPU)")
    monkeypatch.setattr(device_module, "_CPU_FP16", True)
    return "cpu"


def same_losses(a: list[float], b: list[float], dev: str) -> bool:
    return a == b if dev == "cpu" else a == pytest.approx(b, rel=1e-3)


def test_fp16_training_resumes_with_its_loss_scale(tmp_path, fixture_corpus, dev):
    from attnmt.checkpoint import load_checkpoint
    from attnmt.training import train

    settings = (f"train.device={dev}", "train.precision=fp16")
    straight = train(run_config(tmp_path / "straight", fixture_corpus, *settings, ema_decay=0.9, max_steps=8))
    first = train(run_config(tmp_path / "resumed", fixture_corpus, *settings, ema_decay=0.9, max_steps=4))
    resumed = train(run_config(tmp_path / "resumed", fixture_corpus, *settings, ema_decay=0.9, max_steps=8,
                               resume="auto"))
    assert same_losses(straight["losses"], first["losses"] + resumed["losses"], dev)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    # The scaler's state continued (an overflow early on, if the GPU has one, resets its growth tracker).
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
    if dev == "cuda":
        assert torch.is_tensor(a["rng"][0]["cuda"])  # the run's own device generator, saved


def test_bf16_compiled_training_matches_eager_in_a_few_graphs(tmp_path, fixture_corpus, dev, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from attnmt.training import train

    backend = os.environ.get("ATTNMT_TEST_COMPILE_BACKEND", "inductor")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    settings = (f"train.device={dev}", "train.precision=bf16")
    eager = train(run_config(tmp_path / "eager", fixture_corpus, *settings, max_steps=10, valid_every=10))
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = train(run_config(tmp_path / "compiled", fixture_corpus, *settings, max_steps=10, valid_every=10,
                                    compile="true"))
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert 1 <= graphs <= 4, graphs  # TORCH_LOGS=recompiles says why each one after the first was built
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=2e-2)  # bf16: kernels fuse differently


def test_flash_attention_runs_the_decoders_self_attention(dev):
    """With only the flash kernel allowed, the decoder's causal self-attention (no mask: SDPA's
    ``is_causal``) must still run, forward and backward, and give what the default kernels give."""
    device = torch.device(dev)
    torch.manual_seed(0)
    model = build_model(tiny_config(d_model=64, n_heads=4, ffn_dim=128, src_vocab_size=64, tgt_vocab_size=64)).to(device)
    batch = make_batch(random_pairs(8, torch.Generator().manual_seed(1)))
    src, mask, tgt = (t.to(device) for t in (batch.src_tokens, batch.src_mask, batch.tgt_in))

    def run(flash_only: bool):
        model.zero_grad(set_to_none=True)
        originals = [layer.self_attn.forward for layer in model.decoder_layers]
        for layer, forward in zip(model.decoder_layers, originals):
            if flash_only:
                layer.self_attn.forward = flash_only_in(forward)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(src, mask, tgt)
            logits.float().sum().backward()
        finally:
            for layer, forward in zip(model.decoder_layers, originals):
                layer.self_attn.forward = forward
        return logits.float(), [p.grad.clone() for p in model.decoder_layers[0].self_attn.parameters()]

    flash_logits, flash_grads = run(True)
    logits, grads = run(False)
    torch.testing.assert_close(flash_logits, logits, rtol=0, atol=5e-2)
    for a, b in zip(flash_grads, grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def flash_only_in(forward):
    """``forward`` with SDPA allowed its flash kernel only: a call it cannot serve raises."""
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return forward(*args, **kwargs)
    return run


def test_fused_adamw_under_the_loss_scaler_skips_an_overflow(dev):
    from attnmt.config import compose

    device = torch.device(dev)
    torch.manual_seed(0)
    model = build_model(tiny_config()).to(device)
    optim_cfg = compose("train", ["optim.fused=true"]).optim  # on CUDA the default; on the CPU asked for
    optimizer = build_optimizer(model, optim_cfg, device)
    assert optimizer.defaults["fused"]
    scaler = torch.amp.GradScaler(device.type)
    autocast = torch.autocast(device.type, dtype=torch.float16)
    g = torch.Generator().manual_seed(2)

    def update():
        batch = make_batch(random_pairs(4, g))
        for name in ("src_tokens", "src_mask", "tgt_in", "tgt_out"):
            setattr(batch, name, getattr(batch, name).to(device))
        return train_step(model, [batch], optimizer, scaler, autocast, 0.1, 1.0)

    before = [p.detach().clone() for p in model.parameters()]
    assert not update().skipped
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    after_one = [p.detach().clone() for p in model.parameters()]
    steps = [s["step"].item() if torch.is_tensor(s["step"]) else s["step"] for s in optimizer.state.values()]
    scaler.update(2.0**100)  # the next backward overflows fp16
    result = update()
    assert result.skipped and scaler.get_scale() == 2.0**99
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_one))
    assert steps == [s["step"].item() if torch.is_tensor(s["step"]) else s["step"] for s in optimizer.state.values()]


def test_a_cpu_checkpoint_resumes_on_the_gpu_and_back(tmp_path, fixture_corpus, dev, caplog):
    from attnmt.training import train

    caplog.set_level(logging.WARNING, logger="attnmt.training")
    straight = train(run_config(tmp_path / "straight", fixture_corpus, "train.device=cpu", max_steps=12))
    run = tmp_path / "moved"
    first = train(run_config(run, fixture_corpus, "train.device=cpu", max_steps=4))
    second = train(run_config(run, fixture_corpus, f"train.device={dev}", max_steps=8, resume="auto"))
    if dev == "cuda":  # dropout is 0 in these runs, but a resume that cannot be exact says so
        assert "holds no CUDA random state for cuda:0" in caplog.text
    third = train(run_config(run, fixture_corpus, "train.device=cpu", max_steps=12, resume="auto"))
    assert third["step"] == 12
    # The schedule, the batches and the optimizer continued across devices: the same losses, to rounding.
    assert first["losses"] + second["losses"] + third["losses"] == pytest.approx(straight["losses"], rel=1e-3)
