"""PromptKD (and its zero-prompt ablation, plain on-policy reverse KL).

One iteration, exactly as DESIGN.md §1:
1. rollout: the student samples y ~ p_S(.|x) (eval mode, no grad, KV cache);
2. prompt update: L = guidance + w(t) · KL(p_T^θ ‖ p_T), only θ trains;
3. student update: KL(p_S ‖ p_T^θ) with the just-updated prompt.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from promptkd.config import Config, ConfigError, REGISTRY
from promptkd.losses import prompt_loss, regularizer_weight, reverse_kl
from promptkd.methods.base import (KEPT_STUDENT, KEPT_TARGET, Method, MicroBatch, StepContext, StepResult, Tally, global_tokens, has_dropout,
                                   lm_logits, local_tokens, response_start, set_modes, shifted_mask, student_backward,
                                   student_rollouts, student_update_phase, teacher_logits, token_scale)
from promptkd.methods.fused import fused_prompt, fused_student_update, lm_hidden, teacher_hidden
from promptkd.methods.soft_prompt import SoftPrompt
from promptkd.rollout import Rollout


@dataclass
class Kept:
    """What the prompt step hands the student step, per micro-batch (None: compute it there)."""

    # logits [B, T', V], or with method.fused_head the final hidden states [B, T', H] the loss puts through the head
    student: list[Optional[torch.Tensor]]   # the student forward run with grad in the prompt step
    targets: list[Optional[torch.Tensor]]   # stale_student_target: p_T^θ from before the prompt update
    prompt_finite: bool = True              # the prompt's gradient was finite (else the whole step is skipped)

    @staticmethod
    def nothing(n: int) -> "Kept":
        return Kept([None] * n, [None] * n)


class PromptKD(Method):
    spec = REGISTRY["promptkd"]  # RKL is PromptKD without a prompt, reading the same section
    progress_keys = ("loss/rkl", "prompt/loss")

    def __init__(self, ctx: StepContext, prompt: Optional[SoftPrompt] = None) -> None:
        super().__init__(ctx)
        self.prompt = prompt  # owns θ: optimizer, schedule, step, undo, state, export (None: no prompt)
        m = ctx.opts
        if self.uses_prompt() and m.stale_student_target and m.prompt_step_teacher_train \
                and has_dropout(ctx.teacher.base):
            # the kept p_T^θ would carry the prompt step's dropout noise into the student's target
            raise ConfigError("method.promptkd.stale_student_target: needs a deterministic prompted-teacher forward "
                              "in the prompt step, but the teacher has dropout and "
                              "method.promptkd.prompt_step_teacher_train=true; set one of them to false")

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> StepResult:
        ctx = self.ctx
        with ctx.timer.phase("rollout"):
            rollouts = student_rollouts(ctx, micro_batches)
        n_global = global_tokens([r.loss_mask for r in rollouts])  # a device tensor: it only scales losses
        tally = Tally()
        tally.count_tokens(local_tokens([r.loss_mask for r in rollouts]))
        tally.add("rows", float(sum(r.input_ids.shape[0] for r in rollouts)))
        tally.mean("rollout/mean_response_len", "tokens", per="rows")
        kept = Kept.nothing(len(rollouts))
        if self.prompt is not None:
            with ctx.timer.phase("prompt_step"):
                _, kept = self.prompt_update(rollouts, n_global, step, tally)
            if not kept.prompt_finite:
                # identical on every rank (the gradient was all-reduced): the whole step is skipped,
                # and the kept student graph goes with ``kept``
                return StepResult(tally, rollouts, skipped=True)
        with student_update_phase(ctx):
            self.student_update(rollouts, n_global, kept, tally)
        return StepResult(tally, rollouts)

    @classmethod
    def from_config(cls, cfg: Config, ctx: StepContext) -> "PromptKD":
        prompt = None
        if ctx.teacher is not None and ctx.teacher.prompt_length > 0:
            prompt = SoftPrompt(ctx.teacher, cfg.optim.prompt, ctx.total_steps, cfg.train.grad_clip,
                                cfg.model.teacher.path or "tiny-from-config")
        return cls(ctx, prompt)

    @classmethod
    def kept_forwards(cls, cfg: Config, student_dropout: bool) -> frozenset[str]:
        if cls.teacher_prompt_length(cfg) == 0:
            return frozenset()  # no prompt step: nothing runs early
        return cls._kept(cfg.method.promptkd, student_dropout)

    @staticmethod
    def _kept(opts: Any, student_dropout: bool) -> frozenset[str]:
        """The rule of ``student_logits_for_prompt`` and ``stale_student_target``, for the step and the planner."""
        kept = {KEPT_TARGET} if opts.stale_student_target else set()
        if opts.reuse_student_forward and not student_dropout:
            kept.add(KEPT_STUDENT)
        return frozenset(kept)

    def uses_prompt(self) -> bool:
        return self.prompt is not None

    def snapshot(self) -> Optional[dict]:
        return self.prompt.snapshot() if self.prompt is not None else None

    def undo(self, snapshot: dict) -> None:
        self.prompt.load_state_dict(snapshot)

    def state_dict(self) -> dict:
        return {"prompt": self.prompt.state_dict()} if self.prompt is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.prompt is not None and state.get("prompt") is not None:
            self.prompt.load_state_dict(state["prompt"])

    def export(self, out_dir: str) -> None:
        if self.prompt is not None:
            self.prompt.export(out_dir)

    # ------------------------------------------------------------------ phase 2
    def prompt_update(self, rollouts: list[Rollout], n_global: torch.Tensor | float, step: int,
                      tally: Optional[Tally] = None) -> tuple[Tally, Kept]:
        """Phase 2 (only θ trains): (its metrics, added to ``tally``; what the student step may reuse)."""
        tally = Tally() if tally is None else tally
        ctx, m = self.ctx, self.ctx.opts
        w = regularizer_weight(step, ctx.total_steps, m.reg_schedule, m.reg_weight)
        self.prompt.zero_grad()
        kept = Kept.nothing(len(rollouts))
        for i, r in enumerate(rollouts):
            ctx.timer.restart()
            start, mask = response_start(r), shifted_mask(r)
            # official modes: p_S and the plain teacher p_T in eval mode, the prompted teacher in train mode
            set_modes(ctx, student_train=False)
            s_logits = self.student_logits_for_prompt(r, start, kept if i == 0 else None, i)
            ctx.timer.lap("prompt/student_fwd")
            with torch.no_grad():
                base = self.teacher_forward(r, False, start) if w > 0 else None
            ctx.timer.lap("prompt/teacher_base_fwd_nograd")
            ctx.teacher.train(m.prompt_step_teacher_train)
            prompted = self.teacher_forward(r, True, start)
            ctx.teacher.eval()
            ctx.timer.lap("prompt/teacher_prompted_fwd")
            if ctx.fused_head:  # logits only chunk by chunk; the gradient reaches θ through the prompted states
                pl = fused_prompt(ctx, s_logits, prompted, base, mask, w, m.guidance)
            else:
                pl = prompt_loss(s_logits, prompted=prompted,
                                 teacher=base if base is not None else prompted.detach(),
                                 mask=mask, reg_weight=w, guidance=m.guidance, chunk_size=ctx.chunk)
            ctx.timer.lap("prompt/loss")
            (pl.total / token_scale(n_global)).backward()
            ctx.timer.lap("prompt/teacher_bwd")
            if m.stale_student_target:  # the documented shortcut: p_T^θ from before the update
                kept.targets[i] = prompted.detach()
            for key, name in (("total", "prompt/loss"), ("guidance", "prompt/guidance_kl"),
                              ("regularizer", "prompt/reg_kl")):
                tally.add(name, getattr(pl, key))
                tally.mean(name, name)
        # the norm is a host number on purpose: a non-finite one skips the step on every rank
        ctx.timer.restart()
        norm = self.prompt.step()
        ctx.timer.lap("prompt/optimizer")
        kept.prompt_finite = math.isfinite(norm)
        tally.values.update({"prompt/reg_weight": w, "prompt/grad_norm": norm, "prompt/lr": self.prompt.lr})
        return tally, kept

    def teacher_forward(self, r: Rollout, use_prompt: bool, start: int) -> torch.Tensor:
        """The (prompted) teacher's logits [B, T', V], or with method.fused_head its final hidden states [B, T', H]."""
        ctx = self.ctx
        if ctx.fused_head:
            return teacher_hidden(ctx.teacher, r.input_ids, r.attention_mask, use_prompt, start)
        return teacher_logits(ctx.teacher, r.input_ids, r.attention_mask, ctx.vocab_size, use_prompt, start)

    def student_forward(self, model: Any, r: Rollout, start: int) -> torch.Tensor:
        """The student's logits [B, T', V], or with method.fused_head its final hidden states [B, T', H]."""
        if self.ctx.fused_head:
            return lm_hidden(model, r.input_ids, r.attention_mask, start)
        return lm_logits(model, r.input_ids, r.attention_mask, self.ctx.vocab_size, start)

    def student_logits_for_prompt(self, r: Rollout, start: int, kept: Optional[Kept], index: int) -> torch.Tensor:
        """p_S for the guidance term (a constant there), from the student in eval mode (the kept forward below
        runs in train mode, which computes the same without dropout). With method.fused_head: the student's
        hidden states instead of its logits (the loss applies its head).

        Without dropout (train and eval mode then compute the same) the student step's own
        forward (same weights, same sequences) gives the same logits, so for the first micro-batch that forward runs here, with grad, and
        is kept (in ``kept``) for ``student_update``: one student forward less per step, bitwise the same
        result. Only one graph is kept (memory), and it is the first micro-batch's because
        the student step backs it up before any other student forward+backward: under
        ZeRO-3 an interleaved forward+backward between a forward and its backward changed
        the gradients (measured with accumulation 2).
        """
        ctx = self.ctx
        if kept is not None and KEPT_STUDENT in self._kept(ctx.opts, self.student_has_dropout):
            # Without dropout train mode computes what eval mode does, and only in train mode does activation
            # checkpointing (model.student.gradient_checkpointing) cover this graph, which stays alive through
            # the whole prompt step (measured: bench/plan_check.py, zero0_fp32_ckpt).
            ctx.engine.module.train(True)
            try:
                logits = self.student_forward(ctx.engine, r, start)
            finally:
                ctx.engine.module.train(False)
            kept.student[index] = logits
            return logits.detach()
        with torch.no_grad():
            return self.student_forward(ctx.engine.module, r, start)

    @functools.cached_property
    def student_has_dropout(self) -> bool:
        return has_dropout(self.ctx.engine.module)

    # ------------------------------------------------------------------ phase 3
    def student_update(self, rollouts: list[Rollout], n_global: torch.Tensor | float, kept: Kept,
                       tally: Optional[Tally] = None) -> Tally:
        """Phase 3: the student's reverse-KL step; its metrics, added to ``tally``."""
        tally = Tally() if tally is None else tally
        ctx = self.ctx
        use_prompt = self.uses_prompt()
        tally.mean("loss/rkl", "loss/rkl")
        for i, r in enumerate(rollouts):
            ctx.timer.restart()
            start, mask = response_start(r), shifted_mask(r)
            t_logits = kept.targets[i]
            if t_logits is None:
                with torch.no_grad():
                    t_logits = self.teacher_forward(r, use_prompt, start)
            ctx.timer.lap("student/teacher_fwd_nograd")
            s_logits = kept.student[i]
            if s_logits is None:
                s_logits = self.student_forward(ctx.engine, r, start)
            ctx.timer.lap("student/fwd")
            if ctx.fused_head:  # logits (here: hidden states) through both heads, chunk by chunk
                rkl = fused_student_update(ctx, s_logits, t_logits, mask, "rkl", n_global)
            else:
                rkl, _ = reverse_kl(s_logits, teacher=t_logits, mask=mask, chunk_size=ctx.chunk)
                ctx.timer.lap("student/loss")
                student_backward(ctx, rkl, n_global)
            tally.add("loss/rkl", rkl)
        return tally


class RKL(PromptKD):
    """Plain on-policy reverse KL: PromptKD with no prompt (the ablation)."""

    spec = REGISTRY["rkl"]
