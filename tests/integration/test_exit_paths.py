"""Exit codes and clean-up on every way a launch ends (issue 19, item 5), through the real launcher.

- Only bad input (ConfigError, DataError) is exit 2 with one line. An internal error, such as a shape
  bug's ValueError or a full disk's OSError, keeps its traceback and exits 1.
- Every exit path (done, aborted, failed) closes the TensorBoard writer and the run's vLLM engines
  (``Run.close``) before the process ends. The launcher ends with ``os._exit``, which flushes nothing.

Each case is one single-process launch of ``launcher/main.py``, run by a small driver that first
wraps ``Run.close`` and ``MetricsLogger.close`` with spies (they append to a file) and, for the
failure cases, plants the fault: a ValueError raised at optimizer step 3 from inside the training
loop, or an OSError(ENOSPC) raised where the run is built.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import MAIN, REPO, cli_env, last_line, tail
from tests.fixtures.tiny_run import write_tiny_run

STEPS = 4
FAIL_AT = 3  # the planted ValueError fires at the start of this optimizer step

DRIVER = r"""
import errno, os, runpy, sys

spy = os.environ["SPY_FILE"]

def record(name):
    with open(spy, "a") as fh:
        fh.write(name + "\n")

from promptkd import metrics
from promptkd.training import run as run_mod, trainer

run_close, logger_close = run_mod.Run.close, metrics.MetricsLogger.close

def spy_run_close(self):
    record("run.close")
    run_close(self)

def spy_logger_close(self):
    if self._tb is not None:
        record("tensorboard.close")
    logger_close(self)

run_mod.Run.close, metrics.MetricsLogger.close = spy_run_close, spy_logger_close
mode = os.environ["PLANT"]
if mode == "valueerror":  # a bug deep in a step, e.g. two shapes that do not line up
    before_step = trainer.before_step

    def planted(fault, step, student):
        if step == int(os.environ["FAIL_AT"]):
            raise ValueError("planted: shapes (2, 5) and (3, 5) do not line up")
        return before_step(fault, step, student)

    trainer.before_step = planted
elif mode in ("oserror", "oserror_at_save", "oserror_at_export"):  # a full disk: building, saving, exporting
    from promptkd.training import checkpoint, job

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "planted: No space left on device")

    if mode == "oserror":
        job.build_run = full_disk
    elif mode == "oserror_at_save":  # output.save_interval=0: the final checkpoint is the only save
        checkpoint.save = full_disk
    else:
        trainer.Trainer.export = full_disk
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("exit_paths")
    return root, write_tiny_run(root, STEPS, save_interval=0)


def launch(root: Path, cfg: Path, name: str, plant: str, *overrides: str, fault: str = "") -> tuple:
    out, spy = root / name, root / f"{name}.spy"
    env = cli_env(SPY_FILE=str(spy), PLANT=plant, FAIL_AT=str(FAIL_AT), PROMPTKD_FAULT=fault)
    cmd = [sys.executable, "-c", DRIVER, str(MAIN), "--config", str(cfg), f"output.dir={out}", *overrides]
    proc = subprocess.run(["timeout", "300", *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    calls = spy.read_text().split() if spy.exists() else []
    shown = f"rc={proc.returncode}\n--- stderr tail\n{tail(proc.stderr, 40)}"
    return proc, out, calls, shown


def scalar_steps(run_dir: Path) -> set[int]:
    """Every step with a scalar in the run's TensorBoard event files, as a reader sees them on disk."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_internal_value_error_is_exit_1_with_traceback_and_the_run_is_closed(tiny):
    root, cfg = tiny
    # PROMPTKD_FAULT set to a step never reached: the loop then calls faults.before_step, where the bug is planted
    proc, out, calls, shown = launch(root, cfg, "valueerror", "valueerror", fault=f"raise@step={STEPS + 10}")
    assert proc.returncode == 1, shown
    assert "Traceback (most recent call last)" in proc.stderr, shown
    assert "ValueError: planted: shapes (2, 5) and (3, 5) do not line up" in proc.stderr, shown
    assert not last_line(proc.stderr).startswith("error:"), shown
    # the writer was closed on the way out, so the events of steps 1..FAIL_AT-1 are on disk
    assert calls.count("run.close") == 1 and calls.count("tensorboard.close") == 1, (calls, shown)
    assert scalar_steps(out) == set(range(1, FAIL_AT)), shown
    assert not (out / "export").exists(), shown


def test_full_disk_os_error_is_exit_1_with_traceback(tiny):
    root, cfg = tiny
    proc, out, calls, shown = launch(root, cfg, "oserror", "oserror")
    assert proc.returncode == 1, shown
    assert "Traceback (most recent call last)" in proc.stderr, shown
    assert "No space left on device" in proc.stderr, shown
    assert not last_line(proc.stderr).startswith("error:"), shown


@pytest.mark.parametrize("plant", ["oserror_at_save", "oserror_at_export"])
def test_failure_after_training_closes_the_run(tiny, plant):
    """The run's end (final checkpoint, export) fails: exit 1, and the writer and engines are closed all the same,
    with every trained step's events on disk."""
    root, cfg = tiny
    proc, out, calls, shown = launch(root, cfg, plant, plant, "train.max_steps=2")
    assert proc.returncode == 1, shown
    assert "No space left on device" in proc.stderr, shown
    assert calls.count("run.close") == 1 and calls.count("tensorboard.close") == 1, (calls, shown)
    assert scalar_steps(out) >= {1, 2}, shown
    assert not (out / "eval").exists(), shown  # nothing after the failing part ran


def test_aborted_run_exits_3_and_is_closed(tiny):
    from promptkd.training.signals import EXIT_ABORTED

    root, cfg = tiny
    # step 2's logits are NaN; one non-finite step in a row is the limit: TrainingAborted after step 2
    proc, out, calls, shown = launch(root, cfg, "aborted", "none", "train.max_bad_steps=1", fault="nan@step=2")
    assert proc.returncode == EXIT_ABORTED, shown
    assert "train.max_bad_steps" in last_line(proc.stderr), shown
    assert calls.count("run.close") == 1 and calls.count("tensorboard.close") == 1, (calls, shown)
    assert 1 in scalar_steps(out), shown


def test_finished_run_is_closed_once(tiny):
    root, cfg = tiny
    proc, out, calls, shown = launch(root, cfg, "done", "none", "train.max_steps=2")
    assert proc.returncode == 0, shown
    assert calls.count("run.close") == 1 and calls.count("tensorboard.close") == 1, (calls, shown)
    assert scalar_steps(out) >= {1, 2}, shown
