"""AdamW and the warm-up + constant / linear / cosine schedules, for the student and the soft prompt."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

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
        self.overflow = bool(dist.all_reduce_sum(nonfinite_count(grads)) > 0)  # the step's one host read
        if self.overflow:
            return None
        return super().step(closure)


def nonfinite_count(tensors: list[torch.Tensor]) -> torch.Tensor:
    """How many of ``tensors`` hold a NaN or an inf, as a device scalar: no host sync.

    One fused max-|x| per tensor (``_foreach_norm`` with ord=inf: a multi-tensor kernel on CUDA); it is
    inf for an inf and NaN for a NaN anywhere in the tensor, and unlike the 2-norm it cannot overflow
    on large finite values.
    """
    if not tensors:
        return torch.zeros((), device=dist.device())
    peaks = torch.stack([n.float() for n in torch._foreach_norm(tensors, ord=float("inf"))])
    return (~torch.isfinite(peaks)).sum()


# The official code's rule (gmkim-ai/PromptKD utils.get_optimizer_params, from MiniLLM, itself from SpanBERT):
# a parameter gets no weight decay when one of these strings is in its name. These are GPT-2's names, so for
# OPT and LLaMA only biases are exempt and their norm weights decay, as they do in the official runs.
NO_DECAY_NAMES = ("bias", "ln_f.weight", "ln_1.weight", "ln_2.weight", "ln_cross_attn")


def decays(name: str) -> bool:
    return not any(part in name for part in NO_DECAY_NAMES)


def param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """The official decay / no-decay groups of the trainable parameters (by name, NO_DECAY_NAMES)."""
    trainable = [(n, p) for n, p in named if p.requires_grad]
    return [{"params": [p for n, p in trainable if decays(n)], "weight_decay": weight_decay},
            {"params": [p for n, p in trainable if not decays(n)], "weight_decay": 0.0}]


def adamw(params: list[torch.nn.Parameter], opt: OptimConfig, named: Optional[list[tuple[str, Any]]] = None,
          guarded: bool = False, cpu_adam: bool = False):
    """AdamW over ``params``; with ``named`` params, the official decay groups (``param_groups``).

    Without names (the soft prompt) every parameter decays, as the official prompt optimizer does: it takes
    every trainable parameter of the prompted teacher (only the prompt) at the run's weight decay.
    cpu_adam: DeepSpeed's CPU Adam in AdamW mode, the optimizer ZeRO-Offload expects (``offload_optimizer``).
    """
    groups = ([{"params": params, "weight_decay": opt.weight_decay}] if named is None
              else param_groups(named, opt.weight_decay))
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                weight_decay=opt.weight_decay, adamw_mode=True)
    cls = GuardedAdamW if guarded else torch.optim.AdamW
    return cls(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)


def offload_optimizer_choice(cuda: bool, can_build: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    """For a run whose DeepSpeed config offloads the optimizer: (use DeepSpeed's CPU Adam?, why).

    CPU Adam is the fast path ZeRO-Offload asks for; its C++ op is prebuilt (``DS_BUILD_CPU_ADAM=1``) or
    compiled at first use. Without CUDA (our CPU CI) or without a way to load/build the op, the run uses
    torch AdamW, which DeepSpeed accepts with ``zero_force_ds_cpu_optimizer: false``. ``can_build`` is only
    called with CUDA present (it may compile for a minute).
    """
    if not cuda:
        return False, "no CUDA accelerator"
    ok, why = can_build()
    return (True, why) if ok else (False, f"DeepSpeed's CPU Adam op cannot be loaded or built ({why})")


def cpu_adam_loadable() -> tuple[bool, str]:
    """Whether DeepSpeed's CPU Adam op is prebuilt or can be JIT-compiled here (then it is, once, and cached)."""
    import shutil

    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except ImportError as exc:
        return False, f"deepspeed has no CPUAdamBuilder: {exc}"
    builder = CPUAdamBuilder()
    prebuilt = bool(installed_ops.get(builder.name))
    if not prebuilt and shutil.which("c++") is None and shutil.which("g++") is None:
        return False, "not prebuilt and no C++ compiler on PATH"
    try:  # prebuilt: an import; else a JIT compile (~1 min once, needs ninja), which checks compatibility first
        builder.load(verbose=False)
    except Exception as exc:  # noqa: BLE001 - a failed JIT build raises many types; report it and fall back
        return False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return True, "prebuilt" if prebuilt else "JIT-built (cached in ~/.cache/torch_extensions)"
