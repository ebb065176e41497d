"""stage=train from start to end: one object loads, trains, finishes and closes the run.

The shape is torchtitan's ``train.py``: build, train, close in ``finally``. ``TrainJob.run`` does, in this order:
load (build the run; restore the checkpoint ``output.resume`` names), train (the loop), the last dev evaluation,
the final checkpoint, the export and the test evaluation. The last dev evaluation comes before the final
checkpoint, so ``best/`` is never rewritten after it, and the checkpoint's loop state (its dev history, its best
score) holds that evaluation: resuming a finished run does not evaluate again. ``close`` shuts the metrics
writer and the vLLM engines on every exit path: done, preempted, aborted or failed.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Optional

import numpy as np
import torch

from promptkd import distributed as dist
from promptkd.config import Config, ConfigError, zero_stage
from promptkd.evaluation import evaluate_sets, scalars, write_results
from promptkd.training import checkpoint
from promptkd.training.run import Run, build_run

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch's global RNGs from the run's seed (before anything is built)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_path(cfg: Config) -> Optional[str]:
    """The complete checkpoint ``output.resume`` names (auto: the newest in ``output.dir``), or None."""
    if not cfg.output.resume:
        return None
    path = checkpoint.latest(cfg.output.dir) if cfg.output.resume == "auto" else cfg.output.resume
    if path is None:
        log.info("resume=auto: no complete checkpoint in %s, starting fresh", cfg.output.dir)
        return None
    if not os.path.isdir(path):
        raise ConfigError(f"output.resume: no checkpoint at {path}")
    if not os.path.exists(os.path.join(path, checkpoint.MARKER)):
        raise ConfigError(f"output.resume: {path} is not a complete checkpoint (no {checkpoint.MARKER} marker)")
    return path


class TrainJob:
    """One training run's life: ``run`` (load, train, finish) and ``close``; ``train(cfg)`` pairs them."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_: Optional[Run] = None
        self.summary: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        self.load()
        self.train()
        self.finish()
        return self.summary

    def load(self) -> None:
        """Build the run and, when resuming, restore every checkpointed object before the first step."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        path = resume_path(cfg)
        self.run_ = build_run(cfg)
        if path is not None:
            self.run_.trainer.restore(path)

    def train(self) -> None:
        run, cfg = self.run_, self.cfg
        splits = run.splits
        log.info("%s: %d train / %d dev / %d test examples, %d optimizer steps, world size %d, ZeRO-%d",
                 cfg.method.name, len(splits.train), len(splits.dev), len(splits.test), run.total_steps,
                 dist.world_size(), zero_stage(run.ds_config))
        run.trainer.run()

    def finish(self) -> None:
        """The last dev evaluation, the final checkpoint, the export, the test evaluation: in this order."""
        trainer = self.run_.trainer
        self.summary["steps"] = trainer.state.step
        if self.run_.splits.dev:
            self.summary["dev_rougeL"] = self.last_dev_eval()
        trainer.save()
        if self.cfg.output.export:
            trainer.export(os.path.join(self.cfg.output.dir, "export"))
        self.test_eval()

    def last_dev_eval(self) -> float:
        """Dev ROUGE-L at the last step: the loop's own score when it just scored this step, else a new one."""
        trainer = self.run_.trainer
        last = trainer.state.history[-1] if trainer.state.history else None
        if last is not None and last["step"] == trainer.state.step:
            return last["rougeL"]
        return trainer.run_dev_eval()

    def test_eval(self) -> None:
        run, cfg = self.run_, self.cfg
        splits = run.splits
        if not (splits.test or run.eval_sets):
            return
        sets = ({"test": splits.test} if splits.test else {}) | run.eval_sets
        res = evaluate_sets(run.student_decoder(), run.tokenizer, sets, cfg.eval)
        info = ({"test": {"path": cfg.data.test_file, "n": len(splits.test)}} if splits.test else {}) | run.eval_info
        report = write_results(os.path.join(cfg.output.dir, "eval"), {"student": res}, sets, cfg.eval, info)
        run.trainer.logger.scalars(run.trainer.state.step, scalars(report))
        self.summary["test_rougeL"] = {name: r["rougeL"] for name, r in res.items()}

    def close(self, quiet: bool = False) -> None:
        """Close the metrics writer (flushing its events) and the vLLM engines; each closer runs whatever the
        others do.

        The launcher ends the process with ``dist.shutdown`` (``os._exit``), which runs no atexit hook or
        finalizer: what is not closed here is lost. ``quiet``: an error while closing is logged, not raised (the
        run is already failing with another one).
        """
        run = self.run_
        if run is None:
            return
        closers = [run.close]
        if run.trainer is not None and run.trainer.logger is not None:
            closers.insert(0, run.trainer.logger.close)
        errors = []
        for close in closers:
            try:
                close()
            except Exception as exc:
                if quiet:
                    log.exception("while closing a failed run")
                errors.append(exc)
        if errors and not quiet:
            raise errors[0]


def train(cfg: Config) -> dict[str, Any]:
    """stage=train: train the student with ``cfg.method``; checkpoint, export, evaluate on the test split."""
    job = TrainJob(cfg)
    try:
        summary = job.run()
    except BaseException:  # preempted, aborted, failed: the first error is the one to report
        job.close(quiet=True)
        raise
    job.close()
    return summary
