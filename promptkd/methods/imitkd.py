"""ImitKD: forward KL(p_T ‖ p_S) on student-generated responses (every step on-policy).

``method.imitkd.divergence`` swaps the divergence (e.g. ``tvd`` for on-policy total variation).
"""
from __future__ import annotations

from promptkd.config import DIVERGENCES, Config, REGISTRY
from promptkd.methods.base import Method, MicroBatch, StepResult, student_rollouts
from promptkd.methods.token_kd import distill_update


class ImitKD(Method):
    spec = REGISTRY["imitkd"]

    def shown_keys(self) -> list[str]:
        return [f"loss/{self.ctx.opts.divergence}"]

    @classmethod
    def fused_loss(cls, cfg: Config) -> bool:
        return DIVERGENCES[cfg.method.imitkd.divergence].fused

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> StepResult:
        ctx = self.ctx
        with ctx.timer.phase("rollout"):
            rollouts = student_rollouts(ctx, micro_batches)
        d = ctx.opts
        return StepResult(distill_update(ctx, rollouts, d.divergence, beta=d.beta, alpha=d.skew_alpha), rollouts)
