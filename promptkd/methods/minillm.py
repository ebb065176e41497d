"""MiniLLM (Gu et al. 2023): reverse KL as a policy-gradient objective.

One optimizer step over the micro-batches:
1. rollout from p_mix = α·p_T + (1-α)·p_S (α = ``method.minillm.teacher_mix``,
   the plain teacher, no soft prompt): the student in eval mode, no grad, both
   models with their own KV cache (``promptkd.rollout.mixed_step_fn``). The
   ``rollout.*`` temperature / top-k / top-p act on the *mixture*; with the
   defaults (1, 0, 1) y ~ p_mix exactly, otherwise the importance weights below
   still use the unfiltered p_S and p_T. α = 0 is the plain student rollout.
2. on the response tokens: reward r_t = log p_T(y_t) - log p_S(y_t), importance
   weight w_t = p_S(y_t)/p_mix(y_t) clipped at ``clip_weight``, return
   R_t = mean of the later rewards, and the loss
   Σ w_t · (KL(p_S ‖ p_T)_t - R_t · log p_S(y_t)) (``promptkd.losses.pg``),
   normalised by the step's global number of response tokens;
3. optionally ``lm_coef`` × cross-entropy on ``train.micro_batch_size``
   documents of ``lm_data`` per micro-batch, normalised by the global
   number of LM tokens of the step. Its data position is in ``state_dict``.

The teacher is the plain one; under teacher placement zero3 its forwards are
collectives, so a teacher-mixed rollout then stops rank-synchronously too.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from promptkd import distributed as dist
from promptkd.config import Config, REGISTRY
from promptkd.data import collate_prompts
from promptkd.data.corpus import LMCorpus, collate_lm, read_texts
from promptkd.losses import cross_entropy
from promptkd.losses.pg import importance_weights, minillm_terms, sampled_logprobs
from promptkd.methods.base import (Method, MicroBatch, StepContext, StepResult, Tally, global_tokens, lm_logits,
                                   local_tokens, token_scale,
                                   response_start, set_modes, shifted_mask, student_backward, student_update_phase,
                                   teacher_logits, to_device)
from promptkd.rollout import Rollout, generate, hf_step_fn, mixed_step_fn, teacher_step_fn
from promptkd.rollout.core import gathered

log = logging.getLogger(__name__)


def mixed_rollout(ctx: StepContext, micro_batch: MicroBatch, alpha: float) -> Rollout:
    """Responses sampled from α·p_T + (1-α)·p_S; student in eval mode, no grad."""
    set_modes(ctx, student_train=False)
    module = ctx.engine.module
    prompts = to_device(collate_prompts(micro_batch, ctx.pad_id))
    teacher_is_collective = alpha > 0 and ctx.teacher_sharded
    step = mixed_step_fn(hf_step_fn(module), teacher_step_fn(ctx.teacher, use_prompt=False), alpha,
                         ctx.vocab_size)
    # ZeRO-3: each partitioned model that decodes is gathered once for the loop, not layer by layer per token
    with gathered(module, ctx.gather_student, "student rollouts", engine=ctx.engine), \
            gathered(ctx.teacher, ctx.gather_student if alpha > 0 else "never", "teacher decoding",
                     engine=ctx.teacher.zero3_engine):
        return generate(step, prompts["input_ids"], prompts["attention_mask"], ctx.sampling,
                        ctx.eos_id, ctx.pad_id, ctx.vocab_size, generator=ctx.generator,
                        sync=ctx.sync_rollout or teacher_is_collective)


def build_lm_corpus(cfg: Config, tokenizer: Any) -> LMCorpus:
    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    corpus = LMCorpus(read_texts(cfg.method.minillm.lm_data), encode, tokenizer.eos_token_id,
                      cfg.data.max_length, cfg.seed, dist.rank(), dist.world_size())
    log.info("minillm: LM loss on %d documents of %s (coef %g)", len(corpus), cfg.method.minillm.lm_data,
             cfg.method.minillm.lm_coef)
    return corpus


class MiniLLM(Method):
    spec = REGISTRY["minillm"]
    progress_keys = ("loss/minillm_kl", "loss/minillm_pg", "loss/lm")

    def __init__(self, ctx: StepContext, corpus: Optional[LMCorpus] = None, lm_batch_size: int = 0):
        super().__init__(ctx)
        self.corpus = corpus               # the LM loss's documents (None: no LM loss)
        self.lm_batch_size = lm_batch_size  # documents per micro-batch

    @classmethod
    def from_config(cls, cfg: Config, ctx: StepContext) -> "MiniLLM":
        corpus = build_lm_corpus(cfg, ctx.tokenizer) if ctx.opts.lm_coef > 0 else None
        return cls(ctx, corpus, cfg.train.micro_batch_size)

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> StepResult:
        ctx = self.ctx
        with ctx.timer.phase("rollout"):
            seqs = [mixed_rollout(ctx, mb, ctx.opts.teacher_mix) for mb in micro_batches]
        lm = self.lm_batches(len(seqs))
        n_global = global_tokens([s.loss_mask for s in seqs])
        n_lm = global_tokens([b["attention_mask"] for b in lm]) if lm else None
        tally = self.tally([s.loss_mask for s in seqs], [b["attention_mask"] for b in lm])
        with student_update_phase(ctx):
            for i, s in enumerate(seqs):
                loss = self.policy_loss(s, tally) / token_scale(n_global)
                if lm:
                    loss = loss + ctx.opts.lm_coef * self.lm_loss(lm[i], tally) / token_scale(n_lm)
                student_backward(ctx, loss, 1.0)  # already divided by the global counts
        return StepResult(tally, seqs)

    def policy_loss(self, s: Rollout, tally: Tally) -> torch.Tensor:
        """Σ over this micro-batch's response tokens of the MiniLLM objective (a sum, not a mean)."""
        ctx, m = self.ctx, self.ctx.opts
        start = response_start(s)  # no LM head on prompt positions
        mask, targets = shifted_mask(s), s.input_ids[:, start + 1:]
        with torch.no_grad():
            t_logits = teacher_logits(ctx.teacher, s.input_ids, s.attention_mask, ctx.vocab_size, False, start)
        s_logits = lm_logits(ctx.engine, s.input_ids, s.attention_mask, ctx.vocab_size, start)
        logprobs = sampled_logprobs(s_logits, teacher=t_logits, targets=targets, mask=mask, chunk_size=ctx.chunk)
        weights = importance_weights(*logprobs, mask, m.teacher_mix, m.clip_weight)
        terms = minillm_terms(s_logits, teacher=t_logits, targets=targets, weights=weights, mask=mask,
                              length_norm=m.length_norm,
                              single_step=m.single_step, chunk_size=ctx.chunk, logprobs=logprobs)
        for key, value in (("kl", terms.kl), ("pg", terms.pg), ("reward", terms.reward_sum),
                           ("weight", terms.weight_sum)):
            tally.add(key, value)
        return terms.total

    def lm_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        if self.corpus is None:
            return []
        size, pad = self.lm_batch_size, self.ctx.pad_id
        return [to_device(collate_lm(self.corpus.draw(size), pad)) for _ in range(n)]

    def lm_loss(self, batch: dict[str, torch.Tensor], tally: Tally) -> torch.Tensor:
        ctx = self.ctx
        logits = lm_logits(ctx.engine, batch["input_ids"], batch["attention_mask"], ctx.vocab_size)
        ce, _ = cross_entropy(logits, targets=batch["input_ids"][:, 1:], mask=batch["attention_mask"][:, 1:],
                              chunk_size=ctx.chunk)
        tally.add("lm", ce)
        return ce

    def tally(self, masks: list[torch.Tensor], lm_masks: list[torch.Tensor]) -> Tally:
        """The step's metrics: kl, pg, reward, weight (and lm) sums, reduced over ranks only when logged."""
        tally = Tally()
        tally.count_tokens(local_tokens(masks))
        for name, key in (("loss/minillm_kl", "kl"), ("loss/minillm_pg", "pg"), ("minillm/mean_weight", "weight"),
                          ("minillm/mean_reward", "reward")):
            tally.mean(name, key)
        if self.corpus is not None:
            tally.add("lm_tokens", local_tokens(lm_masks))
            tally.mean("loss/lm", "lm", per="lm_tokens")
            tally.mean("minillm/lm_tokens", "lm_tokens", per=None)
        return tally

    def state_dict(self) -> dict:
        return {"lm_corpus": self.corpus.state_dict()} if self.corpus is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.corpus is not None and "lm_corpus" in state:
            self.corpus.load_state_dict(state["lm_corpus"])
