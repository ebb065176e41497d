"""SIGTERM / SIGUSR1: checkpoint at the next step boundary, then exit with EXIT_PREEMPTED.

A second signal exits at once. A watchdog bounds the wait for the boundary, so
a rank stuck in a collective with a dead peer still ends.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75   # checkpoint written; the SLURM scripts requeue on this code
EXIT_ABORTED = 3      # too many consecutive non-finite steps
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint is written."""


class TrainingAborted(RuntimeError):
    """Raised when the run cannot continue (e.g. K non-finite steps in a row)."""


class StopRequest:
    """Installed once per process; ``requested`` flips on the first signal."""

    def __init__(self, grace_s: float = 600.0):
        self.requested = False
        self.grace_s = grace_s

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Optional[object]) -> None:
        if self.requested:
            os._exit(128 + signum)  # second signal: leave now
        self.requested = True
        log.warning("received %s: will checkpoint at the next step boundary and exit with code %d",
                    signal.Signals(signum).name, EXIT_PREEMPTED)
        timer = threading.Timer(self.grace_s, lambda: os._exit(128 + signum))
        timer.daemon = True
        timer.start()
