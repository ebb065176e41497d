"""SFT: cross-entropy on the ground-truth response."""
from __future__ import annotations

from promptkd.config import REGISTRY
from promptkd.losses import cross_entropy
from promptkd.methods.base import (Method, MicroBatch, StepContext, StepResult, Tally, full_batches, global_tokens,
                                   lm_logits, local_tokens, student_backward, student_update_phase)


class SFT(Method):
    spec = REGISTRY["sft"]
    progress_keys = ("loss/ce",)
    def train_step(self, micro_batches: list[MicroBatch], step: int) -> StepResult:
        return StepResult(ce_step(self.ctx, micro_batches))


def ce_step(ctx: StepContext, micro_batches: list[MicroBatch]) -> Tally:
    """Cross-entropy on the micro-batches' responses, normalised by the global token count (SFT, SeqKD)."""
    batches = full_batches(ctx, micro_batches)
    n_global = global_tokens([b["loss_mask"] for b in batches])
    tally = Tally()
    tally.count_tokens(local_tokens([b["loss_mask"] for b in batches]))
    tally.mean("loss/ce", "loss/ce")
    with student_update_phase(ctx):
        for b in batches:
            logits = lm_logits(ctx.engine, b["input_ids"], b["attention_mask"], ctx.vocab_size)
            loss_sum, _ = cross_entropy(logits, targets=b["input_ids"][:, 1:], mask=b["loss_mask"][:, 1:],
                                        chunk_size=ctx.chunk)
            student_backward(ctx, loss_sum, n_global)
            tally.add("loss/ce", loss_sum)
    return tally
