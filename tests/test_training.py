"""The training loop's parts: schedule, loss, one update (accumulation, DDP, non-finite losses), config errors."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attnmt.config import ConfigError, compose
from attnmt.model import build_model
from attnmt.config import check_config
from attnmt.optim import label_smoothed_nll, lr_at
from attnmt.training import train_step
from conftest import decode_config, fixture_train_config, free_port, tiny_config

PAD, BOS, EOS = 0, 2, 3


def make_batch(pairs: list[tuple[list[int], list[int]]]):
    """A batch with the fields train_step reads, padded like attnmt.batching pads (pad 0, right)."""
    src_len = max(len(s) for s, _ in pairs) + 1
    tgt_len = max(len(t) for _, t in pairs) + 1
    src = torch.zeros(len(pairs), src_len, dtype=torch.long)
    tgt_in = torch.zeros(len(pairs), tgt_len, dtype=torch.long)
    tgt_out = torch.zeros(len(pairs), tgt_len, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        src[i, : len(s) + 1] = torch.tensor(s + [EOS])
        tgt_in[i, : len(t) + 1] = torch.tensor([BOS] + t)
        tgt_out[i, : len(t) + 1] = torch.tensor(t + [EOS])
    return SimpleNamespace(src_tokens=src, src_mask=src != PAD, tgt_in=tgt_in, tgt_out=tgt_out,
                           n_tgt_tokens=int((tgt_out != PAD).sum()))


def random_pairs(n: int, generator: torch.Generator) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for _ in range(n):
        s_len, t_len = torch.randint(2, 9, (2,), generator=generator).tolist()
        pairs.append((torch.randint(4, 24, (s_len,), generator=generator).tolist(),
                      torch.randint(4, 24, (t_len,), generator=generator).tolist()))
    return pairs


def run_updates(steps: list[list], model=None, clip_norm: float = 1.0):
    """Apply one update per element of ``steps`` (a list of micro-batches); return model and results.

    Plain SGD: Adam divides by the gradient's running RMS, which turns the rounding noise of
    gradients that are zero in exact arithmetic (attention key biases) into full-size steps, so
    parameters would differ for reasons that have nothing to do with accumulation.
    """
    torch.manual_seed(0)
    model = model or build_model(tiny_config())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    results = []
    for micro in steps:
        results.append(train_step(model, micro, optimizer, scaler, contextlib.nullcontext(), 0.1, clip_norm))
    return model, results


def assert_same_parameters(a, b, exact: bool = False) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if exact:
            assert torch.equal(pa, pb), name
        else:
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------


def shipped(group: str, **fields):
    """A group of the shipped train config (``optim``, ``train``, ...) with ``fields`` replaced."""
    return replace(getattr(compose("train"), group), **fields)


def test_schedule_warms_up_then_decays():
    cfg = shipped("optim", lr=1e-3, warmup_steps=100, warmup_init_lr=0.0)
    assert lr_at(50, cfg) == pytest.approx(5e-4)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(400, cfg) == pytest.approx(5e-4)  # lr * sqrt(100 / 400)
    cosine = shipped("optim", lr=1e-3, warmup_steps=10, warmup_init_lr=0.0, schedule="cosine", min_lr=1e-5)
    assert lr_at(10, cosine, max_steps=110) == pytest.approx(1e-3)
    assert lr_at(60, cosine, max_steps=110) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(110, cosine, max_steps=110) == pytest.approx(1e-5)


def test_loss_matches_torch_cross_entropy():
    logits = torch.randn(3, 5, 11)
    target = torch.randint(4, 11, (3, 5))
    target[0, 3:] = PAD
    for eps in (0.0, 0.1):
        loss, nll = label_smoothed_nll(logits, target, eps, PAD)
        expected = F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=PAD, reduction="sum",
                                   label_smoothing=eps)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(nll, F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=PAD,
                                                        reduction="sum"))


def test_accumulation_equals_one_merged_batch():
    g = torch.Generator().manual_seed(1)
    steps_a, steps_b = [], []
    for _ in range(3):
        a, b = random_pairs(3, g), random_pairs(5, g)
        steps_a.append([make_batch(a), make_batch(b)])  # update_freq=2
        steps_b.append([make_batch(a + b)])  # one batch holding both
    accumulated, results_a = run_updates(steps_a)
    merged, results_b = run_updates(steps_b)
    assert_same_parameters(accumulated, merged)
    for ra, rb in zip(results_a, results_b):
        assert ra.n_tokens == rb.n_tokens
        assert ra.loss == pytest.approx(rb.loss, rel=1e-5)


def _ddp_worker(rank: int, port: int, steps: list[list], out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(build_model(tiny_config()))
        run_updates([micro[rank::2] for micro in steps], model=model)
        if rank == 0:
            torch.save(model.module.state_dict(), out)
        # Leave together: a rank tearing gloo down while the other still uses it can abort (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process(tmp_path):
    g = torch.Generator().manual_seed(2)
    # Each update: 4 micro-batches of different sizes; rank r gets micro-batches r and r + 2
    # (update_freq=2 per rank), the single process all four.
    steps = [[make_batch(random_pairs(n, g)) for n in (2, 5, 3, 4)] for _ in range(3)]
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(free_port(), steps, str(out)), nprocs=2, join=True)
    single, _ = run_updates(steps)
    ddp_state = torch.load(out, weights_only=True)
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(ddp_state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_non_finite_loss_skips_the_update():
    g = torch.Generator().manual_seed(3)
    model = build_model(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.decoder_norm.weight[0] = float("nan")
    before["decoder_norm.weight"][0] = float("nan")
    _, results = run_updates([[make_batch(random_pairs(3, g))]], model=model)
    assert results[0].skipped and math.isnan(results[0].loss)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.isnan(), before[name].isnan())
        assert torch.equal(tensor.nan_to_num(), before[name].nan_to_num()), name


@pytest.mark.parametrize(
    "model_kw, train_kw, optim_kw, message",
    [
        (dict(d_model=30, n_heads=4), {}, {}, r"model.d_model=30 is not divisible by model.n_heads=4"),
        ({}, dict(max_tokens=50), {}, r"train.max_tokens=50 is below the longest allowed sentence \(129"),
        ({}, dict(update_freq=0), {}, r"train.update_freq=0"),
        ({}, dict(max_steps=0), {}, r"no stopping rule"),
        ({}, {}, dict(schedule="linear"), r"optim.schedule='linear' is unknown"),
        ({}, dict(max_steps=0, max_epochs=2), dict(schedule="cosine"), r"optim.schedule=cosine .* train.max_steps"),
        ({}, dict(valid_decode=decode_config(beam_size=0)), {}, r"train.valid_decode.beam_size=0"),
        (dict(activation_dropout=1.0), {}, {}, r"model.activation_dropout=1.0 must be in \[0, 1\)"),
        (dict(dropout=-0.1), {}, {}, r"model.dropout=-0.1 must be in \[0, 1\)"),
        ({}, dict(init_from="a.pt", resume="auto"), {}, r"train.init_from=a.pt .* set only one"),
        ({}, dict(average_last=1), {}, r"train.average_last=1 must be 0 \(off\) or from 2 to train.keep_last=5"),
        ({}, dict(average_last=6), {}, r"train.average_last=6 must be"),
        ({}, dict(ema_decay=1.0), {}, r"train.ema_decay=1.0 must be in \[0, 1\)"),
        ({}, dict(sort_window=-1), {}, r"train.sort_window=-1 must be 0"),
    ],
)
def test_config_errors_name_the_key(model_kw, train_kw, optim_kw, message):
    with pytest.raises(ConfigError, match=message):
        train = shipped("train", **{"max_steps": 10, **train_kw})
        check_config(tiny_config(**model_kw), shipped("optim", **optim_kw), train, max_sentence_tokens=129)


# ----------------------------------------------------------------------------------------------------
# The whole loop on the fixture corpus


def run_config(run_dir, fixture_corpus, *overrides: str, **train):
    """The shipped config for a tiny model on ``fixture_corpus``: fp32, CPU, no dropout; ``train`` sets train.* keys."""
    fields = dict(max_tokens=256, max_steps=8, valid_every=4, log_every=2, seed=3)
    fields.update(train)
    return fixture_train_config(
        run_dir, "model.d_model=32", "model.ffn_dim=64", "model.dropout=0.0", "optim.lr=2e-3", "optim.warmup_steps=4",
        *(f"train.{key}={value}" for key, value in fields.items()), *overrides, corpus=fixture_corpus,
    )


def test_resume_continues_exactly(tmp_path, fixture_corpus, one_thread):
    from attnmt.checkpoint import load_checkpoint
    from attnmt.training import train

    straight = train(run_config(tmp_path / "straight", fixture_corpus, max_steps=8))
    first = train(run_config(tmp_path / "resumed", fixture_corpus, max_steps=4))
    resumed = train(run_config(tmp_path / "resumed", fixture_corpus, max_steps=8, resume="auto"))
    assert straight["step"] == resumed["step"] == 8
    assert straight["losses"] == first["losses"] + resumed["losses"]
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["scheduler"] == b["scheduler"]
    assert a["metrics"] == b["metrics"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_ema_resumes_exactly_and_is_what_checkpoints_translate_with(tmp_path, fixture_corpus, one_thread):
    from attnmt.checkpoint import load_checkpoint, load_for_inference
    from attnmt.training import train

    straight = train(run_config(tmp_path / "straight", fixture_corpus, ema_decay=0.9, max_steps=8))
    train(run_config(tmp_path / "resumed", fixture_corpus, ema_decay=0.9, max_steps=4))
    resumed = train(run_config(tmp_path / "resumed", fixture_corpus, ema_decay=0.9, max_steps=8, resume="auto"))
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key in ("model", "trained_model"):  # the average and the trained weights, bit for bit
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert straight["valid"] == resumed["valid"]
    # The average differs from the trained weights, and validation scored the average: the valid loss
    # of the checkpoint's `model` weights, recomputed, is the one training logged.
    assert any(not torch.equal(a["model"][k], a["trained_model"][k]) for k in a["model"])
    model, _, _ = load_for_inference(tmp_path / "straight" / "checkpoints" / "last.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, a["model"][name]), name
    plain = train(run_config(tmp_path / "plain", fixture_corpus, max_steps=8))
    assert plain["losses"] == straight["losses"]  # the average never feeds back into training
    assert plain["valid"]["loss"] != straight["valid"]["loss"]


def test_average_last_writes_and_validates_the_mean_of_the_newest_checkpoints(tmp_path, fixture_corpus, one_thread):
    from attnmt.checkpoint import load_checkpoint
    from attnmt.training import train

    result = train(run_config(tmp_path, fixture_corpus, max_steps=8, valid_every=2, keep_last=3, average_last=3))
    folder = tmp_path / "checkpoints"
    average = load_checkpoint(folder / "average.pt")
    steps = [load_checkpoint(folder / f"step_{n}.pt")["model"] for n in (4, 6, 8)]
    for name, tensor in average["model"].items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, sum(s[name] for s in steps) / 3, rtol=0, atol=1e-6)
    assert "optimizer" not in average and "trained_model" not in average
    assert result["averaged"]["n_sentences"] == result["valid"]["n_sentences"]
    best = load_checkpoint(folder / "best.pt")
    replaced = all(torch.equal(best["model"][k], average["model"][k]) for k in average["model"])
    assert replaced == (result["averaged"]["bleu"] > load_checkpoint(folder / "last.pt")["best_bleu"])


@pytest.mark.parametrize("limit", [dict(max_steps=4), dict(max_steps=0, max_epochs=1)])
def test_resuming_a_finished_run_trains_no_further(tmp_path, fixture_corpus, one_thread, limit):
    from attnmt.checkpoint import load_checkpoint
    from attnmt.training import train

    first = train(run_config(tmp_path, fixture_corpus, valid_every=1000, **limit))
    again = train(run_config(tmp_path, fixture_corpus, valid_every=1000, resume="auto", **limit))
    assert again["losses"] == [] and again["step"] == first["step"] > 0
    assert "already reached" in again["stop_reason"]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == first["step"]


def test_resume_with_another_number_of_ranks_finishes_the_epoch(tmp_path, fixture_corpus, one_thread):
    from attnmt.checkpoint import load_checkpoint, save_checkpoint
    from attnmt.training import train

    whole = train(run_config(tmp_path / "whole", fixture_corpus, max_steps=0, max_epochs=1, valid_every=1000))
    train(run_config(tmp_path / "run", fixture_corpus, max_steps=4, valid_every=4))
    # Make the step-4 checkpoint look like rank 0's of a two-rank run: 4 batches each, 8 in all.
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    state["sampler"]["world_size"], state["rng"] = 2, state["rng"] * 2
    save_checkpoint(state, path)
    resumed = train(run_config(tmp_path / "run", fixture_corpus, max_steps=0, max_epochs=1, valid_every=1000,
                               resume="auto"))
    assert resumed["stop_reason"] == "train.max_epochs=1 reached"
    assert resumed["step"] == whole["step"] - 4  # 8 of the epoch's batches were done, one per update


def test_a_signal_at_a_validation_step_defers_that_validation_to_the_resume(tmp_path, fixture_corpus, one_thread,
                                                                          monkeypatch):
    import signal

    from attnmt import training
    from attnmt.checkpoint import load_checkpoint

    straight = training.train(run_config(tmp_path / "straight", fixture_corpus, max_steps=8))
    real_step, calls = training.train_step, []

    def interrupted_after_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: train()'s handler asks to stop after this update
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", interrupted_after_4)
    first = training.train(run_config(tmp_path / "resumed", fixture_corpus, max_steps=8))
    assert first["step"] == 4 and first["interrupted"] == "SIGINT" and first["valid"] == {}
    monkeypatch.setattr(training, "train_step", real_step)
    resumed = training.train(run_config(tmp_path / "resumed", fixture_corpus, max_steps=8, resume="auto"))
    assert straight["losses"] == first["losses"] + resumed["losses"]
    for name in ("best.pt", "last.pt"):
        a = load_checkpoint(tmp_path / "straight" / "checkpoints" / name)
        b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / name)
        assert (a["step"], a["best_bleu"], a["validations_without_improvement"], a["metrics"]) == (
            b["step"], b["best_bleu"], b["validations_without_improvement"], b["metrics"]), name


def test_a_refused_start_leaves_the_run_untouched(tmp_path, fixture_corpus, one_thread):
    from attnmt.checkpoint import CheckpointError, average_checkpoints
    from attnmt.training import train

    train(run_config(tmp_path, fixture_corpus, max_steps=4))
    config = (tmp_path / "config.yaml").read_text()
    assert "max_steps: 4" in config
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(run_config(tmp_path, fixture_corpus, max_steps=999))
    with pytest.raises(ConfigError, match=r"train.log_every=0 must be at least 1"):
        train(run_config(tmp_path, fixture_corpus, max_steps=999, log_every=0, resume="auto"))
    averaged = average_checkpoints([tmp_path / "checkpoints" / "step_4.pt"], tmp_path / "avg.pt")
    with pytest.raises(CheckpointError, match=r"avg.pt holds model weights only .* cannot be resumed"):
        train(run_config(tmp_path, fixture_corpus, max_steps=999, resume=str(averaged)))
    assert (tmp_path / "config.yaml").read_text() == config


def test_a_run_of_non_finite_losses_stops_training(tmp_path, fixture_corpus, monkeypatch):
    from attnmt import training

    def diverged(model, micro, *args):
        return training.StepResult(math.nan, math.nan, 10, math.nan, True)

    monkeypatch.setattr(training, "train_step", diverged)
    cfg = run_config(tmp_path, fixture_corpus, max_bad_steps=3)
    # Skipped updates do not count: the run stops where it started.
    with pytest.raises(training.TrainingError, match=r"at step 0: 3 non-finite losses in a row \(train.max_bad_steps=3\)"):
        training.train(cfg)


def test_out_of_memory_names_the_batch_and_the_fix(tmp_path, fixture_corpus, monkeypatch):
    from attnmt import training

    def out_of_memory(model, micro, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "train_step", out_of_memory)
    cfg = run_config(tmp_path, fixture_corpus, update_freq=2)
    message = (r"out of memory on a batch of src \(\d+, \d+\) tgt \(\d+, \d+\), src \(\d+, \d+\) tgt \(\d+, \d+\); "
               r"lower train.max_tokens \(now 256\) and raise train.update_freq \(now 2\)")
    with pytest.raises(training.TrainingError, match=message):
        training.train(cfg)


def test_tiny_model_learns_the_fixture_corpus(tmp_path, fixture_corpus, one_thread):
    import sacrebleu

    from attnmt.data import read_lines
    from attnmt.training import train

    cfg = run_config(tmp_path, fixture_corpus, "optim.lr=3e-3", "optim.warmup_steps=30", max_tokens=1024,
                     max_steps=200, valid_every=100, log_every=100, seed=1)
    result = train(cfg)

    # Chance on this templated corpus is not 0: every English sentence shares "The ... in the ...".
    # BLEU of each valid reference scored against another one (references rotated by one) is 8.2.
    references = read_lines(fixture_corpus / "valid.en")
    chance = sacrebleu.corpus_bleu(references[1:] + references[:1], [references]).score
    assert chance < 15
    # Measured at step 200 (seeds 1-4): BLEU 87.1, 90.1, 80.7, 94.5 (BLEU 0 at step 25, 23.8 at step 100);
    # ~7 s on one CPU thread. 50 is 6x chance and 30 points below the worst seed.
    assert result["valid"]["n_sentences"] == 40
    assert result["best_bleu"] > 50, result["valid"]
    assert result["valid"]["chrf"] > 60
    assert result["losses"][-1] < result["losses"][0] / 2
