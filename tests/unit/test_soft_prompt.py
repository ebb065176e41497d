"""The one owner of the soft prompt (SoftPrompt) and the one rule for skipped steps (Method.step)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from promptkd.config import OptimConfig
from promptkd.methods.base import Method, StepResult
from promptkd.methods.soft_prompt import SoftPrompt
from promptkd.models import PromptedTeacher, build_tiny


def _prompt(lr: float = 0.1, warmup: int = 0, clip: float = 1.0) -> SoftPrompt:
    torch.manual_seed(0)
    teacher = PromptedTeacher(build_tiny("llama", 1, 16, 2, vocab_size=40), prompt_length=3, init="random",
                              dtype=torch.float32)
    return SoftPrompt(teacher, OptimConfig(lr=lr, warmup_steps=warmup, weight_decay=0.0), 10, clip, "tiny")


def _grad(prompt: SoftPrompt, value: float) -> None:
    prompt.teacher.prompt.grad = torch.full_like(prompt.teacher.prompt, value)


def test_step_clips_steps_and_schedules():
    p = _prompt(lr=0.1, warmup=2, clip=1.0)
    before = p.teacher.prompt.detach().clone()
    assert p.lr == 0.05                                  # warm-up step 1 of 2
    _grad(p, 2.0)
    norm = p.step()
    assert norm == torch.full((3, 16), 2.0).norm().item()  # the norm before clipping
    assert p.teacher.prompt.grad is None                 # zeroed for the next step
    assert not torch.equal(before, p.teacher.prompt)
    assert p.lr == 0.1                                   # the schedule moved on


def test_non_finite_gradient_changes_nothing():
    p = _prompt()
    before, lr = p.teacher.prompt.detach().clone(), p.lr
    _grad(p, float("nan"))
    norm = p.step()                                      # NaN norm: no update, no schedule step
    assert norm != norm
    assert torch.equal(before, p.teacher.prompt) and p.lr == lr
    assert not p.optimizer.state                         # Adam never stepped


def test_snapshot_and_state_dict_restore_exactly(tmp_path):
    p = _prompt()
    _grad(p, 1.0)
    p.step()
    snap, snap_for_q = p.snapshot(), p.snapshot()   # (optimizer state loaded back is shared, not copied)
    after_one = p.teacher.prompt.detach().clone()
    _grad(p, -3.0)
    p.step()
    assert not torch.equal(after_one, p.teacher.prompt)
    p.load_state_dict(snap)                              # undo the second step: prompt, Adam moments, schedule
    assert torch.equal(after_one, p.teacher.prompt)
    _grad(p, -3.0)
    p.step()
    again = p.teacher.prompt.detach().clone()
    q = _prompt()
    q.load_state_dict(snap_for_q)
    _grad(q, -3.0)
    q.step()
    assert torch.equal(again, q.teacher.prompt)          # a restored owner continues bitwise the same
    p.export(str(tmp_path))
    assert torch.equal(load_file(str(tmp_path / "teacher_prompt" / "teacher_prompt.safetensors"))["prompt"], again)


class _Toy(Method):
    """Records what the rule does; ``bad`` says whether its own gradient was not finite."""

    def __init__(self, engine, bad=False, student_skips=False):
        super().__init__(SimpleNamespace(engine=engine))
        self.bad, self.student_skips, self.value, self.undone = bad, student_skips, 0, []

    def snapshot(self):
        return {"value": self.value}

    def undo(self, snapshot):
        self.undone.append(snapshot)
        self.value = snapshot["value"]

    def train_step(self, micro_batches, step):
        self.value += 1
        if self.student_skips:
            self.ctx.engine.skipped_steps += 1
        return StepResult({"x": 1.0}, skipped=self.bad)


def test_one_rule_for_skipped_steps():
    engine = SimpleNamespace(skipped_steps=0)
    ok = _Toy(engine)
    assert not ok.step([], 0).skipped and ok.value == 1 and not ok.undone
    own = _Toy(engine, bad=True)                         # the method's own gradient (e.g. the prompt's)
    assert own.step([], 0).skipped and own.value == 0 and own.undone == [{"value": 0}]
    student = _Toy(engine, student_skips=True)           # the engine dropped the student's update
    assert student.step([], 0).skipped and student.value == 0
