"""Checkpoints: weights_only round trips, clear errors on bad files, RNG states, keep-N, averaging."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from attnmt import checkpoint
from attnmt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from attnmt.model import build_model
from conftest import tiny_config


def _state(step: int = 3, scale: float = 1.0) -> dict:
    model = build_model(tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.98))
    model(torch.tensor([[4, 5, 3]]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([[2, 6]])).sum().backward()
    optimizer.step()
    return {
        "format": checkpoint.FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "rng": [checkpoint.rng_state(torch.device("cpu"))],
        "step": step,
        "config": {"train": {"max_tokens": 100, "lr": 0.1, "resume": None}},
    }


def test_round_trip_with_weights_only(tmp_path):
    state = _state()
    save_checkpoint(state, tmp_path / "a.pt")
    # The plain torch.load call a user would write must succeed without any allow-listing.
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert loaded["step"] == 3 and loaded["config"] == state["config"]
    for name, tensor in state["model"].items():
        assert torch.equal(loaded["model"][name], tensor)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"], "the temporary file must be gone"


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    save_checkpoint(_state(), tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt cannot be read .*truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an attnmt checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_rng_state_round_trip(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    save_checkpoint({"format": checkpoint.FORMAT, "rng": checkpoint.rng_state(torch.device("cpu"))}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert checkpoint.set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"], torch.device("cpu")) is None
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


class FakeCudaGenerators:
    """torch.cuda's per-device generator calls, on a machine without CUDA: each device's state a tensor."""

    def __init__(self, monkeypatch, n_devices: int) -> None:
        self.states = {i: torch.full((4,), i, dtype=torch.uint8) for i in range(n_devices)}
        self.restored: dict[int, torch.Tensor] = {}
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: self.states[torch.device(device).index].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: self.restored.update(
            {torch.device(device).index: state}))


def test_a_gpu_run_saves_and_restores_its_own_devices_generator(monkeypatch):
    gpus = FakeCudaGenerators(monkeypatch, n_devices=4)
    saved = checkpoint.rng_state(torch.device("cuda", 2))
    assert torch.equal(saved["cuda"], gpus.states[2])
    # Resumed on another GPU of a machine with fewer GPUs: the run's generator continues there.
    assert checkpoint.set_rng_state(saved, torch.device("cuda", 0)) is None
    assert torch.equal(gpus.restored[0], gpus.states[2])


@pytest.mark.parametrize("written_on, resumed_on", [
    ("cpu", "cuda:0"),  # a CPU checkpoint resumed on a GPU
    ("old list of 1", "cuda:1"),  # a checkpoint of the old format (every GPU's state) from a machine with one GPU
])
def test_a_gpu_generator_that_cannot_be_restored_is_said(monkeypatch, written_on, resumed_on):
    gpus = FakeCudaGenerators(monkeypatch, n_devices=2)
    state = checkpoint.rng_state(torch.device("cpu"))
    if written_on.startswith("old"):
        state["cuda"] = [gpus.states[0]]
    reason = checkpoint.set_rng_state(state, torch.device(resumed_on))
    assert f"no CUDA random state for {resumed_on}" in reason and "not repeat an uninterrupted run exactly" in reason
    assert gpus.restored == {}


def test_an_old_checkpoints_list_of_gpu_states_restores_the_runs_own(monkeypatch):
    gpus = FakeCudaGenerators(monkeypatch, n_devices=2)
    state = {**checkpoint.rng_state(torch.device("cpu")), "cuda": [gpus.states[0], gpus.states[1]]}
    assert checkpoint.set_rng_state(state, torch.device("cuda", 1)) is None
    assert torch.equal(gpus.restored[1], gpus.states[1]) and list(gpus.restored) == [1]


def test_keep_last_best_and_resume_path(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save_run_checkpoint(_state(step), tmp_path, keep_last=2, is_best=step == 20)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "step_30.pt", "step_40.pt"]
    assert load_checkpoint(folder / "best.pt")["step"] == 20
    assert load_checkpoint(folder / "last.pt")["step"] == 40
    assert checkpoint.resume_path("auto", tmp_path) == folder / "last.pt"
    assert checkpoint.resume_path("auto", tmp_path / "fresh") is None
    assert checkpoint.resume_path("none", tmp_path / "fresh") is None
    with pytest.raises(CheckpointError, match="train.resume=auto"):  # a fresh start would overwrite the run
        checkpoint.resume_path("none", tmp_path)
    with pytest.raises(CheckpointError, match="train.resume"):
        checkpoint.resume_path(str(tmp_path / "nope.pt"), tmp_path)


def test_averaging_is_the_mean_of_the_weights(tmp_path):
    paths = []
    for i, scale in enumerate((1.0, 2.0, 6.0)):
        torch.manual_seed(0)  # same initial weights, scaled differently
        paths.append(tmp_path / f"step_{i}.pt")
        save_checkpoint(_state(i, scale), paths[-1])
    averaged = checkpoint.average_model_states(paths)
    first = load_checkpoint(paths[0])["model"]
    for name, tensor in first.items():
        if tensor.is_floating_point() and "norm" not in name and "bias" not in name:
            # Adam moved each copy a little after scaling; compare with the mean of the stored weights.
            stored = torch.stack([load_checkpoint(p)["model"][name] for p in paths])
            torch.testing.assert_close(averaged[name], stored.mean(0))
    out = checkpoint.average_checkpoints(paths, tmp_path / "avg.pt")
    state = load_checkpoint(out)
    assert "optimizer" not in state and state["step"] == 2
    assert len(state["averaged_from"]) == 3


def test_averaging_refuses_different_models(tmp_path):
    save_checkpoint(_state(), tmp_path / "a.pt")
    other = build_model(tiny_config(d_model=16, ffn_dim=32))
    save_checkpoint({"format": checkpoint.FORMAT, "model": other.state_dict()}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="different model"):
        checkpoint.average_model_states([tmp_path / "a.pt", tmp_path / "b.pt"])


def test_averaging_refuses_a_checkpoint_twice_an_output_that_is_an_input_and_unknown_keys(tmp_path):
    for name in ("a.pt", "b.pt"):
        save_checkpoint(_state(), tmp_path / name)
    (tmp_path / "also-a.pt").symlink_to(tmp_path / "a.pt")
    before = (tmp_path / "a.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"also-a.pt is given twice \(.*a.pt\)"):
        checkpoint.average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "also-a.pt"], tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"the output .*b.pt is the input .*b.pt"):
        checkpoint.average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "b.pt")
    newer = _state()
    newer["model_config"] = {**asdict(tiny_config()), "rotary": True}  # an option this version does not know
    save_checkpoint(newer, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"c.pt has config keys .* does not know: model.rotary"):
        checkpoint.average_checkpoints([tmp_path / "a.pt", tmp_path / "c.pt"], tmp_path / "x.pt")
    assert (tmp_path / "a.pt").read_bytes() == before and not (tmp_path / "x.pt").exists()


def test_a_full_disk_says_what_to_do_for_what_was_being_written(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"not enough disk space .* lower train.keep_last, then resume"):
        save_checkpoint(_state(), tmp_path / "last.pt")  # a training checkpoint: it resumes
    imported = {"format": checkpoint.FORMAT, "model": build_model(tiny_config()).state_dict()}
    with pytest.raises(CheckpointError) as refused:
        save_checkpoint(imported, tmp_path / "model.pt")  # attnmt-import's or attnmt-average's: written again
    assert "free some space, then run the command again" in str(refused.value)
    assert "train." not in str(refused.value)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"format": checkpoint.FORMAT, "model": build_model(tiny_config())}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        load_checkpoint(tmp_path / "pickled.pt")


OLD_CHECKPOINT = Path(__file__).parent / "fixtures" / "checkpoint-5ba9c4e.pt"


def test_a_checkpoint_written_before_the_model_gained_options_loads_and_translates_as_it_did(tmp_path):
    """tests/fixtures/checkpoint-5ba9c4e.pt was written by attnmt at 5ba9c4e (make_checkpoint.md), before
    the model keys of MODEL_KEYS_ADDED existed; its .json holds what that version translated."""
    from attnmt.config import MODEL_KEYS_ADDED
    from attnmt.inference import Engine
    from attnmt.inference.native import NativeBackend
    from conftest import decode_config

    state = load_checkpoint(OLD_CHECKPOINT)
    assert MODEL_KEYS_ADDED and not set(MODEL_KEYS_ADDED) & set(state["model_config"]), "the fixture predates them"
    recorded = json.loads(OLD_CHECKPOINT.with_suffix(".json").read_text(encoding="utf-8"))
    lines = (Path(__file__).parent / "fixtures" / "tiny" / "test.de").read_text(encoding="utf-8").splitlines()
    model, tokenizer, _ = checkpoint.load_for_inference(OLD_CHECKPOINT)
    engine = Engine("native", NativeBackend(model), tokenizer)
    for name, expected in recorded["translations"].items():
        cfg = decode_config(**dict(item.split("=") for item in expected["overrides"]))
        ours = engine.translate(lines, cfg)
        assert [t.texts for t in ours] == expected["texts"], name
        for t, scores in zip(ours, expected["scores"]):
            assert t.scores == pytest.approx(scores, abs=1e-5, nan_ok=True), name
    # It is an ordinary checkpoint for the other commands: averaging keeps its model config.
    shutil.copy(OLD_CHECKPOINT, tmp_path / "copy.pt")  # the same file twice is refused; a copy is another file
    averaged = checkpoint.average_checkpoints([OLD_CHECKPOINT, tmp_path / "copy.pt"], tmp_path / "avg.pt")
    assert checkpoint.model_config(load_checkpoint(averaged), averaged) == checkpoint.model_config(state, OLD_CHECKPOINT)


def test_model_keys_added_later_get_the_values_that_reproduce_old_checkpoints():
    """Every key of MODEL_KEYS_ADDED exists in the schema and in configs/model/base.yaml; a checkpoint
    without it builds the model it was trained as (the added key's value changes nothing)."""
    from dataclasses import fields

    from attnmt.config import MODEL_KEYS_ADDED, ModelConfig

    state = load_checkpoint(OLD_CHECKPOINT)
    base = compose_model()
    assert set(MODEL_KEYS_ADDED) <= {f.name for f in fields(ModelConfig)} and set(MODEL_KEYS_ADDED) <= set(vars(base))
    # The activation dropout of a checkpoint without the key is its dropout, as it was trained.
    saved = dict(state["model_config"], dropout=0.3)
    train_model = build_model(checkpoint.model_config({**state, "model_config": saved}, OLD_CHECKPOINT))
    assert train_model.encoder_layers[0].ffn.dropout.p == 0.3
    # A key this version does not know is refused, naming it, as a newer attnmt's checkpoint.
    with pytest.raises(CheckpointError, match=r"has config keys attnmt .* does not know: model.some_new_option"):
        checkpoint.model_config({**state, "model_config": {**state["model_config"], "some_new_option": 1}}, "new.pt")


def compose_model():
    from attnmt.config import compose

    return compose("train").model
