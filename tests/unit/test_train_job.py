"""The run owns its end (issue 20, item 4): ``TrainJob`` loads, trains, evaluates dev, saves, exports and
evaluates test in that order, and closes the writer and the engines on every exit path; the checkpointed
objects save and load themselves; every stage, plan included, goes through ``STAGES``."""
from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch

from promptkd.training import checkpoint, job
from promptkd.training.signals import Preempted, TrainingAborted
from promptkd.training.trainer import LoopState, MicroBatches

# ----------------------------------------------------------------------------- order and closing, with stand-ins


class _Planted(Exception):
    pass


class _Trainer:
    def __init__(self, calls: list, fail: str, scored_last: bool):
        self.calls, self.fail = calls, fail
        self.state = LoopState(step=0)
        self.scored_last = scored_last
        self.logger = types.SimpleNamespace(close=lambda: calls.append("logger.close"),
                                            scalars=lambda step, values: calls.append("test_eval.log"))

    def _do(self, name: str) -> None:
        self.calls.append(name)
        if self.fail == name:
            raise {"train": Preempted, "dev_eval": TrainingAborted}.get(name, _Planted)(f"planted at {name}")

    def restore(self, path: str) -> None:
        self._do("restore")

    def run(self) -> LoopState:
        self._do("train")
        self.state.step = 4
        if self.scored_last:
            self.state.history.append({"step": 4, "rougeL": 7.0})
        return self.state

    def run_dev_eval(self) -> float:
        self._do("dev_eval")
        self.state.history.append({"step": self.state.step, "rougeL": 5.0})
        return 5.0

    def save(self) -> str:
        self._do("save")
        return "ckpt"

    def export(self, out_dir: str) -> None:
        self._do("export")


def _fake_build(calls: list, fail: str = "", scored_last: bool = False, close_fails: bool = False):
    def build_run(cfg, **kwargs):
        calls.append("build")
        if fail == "build":
            raise _Planted("planted at build")

        def close():
            calls.append("run.close")
            if close_fails:
                raise RuntimeError("closing failed too")

        splits = types.SimpleNamespace(train=[1], dev=[1], test=[1])
        return types.SimpleNamespace(trainer=_Trainer(calls, fail, scored_last), splits=splits, eval_sets={},
                                     eval_info={}, total_steps=4, ds_config={}, close=close,
                                     student_decoder=lambda: None, tokenizer=None)

    return build_run


@pytest.fixture
def cfg(tmp_path):
    from promptkd.config import load_config

    return load_config(None, ["data.train_file=unused.jsonl", f"output.dir={tmp_path}", "data.test_file=t.jsonl"])


@pytest.fixture
def planted(monkeypatch, tmp_path):
    """Run ``job.train`` on stand-ins that record every call (and fail where asked)."""

    def go(cfg, fail: str = "", resume: str = "", **kwargs) -> list:
        calls: list = []
        monkeypatch.setattr(job, "build_run", _fake_build(calls, fail, **kwargs))
        monkeypatch.setattr(job, "resume_path", lambda c: resume or None)

        def evaluate_sets(*args):
            calls.append("test_eval")
            if fail == "test_eval":
                raise _Planted("planted at test_eval")
            return {"test": {"rougeL": 1.0}}

        monkeypatch.setattr(job, "evaluate_sets", evaluate_sets)
        monkeypatch.setattr(job, "write_results", lambda *a: {})
        monkeypatch.setattr(job, "scalars", lambda report: {})
        try:
            job.train(cfg)
        except (_Planted, Preempted, TrainingAborted, RuntimeError) as exc:
            calls.append(f"raised {type(exc).__name__}: {exc}")
        return calls

    return go


END = ["logger.close", "run.close"]


def test_the_run_ends_in_order_and_closes(cfg, planted):
    calls = planted(cfg, resume="ckpt")
    # the last dev evaluation comes before the final checkpoint: best/ is never newer than the checkpoint
    assert calls == ["build", "restore", "train", "dev_eval", "save", "export", "test_eval", "test_eval.log", *END]


def test_a_step_the_loop_scored_is_not_evaluated_again(cfg, planted):
    assert "dev_eval" not in planted(cfg, scored_last=True)


@pytest.mark.parametrize("where", ["restore", "train", "dev_eval", "save", "export", "test_eval"])
def test_every_exit_path_closes_the_writer_and_the_engines_once(cfg, planted, where):
    calls = planted(cfg, fail=where, resume="ckpt")
    assert calls[-1].startswith("raised") and f"planted at {where}" in calls[-1], calls
    assert calls[-3:-1] == END, calls                     # closed, after the failing part and nothing else
    assert calls.index(where) == len(calls) - 4, calls    # nothing of the run ran after the failure


def test_a_failure_while_building_has_nothing_to_close(cfg, planted):
    calls = planted(cfg, fail="build")
    assert calls == ["build", "raised _Planted: planted at build"]


def test_a_closing_error_does_not_hide_the_failure(cfg, planted):
    calls = planted(cfg, fail="save", close_fails=True)
    assert calls[-1] == "raised _Planted: planted at save", calls


def test_a_closing_error_of_a_finished_run_is_raised(cfg, planted):
    calls = planted(cfg, close_fails=True)
    assert calls[-1] == "raised RuntimeError: closing failed too", calls


# ----------------------------------------------------------------------------- Stateful objects


def test_loop_state_round_trips_and_refuses_unknown_keys():
    a = LoopState(step=7, best_dev=3.5, history=[{"step": 5, "rougeL": 3.5}], skipped_steps=1)
    b = LoopState()
    b.load_state_dict(a.state_dict())
    assert b == a
    a.history.append({"step": 6})
    assert len(b.history) == 1                            # a copy, not the same list
    with pytest.raises(TypeError):
        b.load_state_dict({"step": 1, "no_such_field": 2})


def test_the_sampler_owns_its_position_and_resumes_it():
    data = list(range(7))
    whole = MicroBatches(data, 2, seed=3)
    stream = iter(whole)
    first = [next(stream) for _ in range(5)]              # into the second epoch (4 micro-batches an epoch)
    saved = whole.state_dict()
    assert saved == {"epoch": 1, "batch_in_epoch": 1}
    rest = [next(stream) for _ in range(4)]
    resumed = MicroBatches(data, 2, seed=3)
    resumed.load_state_dict(saved)
    again = iter(resumed)
    assert [next(again) for _ in range(4)] == rest and first


def test_rank_state_round_trips(monkeypatch):
    monkeypatch.setattr(checkpoint, "_accelerator", lambda: None)  # the CPU's RNG is torch's
    gen = torch.Generator(device="cpu").manual_seed(1)
    rng, g = checkpoint.ProcessRNG(), checkpoint.GeneratorState(gen)
    saved = {"rng": rng.state_dict(), "generator": g.state_dict()}
    expect = (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=gen)))
    rng.load_state_dict(saved["rng"])
    g.load_state_dict(saved["generator"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=gen))) \
        == expect
    g.load_state_dict(gen.get_state())                    # an older rank file held the bare tensor


class _Engine:
    module = types.SimpleNamespace(config=types.SimpleNamespace(to_json_file=lambda p: open(p, "w").write("{}")))

    def save_checkpoint(self, path, tag, save_latest):
        pass

    def load_checkpoint(self, path, tag):
        pass


def test_checkpoint_saves_and_loads_every_registered_object(tmp_path):
    loop, sampler, method = LoopState(step=3, skipped_steps=2), MicroBatches(list(range(5)), 2, 0), \
        checkpoint.Snapshot({"prompt": torch.ones(2)})
    sampler.load_state_dict({"epoch": 2, "batch_in_epoch": 1})
    path = checkpoint.save(str(tmp_path), 3, _Engine(), {"trainer": loop, "method": method, "sampler": sampler}, {})
    assert sorted(checkpoint.read_state(path)) == ["method", "sampler", "trainer"]
    assert not (tmp_path / "checkpoints" / "latest").exists()
    loop2, sampler2, method2 = LoopState(), MicroBatches(list(range(5)), 2, 0), checkpoint.Snapshot()
    checkpoint.load(path, _Engine(), {"trainer": loop2, "method": method2, "sampler": sampler2}, {})
    assert loop2 == loop and sampler2.state_dict() == {"epoch": 2, "batch_in_epoch": 1}
    assert torch.equal(method2.state["prompt"], torch.ones(2))


def test_an_older_layout_is_read_into_the_objects(tmp_path):
    """Before the objects saved themselves, "trainer" held the data position and the method's state."""
    path = checkpoint.save(str(tmp_path), 2, _Engine(), {"trainer": checkpoint.Snapshot(
        {"step": 2, "epoch": 1, "batch_in_epoch": 3, "method": {"phi": 0.5}})}, {})
    loop, sampler, method = LoopState(), MicroBatches(list(range(9)), 2, 0), checkpoint.Snapshot()
    checkpoint.load(path, _Engine(), {"trainer": loop, "method": method, "sampler": sampler}, {})
    assert loop.step == 2 and sampler.state_dict() == {"epoch": 1, "batch_in_epoch": 3}
    assert method.state == {"phi": 0.5}


# ----------------------------------------------------------------------------- one dispatch


def test_every_stage_the_config_accepts_is_dispatched_by_stages():
    from promptkd.config.schema import Config
    from promptkd.stages import STAGES

    import dataclasses

    choices = next(f for f in dataclasses.fields(Config) if f.name == "stage").metadata.get("choices")
    assert choices is not None and set(STAGES) == set(choices)
    assert [name for name, s in STAGES.items() if not s.distributed] == ["plan"]


def test_the_launcher_runs_plan_through_stages(monkeypatch, capsys):
    import launcher.main as main
    from promptkd import stages

    seen = []
    monkeypatch.setitem(stages.STAGES, "plan", stages.Stage(lambda cfg, path: seen.append((cfg.stage, path)),
                                                            distributed=False, takes_path=True))
    assert main.main(["stage=plan", "data.train_file=unused.jsonl"]) == 0
    assert seen == [("plan", main.DEFAULT_CONFIG)]


def test_every_rank_takes_the_state_dicts_a_collective_one_included(tmp_path, monkeypatch):
    """DistiLLM's state_dict gathers every rank's buffer: a rank that is not rank 0 must call it too (it then
    writes only its own rank file)."""
    calls = []

    class Collective:
        def state_dict(self):
            calls.append("state_dict")
            return {}

        def load_state_dict(self, state):
            pass

    monkeypatch.setattr(checkpoint.dist, "is_main", lambda: False)
    monkeypatch.setattr(checkpoint.dist, "rank", lambda: 1)
    (tmp_path / "checkpoints" / ".tmp_step_1").mkdir(parents=True)   # rank 0 made it
    checkpoint.save(str(tmp_path), 1, _Engine(), {"method": Collective()}, {})
    assert calls == ["state_dict"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / ".tmp_step_1").iterdir()) == ["rank_1.pt"]


# ----------------------------------------------------------------------------- the step context and the vLLM engine


def test_the_step_context_is_immutable_and_takes_the_vllm_engine_at_construction(cfg):
    import dataclasses

    from promptkd.methods import step_context

    engine = object()
    ctx = step_context(cfg, None, None, pad_id=0, eos_id=1, vocab_size=8, total_steps=3, vllm=engine)
    assert ctx.vllm is engine
    for name, value in (("vllm", None), ("teacher", object()), ("sampling", None), ("timer", None)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(ctx, name, value)
    assert ctx.vllm is engine
    other = dataclasses.replace(ctx, vllm=None)      # a variant is a new context; the timer is the same object
    assert other.vllm is None and ctx.vllm is engine and other.timer is ctx.timer


class _Rollouts:
    """Stands in for ``VLLMRollouts``: records its closing."""

    def __init__(self, calls: list):
        self.calls = calls

    def close(self) -> None:
        self.calls.append("vllm.close")


class _BuiltTrainer:
    logger = None

    def __init__(self, calls: list, fail: str, *args, **kwargs):
        self.calls, self.fail = calls, fail
        if fail == "trainer":
            raise _Planted("planted at trainer")

    def run(self):
        self.calls.append("train")
        if self.fail == "train":
            raise _Planted("planted at train")


@pytest.fixture
def built(monkeypatch, cfg):
    """The real ``build_run`` (and ``Run``) with its heavy parts stood in, under rollout.engine=vllm."""
    from promptkd.config import with_overrides
    from promptkd.training import run as R
    from promptkd.training.builders import Splits

    calls: list = []
    import dataclasses

    # vLLM is not installed here (config validation would refuse the engine): the stand-in plays it
    cfg = with_overrides(cfg, {"method.name": "imitkd"})
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine="vllm"))

    def go(fail: str = "", method_close_fails: bool = False):
        def build_method(cfg, ctx):
            calls.append("method")
            if fail == "method":
                raise _Planted("planted at method")

            def close():
                calls.append("method.close")
                if method_close_fails:
                    raise RuntimeError("method closing failed")

            return types.SimpleNamespace(ctx=ctx, close=close)

        tok = types.SimpleNamespace(pad_token_id=0, eos_token_id=1)
        parts = {"load_raw_splits": lambda cfg: ([], [], []), "example_texts": lambda raw: [],
                 "build_tokenizer": lambda cfg, run_dir, texts: tok, "check_teacher_tokenizer": lambda *a: None,
                 "tokenize_splits": lambda cfg, tok, raw: Splits(train=[1], dev=[], test=[]),
                 "load_teacher": lambda spec, tok: calls.append("teacher") or types.SimpleNamespace(base=None),
                 "build_student_engine": lambda cfg, tok, total: (types.SimpleNamespace(module=None), {}),
                 "check_fused_heads": lambda *models: None,  # the stand-in engine and teacher have no heads
                 "vocab_size": lambda *a: 8, "eos_for": lambda *a: 1, "build_method": build_method,
                 "vllm_rollouts": lambda *a: calls.append("vllm") or _Rollouts(calls),
                 "write_config": lambda cfg, run_dir: calls.append("config.yaml"),
                 "Trainer": lambda *a, **kw: _BuiltTrainer(calls, fail, *a, **kw)}
        for name, fn in parts.items():
            monkeypatch.setattr(R, name, fn)
        return calls

    return cfg, go


def test_the_vllm_engine_is_built_before_the_context_and_owned_by_the_run(built):
    from promptkd.training.run import build_run

    cfg, go = built
    calls = go()
    run = build_run(cfg)
    assert calls == ["teacher", "vllm", "method", "config.yaml"]
    assert run.method.ctx.vllm is run.rollouts is not None     # the context got it when it was made
    run.close()
    run.close()                                                 # closing twice closes once
    assert calls[-2:] == ["method.close", "vllm.close"] and calls.count("vllm.close") == 1


@pytest.mark.parametrize("where", ["method", "trainer"])
def test_a_failure_after_the_vllm_engine_started_closes_it(built, where):
    from promptkd.training.run import build_run

    cfg, go = built
    calls = go(fail=where)
    with pytest.raises(_Planted):
        build_run(cfg)
    assert calls[-1] == "vllm.close" and calls.count("vllm.close") == 1, calls


def test_the_vllm_engine_is_closed_when_the_methods_closing_fails(built):
    from promptkd.training.run import build_run

    cfg, go = built
    calls = go(method_close_fails=True)
    run = build_run(cfg)
    with pytest.raises(RuntimeError, match="method closing failed"):
        run.close()
    assert calls[-2:] == ["method.close", "vllm.close"]


def test_a_training_failure_closes_the_vllm_engine_through_the_job(built, monkeypatch):
    cfg, go = built
    calls = go(fail="train")
    monkeypatch.setattr(job, "resume_path", lambda c: None)
    with pytest.raises(_Planted, match="planted at train"):
        job.train(cfg)                                          # the real build_run and Run, through TrainJob
    assert calls[-3:] == ["train", "method.close", "vllm.close"], calls
