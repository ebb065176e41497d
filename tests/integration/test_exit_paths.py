"""Exit codes and clean-up on every way a launch ends (issue 19, item 5), through the real launcher.

- Only bad input (ConfigError, DataError) is exit 2 with one line. An internal error, such as a shape
  bug's ValueError or a full disk's OSError, keeps its traceback and exits 1.
- Every exit path (done, aborted, failed) closes the TensorBoard writer and the run's vLLM engines
  (``Run.close``) before the process ends. The launcher ends with ``os._exit``, which flushes nothing.

Each case is one single-process launch of ``launcher/main.py``, run by a small driver that first
wraps ``Run.close`` and ``MetricsLogger.close`` with spies (they append to a file) and, for the
failure cases, plants the fault: a ValueError raised at optimizer step 3 from inside the training
loop, or an OSError(ENOSPC) raised where the run is built. The six launches are independent: one
module fixture starts them side by side (tests/fixtures/parallel.py), and each test reads its own.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import MAIN, cli_env, last_line, tail
from tests.fixtures.parallel import Launch, run_side_by_side
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


# name -> (what the driver plants, overrides, PROMPTKD_FAULT): every launch of this module
CASES = {
    # PROMPTKD_FAULT set to a step never reached: the loop then calls faults.before_step, where the bug is planted
    "valueerror": ("valueerror", (), f"raise@step={STEPS + 10}"),
    "oserror": ("oserror", (), ""),
    "oserror_at_save": ("oserror_at_save", ("train.max_steps=2",), ""),
    "oserror_at_export": ("oserror_at_export", ("train.max_steps=2",), ""),
    # step 2's logits are NaN; one non-finite step in a row is the limit: TrainingAborted after step 2
    "aborted": ("none", ("train.max_bad_steps=1",), "nan@step=2"),
    "done": ("none", ("train.max_steps=2",), ""),
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, tuple]:
    """Every case's launch, side by side (independent one-process runs): name -> (proc, out, calls, shown)."""
    root = tmp_path_factory.mktemp("exit_paths")
    cfg = write_tiny_run(root, STEPS, save_interval=0)
    launches = {}
    for name, (plant, overrides, fault) in CASES.items():
        env = cli_env(SPY_FILE=str(root / f"{name}.spy"), PLANT=plant, FAIL_AT=str(FAIL_AT), PROMPTKD_FAULT=fault)
        launches[name] = Launch([sys.executable, "-c", DRIVER, str(MAIN), "--config", str(cfg),
                                 f"output.dir={root / name}", *overrides], env=env)
    procs = run_side_by_side(launches)
    results = {}
    for name, proc in procs.items():
        spy = root / f"{name}.spy"
        calls = spy.read_text().split() if spy.exists() else []
        results[name] = (proc, root / name, calls, f"rc={proc.returncode}\n--- stderr tail\n{tail(proc.stderr, 40)}")
    return results


def scalar_steps(run_dir: Path) -> set[int]:
    """Every step with a scalar in the run's TensorBoard event files, as a reader sees them on disk."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_internal_value_error_is_exit_1_with_traceback_and_the_run_is_closed(launched):
    proc, out, calls, shown = launched["valueerror"]
    assert proc.returncode == 1, shown
    assert "Traceback (most recent call last)" in proc.stderr, shown
    assert "ValueError: planted: shapes (2, 5) and (3, 5) do not line up" in proc.stderr, shown
    assert not last_line(proc.stderr).startswith("error:"), shown
    # the writer was closed on the way out, so the events of steps 1..FAIL_AT-1 are on disk
    assert calls.count("run.close") == 1 and calls.count("tensorboard.close") == 1, (calls, shown)
    assert scalar_steps(out) == set(range(1, FAIL_AT)), shown
    assert not (out / "export").exists(), shown


def test_full_disk_os_error_is_exit_1_with_traceback(launched):
    proc, out, calls, shown = launched["oserror"]
    assert proc.returncode == 1, shown
    assert "Traceback (most recent call last)" in proc.stderr, shown
    assert "No space left on device" in proc.stderr, shown
    assert not last_line(proc.stderr).startswith("error:"), shown


@pytest.mark.parametrize("plant", ["oserror_at_save", "oserror_at_export"])
def test_failure_after_training_closes_the_run(launched, plant):
    """The run's end (final checkpoint, export) fails: exit 1, and the writer and engines are closed all the same,
    with every trained step's events on disk."""
    proc, out, calls, shown = launched[plant]
    assert proc.returncode == 1, shown
    assert "No space left on device" in proc.stderr, shown
    assert calls.count("run.close") == 1 and calls.count("tensorboard.close") == 1, (calls, shown)
    assert scalar_steps(out) >= {1, 2}, shown
    assert not (out / "eval").exists(), shown  # nothing after the failing part ran


def test_aborted_run_exits_3_and_is_closed(launched):
    from promptkd.training.signals import EXIT_ABORTED

    proc, out, calls, shown = launched["aborted"]
    assert proc.returncode == EXIT_ABORTED, shown
    assert "train.max_bad_steps" in last_line(proc.stderr), shown
    assert calls.count("run.close") == 1 and calls.count("tensorboard.close") == 1, (calls, shown)
    assert 1 in scalar_steps(out), shown


def test_finished_run_is_closed_once(launched):
    proc, out, calls, shown = launched["done"]
    assert proc.returncode == 0, shown
    assert calls.count("run.close") == 1 and calls.count("tensorboard.close") == 1, (calls, shown)
    assert scalar_steps(out) >= {1, 2}, shown
