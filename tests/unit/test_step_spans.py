"""The step is written once (issue 20, item 3): finer timer spans inside the real step, the planner asks the
method which forwards it keeps, and ``StepResult`` carries ``skipped`` and ``tokens`` as fields."""
from __future__ import annotations

import pytest
import torch

from promptkd.config import load_config
from promptkd.methods import METHODS
from promptkd.methods.base import KEPT_STUDENT, KEPT_TARGET, StepResult, Tally
from promptkd.metrics import PhaseTimer

# ----------------------------------------------------------------------------- PhaseTimer laps


def test_laps_are_free_and_silent_until_detail_is_on():
    timer, syncs = PhaseTimer(), []
    with timer.phase("student_step"):
        timer.lap("student/bwd")
        timer.restart()
        timer.lap("student/optimizer")
    assert set(timer.pop()) == {"student_step"}
    timer.detail(lambda: syncs.append(1))
    with timer.phase("student_step"):
        timer.lap("student/bwd")
        timer.restart()
        timer.lap("student/optimizer")
        timer.lap("student/optimizer")
    spans = timer.pop()
    assert set(spans) == {"student_step", "student/bwd", "student/optimizer"}
    assert spans["student_step"] >= spans["student/bwd"] + spans["student/optimizer"] >= 0
    assert len(syncs) == 6                                # each boundary waits for the device: 2 + 1 + 1 + 2
    timer.detail(on=False)
    timer.lap("student/bwd")
    assert timer.pop() == {} and len(syncs) == 6


# ----------------------------------------------------------------------------- StepResult fields


def test_tokens_are_a_field_that_count_tokens_sets():
    tally = Tally()
    tally.count_tokens(torch.tensor(5.0))
    tally.add("loss/x", 10.0)
    tally.mean("loss/x", "loss/x")
    r = StepResult(tally)
    assert float(r.tokens) == 5.0 and r.global_tokens() == 5.0 and r.reduce()["loss/x"] == 2.0


def test_tokens_given_to_step_result_are_the_divisor_too():
    tally = Tally()
    tally.add("loss/x", 12.0)
    tally.mean("loss/x", "loss/x")
    r = StepResult(tally, tokens=torch.tensor(4.0))
    assert r.global_tokens() == 4.0 and r.reduce() == {"tokens": 4.0, "loss/x": 3.0}


def test_a_step_that_counts_no_tokens_says_so():
    r = StepResult({"loss/x": 1.0})
    assert r.tokens is None and r.global_tokens() is None and not r.skipped


def test_the_trainer_logs_no_throughput_without_tokens(tmp_path):
    from types import SimpleNamespace

    from promptkd.training.trainer import Trainer

    rows = []

    class Logger:
        def scalars(self, step, values):
            rows.append(values)

        def text(self, *a):
            pass

    class Method:
        ctx = SimpleNamespace(engine=SimpleNamespace(get_lr=lambda: [0.0], get_global_grad_norm=lambda: None),
                              timer=PhaseTimer())
        counted = False

        def step(self, micro, step):
            return StepResult({"loss/x": 1.0}, tokens=torch.tensor(3.0) if self.counted else None)

        def shown_keys(self):
            return ["loss/x"]

    cfg = load_config(None, ["data.train_file=unused.jsonl", "logging.progress_bar=false", "logging.interval=1"])
    m = Method()
    Trainer(cfg, str(tmp_path), m, [1, 2], 1, logger=Logger()).run()
    m.counted = True
    Trainer(cfg, str(tmp_path), m, [1, 2], 1, logger=Logger()).run()
    assert "perf/tokens_per_second" not in rows[0] and rows[1]["perf/tokens_per_second"] > 0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_names_the_keys_its_progress_bar_shows(name):
    cfg = load_config(None, ["stage=plan", f"method.name={name}"])
    cls = METHODS[name]
    keys = cls.shown_keys(cls.__new__(cls)) if cls.progress_keys else None
    if keys is None:  # named from the method's settings
        m = cls.__new__(cls)
        m.ctx = type("Ctx", (), {"opts": getattr(cfg.method, cls.section)})()
        keys = m.shown_keys()
    assert keys and all(k.startswith(("loss/", "prompt/")) for k in keys), keys


# ----------------------------------------------------------------------------- kept forwards: the step and the planner


@pytest.mark.parametrize("overrides,dropout,kept", [
    ([], False, {KEPT_STUDENT}),
    ([], True, set()),
    (["method.promptkd.reuse_student_forward=false"], False, set()),
    (["method.promptkd.stale_student_target=true"], False, {KEPT_STUDENT, KEPT_TARGET}),
    (["model.teacher.prompt_length=0"], False, set()),       # no prompt step: nothing runs early
    (["method.name=rkl"], False, set()),
    (["method.name=sft"], False, set()),
])
def test_kept_forwards(overrides, dropout, kept):
    cfg = load_config(None, ["stage=plan", "method.name=promptkd", *overrides])
    assert METHODS[cfg.method.name].kept_forwards(cfg, dropout) == kept


def test_the_planner_carries_what_the_method_keeps(monkeypatch):
    from promptkd.plan import plan_config

    cfg = load_config("configs/llama-13b_to_llama-7b.yaml", ["plan.world_size=4"])  # LLaMA: no dropout
    carried = [x.term for x in plan_config(cfg).phases["student_step"] if "kept from the prompt step" in x.term]
    assert carried, "a student without dropout: the prompt step runs its forward for the student step"
    monkeypatch.setattr(METHODS["promptkd"], "kept_forwards", classmethod(lambda cls, cfg, student_dropout: frozenset()))
    plan = plan_config(cfg)
    assert not [x for x in plan.phases["student_step"] if "kept from the prompt step" in x.term]
    assert any(x.term.startswith("student activations, forward") for x in plan.phases["student_step"])
