"""The fused LM head on a method's side: hidden-state forwards, and the divergences through the heads.

With ``method.fused_head`` (the default) a method's divergence never sees ``[B, T, V]`` logits: the student
and the teacher run without their LM heads (``promptkd.models.forward.head_inputs``: the final hidden states
of the same positions ``lm_logits``/``teacher_logits`` would give logits for), and the loss applies each
head chunk by chunk (``promptkd.losses.fused_head``). Each head's weight is gathered once per loss under
ZeRO-3 (``head_params``), never per chunk. Values and gradients equal the logits path to 1e-6 in fp32
(tests/unit/test_fused_methods.py); rollouts keep the logits path (the last position only).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from promptkd.losses import PromptLoss
from promptkd.losses.fused_head import HeadStates, fused_prompt_loss, fused_token_divergence
from promptkd.methods.base import StepContext, loss_scale
from promptkd.models.forward import head_inputs, head_params
from promptkd.rollout import position_ids


# The methods whose student loss is a teacher-student divergence over token distributions (REGISTRY's
# ``fused_head``): with method.fused_head their losses run here. SFT and SeqKD (cross-entropy on tokens), MiniLLM
# (policy-gradient terms on sampled tokens' log-probabilities) and KD's CE term keep the logits path.


def lm_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The student's final hidden states [B, T-1-start, H] for positions start..T-2 (``lm_logits``'s rows)."""
    seq_len = input_ids.shape[1]
    hidden = head_inputs(model, seq_len - start, input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids(attention_mask), use_cache=False)
    return hidden[:, -(seq_len - start):][:, :-1]


def teacher_hidden(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   use_prompt: bool, start: int = 0) -> torch.Tensor:
    """Like ``lm_hidden`` for a PromptedTeacher: [B, T-1-start, H] (``teacher_logits``'s rows)."""
    seq_len = input_ids.shape[1]
    hidden, _ = teacher(input_ids, attention_mask, use_prompt=use_prompt, logits_to_keep=seq_len - start,
                        return_hidden=True)
    return hidden[:, -(seq_len - start):][:, :-1]


def teacher_module(teacher: torch.nn.Module) -> torch.nn.Module:
    """The HF model whose head a PromptedTeacher's logits come from."""
    return getattr(teacher, "base", teacher)


def fused_student_update(ctx: StepContext, s_hidden: torch.Tensor, t_hidden: torch.Tensor, mask: torch.Tensor,
                         name: str, n_global: torch.Tensor | float, *, beta: float = 0.5,
                         alpha: float = 0.1) -> torch.Tensor:
    """``student_backward(ctx, divergence, n_global)`` for the summed divergence ``name`` (as
    ``promptkd.losses.token_divergence``) of the student's states against the (plain or prompted) teacher's,
    a constant, through both LM heads; returns the divergence (detached).

    The student's head stays gathered (ZeRO-3) from the loss through its backward, where its gradient lands
    (``head_params``); the teacher's only for the loss. The optimizer step runs after the head is released.
    """
    with head_params(ctx.engine) as (s_w, s_b):
        with head_params(teacher_module(ctx.teacher)) as (t_w, t_b):
            total, _ = fused_token_divergence(HeadStates(s_hidden, s_w, s_b),
                                              teacher=HeadStates(t_hidden, t_w, t_b).detached(), name=name,
                                              mask=mask, vocab=ctx.vocab_size, beta=beta, alpha=alpha,
                                              chunk_size=ctx.chunk)
        ctx.timer.lap("student/loss")
        # student_backward's scale (its backward and step are split here by the head's gather)
        ctx.engine.backward(total * loss_scale(n_global), scale_wrt_gas=False)
    ctx.timer.lap("student/bwd")
    ctx.engine.step()
    ctx.timer.lap("student/optimizer")
    return total.detach()


def fused_prompt(ctx: StepContext, s_hidden: torch.Tensor, prompted: torch.Tensor, base: Optional[torch.Tensor],
                 mask: torch.Tensor, reg_weight: float, guidance: str) -> PromptLoss:
    """PromptKD's prompt loss through the heads: the gradient flows into the prompted teacher's states (and on to
    θ); the student's states and the plain teacher's are constants. ``base`` may be None when reg_weight == 0.
    Neither head trains here, so both are released (ZeRO-3) once the loss is computed."""
    with head_params(ctx.engine) as (s_w, s_b), head_params(teacher_module(ctx.teacher)) as (t_w, t_b):
        t_w = t_w.detach()
        t_b = None if t_b is None else t_b.detach()
        return fused_prompt_loss(HeadStates(s_hidden, s_w, s_b), prompted=HeadStates(prompted, t_w, t_b),
                                 teacher=None if base is None else HeadStates(base, t_w, t_b), mask=mask,
                                 vocab=ctx.vocab_size, reg_weight=reg_weight, guidance=guidance,
                                 chunk_size=ctx.chunk)
