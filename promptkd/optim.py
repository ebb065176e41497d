"""AdamW and the warm-up + constant / linear / cosine schedules, for the student and the soft prompt."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from promptkd import distributed as dist
from promptkd.config import OptimConfig


def lr_factor(opt: OptimConfig, total_steps: int):
    """Warm-up then constant / linear / cosine (down to ``opt.min_lr``); a function of the 0-based step."""
    floor = opt.min_lr / opt.lr

    def factor(step: int) -> float:
        if opt.warmup_steps and step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        if opt.schedule == "constant":
            return 1.0
        span = max(1, total_steps - opt.warmup_steps)
        progress = min(1.0, (step - opt.warmup_steps) / span)
        decay = 1.0 - progress if opt.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * decay  # decays to min_lr (torch's CosineAnnealingLR eta_min)

    return factor


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not finite on some rank.

    DeepSpeed's ZeRO optimizers already skip such steps; without ZeRO the client
    optimizer steps directly, so this guard sets ``overflow``, which the engine
    reads to count the step as skipped (and not advance the lr schedule).
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        local_bad = any(not bool(torch.isfinite(g).all()) for g in grads)
        self.overflow = dist.any_true(local_bad)
        if self.overflow:
            return None
        return super().step(closure)


def adamw(params: list[torch.nn.Parameter], opt: OptimConfig, named: Optional[list[tuple[str, Any]]] = None,
          guarded: bool = False):
    """AdamW; with ``named`` params, biases and norm weights get no weight decay."""
    if named is None:
        groups = [{"params": params, "weight_decay": opt.weight_decay}]
    else:
        decay = [p for n, p in named if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in named if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": opt.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    cls = GuardedAdamW if guarded else torch.optim.AdamW
    return cls(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)
