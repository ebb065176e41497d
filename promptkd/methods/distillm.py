"""DistiLLM (Ko et al. 2024): skew KL with an adaptive off-policy schedule.

Loss (``method.distillm.loss``, α = ``method.distillm.skew_alpha``; every key below is
``method.distillm.*``):
srkl = KL(p_S ‖ α·p_S + (1-α)·p_T), sfkl = KL(p_T ‖ α·p_T + (1-α)·p_S).

Where a step's sequences come from: two draws per step from ``SharedDraws``
(seeded identically on every rank, so every rank takes the same branch):
- ``u1 >= φ``: the ground-truth responses;
- ``u1 < φ``, a student-sample step:
  - ``u2 < replay_ratio`` and every rank's buffer is non-empty: *replay*, each
    micro-batch is replaced by as many items of this rank's replay buffer
    (which items is drawn with the per-rank rollout generator: not control flow);
  - otherwise *fresh*: the student samples responses to the step's prompts
    (synced rollout); they are trained on and pushed into the FIFO buffer
    (``replay_capacity`` items per rank).

The schedule φ starts at ``init_prob``. DistiLLM raises it when the
dev loss stops improving; here the dev loss is proxied by the step's global
mean training loss (identical on every rank, free, and needing no trainer
hook): every ``window`` steps the window's mean is compared with the
previous window's, and unless it dropped by more than ``loss_eps``,
φ grows by ``prob_step`` (capped at 1). The proxy mixes data sources
(ground truth, replay, fresh), which a held-out dev loss would not.

``state_dict`` carries the draws, φ, the window and every rank's buffer (it
gathers them, so every rank must call it, as the trainer's ``save`` does).
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import torch

from promptkd import distributed as dist
from promptkd.config import REGISTRY
from promptkd.data import TokenizedExample
from promptkd.methods.base import Method, MicroBatch, StepContext, StepResult, student_rollouts
from promptkd.methods.token_kd import SharedDraws, distill_update, ground_truth
from promptkd.rollout import Rollout

GROUND_TRUTH, FRESH, REPLAY = 0, 1, 2


class ReplayBuffer:
    """FIFO of this rank's student samples as token-id lists (checkpoint-friendly)."""

    def __init__(self, capacity: int):
        self.items: deque[dict] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, rollouts: list[Rollout], micro_batches: list[MicroBatch]) -> None:
        for r, mb in zip(rollouts, micro_batches):
            p = r.prompt_len
            for i, ex in enumerate(mb):
                self.items.append({
                    "id": ex.id,
                    "prompt_ids": r.input_ids[i, :p][r.attention_mask[i, :p].bool()].tolist(),
                    "response_ids": r.input_ids[i, p:][r.loss_mask[i, p:].bool()].tolist(),
                })

    def sample(self, sizes: list[int], generator: Optional[torch.Generator]) -> list[MicroBatch]:
        """Micro-batches of the given sizes; without replacement when the buffer is large enough."""
        total = sum(sizes)
        # drawn on the generator's own device (the rollout generator lives on the accelerator)
        device = generator.device if generator is not None else torch.device("cpu")
        if len(self.items) >= total:
            order = torch.randperm(len(self.items), generator=generator, device=device)[:total].tolist()
        else:
            order = torch.randint(len(self.items), (total,), generator=generator, device=device).tolist()
        picked = [TokenizedExample(id=it["id"], prompt_ids=list(it["prompt_ids"]),
                                   response_ids=list(it["response_ids"]), references=[], category="replay")
                  for it in (self.items[j] for j in order)]
        out, start = [], 0
        for n in sizes:
            out.append(picked[start:start + n])
            start += n
        return out


class DistiLLM(Method):
    spec = REGISTRY["distillm"]

    def shown_keys(self) -> list[str]:
        return [f"loss/{self.ctx.opts.loss}"]

    def __init__(self, ctx: StepContext):
        super().__init__(ctx)
        m = ctx.opts
        self.draws = SharedDraws(ctx.seed)
        self.buffer = ReplayBuffer(m.replay_capacity)
        self.phi = float(m.init_prob)
        self.window: list[float] = []
        self.prev_window: Optional[float] = None

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> StepResult:
        ctx, m = self.ctx, self.ctx.opts
        u_student, u_replay = self.draws.draw(2)
        source = GROUND_TRUTH
        if u_student < self.phi:
            replay = u_replay < m.replay_ratio and dist.all_true(len(self.buffer) > 0)
            source = REPLAY if replay else FRESH
        if source == FRESH:
            with ctx.timer.phase("rollout"):
                seqs = student_rollouts(ctx, micro_batches)
            self.buffer.add(seqs, micro_batches)
        elif source == REPLAY:
            seqs = ground_truth(ctx, self.buffer.sample([len(mb) for mb in micro_batches], ctx.generator))
        else:
            seqs = ground_truth(ctx, micro_batches)
        tally = distill_update(ctx, seqs, m.loss, alpha=m.skew_alpha)
        phi_used = self.phi
        # the adaptive schedule reads the global step loss on every rank: reduced every step (control flow)
        self._update_schedule(tally.reduce()[f"loss/{m.loss}"])
        tally.values.update({"distillm/source": float(source), "distillm/phi": phi_used,
                             "distillm/buffer_size": float(len(self.buffer))})
        return StepResult(tally, seqs if source == FRESH else [])

    def _update_schedule(self, step_loss: float) -> None:
        m = self.ctx.opts
        self.window.append(step_loss)
        if len(self.window) < m.window:
            return
        mean = sum(self.window) / len(self.window)
        stalled = self.prev_window is not None and mean >= self.prev_window - m.loss_eps
        # the loss is a global mean (same on every rank); the vote makes φ's equality not hinge on float bits
        if dist.any_true(stalled):
            self.phi = min(1.0, self.phi + m.prob_step)
        self.prev_window, self.window = mean, []

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Collective: gathers every rank's buffer (call on all ranks)."""
        return {"draws": self.draws.state_dict(), "phi": self.phi, "window": list(self.window),
                "prev_window": self.prev_window, "buffers": dist.all_gather_object(list(self.buffer.items))}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.draws.load_state_dict(state["draws"])
        self.phi, self.window, self.prev_window = state["phi"], list(state["window"]), state["prev_window"]
        buffers = state["buffers"]
        world, rank = dist.world_size(), dist.rank()
        # same world size: each rank gets its own samples back; otherwise deal the pooled samples out
        mine = buffers[rank] if len(buffers) == world else [it for b in buffers for it in b][rank::world]
        self.buffer.items.clear()
        self.buffer.items.extend(mine)
