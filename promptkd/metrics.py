"""Rank-0 logging: TensorBoard + a JSONL mirror, phase timers, and the log format."""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from promptkd import distributed as dist

log = logging.getLogger(__name__)


def setup_logging(level: str = "INFO") -> None:
    """Every rank logs warnings; rank 0 also logs INFO. The rank is in the prefix."""
    lvl = getattr(logging, level.upper(), logging.INFO) if dist.is_main() else logging.WARNING
    fmt = f"%(asctime)s [rank{dist.rank()}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=lvl, format=fmt, datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # per-shard load/save bars drown the training log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class MetricsLogger:
    """Scalars and texts to TensorBoard and ``metrics.jsonl``; a no-op off rank 0.

    The files open at the first write, so a resumed run can say where it continues first (``resume_at``).
    """

    def __init__(self, run_dir: str, tensorboard: bool = True, prefix: str = "", purge_step: Optional[int] = None):
        """``purge_step``: on resume, drop points at steps >= it that the interrupted run logged."""
        self.enabled = dist.is_main()
        self.prefix = prefix
        self.run_dir, self.tensorboard, self.purge_step = run_dir, tensorboard, purge_step
        self._tb = None
        self._jsonl = None

    def resume_at(self, step: int) -> None:
        """Points at ``step`` and later, from the run this one continues, are dropped (before the first write)."""
        if self._jsonl is not None:
            raise RuntimeError("MetricsLogger.resume_at: the files are open already")
        self.purge_step = step

    def _open(self) -> None:
        if self._jsonl is not None:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if self.purge_step is not None and os.path.exists(path):
            _truncate_jsonl(path, self.purge_step)
        self._jsonl = open(path, "a")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=self.purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._open()
        for key, value in values.items():
            if self._tb is not None:
                self._tb.add_scalar(self.prefix + key, value, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        self._open()
        if self._tb is not None:
            self._tb.add_text(self.prefix + tag, text, step)

    @property
    def closed(self) -> bool:
        return self._jsonl is None and self._tb is None

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _truncate_jsonl(path: str, purge_step: int) -> None:
    with open(path) as fh:
        keep = [line for line in fh if line.strip() and json.loads(line).get("step", 0) < purge_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


class PhaseTimer:
    """Accumulates wall seconds per named phase between ``pop`` calls.

    ``phase(name)`` times a coarse phase of a step (rollout, prompt_step, student_step) and is always on.
    ``lap(name)`` marks the end of a finer span inside a phase (``prompt/loss``, ``student/bwd``, ...): the
    time since the previous lap (or the phase's start) goes to ``name``. Laps cost one attribute read until
    ``detail(sync)`` turns them on (bench/phases.py): then every boundary first waits for the device
    (``sync``), so a span holds the work launched in it, not the work still queued.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.detailed = False
        self._sync: Optional[Callable[[], None]] = None
        self._mark = 0.0

    def detail(self, sync: Optional[Callable[[], None]] = None, on: bool = True) -> None:
        """Turn the finer spans on (``sync``: waits for the device at each boundary) or off."""
        self.detailed, self._sync = on, sync if on else None

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self._mark = self._now()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + self._now() - start

    def lap(self, name: str) -> None:
        """The span since the last boundary is ``name``'s (nothing unless ``detail`` is on)."""
        if not self.detailed:
            return
        now = self._now()
        self.totals[name] = self.totals.get(name, 0.0) + now - self._mark
        self._mark = now

    def restart(self) -> None:
        """A new span starts here (what ran since the last boundary is nobody's)."""
        if self.detailed:
            self._mark = self._now()

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def format_scalars(values: dict[str, float], keys: Optional[list[str]] = None) -> str:
    keys = keys or sorted(values)
    return " ".join(f"{k}={values[k]:.4g}" for k in keys if k in values)
