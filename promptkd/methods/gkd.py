"""GKD (Agarwal et al. 2024): generalized JSD(β) with an on-policy fraction λ.

Each optimizer step draws once from a generator seeded identically on every
rank (``SharedDraws``): with probability ``method.gkd.lmbda`` the whole step
trains on student samples, otherwise on the ground-truth responses. The
per-rank rollout generator is never used for this choice, so all ranks take
the same branch (ZeRO-3 rollouts are collectives). The JSD(β) convention
(β=0 forward KL, β=1 reverse KL) is in ``promptkd.losses.generalized_jsd``;
``method.gkd.divergence`` can replace JSD with fkl | rkl | tvd | sfkl | srkl.
"""
from __future__ import annotations

from promptkd.config import DIVERGENCES, Config, REGISTRY
from promptkd.methods.base import Method, MicroBatch, StepContext, StepResult, student_rollouts
from promptkd.methods.token_kd import SharedDraws, distill_update, ground_truth


class GKD(Method):
    spec = REGISTRY["gkd"]

    def shown_keys(self) -> list[str]:
        return [f"loss/{self.ctx.opts.divergence}"]

    @classmethod
    def fused_loss(cls, cfg: Config) -> bool:
        return DIVERGENCES[cfg.method.gkd.divergence].fused

    def __init__(self, ctx: StepContext):
        super().__init__(ctx)
        self.draws = SharedDraws(ctx.seed)

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> StepResult:
        ctx = self.ctx
        g = ctx.opts
        on_policy = self.draws.draw()[0] < g.lmbda
        if on_policy:
            with ctx.timer.phase("rollout"):
                seqs = student_rollouts(ctx, micro_batches)
        else:
            seqs = ground_truth(ctx, micro_batches)
        tally = distill_update(ctx, seqs, g.divergence, beta=g.beta, alpha=g.skew_alpha)
        tally.values["gkd/on_policy"] = float(on_policy)
        return StepResult(tally, seqs if on_policy else [])

    def state_dict(self) -> dict:
        return {"draws": self.draws.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "draws" in state:
            self.draws.load_state_dict(state["draws"])
