"""The one owner of the teacher's trainable soft prompt θ.

The parameter itself lives in the ``PromptedTeacher`` (its forward prepends it); everything
that trains, undoes, saves and exports it is here: the AdamW optimizer and its lr schedule,
the all-reduce of the gradient over ranks, clipping, the step, the snapshot that undoes a
skipped step, the checkpoint state and the export files. The method that trains a prompt
holds one; the trainer and the checkpoint code only ever see its ``state_dict`` and ``export``.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch

from promptkd import distributed as dist
from promptkd.config import OptimConfig
from promptkd.models import PROMPT_DIR, PromptedTeacher
from promptkd.optim import adamw, lr_factor


class SoftPrompt:
    def __init__(self, teacher: PromptedTeacher, opt: OptimConfig, total_steps: int, grad_clip: float,
                 teacher_id: str):
        self.teacher = teacher
        self.optimizer = adamw([teacher.prompt], opt)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(opt, total_steps))
        self.grad_clip = grad_clip
        self.teacher_id = teacher_id  # recorded in the exported teacher_prompt.json

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """Sum the (globally normalised) gradient over ranks, clip, step; returns the gradient norm.

        The norm is identical on every rank after the all-reduce, so a non-finite one makes every
        rank skip the update (and the schedule) together.
        """
        prompt = self.teacher.prompt
        if prompt.grad is None:
            prompt.grad = torch.zeros_like(prompt)
        dist.all_reduce_tensors_([prompt.grad])
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_([prompt], clip))
        if math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
        self.zero_grad()
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {"prompt": self.teacher.prompt_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_prompt_state(state["prompt"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def snapshot(self) -> dict[str, Any]:
        """A copy of the whole state (small: P x d plus the Adam moments), to undo a skipped step."""
        return copy.deepcopy(self.state_dict())

    def export(self, out_dir: str) -> None:
        """teacher_prompt.safetensors + teacher_prompt.json into ``out_dir/teacher_prompt/`` (rank 0 writes).

        Beside the student, not among its files: an HF model dir must hold the model only.
        """
        if dist.is_main():
            self.teacher.save_prompt(os.path.join(out_dir, PROMPT_DIR), self.teacher_id)
