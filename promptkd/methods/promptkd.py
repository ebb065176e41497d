"""PromptKD (and its zero-prompt ablation, plain on-policy reverse KL).

One iteration, exactly as DESIGN.md §1:
1. rollout: the student samples y ~ p_S(.|x) (eval mode, no grad, KV cache);
2. prompt update: L = guidance + w(t) · KL(p_T^θ ‖ p_T), only θ trains;
3. student update: KL(p_S ‖ p_T^θ) with the just-updated prompt.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Optional

import torch

from promptkd import distributed as dist
from promptkd.config import ConfigError
from promptkd.losses import prompt_loss, regularizer_weight, reverse_kl
from promptkd.methods.base import (Method, MicroBatch, global_mean, global_tokens, has_dropout, lm_logits, lr_of,
                                   response_start, set_modes, shifted_mask, student_backward, student_rollout,
                                   student_update_phase, teacher_logits)
from promptkd.rollout import Rollout


class PromptKD(Method):
    uses_teacher = True
    trains_prompt = True

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.reused: list[Optional[torch.Tensor]] = []
        self.stale_targets: list[Optional[torch.Tensor]] = []
        m = ctx.cfg.method
        if self.uses_prompt() and m.stale_student_target and m.prompt_step_teacher_train \
                and has_dropout(ctx.teacher.base):
            # the kept p_T^θ would carry the prompt step's dropout noise into the student's target
            raise ConfigError("method.stale_student_target: needs a deterministic prompted-teacher forward in the "
                              "prompt step, but the teacher has dropout and method.prompt_step_teacher_train=true; "
                              "set one of them to false")

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> dict[str, float]:
        ctx = self.ctx
        with ctx.timer.phase("rollout"):
            rollouts = [student_rollout(ctx, mb) for mb in micro_batches]
        n_global = global_tokens([r.loss_mask for r in rollouts])
        metrics = {"tokens": n_global, "rollout/mean_response_len": n_global / max(1.0, float(
            dist.all_reduce_sum(sum(r.input_ids.shape[0] for r in rollouts))))}
        self.last_rollouts = rollouts
        snapshot = self.prompt_snapshot() if self.uses_prompt() else None
        if self.uses_prompt():
            with ctx.timer.phase("prompt_step"):
                metrics.update(self.prompt_update(rollouts, n_global, step))
            if not math.isfinite(metrics["prompt/grad_norm"]):
                # identical on every rank (the gradient was all-reduced): skip the whole step
                self.restore_prompt(snapshot)
                self.reused = self.stale_targets = []  # drop the kept student graph
                return {**metrics, "skipped": 1.0}
        skipped_before = ctx.engine.skipped_steps
        with student_update_phase(ctx):
            metrics.update(self.student_update(rollouts, n_global))
        if ctx.engine.skipped_steps != skipped_before:
            if snapshot is not None:  # the student step was dropped: so is the prompt's
                self.restore_prompt(snapshot)
            metrics["skipped"] = 1.0
        return metrics

    def prompt_snapshot(self) -> dict:
        """Prompt + its optimizer/scheduler state (small: P x d) to undo a skipped step."""
        ctx = self.ctx
        return copy.deepcopy({"prompt": ctx.teacher.prompt_state(), "opt": ctx.prompt_optimizer.state_dict(),
                              "sched": ctx.prompt_scheduler.state_dict() if ctx.prompt_scheduler else None})

    def restore_prompt(self, snap: dict) -> None:
        ctx = self.ctx
        ctx.teacher.load_prompt_state(snap["prompt"])
        ctx.prompt_optimizer.load_state_dict(snap["opt"])
        if ctx.prompt_scheduler is not None:
            ctx.prompt_scheduler.load_state_dict(snap["sched"])

    def uses_prompt(self) -> bool:
        return self.ctx.teacher is not None and self.ctx.teacher.prompt_length > 0

    # ------------------------------------------------------------------ phase 2
    def prompt_update(self, rollouts: list[Rollout], n_global: float, step: int) -> dict[str, float]:
        ctx, m = self.ctx, self.ctx.cfg.method
        w = regularizer_weight(step, ctx.total_steps, m.reg_schedule, m.reg_weight)
        opt = ctx.prompt_optimizer
        opt.zero_grad(set_to_none=True)
        sums = {"guidance": 0.0, "regularizer": 0.0, "total": 0.0}
        self.reused = [None] * len(rollouts)         # kept student forwards, for student_update
        self.stale_targets = [None] * len(rollouts)  # stale_student_target only
        for i, r in enumerate(rollouts):
            start, mask = response_start(r), shifted_mask(r)
            # official modes: p_S and the plain teacher p_T in eval mode, the prompted teacher in train mode
            set_modes(ctx, student_train=False)
            s_logits = self.student_logits_for_prompt(r, start, keep=i == 0, index=i)
            with torch.no_grad():
                base = (teacher_logits(ctx.teacher, r.input_ids, r.attention_mask, ctx.vocab_size, False, start)
                        if w > 0 else None)
            ctx.teacher.train(m.prompt_step_teacher_train)
            prompted = teacher_logits(ctx.teacher, r.input_ids, r.attention_mask, ctx.vocab_size, True, start)
            ctx.teacher.eval()
            pl = prompt_loss(prompted, s_logits, base if base is not None else prompted.detach(), mask,
                             reg_weight=w, guidance=m.guidance, chunk_size=ctx.chunk)
            (pl.total / max(n_global, 1.0)).backward()
            if m.stale_student_target:  # the documented shortcut: p_T^θ from before the update
                self.stale_targets[i] = prompted.detach()
            for key in sums:
                sums[key] += float(getattr(pl, key).detach())
        grad_norm = self.reduce_and_step_prompt()
        return {"prompt/loss": global_mean(sums["total"], n_global),
                "prompt/guidance_kl": global_mean(sums["guidance"], n_global),
                "prompt/reg_kl": global_mean(sums["regularizer"], n_global),
                "prompt/reg_weight": w, "prompt/grad_norm": grad_norm, "prompt/lr": lr_of(opt)}

    def student_logits_for_prompt(self, r: Rollout, start: int, keep: bool, index: int) -> torch.Tensor:
        """p_S for the guidance term (a constant there), from the student in eval mode.

        Without dropout (train and eval mode then compute the same) the student step's own
        forward (same weights, same sequences) gives the same logits, so for the first micro-batch that forward runs here, with grad, and
        is kept for ``student_update``: one student forward less per step, bitwise the same
        result. Only one graph is kept (memory), and it is the first micro-batch's because
        the student step backs it up before any other student forward+backward: under
        ZeRO-3 an interleaved forward+backward between a forward and its backward changed
        the gradients (measured with accumulation 2).
        """
        ctx = self.ctx
        if keep and ctx.cfg.method.reuse_student_forward and not self.student_has_dropout:
            kept = lm_logits(ctx.engine, r.input_ids, r.attention_mask, ctx.vocab_size, start)
            self.reused[index] = kept
            return kept.detach()
        with torch.no_grad():
            return lm_logits(ctx.engine.module, r.input_ids, r.attention_mask, ctx.vocab_size, start)

    @functools.cached_property
    def student_has_dropout(self) -> bool:
        return has_dropout(self.ctx.engine.module)

    def reduce_and_step_prompt(self) -> float:
        """Sum the (globally normalised) prompt grads over ranks, clip, step."""
        ctx = self.ctx
        prompt = ctx.teacher.prompt
        if prompt.grad is None:
            prompt.grad = torch.zeros_like(prompt)
        dist.all_reduce_tensors_([prompt.grad])
        clip = ctx.cfg.train.grad_clip
        norm = float(torch.nn.utils.clip_grad_norm_([prompt], clip if clip > 0 else float("inf")))
        if math.isfinite(norm):  # identical on every rank after the all-reduce
            ctx.prompt_optimizer.step()
            if ctx.prompt_scheduler is not None:
                ctx.prompt_scheduler.step()
        ctx.prompt_optimizer.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ phase 3
    def student_update(self, rollouts: list[Rollout], n_global: float) -> dict[str, float]:
        ctx = self.ctx
        use_prompt = self.uses_prompt()
        # what prompt_update left for this step (nothing when it did not run)
        reused, stale = (self.reused, self.stale_targets) if use_prompt else ([], [])
        total = 0.0
        for i, r in enumerate(rollouts):
            start, mask = response_start(r), shifted_mask(r)
            t_logits = stale[i] if i < len(stale) else None
            if t_logits is None:
                with torch.no_grad():
                    t_logits = teacher_logits(ctx.teacher, r.input_ids, r.attention_mask, ctx.vocab_size, use_prompt,
                                              start)
            s_logits = reused[i] if i < len(reused) else None
            if s_logits is None:
                s_logits = lm_logits(ctx.engine, r.input_ids, r.attention_mask, ctx.vocab_size, start)
            rkl, _ = reverse_kl(s_logits, t_logits, mask, chunk_size=ctx.chunk)
            student_backward(ctx, rkl, n_global)
            total += float(rkl.detach())
        self.reused = self.stale_targets = []
        return {"loss/rkl": global_mean(total, n_global)}


class RKL(PromptKD):
    """Plain on-policy reverse KL: PromptKD with no prompt (the ablation)."""

    trains_prompt = False

    def uses_prompt(self) -> bool:
        return False
