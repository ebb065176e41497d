"""Shared pieces of the token-level distillation baselines (ImitKD, GKD, DistiLLM).

- ``SharedDraws``: random numbers that are the same on every rank, for choices
  that change control flow (on/off-policy, generate/replay);
- ``ground_truth``: the dataset responses in the rollout layout;
- ``distill_update``: one student update with a teacher divergence over a step's
  sequences, normalised by the step's global token count.
"""
from __future__ import annotations

import torch

from promptkd.losses import token_divergence
from promptkd.methods.base import (MicroBatch, StepContext, Tally, full_batches, global_tokens, lm_logits, local_tokens,
                                   response_start, shifted_mask, student_backward, student_update_phase,
                                   teacher_logits)
from promptkd.rollout import Rollout
from promptkd.methods.fused import fused_student_update, lm_hidden, teacher_hidden
from promptkd.seeding import derive_seed


class SharedDraws:
    """Uniform [0, 1) draws that are identical on every rank.

    Under ZeRO-3 every student forward (and every synced decode step) is a
    collective, so a random choice that decides *whether* a rank generates must
    come out the same everywhere. This generator is seeded from ``cfg.seed``
    only (never the rank) and callers draw a fixed number of values per step,
    so the streams stay in lock-step; its state goes into the method's
    ``state_dict`` so a resumed run continues the same sequence.
    """

    def __init__(self, seed: int):
        # on the CPU on purpose: the draws are host-side control flow, read with .tolist()
        self.generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "shared"))

    def draw(self, n: int = 1) -> list[float]:
        return torch.rand(n, generator=self.generator, dtype=torch.float64, device="cpu").tolist()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def ground_truth(ctx: StepContext, micro_batches: list[MicroBatch]) -> list[Rollout]:
    """Dataset prompt + response, right-padded; the loss mask covers the response."""
    return [Rollout(b["input_ids"], b["attention_mask"], b["loss_mask"], prompt_len=0)
            for b in full_batches(ctx, micro_batches)]


def distill_update(ctx: StepContext, seqs: list[Rollout], divergence: str, *, alpha: float,
                   beta: float = 0.5) -> Tally:
    """Student step on ``divergence(p_T, p_S)`` over the response tokens of ``seqs``.

    ``alpha`` is the skew of sfkl/srkl, ``beta`` JSD's β (the caller's config section
    gives both). The teacher runs without its prompt (these baselines have none) and is a constant.
    """
    n_global = global_tokens([s.loss_mask for s in seqs])
    tally = Tally()
    tally.count_tokens(local_tokens([s.loss_mask for s in seqs]))
    name = f"loss/{divergence}"
    tally.mean(name, name)
    with student_update_phase(ctx):
        for s in seqs:
            start, mask = response_start(s), shifted_mask(s)
            if ctx.fused_head:  # no [N, V] logits: the loss applies both heads chunk by chunk
                with torch.no_grad():
                    t_hidden = teacher_hidden(ctx.teacher, s.input_ids, s.attention_mask, False, start)
                s_hidden = lm_hidden(ctx.engine, s.input_ids, s.attention_mask, start)
                loss = fused_student_update(ctx, s_hidden, t_hidden, mask, divergence, n_global, beta=beta,
                                            alpha=alpha)
            else:
                with torch.no_grad():
                    t_logits = teacher_logits(ctx.teacher, s.input_ids, s.attention_mask, ctx.vocab_size,
                                              use_prompt=False, start=start)
                s_logits = lm_logits(ctx.engine, s.input_ids, s.attention_mask, ctx.vocab_size, start)
                loss, _ = token_divergence(s_logits, teacher=t_logits, name=divergence, mask=mask,
                                           chunk_size=ctx.chunk, beta=beta, alpha=alpha)
                student_backward(ctx, loss, n_global)
            tally.add(name, loss)
    return tally
