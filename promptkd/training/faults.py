"""Fault injection for the reliability tests, driven by ``PROMPTKD_FAULT``.

Format: ``kind@step=N[,rank=R]`` with kind one of ``raise`` (an exception on
that rank), ``nan`` (the student's training forwards become NaN for that step), ``sigkill``
(the process kills itself at the start of step N, so the last checkpoint is the
one before), or ``sigkill_in_save`` (it kills itself while saving step N's
checkpoint, after the files and before the ``COMPLETE`` marker: a torn
checkpoint). Unset in normal runs, and then free.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any, Optional

import torch

from promptkd import distributed as dist

ENV = "PROMPTKD_FAULT"
KINDS = ("raise", "nan", "sigkill", "sigkill_in_save")


@dataclass
class Fault:
    kind: str
    step: int
    rank: Optional[int] = None


def parse(text: str) -> Fault:
    kind, _, rest = text.partition("@")
    fields = dict(part.split("=", 1) for part in rest.split(",") if part)
    if kind not in KINDS or "step" not in fields:
        raise ValueError(f"{ENV}: expected kind@step=N[,rank=R] with kind {'|'.join(KINDS)}, got {text!r}")
    return Fault(kind, int(fields["step"]), int(fields["rank"]) if "rank" in fields else None)


def configured() -> Optional[Fault]:
    text = os.environ.get(ENV, "")
    return parse(text) if text else None


def _nan_hook(module: Any, _inputs: Any, output: torch.Tensor) -> Any:
    """On the input embeddings: everything after them is NaN, the logits and the fused head's hidden states
    alike (``method.fused_head`` never builds the logits a hook on them would poison)."""
    if module.training:  # rollouts (eval mode) stay finite; every training forward is poisoned
        return output * float("nan")  # keeps the graph: NaN gradients flow back
    return output


def _fires(fault: Optional[Fault], step: int) -> bool:
    return fault is not None and fault.step == step and (fault.rank is None or fault.rank == dist.rank())


def in_save(step: int) -> None:
    """``sigkill_in_save``: die while the checkpoint of ``step`` is written, before it is marked complete."""
    fault = configured()
    if fault is not None and fault.kind == "sigkill_in_save" and _fires(fault, step):
        os.kill(os.getpid(), signal.SIGKILL)


def before_step(fault: Optional[Fault], step: int, student: torch.nn.Module) -> Optional[Any]:
    """Trigger the fault at the start of optimizer step ``step`` (1-based); returns a hook to remove."""
    if fault is None or fault.kind == "sigkill_in_save" or not _fires(fault, step):
        return None
    if fault.kind == "raise":
        raise RuntimeError(f"injected fault on rank {dist.rank()} at step {step}")
    if fault.kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    return student.get_input_embeddings().register_forward_hook(_nan_hook)
