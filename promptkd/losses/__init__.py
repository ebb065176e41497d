"""Pure losses returning (sum, count), called ``loss(student, *, teacher=..., mask=..., ...)``.

core: the KL family, the prompt loss, cross-entropy; fused: chunked gradients computed in the forward;
pg: MiniLLM's policy-gradient objective.
"""
from __future__ import annotations

from promptkd.losses.core import (
    cross_entropy, DIVERGENCE_FNS, DIVERGENCES, forward_kl, generalized_jsd, GUIDANCE_CHOICES, kl_divergence,
    prompt_loss, PromptLoss, regularizer_weight, reverse_kl, SCHEDULE_CHOICES, skew_forward_kl, skew_kl,
    skew_reverse_kl, token_divergence, total_variation,
)

__all__ = ["cross_entropy", "DIVERGENCE_FNS", "DIVERGENCES", "forward_kl", "generalized_jsd", "GUIDANCE_CHOICES",
           "kl_divergence", "prompt_loss", "PromptLoss", "regularizer_weight", "reverse_kl", "SCHEDULE_CHOICES",
           "skew_forward_kl", "skew_kl", "skew_reverse_kl", "token_divergence", "total_variation"]
