"""Sampling engines: core (the KV-cache decode loop every generation shares, and the Rollout layout); vllm (vLLM
as the student's rollout engine, imported only when configured)."""
from __future__ import annotations

from promptkd.rollout.core import (
    banned_ngram_mask, banned_ngram_tokens, choose_tokens, filter_logits, generate, hf_step_fn, mixed_step_fn, position_ids,
    Rollout, rollout_from_responses, SamplingParams, StepFn, teacher_step_fn,
)

__all__ = ["banned_ngram_mask", "banned_ngram_tokens", "choose_tokens", "filter_logits", "generate", "hf_step_fn", "mixed_step_fn",
           "position_ids", "Rollout", "rollout_from_responses", "SamplingParams", "StepFn",
           "teacher_step_fn"]
