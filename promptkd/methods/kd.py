"""KD: token-level forward KL(p_T || p_S) on ground truth, optionally mixed with CE."""
from __future__ import annotations

import torch

from promptkd.config import Config, REGISTRY
from promptkd.losses import cross_entropy, forward_kl
from promptkd.methods.base import (Method, MicroBatch, StepResult, Tally, full_batches, global_tokens, lm_logits,
                                   local_tokens, student_backward, student_update_phase, teacher_logits)
from promptkd.methods.fused import fused_student_update, lm_hidden, teacher_hidden


class KD(Method):
    spec = REGISTRY["kd"]
    progress_keys = ("loss/fkl", "loss/ce")

    @classmethod
    def fused_loss(cls, cfg: Config) -> bool:
        return cfg.method.kd.ce_weight == 0  # forward KL; the ground-truth CE term is not fused

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> StepResult:
        ctx = self.ctx
        w_ce = ctx.opts.ce_weight
        batches = full_batches(ctx, micro_batches)
        n_global = global_tokens([b["loss_mask"] for b in batches])
        tally = Tally()
        tally.count_tokens(local_tokens([b["loss_mask"] for b in batches]))
        tally.mean("loss/fkl", "loss/fkl")
        if w_ce > 0:
            tally.mean("loss/ce", "loss/ce")
        with student_update_phase(ctx):
            for b in batches:
                ids, attn, mask = b["input_ids"], b["attention_mask"], b["loss_mask"][:, 1:]
                if ctx.fused_head and w_ce == 0:  # the CE term needs the student's logits: only pure FKL is fused
                    with torch.no_grad():
                        t_hidden = teacher_hidden(ctx.teacher, ids, attn, use_prompt=False)
                    fkl = fused_student_update(ctx, lm_hidden(ctx.engine, ids, attn), t_hidden, mask, "fkl", n_global)
                    tally.add("loss/fkl", fkl)
                    continue
                with torch.no_grad():
                    t_logits = teacher_logits(ctx.teacher, ids, attn, ctx.vocab_size, use_prompt=False)
                s_logits = lm_logits(ctx.engine, ids, attn, ctx.vocab_size)
                fkl, _ = forward_kl(s_logits, teacher=t_logits, mask=mask, chunk_size=ctx.chunk)
                loss = (1.0 - w_ce) * fkl
                if w_ce > 0:
                    ce, _ = cross_entropy(s_logits, targets=ids[:, 1:], mask=mask, chunk_size=ctx.chunk)
                    loss = loss + w_ce * ce
                    tally.add("loss/ce", ce)
                student_backward(ctx, loss, n_global)
                tally.add("loss/fkl", fkl)
        return StepResult(tally)
