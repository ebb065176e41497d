"""MiniLLM's policy-gradient objective (Gu et al. 2023) on aligned logits.

Same conventions as ``promptkd.losses``: logits ``[B, T, V]`` already shifted so
position t predicts ``targets[:, t]``, a ``[B, T]`` mask, fp32 inside, masked-in
rows selected before any softmax, ``(loss_sum, n_tokens)`` out, normalised by
the caller with a global token count.

On a response y sampled from p_mix = α·p_T + (1-α)·p_S, per response token t:
- reward ``r_t = log p_T(y_t) - log p_S(y_t)`` (a constant);
- importance weight ``w_t = p_S(y_t) / p_mix(y_t)``, clipped (a constant);
- return ``R_t`` = mean (length_norm) or sum of ``r_t'`` over the later tokens
  t' > t of the same response, 0 at its last token;
- ``loss = Σ_t w_t · (KL(p_S ‖ p_T)_t - R_t · log p_S(y_t))``.
The first term (single-step) is the exact gradient of this position's reverse
KL; the second is the REINFORCE surrogate of the long-term reverse KL, whose
gradient is ``-R_t ∇ log p_S(y_t)``. Gradients reach the student logits only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promptkd.losses.core import _check_shapes, _n_tokens, _run_chunked, _select


def _check_targets(targets: torch.Tensor, mask: torch.Tensor, name: str = "targets") -> None:
    if targets.shape != mask.shape:
        raise ValueError(f"{name} must be [B, T] = {tuple(mask.shape)}, got {tuple(targets.shape)}")


def _picked_chunk(s_logits: torch.Tensor, t_logits: torch.Tensor, targets: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    keep = mask.bool()
    idx = targets[keep].long().unsqueeze(-1)
    out = torch.zeros((2,) + mask.shape, dtype=torch.float32, device=mask.device)
    out[0][keep] = F.log_softmax(_select(s_logits, keep), dim=-1).gather(-1, idx).squeeze(-1)
    out[1][keep] = F.log_softmax(_select(t_logits, keep), dim=-1).gather(-1, idx).squeeze(-1)
    return out


@torch.no_grad()
def sampled_logprobs(student: torch.Tensor, *, teacher: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                     chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_S(y_t), log p_T(y_t)), each fp32 [B, T], 0 at masked-out positions; no grad."""
    _check_shapes([student, teacher], mask)
    _check_targets(targets, mask)
    parts = []
    step = chunk_size if chunk_size else max(mask.shape[1], 1)
    for start in range(0, mask.shape[1], step):  # position-wise: chunks simply concatenate
        sl = slice(start, start + step)
        parts.append(_picked_chunk(student[:, sl], teacher[:, sl], targets[:, sl], mask[:, sl]))
    out = torch.cat(parts, dim=2) if parts else torch.zeros((2,) + mask.shape, device=mask.device)
    return out[0], out[1]


def importance_weights(logp_student: torch.Tensor, logp_teacher: torch.Tensor, mask: torch.Tensor,
                       alpha: float, clip: float) -> torch.Tensor:
    """w_t = p_S(y_t) / (α·p_T(y_t) + (1-α)·p_S(y_t)), at most ``clip``; 0 off the mask, [B, T].

    w <= 1/(1-α) always, so ``clip`` only binds when α > 1 - 1/clip. α = 0 gives exactly 1.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    m = mask.to(torch.float32)
    if alpha == 0.0:
        return m.clone()
    # 1 / (α·exp(lt - ls) + 1 - α): an overflowing ratio gives w = 0, never nan
    ratio = torch.exp((logp_teacher - logp_student).float())
    w = 1.0 / (alpha * ratio + (1.0 - alpha))
    return w.clamp(max=clip) * m


def future_returns(rewards: torch.Tensor, mask: torch.Tensor, length_norm: bool = True) -> torch.Tensor:
    """R_t over the later masked positions of each row: mean (length_norm) or sum; 0 where none, [B, T].

    rewards, mask: [B, T]; rewards at masked-out positions are ignored.
    """
    m = mask.to(torch.float32)
    r = rewards.to(torch.float32) * m
    # suffix sums that exclude position t itself
    after = r.flip(1).cumsum(1).flip(1) - r
    count = m.flip(1).cumsum(1).flip(1) - m
    ret = after / count.clamp(min=1.0) if length_norm else after
    return torch.where(count > 0, ret, torch.zeros_like(ret)) * m


def _make_minillm_chunk(single_step: bool, long_term: bool):
    def chunk(s_logits: torch.Tensor, t_logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
              returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.bool()
        s_logp = F.log_softmax(_select(s_logits, keep), dim=-1)
        w = weights[keep].to(torch.float32)
        zero = torch.zeros((), dtype=torch.float32, device=s_logp.device)
        kl = zero
        if single_step:
            t_logp = F.log_softmax(_select(t_logits, keep), dim=-1)
            kl = (w * (s_logp.exp() * (s_logp - t_logp)).sum(-1)).sum()
        pg = zero
        if long_term:
            picked = s_logp.gather(-1, targets[keep].long().unsqueeze(-1)).squeeze(-1)
            pg = -(w * returns[keep].to(torch.float32) * picked).sum()
        return torch.stack([kl, pg])

    return chunk


@dataclass
class MiniLLMTerms:
    """The objective and its parts (fp32 scalars, sums over tokens); only ``total`` has a graph."""

    total: torch.Tensor
    kl: torch.Tensor          # Σ w_t · KL(p_S ‖ p_T)_t
    pg: torch.Tensor          # Σ -w_t · R_t · log p_S(y_t)
    reward_sum: torch.Tensor  # Σ r_t
    weight_sum: torch.Tensor  # Σ w_t
    n_tokens: torch.Tensor


def minillm_terms(student: torch.Tensor, *, teacher: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                  mask: torch.Tensor, length_norm: bool = True, single_step: bool = True, long_term: bool = True,
                  chunk_size: int | None = None,
                  logprobs: tuple[torch.Tensor, torch.Tensor] | None = None) -> MiniLLMTerms:
    """MiniLLM loss on sampled ``targets`` [B, T] with importance ``weights`` [B, T] (constants).

    Rewards and returns are computed here from the (detached) logits, or from
    ``logprobs`` = ``sampled_logprobs(...)`` when the caller already has them; the
    teacher never receives a gradient. ``single_step`` / ``long_term`` switch the two terms.
    """
    _check_shapes([student, teacher], mask)
    _check_targets(targets, mask)
    _check_targets(weights, mask, "weights")
    teacher = teacher.detach()
    weights = weights.detach().to(torch.float32)
    ls, lt = logprobs if logprobs is not None else sampled_logprobs(student, teacher=teacher, targets=targets,
                                                                     mask=mask, chunk_size=chunk_size)
    m = mask.to(torch.float32)
    rewards = (lt - ls) * m
    returns = future_returns(rewards, mask, length_norm)
    parts = _run_chunked(_make_minillm_chunk(single_step, long_term),
                         [student, teacher, targets, weights, returns], mask, chunk_size)
    return MiniLLMTerms(total=parts[0] + parts[1], kl=parts[0].detach(), pg=parts[1].detach(),
                        reward_sum=rewards.sum(), weight_sum=(weights * m).sum(), n_tokens=_n_tokens(mask))
