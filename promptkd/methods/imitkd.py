"""ImitKD: forward KL(p_T ‖ p_S) on student-generated responses (every step on-policy).

``method.divergence`` swaps the divergence (e.g. ``tvd`` for on-policy total variation).
"""
from __future__ import annotations

from promptkd.methods.base import Method, MicroBatch, student_rollout
from promptkd.methods.distill import distill_update, resolve_divergence


class ImitKD(Method):
    uses_teacher = True
    default_divergence = "fkl"

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> dict[str, float]:
        ctx = self.ctx
        with ctx.timer.phase("rollout"):
            rollouts = [student_rollout(ctx, mb) for mb in micro_batches]
        self.last_rollouts = rollouts
        return distill_update(ctx, rollouts, resolve_divergence(ctx.cfg, self.default_divergence))
