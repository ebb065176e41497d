"""Checkpoints on an accelerator (issue 19): the accelerator RNG is saved and restored, a rank without its
RNG file says what it does not restore, every load maps onto the CPU first, and a ZeRO-3 export gathers
one module at a time."""
from __future__ import annotations

import contextlib
import logging
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from promptkd.models import build_tiny
from promptkd.training import checkpoint


class FakeAccelerator:
    """DeepSpeed's accelerator API, RNG part: a device whose RNG state is a byte tensor."""

    def __init__(self):
        self.state = torch.tensor([1, 2, 3], dtype=torch.uint8)
        self.set_calls: list[torch.Tensor] = []

    def device_name(self, index=None) -> str:
        return "cuda"

    def get_rng_state(self, device_index=None) -> torch.Tensor:
        return self.state.clone()

    def set_rng_state(self, state, device_index=None) -> None:
        self.set_calls.append(state.clone())
        self.state = state.clone()


class FakeEngine:
    def __init__(self, module: torch.nn.Module):
        self.module = module

    def save_checkpoint(self, path, tag, save_latest=False):
        pass

    def load_checkpoint(self, path, tag):
        pass


@pytest.fixture
def engine():
    torch.manual_seed(0)
    return FakeEngine(build_tiny("llama", 1, 16, 2, vocab_size=64))


def _rank_state(generator=None) -> dict:
    """What the Trainer checkpoints per rank: the process RNGs and the rollout generator."""
    return {"rng": checkpoint.ProcessRNG(), "generator": checkpoint.GeneratorState(generator)}


def _save(tmp_path, engine, generator=None) -> str:
    prompt = torch.arange(6, dtype=torch.float32).view(2, 3)
    state = {"trainer": checkpoint.Snapshot({"step": 4}), "method": checkpoint.Snapshot({"prompt": {"prompt": prompt}})}
    return checkpoint.save(str(tmp_path), 4, engine, state, _rank_state(generator))


def _load(path, engine, generator=None) -> dict:
    return checkpoint.load(path, engine, {}, _rank_state(generator))


def test_accelerator_rng_is_saved_and_restored(tmp_path, engine, monkeypatch):
    accel = FakeAccelerator()
    monkeypatch.setattr(checkpoint, "_accelerator", lambda: accel)
    gen = torch.Generator(device="cpu").manual_seed(5)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = _save(tmp_path, engine, gen)
    expect = (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=gen)))
    accel.state = torch.tensor([9, 9, 9], dtype=torch.uint8)          # the device RNG moves on after the save
    random.seed(2), np.random.seed(2), torch.manual_seed(2), gen.manual_seed(2)
    _load(path, engine, gen)
    assert [s.tolist() for s in accel.set_calls] == [[1, 2, 3]]
    assert accel.state.tolist() == [1, 2, 3]
    got = (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=gen)))
    assert got == expect


def test_missing_rank_file_warns_what_is_not_restored(tmp_path, engine, caplog):
    path = _save(tmp_path, engine, torch.Generator(device="cpu"))
    (tmp_path / "checkpoints" / "step_4" / "rank_0.pt").rename(tmp_path / "checkpoints" / "step_4" / "rank_7.pt")
    with caplog.at_level(logging.WARNING, logger="promptkd.training.checkpoint"):
        _load(path, engine, torch.Generator(device="cpu"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    msg = warnings[0]
    assert "rank_0.pt" in msg and "written by 1 ranks" in msg
    for what in ("Python", "NumPy", "torch CPU", "accelerator RNG", "rollout generator"):
        assert what in msg, (what, msg)


def test_accelerator_state_without_an_accelerator_warns(tmp_path, engine, monkeypatch, caplog):
    monkeypatch.setattr(checkpoint, "_accelerator", lambda: FakeAccelerator())
    path = _save(tmp_path, engine)
    monkeypatch.setattr(checkpoint, "_accelerator", lambda: None)      # resumed on a CPU machine
    with caplog.at_level(logging.WARNING, logger="promptkd.training.checkpoint"):
        _load(path, engine)
    assert any("accelerator RNG" in r.getMessage() and "not" in r.getMessage() for r in caplog.records)


def test_cpu_checkpoint_resumed_on_an_accelerator_warns(tmp_path, engine, monkeypatch, caplog):
    path = _save(tmp_path, engine)                                      # written on a CPU machine
    accel = FakeAccelerator()
    monkeypatch.setattr(checkpoint, "_accelerator", lambda: accel)
    with caplog.at_level(logging.WARNING, logger="promptkd.training.checkpoint"):
        _load(path, engine)
    assert not accel.set_calls
    assert any("no accelerator RNG state" in r.getMessage() and "not restored" in r.getMessage()
               for r in caplog.records)


def test_every_load_maps_onto_the_cpu(tmp_path, engine, monkeypatch):
    """Rank 0 wrote the prompt from its device: unmapped, every rank would load it onto that device."""
    path = _save(tmp_path, engine, torch.Generator(device="cpu"))
    seen, real = [], torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state = _load(path, engine, torch.Generator(device="cpu"))
    assert seen == ["cpu", "cpu"]                                       # state.pt and this rank's rank_0.pt
    assert state["method"]["prompt"]["prompt"].device == torch.device("cpu")


# ----------------------------------------------------------------------------- ZeRO-3 export, module by module

def _counting_gather(monkeypatch) -> dict:
    """deepspeed.zero.GatheredParameters that counts the parameters gathered at the same time."""
    import deepspeed

    count = {"now": 0, "peak": 0, "calls": 0}

    @contextlib.contextmanager
    def gathered(params, modifier_rank=None, **kwargs):
        params = list(params) if isinstance(params, (list, tuple)) else [params]
        count["now"] += len(params)
        count["calls"] += 1
        count["peak"] = max(count["peak"], count["now"])
        try:
            yield
        finally:
            count["now"] -= len(params)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gathered)
    return count


def test_zero3_export_gathers_one_module_at_a_time(tmp_path, engine, monkeypatch):
    module = engine.module
    for i, p in enumerate(module.parameters()):
        p.ds_id = i                                                     # looks partitioned to export_student
    count = _counting_gather(monkeypatch)
    tok = SimpleNamespace(save_pretrained=lambda d: None)
    checkpoint.export_student(engine, tok, str(tmp_path / "export"))
    per_module = max(len(list(m.parameters(recurse=False))) for m in module.modules())
    total = len(list(module.parameters()))
    assert total > per_module
    assert count["now"] == 0 and 1 <= count["peak"] <= per_module, (count, per_module, total)
    saved = load_file(str(tmp_path / "export" / "model.safetensors"))
    expect = {k: v for k, v in module.state_dict().items() if k in saved}
    assert set(saved) == set(expect) and len(saved) >= total - 1        # a tied head may be left out
    assert all(torch.equal(saved[k], expect[k]) for k in saved)
