"""The loop's small parts: the lr schedules, the step count, keep_last pruning, and the data order across a resume."""
from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch

from promptkd import distributed as dist
from promptkd.config import Config, OptimConfig
from promptkd.methods import Method, StepContext, StepResult
from promptkd.optim import lr_factor
from promptkd.training import checkpoint
from promptkd.training.builders import steps_for
from promptkd.training.trainer import MicroBatches, Trainer


# ----------------------------------------------------------------------------- lr_factor

def _opt(schedule: str, warmup: int = 0, lr: float = 1e-3, min_lr: float = 0.0) -> OptimConfig:
    return OptimConfig(lr=lr, warmup_steps=warmup, schedule=schedule, min_lr=min_lr)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_is_linear_from_one_step_to_the_peak(schedule):
    f = lr_factor(_opt(schedule, warmup=4), total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0  # the first step after warm-up is at the peak for every schedule


def test_constant_stays_at_the_peak():
    f = lr_factor(_opt("constant", warmup=2), total_steps=10)
    assert [f(s) for s in range(2, 50)] == [1.0] * 48


@pytest.mark.parametrize("min_lr", [0.0, 1e-4])
def test_linear_and_cosine_against_their_formulas(min_lr):
    lr, warmup, total = 1e-3, 4, 12
    floor = min_lr / lr
    lin, cos = (lr_factor(_opt(s, warmup, lr, min_lr), total) for s in ("linear", "cosine"))
    for s in range(warmup, total + 5):
        p = min(1.0, (s - warmup) / (total - warmup))
        assert lin(s) == pytest.approx(floor + (1 - floor) * (1 - p), abs=1e-15)
        assert cos(s) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)), abs=1e-15)
    assert lin(8) == pytest.approx(floor + (1 - floor) * 0.5) and cos(8) == pytest.approx(lin(8))  # mid-decay
    assert lin(total) == pytest.approx(floor) and cos(total + 100) == pytest.approx(floor)  # ends at min_lr


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_matches_torchs_schedulers(schedule):
    """Without warm-up, torch's LinearLR / CosineAnnealingLR(eta_min) give the same lrs."""
    lr, min_lr, total = 1e-3, 1e-4, 10
    f = lr_factor(_opt(schedule, 0, lr, min_lr), total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = (torch.optim.lr_scheduler.LinearLR(opt, 1.0, min_lr / lr, total) if schedule == "linear"
             else torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=min_lr))
    for s in range(total + 1):
        assert lr * f(s) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), s
        opt.step()
        sched.step()


# ----------------------------------------------------------------------------- steps_for

def _cfg(**train) -> Config:
    cfg = Config()
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_max_steps_wins_over_epochs():
    assert steps_for(_cfg(max_steps=7, epochs=100), 1000, 2, 1) == 7


@pytest.mark.parametrize("n,mb,ga,epochs,expected", [
    (10, 3, 2, 3, 6),    # 4 micro-batches (the last one short) -> 2 steps per epoch
    (12, 3, 2, 1, 2),    # exactly 4 micro-batches
    (10, 3, 8, 2, 2),    # fewer micro-batches than one step needs: still one step per epoch
    (1, 4, 1, 5, 5),
])
def test_steps_per_epoch(n, mb, ga, epochs, expected):
    assert steps_for(_cfg(epochs=epochs), n, mb, ga) == expected


def test_steps_for_counts_the_per_rank_shard(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    # 11 examples on 2 ranks: 6 each (padded shard), 3 micro-batches of 2, 2 steps of 2 micro-batches
    assert steps_for(_cfg(epochs=1), 11, 2, 2) == 2


@pytest.mark.parametrize("n,mb,ga", [(7, 2, 3), (16, 4, 2), (5, 8, 1), (33, 5, 4)])
def test_steps_for_agrees_with_the_loader(n, mb, ga):
    loader = MicroBatches(list(range(n)), mb, seed=0)
    assert steps_for(_cfg(epochs=3), n, mb, ga) == 3 * max(1, math.ceil(len(loader) / ga))


# ----------------------------------------------------------------------------- keep_last

class _Engine:
    """What checkpoint.save and the Trainer touch of a DeepSpeed engine."""

    skipped_steps = 0
    module = SimpleNamespace(config=SimpleNamespace(to_json_file=lambda p: open(p, "w").write("{}")))

    def save_checkpoint(self, path: str, tag: str, save_latest: bool) -> None:
        os.makedirs(os.path.join(path, tag))

    def get_lr(self) -> list[float]:
        return [0.0]

    def get_global_grad_norm(self):
        return None


def test_keep_last_deletes_old_checkpoints_and_stale_temp_dirs(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp_step_9").mkdir(parents=True)  # a save that died before its rename
    for step in range(1, 5):
        checkpoint.save(str(tmp_path), step, _Engine(), {"trainer": checkpoint.Snapshot({"step": step})}, keep_last=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_3", "step_4"]
    assert checkpoint.latest(str(tmp_path)) == str(root / "step_4")


def test_keep_last_zero_keeps_every_checkpoint_but_no_temp_dir(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp_step_2").mkdir(parents=True)
    for step in (1, 3):
        checkpoint.save(str(tmp_path), step, _Engine(), {"trainer": checkpoint.Snapshot({"step": step})}, keep_last=0)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_1", "step_3"]


# ----------------------------------------------------------------------------- epoch rollover across a resume

class _Recorder(Method):
    """Records the examples of every step, in order."""

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        self.seen: list[list[int]] = []

    def train_step(self, micro_batches, step):
        self.seen.append([ex for mb in micro_batches for ex in mb])
        return StepResult({"loss/x": 0.0})


class _Logger:
    def scalars(self, step, values):
        pass

    def text(self, step, tag, text):
        pass


def _train(tmp_path, data: list[int], steps: int, ga: int, saved: dict | None = None) -> tuple[list, dict]:
    """Train ``steps`` steps (continuing ``saved``, the checkpointed objects' states); (steps seen, states)."""
    cfg = _cfg(micro_batch_size=2, grad_accum=ga)
    cfg.output.save_interval, cfg.logging.progress_bar, cfg.seed = 0, False, 3
    method = _Recorder(StepContext(engine=_Engine(), pad_id=0, eos_id=0, vocab_size=1, total_steps=steps,
                                   sampling=None))
    trainer = Trainer(cfg, str(tmp_path), method, data, steps, logger=_Logger())
    for name, obj in trainer.checkpointed().items():  # what Trainer.restore does with a checkpoint's state.pt
        if saved is not None:
            obj.load_state_dict(copy.deepcopy(saved[name]))
    trainer.run()
    return method.seen, {name: obj.state_dict() for name, obj in trainer.checkpointed().items()}


@pytest.mark.parametrize("ga,first,where", [(3, 2, (1, 2)), (2, 2, (0, 4)), (3, 3, (2, 1))])
def test_resume_across_an_epoch_boundary_keeps_the_data_order(tmp_path, ga, first, where):
    """7 examples in micro-batches of 2: 4 micro-batches an epoch. Stop after ``first`` steps (ga=3: mid-epoch 1;
    ga=2: at the end of epoch 0; ga=3, 3 steps: mid-epoch 2), restore the loop state as a checkpoint does, and
    continue past the next epoch boundary: the steps see what the uninterrupted run saw."""
    data, total = list(range(7)), 6
    whole, end = _train(tmp_path, data, total, ga)
    head, stopped = _train(tmp_path, data, first, ga)
    assert (stopped["sampler"]["epoch"], stopped["sampler"]["batch_in_epoch"]) == where
    tail, resumed_end = _train(tmp_path, data, total, ga, stopped)
    assert head + tail == whole
    assert resumed_end["sampler"]["epoch"] > stopped["sampler"]["epoch"], "the resumed part must cross an epoch"
    assert resumed_end == end
    # each epoch sees every example, in an order of its own (the sampler is reshuffled per epoch)
    flat = [e for step in whole for e in step]
    assert flat[:7] != flat[7:14] and sorted(flat[:7]) == sorted(flat[7:14]) == data
