"""Reliability through the real CLI: exact resume after SIGKILL, SIGUSR1, rank failure, NaN steps.

Every run is a real launch (torchrun, 2 gloo ranks, or a single process).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.fixtures.cli import cli_env  # noqa: E402
from tests.fixtures.parallel import Launch, run_side_by_side  # noqa: E402
from tests.fixtures.tiny_run import write_tiny_run  # noqa: E402
from promptkd.training import checkpoint  # noqa: E402
from promptkd.training.signals import EXIT_PREEMPTED  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return root, write_tiny_run(root, STEPS, save_interval=1)


def env(**extra: str) -> dict:
    return cli_env(**extra)


def torchrun(cfg, *overrides: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            os.path.join(REPO, "launcher", "main.py"), "--config", str(cfg), *overrides]


def single(cfg, *overrides: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "launcher", "main.py"), "--config", str(cfg), *overrides]


def run(cmd: list[str], timeout: int = 300, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def final_weights(out) -> dict[str, torch.Tensor]:
    w = load_file(os.path.join(out, "export", "model.safetensors"))
    w.update({"prompt": load_file(os.path.join(out, "export", "teacher_prompt", "teacher_prompt.safetensors"))["prompt"]})
    return w


def tb_scalars(out, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


KILLED = "Signal 9 (SIGKILL) received"  # torchrun's report of a rank that died by SIGKILL


def killed_at(proc: subprocess.CompletedProcess, out, last_complete: int) -> None:
    """The launch died by SIGKILL, and its newest complete checkpoint is ``last_complete`` (< STEPS)."""
    from promptkd.training import checkpoint

    assert proc.returncode != 0 and KILLED in proc.stderr, proc.stderr[-3000:]
    assert checkpoint.latest(str(out)) == str(out / "checkpoints" / f"step_{last_complete}")
    assert last_complete < STEPS and not os.path.exists(out / "export")


# (DeepSpeed JSON, the fault, the newest complete checkpoint it leaves, the torn temp dir it leaves): each ZeRO
# stage's checkpoint layout survives one kind of kill
#  - ZeRO-2: rank 1 SIGKILLs itself at the start of step 3; the launcher takes rank 0 down;
#  - ZeRO-3: every rank dies while saving step 3, before its COMPLETE marker: a torn checkpoint.
KILLS = {
    "zero2": ("sigkill@step=3,rank=1", 2, None),
    "zero3_tiny_test": ("sigkill_in_save@step=3", 2, ".tmp_step_3"),
}


@pytest.mark.parametrize("ds", list(KILLS))
def test_resume_after_sigkill_is_bitwise_exact(setup, ds):
    root, cfg = setup
    fault, last_complete, torn_name = KILLS[ds]
    common = (f"deepspeed=ds_configs/{ds}.json",)
    full, killed = root / f"full_{ds}", root / f"killed_{ds}"
    # 1) the uninterrupted run and the killed one, independent: side by side
    procs = run_side_by_side({
        "full": Launch(torchrun(cfg, *common, f"output.dir={full}")),
        "killed": Launch(torchrun(cfg, *common, f"output.dir={killed}"), env=env(PROMPTKD_FAULT=fault)),
    })
    ok(procs["full"])
    killed_at(procs["killed"], killed, last_complete)
    if torn_name:
        torn = killed / "checkpoints" / torn_name
        assert torn.is_dir() and not (torn / "COMPLETE").exists()
    reference = final_weights(full)
    # 2) resume to the end; beside it, the offline consolidation of the full run's last checkpoint
    procs = run_side_by_side({
        "consolidate": Launch([sys.executable, "-m", "promptkd.consolidate", str(full / "checkpoints" / f"step_{STEPS}"),
                               str(full / "consolidated")], timeout_s=120),
        "done": Launch(torchrun(cfg, *common, f"output.dir={killed}", "output.resume=auto")),
    })
    check_offline_consolidation(procs["consolidate"], full / "consolidated", reference)
    done = procs["done"]
    ok(done)
    assert f"resumed from {killed}/checkpoints/step_{last_complete}" in done.stderr
    assert not list((killed / "checkpoints").glob(".tmp_*")), "a torn checkpoint's temp dir survived the next save"
    resumed = final_weights(killed)
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after resume"
    # TensorBoard continues at the right step: each step once, with the uninterrupted run's values
    full_rkl, resumed_rkl = tb_scalars(full, "loss/rkl"), tb_scalars(killed, "loss/rkl")
    assert [s for s, _ in resumed_rkl] == list(range(1, STEPS + 1))
    assert resumed_rkl == full_rkl


def check_offline_consolidation(proc: subprocess.CompletedProcess, target, reference: dict) -> None:
    """`python -m promptkd.consolidate` rebuilt the exported student from the last checkpoint alone."""
    ok(proc)
    merged = load_file(str(target / "model.safetensors"))
    merged["prompt"] = load_file(str(target / "teacher_prompt" / "teacher_prompt.safetensors"))["prompt"]
    assert merged.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor.float(), merged[name].float()), name
    assert (target / "tokenizer.json").exists()


def test_torn_checkpoint_is_skipped(setup, tmp_path):
    from promptkd.training import checkpoint

    ckpts = tmp_path / "checkpoints"
    for name, complete in (("step_2", True), ("step_4", False), (".tmp_step_5", False)):
        (ckpts / name).mkdir(parents=True)
        if complete:
            (ckpts / name / checkpoint.MARKER).write_text("2\n")
    assert checkpoint.latest(str(tmp_path)) == str(ckpts / "step_2")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.load(str(ckpts / "step_4"), engine=None)


def test_sigusr1_checkpoints_exits_and_resumes(setup):
    root, cfg = setup
    out = root / "sigusr1"
    steps = 400
    proc = subprocess.Popen(single(cfg, f"output.dir={out}", f"train.max_steps={steps}", "output.save_interval=0"),
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    latest = os.path.basename(checkpoint.latest(str(out)))
    stopped_at = int(latest.split("_")[1])
    assert 2 <= stopped_at < steps
    assert not (out / "export").exists()
    done = run(single(cfg, f"output.dir={out}", f"train.max_steps={stopped_at + 2}", "output.save_interval=0",
                      "output.resume=auto"))
    ok(done)
    assert f"resumed from {out}/checkpoints/{latest}" in done.stderr
    steps_logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps_logged == list(range(1, stopped_at + 3))


def test_a_failing_rank_ends_every_rank_quickly(setup):
    """Rank 1 raises at step 2: rank 0, in the step's next collective, fails on the lost connection to its peer and
    ends, rather than waiting out the collective's timeout. (The 120 s limit only catches a hang; how long the
    launch took is not asserted.)"""
    root, cfg = setup
    proc = run(torchrun(cfg, f"output.dir={root / 'raise'}", "train.max_steps=50"), timeout=120,
               PROMPTKD_FAULT="raise@step=2,rank=1")
    assert proc.returncode != 0
    assert "injected fault on rank 1 at step 2" in proc.stderr
    # rank 0's own error from gloo's TCP transport: the peer is gone (closed, reset or a broken pipe)
    assert "gloo/transport/tcp/pair.cc" in proc.stderr, proc.stderr[-3000:]
    leftovers = subprocess.run(["pgrep", "-f", str(root / "raise")], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", "a rank survived"


def _model_states(ckpt) -> dict[str, torch.Tensor]:
    states = torch.load(os.path.join(ckpt, "ds", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    method = checkpoint.read_state(ckpt)["method"]
    prompt = method.get("prompt")  # the SoftPrompt's state, kept in the method's state
    return {**states, "prompt": prompt["prompt"]["prompt"]} if prompt else dict(states)


NAN_LAUNCHES = ("zero2_2ranks", "sft_zero2_2ranks", "zero0_single")


@pytest.fixture(scope="module")
def nan_runs(setup) -> dict[str, subprocess.CompletedProcess]:
    """The three NaN-step launches, independent of each other: side by side."""
    root, cfg = setup
    launches = {}
    for launch in NAN_LAUNCHES:
        out = root / f"nan_{launch}"
        if launch.endswith("2ranks"):
            method = "sft" if launch.startswith("sft") else "promptkd"
            cmd = torchrun(cfg, f"output.dir={out}", "train.max_steps=4", "deepspeed=ds_configs/zero2.json",
                           f"method.name={method}")
            fault = "nan@step=2,rank=1"
        else:
            cmd = single(cfg, f"output.dir={out}", "train.max_steps=4", "deepspeed=ds_configs/zero0.json")
            fault = "nan@step=2"
        launches[launch] = Launch(cmd, env=env(PROMPTKD_FAULT=fault))
    return run_side_by_side(launches, at_once=len(launches))


@pytest.mark.parametrize("launch", NAN_LAUNCHES)
def test_nan_step_is_skipped_on_every_rank(setup, nan_runs, launch):
    """The NaN appears on one rank only (2-rank cases); both must skip the update."""
    root, _ = setup
    out = root / f"nan_{launch}"
    ok(nan_runs[launch])
    ck = out / "checkpoints"
    s1, s2, s3 = (_model_states(ck / f"step_{i}") for i in (1, 2, 3))
    assert all(torch.equal(s1[k], s2[k]) for k in s1), "the NaN step changed the weights"
    assert any(not torch.equal(s2[k], s3[k]) for k in s2), "training should go on after the skipped step"
    logged = {json.loads(line)["step"]: json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train/skipped_steps" in line}
    assert logged[1]["train/skipped_steps"] == 0 and logged[2]["train/skipped_steps"] == 1
    assert logged[4]["train/skipped_steps"] == 1


# Consecutive NaN steps abort the run (exit 3, the last line names train.max_bad_steps): the same launch
# (nan@step=2, train.max_bad_steps=1, one process) is tests/integration/test_exit_paths.py::
# test_aborted_run_exits_3_and_is_closed, which checks that and that the run is closed.
