"""The GPU path, on the CPU: mixed precision (fp16 with loss scaling, bf16), torch.compile, the
choice of precision and of the distributed backend on GPUs this machine does not have, and the
throughput meter. CUDA itself is tested by ``-m gpu`` (``tests/test_cuda.py``) on a lent GPU."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from attnmt import device as device_module
from attnmt import distributed
from attnmt.config import ConfigError
from attnmt.device import inference_dtype, resolve_precision
from attnmt.model import build_model
from attnmt.training import train_step
from conftest import free_port, tiny_config
from test_training import make_batch, random_pairs, run_config

GPU_NAMES = {6: "Tesla P100-PCIE-16GB", 7: "Tesla V100-SXM2-16GB", 8: "NVIDIA A100-SXM4-40GB", 9: "NVIDIA H100 80GB HBM3"}


def fake_gpus(monkeypatch, *majors: int, emulates_bf16: bool = True) -> None:
    """torch.cuda's answers for GPUs of compute capability ``majors`` (one per device), on this CPU machine.
    As in torch 2.13, ``is_bf16_supported()`` asks about the current device (cuda:0) and counts emulation."""
    def index(device=None) -> int:
        return (torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")).index or 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(majors))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=majors[index(d)], minor=0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: GPU_NAMES[majors[index(d)]])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: majors[0] >= 8 or (including_emulation and emulates_bf16))


# ----------------------------------------------------------------------------------------------------
# Which precision, which backend


def test_precision_auto_takes_fp16_on_gpus_that_only_emulate_bf16(monkeypatch, caplog):
    fake_gpus(monkeypatch, 7)  # a V100: bf16 emulated, which torch's is_bf16_supported() counts
    cuda = torch.device("cuda", 0)
    assert resolve_precision("auto", cuda) == torch.float16
    assert inference_dtype(cuda) == torch.float32
    with caplog.at_level(logging.WARNING, logger="attnmt.device"):
        assert resolve_precision("bf16", cuda) == torch.bfloat16  # asked for: slow, but it runs
    assert "Tesla V100-SXM2-16GB only emulates bfloat16" in caplog.text and "auto would choose fp16" in caplog.text
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32


def test_precision_asks_about_the_runs_own_gpu(monkeypatch):
    fake_gpus(monkeypatch, 7, 9)  # cuda:0 a V100, cuda:1 an H100; the current device is cuda:0
    assert resolve_precision("auto", torch.device("cuda", 1)) == torch.bfloat16
    assert inference_dtype(torch.device("cuda", 1)) == torch.bfloat16
    assert resolve_precision("auto", torch.device("cuda", 0)) == torch.float16


def test_precision_errors_name_the_key(monkeypatch):
    with pytest.raises(ConfigError, match=r"train.precision='fp8' is unknown"):
        resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train.precision=fp16 needs a CUDA device; on the CPU use fp32 or bf16"):
        resolve_precision("fp16", torch.device("cpu"))  # users get the refusal; tests reach fp16 by _CPU_FP16
    fake_gpus(monkeypatch, 6, emulates_bf16=False)
    with pytest.raises(ConfigError, match=r"train.precision=bf16 but Tesla P100-PCIE-16GB does not support bfloat16"):
        resolve_precision("bf16", torch.device("cuda"))
    assert resolve_precision("auto", torch.device("cuda")) == torch.float16


@pytest.mark.parametrize("setting, backend", [("cpu", "gloo"), ("auto", "nccl"), ("cuda", "nccl")])
def test_the_distributed_backend_follows_the_runs_device(monkeypatch, setting, backend):
    fake_gpus(monkeypatch, 9, 9)
    joined, devices = [], []
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    info = distributed.setup(setting)
    assert (info.rank, info.local_rank, info.world_size) == (1, 1, 2)
    assert joined == [backend]
    assert devices == ([] if backend == "gloo" else [torch.device("cuda", 1)])


def test_ddp_is_wrapped_before_compilation():
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    from attnmt.training import wrap_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = wrap_model(build_model(tiny_config()), torch.device("cpu"), world_size=2, compile_model=True)
        assert isinstance(wrapped, OptimizedModule) and isinstance(wrapped._orig_mod, DistributedDataParallel)
        assert callable(wrapped.no_sync)  # what gradient accumulation reaches through the compiled wrapper
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# One update under fp16 with loss scaling, and under bf16


def one_update(autocast, scaler, on_gradient=None):
    """A fresh tiny model after one plain-SGD update on a fixed batch; returns (model, result).
    ``on_gradient(grad)`` sees each parameter's gradient."""
    torch.manual_seed(0)
    model = build_model(tiny_config())
    for p in model.parameters() if on_gradient else ():
        p.register_hook(on_gradient)
    batch = make_batch(random_pairs(6, torch.Generator().manual_seed(5)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return model, train_step(model, [batch], optimizer, scaler, autocast, 0.1, 1.0)


def fp32_update():
    return one_update(contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False))


def test_an_fp16_update_with_loss_scaling_matches_fp32():
    scaler = torch.amp.GradScaler("cpu")  # the stand-in for CUDA's: same class, same arithmetic
    model, result = one_update(torch.autocast("cpu", dtype=torch.float16), scaler)
    reference, expected = fp32_update()
    assert not result.skipped and scaler.get_scale() == 2.0**16
    # fp16 keeps 11 bits: the loss within 0.2%, each weight's update (lr 0.5 x gradient) within 2e-3.
    assert result.loss == pytest.approx(expected.loss, rel=2e-3) and result.grad_norm == pytest.approx(
        expected.grad_norm, rel=1e-2)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3, msg=name)
        assert p.dtype == torch.float32


def test_an_fp16_overflow_is_a_skipped_update_that_halves_the_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # gradients overflow fp16's 65504
    model, result = one_update(torch.autocast("cpu", dtype=torch.float16), scaler)
    torch.manual_seed(0)
    untouched = build_model(tiny_config())
    assert result.skipped and math.isfinite(result.loss) and not math.isfinite(result.grad_norm)
    assert scaler.get_scale() == 2.0**99
    for (name, p), q in zip(model.named_parameters(), untouched.parameters()):
        assert torch.equal(p, q), name


def test_a_bf16_update_keeps_weights_gradients_and_loss_in_fp32(monkeypatch):
    from attnmt import training

    seen = {"logits": set(), "loss": set(), "grads": set()}
    real_loss = training.label_smoothed_nll

    def loss(logits, *args):
        seen["logits"].add(logits.dtype)
        result = real_loss(logits, *args)
        seen["loss"].update(t.dtype for t in result)
        return result

    monkeypatch.setattr(training, "label_smoothed_nll", loss)
    model, result = one_update(torch.autocast("cpu", dtype=torch.bfloat16), torch.amp.GradScaler("cpu", enabled=False),
                               on_gradient=lambda grad: seen["grads"].add(grad.dtype))
    assert seen == {"logits": {torch.bfloat16}, "loss": {torch.float32}, "grads": {torch.float32}}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference, expected = fp32_update()
    assert not result.skipped and result.loss == pytest.approx(expected.loss, rel=2e-2)  # bf16 keeps 8 bits


def test_the_native_engine_under_bf16_keeps_its_cache_in_bf16_and_translates_as_fp32(trained_checkpoint, fixture_corpus,
                                                                                      monkeypatch):
    from attnmt.data import read_lines
    from attnmt.inference import native
    from attnmt.model.attention import KVCache
    from conftest import decode_config, native_engine

    sources = read_lines(fixture_corpus / "valid.de")
    engine = native_engine(trained_checkpoint)
    fp32 = [t.texts[0] for t in engine.translate(sources, decode_config(beam_size=4))]
    cached = set()
    real_append = KVCache.append

    def append(self, layer, k, v):
        k_all, v_all = real_append(self, layer, k, v)
        cached.update((k_all.dtype, v_all.dtype))
        return k_all, v_all

    monkeypatch.setattr(KVCache, "append", append)
    monkeypatch.setattr(native, "inference_dtype", lambda device: torch.bfloat16)  # as on a GPU with bf16
    bf16 = [t.texts[0] for t in engine.translate(sources, decode_config(beam_size=4))]
    assert cached == {torch.bfloat16}
    # bf16 rounds the scores: a near tie may go the other way, a whole line rarely. Measured: 40 of 40 equal.
    same = sum(a == b for a, b in zip(fp32, bf16))
    assert same >= 0.9 * len(sources), list(zip(fp32, bf16))


# ----------------------------------------------------------------------------------------------------
# The training loop under fp16, compiled, and its throughput meter


def test_fp16_training_resumes_exactly_with_its_loss_scale(tmp_path, fixture_corpus, one_thread, monkeypatch):
    from attnmt.checkpoint import load_checkpoint
    from attnmt.training import train

    monkeypatch.setattr(device_module, "_CPU_FP16", True)
    fp16 = ("train.precision=fp16",)
    straight = train(run_config(tmp_path / "straight", fixture_corpus, *fp16, ema_decay=0.9, max_steps=8))
    first = train(run_config(tmp_path / "resumed", fixture_corpus, *fp16, ema_decay=0.9, max_steps=4))
    resumed = train(run_config(tmp_path / "resumed", fixture_corpus, *fp16, ema_decay=0.9, max_steps=8, resume="auto"))
    assert straight["losses"] == first["losses"] + resumed["losses"] and straight["skipped_updates"] == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    # The scaler's state is in the checkpoint, and continued: 8 calm updates since its scale last changed.
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] == 2.0**16 and a["scaler"]["_growth_tracker"] == 8
    for key in ("model", "trained_model"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert straight["valid"] == resumed["valid"]
    plain = train(run_config(tmp_path / "fp32", fixture_corpus, ema_decay=0.9, max_steps=8))
    assert straight["losses"] == pytest.approx(plain["losses"], rel=1e-2)


def overflowing(monkeypatch, every: int) -> None:
    """From now on, every ``every``-th update's gradients overflow (as an fp16 backward can)."""
    from attnmt import training

    real_build, calls = training.build_model, [0]

    def build(cfg):
        model = real_build(cfg)

        def hook(grad):
            return grad * math.inf if calls[0] % every == 0 else grad

        model.decoder_norm.weight.register_hook(hook)
        return model

    real_step = training.train_step

    def step(*args, **kwargs):
        calls[0] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "build_model", build)
    monkeypatch.setattr(training, "train_step", step)


def test_fp16_overflows_in_a_row_stop_the_run_in_one_line(tmp_path, fixture_corpus, one_thread, monkeypatch):
    from attnmt.training import TrainingError, train

    monkeypatch.setattr(device_module, "_CPU_FP16", True)
    overflowing(monkeypatch, every=1)
    message = (r"^training stopped at step 0: 3 fp16 gradient overflows in a row \(train.max_bad_steps=3\); loss scale "
               r"now 8192\. Lower optim.lr")
    with pytest.raises(TrainingError, match=message) as raised:
        train(run_config(tmp_path, fixture_corpus, "train.precision=fp16", max_bad_steps=3))
    assert "\n" not in str(raised.value)


def test_a_loss_scale_that_keeps_falling_stops_the_run_and_skipped_updates_do_not_count(tmp_path, fixture_corpus,
                                                                                         one_thread, monkeypatch):
    from attnmt.training import MIN_LOSS_SCALE, TrainingError, train

    monkeypatch.setattr(device_module, "_CPU_FP16", True)
    overflowing(monkeypatch, every=2)  # never two in a row, yet the scale halves every other update
    halvings = math.ceil(math.log2(2.0**16 / MIN_LOSS_SCALE))  # 30: from 2^16 to below 1e-4
    with pytest.raises(TrainingError, match=rf"at step {halvings}: the fp16 loss scale fell to {2.0 ** (16 - halvings):g}"):
        train(run_config(tmp_path, fixture_corpus, "train.precision=fp16", max_steps=1000, valid_every=1000,
                         log_every=1000))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_training_equals_eager_in_a_few_graphs(tmp_path, fixture_corpus, one_thread, monkeypatch, caplog,
                                                       backend):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from attnmt import training
    from attnmt.checkpoint import load_checkpoint

    shapes = []
    real_step, real_compile = training.train_step, torch.compile

    def step(model, micro, *args):
        shapes.append((tuple(micro[0].src_tokens.shape), tuple(micro[0].tgt_in.shape)))
        return real_step(model, micro, *args)

    monkeypatch.setattr(training, "train_step", step)
    caplog.set_level(logging.INFO, logger="attnmt.training")
    eager = training.train(run_config(tmp_path / "eager", fixture_corpus, max_steps=10, valid_every=10))
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=backend))
    torch._dynamo.reset()
    counters.clear()
    caplog.clear()
    try:
        compiled = training.train(run_config(tmp_path / "compiled", fixture_corpus, max_steps=10, valid_every=10,
                                             compile="true"))
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert len(set(shapes[:10])) >= 5  # ten batches of several shapes: the test of recompilation
    assert 1 <= graphs <= 4, graphs  # shapes marked dynamic after the first change, not a graph per shape
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    state = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.pt")
    assert not [k for k in state["model"] if "_orig_mod" in k]
    # The first log line's two updates built the graphs: no throughput figure for them.
    assert re.search(r"step 2 \|.*\| compiling$", caplog.text, re.MULTILINE)


def test_batches_from_pinned_memory_go_to_the_device_without_waiting():
    from attnmt.training import Run

    copies = []

    class Pinned:
        def to(self, device, non_blocking=False):
            copies.append(non_blocking)
            return self

    state = SimpleNamespace(sampler=range(10), batches_in_epoch=0, epoch=1)
    run = Run(cfg=SimpleNamespace(train=SimpleNamespace(update_freq=2, max_epochs=0)), info=None,
              device=torch.device("cpu"), autocast=None, run_dir=None, state=state, model=None,
              loader=SimpleNamespace(pin_memory=True), valid=None, writer=None, progress=None)
    run.batch_iter = iter([Pinned(), Pinned()])
    assert len(run.next_micro_batches()) == 2 and copies == [True, True]


class FakeClock:
    """The training loop's time: updates take 1 s each, a validation 1000 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    perf_counter = time


def test_tokens_per_second_counts_training_time_only(tmp_path, fixture_corpus, one_thread, monkeypatch, caplog):
    from attnmt import training

    clock, tokens = FakeClock(), []
    real_step, real_validate = training.train_step, training.validate

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        clock.now += 1.0
        tokens.append(result.n_tokens)
        return result

    def validate(*args, **kwargs):
        clock.now += 1000.0
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(training, "time", clock)
    monkeypatch.setattr(training, "train_step", step)
    monkeypatch.setattr(training, "validate", validate)
    caplog.set_level(logging.INFO, logger="attnmt.training")
    training.train(run_config(tmp_path, fixture_corpus, max_steps=8, valid_every=3, log_every=4))
    logged = [int(x) for x in re.findall(r"\| (\d+) tok/s", caplog.text)]
    # Windows of 4 updates, each holding a validation (steps 3 and 6): 4 s of training each.
    assert logged == [round(sum(tokens[:4]) / 4), round(sum(tokens[4:8]) / 4)]


def test_train_tf32_reaches_the_switch(tmp_path, fixture_corpus, one_thread, monkeypatch):
    from attnmt import training

    calls = []
    monkeypatch.setattr(training, "allow_tf32", lambda device, enabled: calls.append((device.type, enabled)))
    training.train(run_config(tmp_path, fixture_corpus, max_steps=1, valid_every=1, tf32="false"))
    assert calls == [("cpu", False)]
