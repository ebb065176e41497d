"""Fault injection for the reliability tests, driven by ``PROMPTKD_FAULT``.

Format: ``kind@step=N[,rank=R]`` with kind one of ``raise`` (an exception on
that rank), ``nan`` (the student's logits become NaN for that step), or
``sigkill`` (the process kills itself). Unset in normal runs, and then free.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any, Optional

import torch

from promptkd import distributed as dist

ENV = "PROMPTKD_FAULT"


@dataclass
class Fault:
    kind: str
    step: int
    rank: Optional[int] = None


def parse(text: str) -> Fault:
    kind, _, rest = text.partition("@")
    fields = dict(part.split("=", 1) for part in rest.split(",") if part)
    if kind not in ("raise", "nan", "sigkill") or "step" not in fields:
        raise ValueError(f"{ENV}: expected kind@step=N[,rank=R] with kind raise|nan|sigkill, got {text!r}")
    return Fault(kind, int(fields["step"]), int(fields["rank"]) if "rank" in fields else None)


def configured() -> Optional[Fault]:
    text = os.environ.get(ENV, "")
    return parse(text) if text else None


def _nan_hook(module: Any, _inputs: Any, output: Any) -> Any:
    if module.training:  # rollouts (eval mode) stay finite; every training forward is poisoned
        output.logits = output.logits * float("nan")  # keeps the graph: NaN gradients flow back
    return output


def before_step(fault: Optional[Fault], step: int, student: torch.nn.Module) -> Optional[Any]:
    """Trigger the fault at the start of optimizer step ``step`` (1-based); returns a hook to remove."""
    if fault is None or fault.step != step or (fault.rank is not None and fault.rank != dist.rank()):
        return None
    if fault.kind == "raise":
        raise RuntimeError(f"injected fault on rank {dist.rank()} at step {step}")
    if fault.kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    return student.register_forward_hook(_nan_hook)
