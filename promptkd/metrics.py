"""Rank-0 logging: TensorBoard + a JSONL mirror, phase timers, and the log format."""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from typing import Iterator, Optional

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
    """Scalars and texts to TensorBoard and ``metrics.jsonl``; a no-op off rank 0."""

    def __init__(self, run_dir: str, tensorboard: bool = True, prefix: str = "", purge_step: Optional[int] = None):
        """``purge_step``: on resume, drop points at steps >= it that the interrupted run logged."""
        self.enabled = dist.is_main()
        self.prefix = prefix
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        if purge_step is not None and os.path.exists(path):
            _truncate_jsonl(path, purge_step)
        self._jsonl = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            if self._tb is not None:
                self._tb.add_scalar(self.prefix + key, value, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(self.prefix + tag, text, step)

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
    """Accumulates wall seconds per named phase between ``pop`` calls."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def format_scalars(values: dict[str, float], keys: Optional[list[str]] = None) -> str:
    keys = keys or sorted(values)
    return " ".join(f"{k}={values[k]:.4g}" for k in keys if k in values)
