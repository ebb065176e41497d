"""Token-level losses on aligned logits.

Conventions shared by every function here:

- logits are ``[B, T, V]`` in any float dtype and are already shifted by the
  caller, so position ``t`` of every input predicts the same token;
- ``mask`` is ``[B, T]`` (0/1, any dtype) and marks the positions that count;
- the result is ``(loss_sum, n_tokens)``, both fp32 scalars, with
  ``n_tokens = mask.sum()``. Callers divide by a *global* token count (over
  accumulation micro-batches and ranks), never by a per-batch mean;
- one argument order: the student's logits first, everything else keyword-only
  (``forward_kl(s, teacher=t, mask=m)``), so no call can swap the two models.
  ``kl_divergence(p, q)`` and ``skew_kl(p, q)`` are the role-free primitives
  (KL(p || q) of any two distributions) the named losses are built from.

All arithmetic runs in fp32. Only masked-in rows are selected before the
softmax, so padding rows cost nothing and garbage (even inf/nan) logits at
masked-out positions cannot leak into values or gradients.

``chunk_size`` bounds peak memory: T is processed in slices of that length.
When a gradient is needed, the KL divergences and the prompt loss compute it in
the forward, slice by slice (``promptkd.losses.fused``: slices of ``chunk_size x B``
kept rows, found with one ``nonzero`` per loss, so the slice loop never syncs with the
host; ``chunk_size=None`` then picks ~16 MB fp32 slices on CPU, so small vocabularies
stay one piece, and slices sized by free memory on CUDA); the other
losses run each slice under non-reentrant activation checkpointing, so the fp32
``B x chunk x V`` intermediates are recomputed in backward instead of being
kept alive for the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from promptkd.config.divergences import DIVERGENCES
from promptkd.config.methods import GUIDANCE_CHOICES, SCHEDULE_CHOICES
from promptkd.losses.fused import _FusedChunkedKL, _FusedPromptLoss, _select, auto_chunk

ChunkFn = Callable[..., torch.Tensor]


def _check_shapes(logits: list[torch.Tensor], mask: torch.Tensor) -> None:
    first = logits[0]
    if first.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(first.shape)}")
    for other in logits[1:]:
        if other.shape != first.shape:
            raise ValueError(
                f"logits shapes differ: {tuple(first.shape)} vs {tuple(other.shape)}"
            )
    if mask.shape != first.shape[:2]:
        raise ValueError(
            f"mask must be [B, T] = {tuple(first.shape[:2])}, got {tuple(mask.shape)}"
        )


def _n_tokens(mask: torch.Tensor) -> torch.Tensor:
    return mask.detach().to(torch.float32).sum()


def _run_chunked(
    fn: ChunkFn,
    tensors: list[torch.Tensor],
    mask: torch.Tensor,
    chunk_size: int | None,
) -> torch.Tensor:
    """Apply ``fn(*tensor_slices, mask_slice)`` over T and sum the results.

    ``fn`` must return an fp32 tensor (scalar or small vector) that is additive
    over positions; that is what makes chunking exact.
    """
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    seq_len = mask.shape[1]
    if chunk_size is None or seq_len == 0:
        return fn(*tensors, mask)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    total: torch.Tensor | None = None
    for start in range(0, seq_len, chunk_size):
        end = min(start + chunk_size, seq_len)
        parts = [t[:, start:end] for t in tensors]
        mask_part = mask[:, start:end]
        if needs_grad:
            out = checkpoint(fn, *parts, mask_part, use_reentrant=False)
        else:
            out = fn(*parts, mask_part)
        total = out if total is None else total + out
    assert total is not None  # seq_len > 0, so the loop ran at least once
    return total


def _kl_rows(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(p || q) given fp32 log-probs [N, V]."""
    return (p_logp.exp() * (p_logp - q_logp)).sum()


def _kl_chunk(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask.bool()
    p_logp = F.log_softmax(_select(p_logits, keep), dim=-1)
    q_logp = F.log_softmax(_select(q_logits, keep), dim=-1)
    return _kl_rows(p_logp, q_logp)


def kl_divergence(
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level KL(p || q) = sum_v p (log p - log q), summed over masked positions.

    p, q: logits [B, T, V]; mask: [B, T]. Gradients flow to whichever
    input requires grad; detach at the call site to make one side a constant.
    """
    _check_shapes([p, q], mask)
    if _fused(chunk_size, p, q):
        chunk = chunk_size or auto_chunk(p)
        return _FusedChunkedKL.apply(p, q, mask, chunk), _n_tokens(mask)
    loss = _run_chunked(_kl_chunk, [p, q], mask, chunk_size)
    return loss, _n_tokens(mask)


def _fused(chunk_size: int | None, *logits: torch.Tensor) -> bool:
    """Gradients needed: compute them in the forward (faster than autograd, measured, and less memory)."""
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    return torch.is_grad_enabled() and any(t.requires_grad for t in logits)


def forward_kl(
    student: torch.Tensor,
    *,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_T || p_S): mass-covering distillation (KD, ImitKD). Logits [B, T, V], mask [B, T]."""
    return kl_divergence(teacher, student, mask=mask, chunk_size=chunk_size)


def reverse_kl(
    student: torch.Tensor,
    *,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_S || p_T): mode-seeking distillation (PromptKD student update). Logits [B, T, V], mask [B, T]."""
    return kl_divergence(student, teacher, mask=mask, chunk_size=chunk_size)


def _ce_chunk(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask.bool()
    logp = F.log_softmax(_select(logits, keep), dim=-1)
    picked = logp.gather(-1, targets[keep].long().unsqueeze(-1))
    return -picked.sum()


def cross_entropy(
    student: torch.Tensor,
    *,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of -log p_S(target) over masked positions.

    student: logits [B, T, V] of the model being trained; targets: [B, T] long (values at
    masked-out positions are never read, so -100 or pad ids are fine there); mask: [B, T].
    """
    _check_shapes([student], mask)
    if targets.shape != mask.shape:
        raise ValueError(
            f"targets must be [B, T] = {tuple(mask.shape)}, got {tuple(targets.shape)}"
        )
    loss = _run_chunked(_ce_chunk, [student, targets], mask, chunk_size)
    return loss, _n_tokens(mask)


@dataclass
class PromptLoss:
    """Prompt-update objective and its parts (all fp32 scalars, sums over tokens).

    ``total`` is the only term with a graph; ``guidance``/``regularizer`` are
    detached copies for logging.
    """

    total: torch.Tensor
    guidance: torch.Tensor
    regularizer: torch.Tensor
    n_tokens: torch.Tensor


def _make_prompt_chunk(guidance: str, with_reg: bool) -> ChunkFn:
    """Fused guidance + regularizer so the prompted log-softmax is computed once per chunk."""

    def chunk(
        prompted: torch.Tensor, student: torch.Tensor, base: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        keep = mask.bool()
        prompted_logp = F.log_softmax(_select(prompted, keep), dim=-1)
        student_logp = F.log_softmax(_select(student, keep), dim=-1)
        if guidance == "teacher_student":
            guide = _kl_rows(prompted_logp, student_logp)
        else:
            guide = _kl_rows(student_logp, prompted_logp)
        if with_reg:
            reg = _kl_rows(prompted_logp, F.log_softmax(_select(base, keep), dim=-1))
        else:
            reg = torch.zeros((), dtype=torch.float32, device=guide.device)
        return torch.stack([guide, reg])

    return chunk


def prompt_loss(
    student: torch.Tensor,
    *,
    prompted: torch.Tensor,
    teacher: torch.Tensor | None,
    mask: torch.Tensor,
    reg_weight: float,
    guidance: str = "teacher_student",
    chunk_size: int | None = None,
) -> PromptLoss:
    """PromptKD prompt objective: guidance + reg_weight * KL(p_T^theta || p_T).

    student: p_S's logits; prompted: p_T^theta's (the only input trained here); teacher: the
    plain p_T's. guidance "teacher_student" is KL(p_T^theta || p_S) (paper default);
    "student_teacher" is KL(p_S || p_T^theta). All logits [B, T, V], mask [B, T].
    Student and plain-teacher logits are detached: only the prompt is trained here.
    With reg_weight == 0 the regularizer is not computed and reported as 0, and
    ``teacher`` may be None (the plain-teacher forward can be skipped).
    """
    if guidance not in GUIDANCE_CHOICES:
        raise ValueError(f"guidance must be one of {GUIDANCE_CHOICES}, got {guidance!r}")
    student = student.detach()
    with_reg = reg_weight != 0
    if with_reg and teacher is None:
        raise ValueError("prompt_loss: teacher (the plain teacher's logits) is required when reg_weight != 0")
    # Without the regularizer the base logits are never read; the student tensor
    # is a shape-compatible stand-in so the chunk driver needs no special case.
    base = student if teacher is None or not with_reg else teacher.detach()
    _check_shapes([prompted, student, base], mask)
    if _fused(chunk_size, prompted):
        chunk = chunk_size or auto_chunk(prompted)
        total, guide, reg = _FusedPromptLoss.apply(prompted, student, base, mask, chunk,
                                                   guidance == "teacher_student", float(reg_weight) if with_reg
                                                   else 0.0)
        return PromptLoss(total=total, guidance=guide, regularizer=reg, n_tokens=_n_tokens(mask))
    parts = _run_chunked(
        _make_prompt_chunk(guidance, with_reg),
        [prompted, student, base],
        mask,
        chunk_size,
    )
    guide, reg = parts[0], parts[1]
    total = guide + reg_weight * reg if with_reg else guide
    return PromptLoss(
        total=total,
        guidance=guide.detach(),
        regularizer=reg.detach(),
        n_tokens=_n_tokens(mask),
    )


def regularizer_weight(step: int, total_steps: int, schedule: str, constant: float = 1.0) -> float:
    """Weight w(t) of the prompt regularizer.

    "linear": constant · (1 - step/total_steps) clamped at >= 0 (the paper: constant = 1);
    "constant": ``constant``;
    "off": 0.0.
    """
    if schedule == "linear":
        if total_steps <= 0:
            raise ValueError(
                f"linear regularizer schedule needs total_steps > 0, got {total_steps}"
            )
        return float(constant) * max(0.0, 1.0 - step / total_steps)
    if schedule == "constant":
        return float(constant)
    if schedule == "off":
        return 0.0
    raise ValueError(
        f"unknown regularizer schedule {schedule!r}; expected one of {SCHEDULE_CHOICES}"
    )


# ----------------------------------------------------------------------------- baseline divergences
#
# Same conventions as above: (student, *, teacher, mask, chunk_size=None) -> (sum, n_tokens),
# fp32 inside, gradients flow to whichever input requires grad (also through mixtures).


def _mix_logp(a_logp: torch.Tensor, b_logp: torch.Tensor, w_a: float) -> torch.Tensor:
    """log(w_a · a + (1 - w_a) · b) from fp32 log-probs [N, V], computed stably."""
    if w_a == 0.0:
        return b_logp
    if w_a == 1.0:
        return a_logp
    return torch.logsumexp(torch.stack([a_logp + math.log(w_a), b_logp + math.log1p(-w_a)]), dim=0)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _make_skew_chunk(alpha: float) -> ChunkFn:
    def chunk(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.bool()
        p_logp = F.log_softmax(_select(p_logits, keep), dim=-1)
        q_logp = F.log_softmax(_select(q_logits, keep), dim=-1)
        return _kl_rows(p_logp, _mix_logp(p_logp, q_logp, alpha))

    return chunk


def skew_kl(
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    mask: torch.Tensor,
    chunk_size: int | None = None,
    alpha: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Skew KL (DistiLLM): KL(p || alpha·p + (1-alpha)·q) per token, summed over the mask.

    alpha = 0 is KL(p || q); alpha = 1 is 0. p, q: logits [B, T, V], mask [B, T].
    """
    _check_unit("alpha", alpha)
    _check_shapes([p, q], mask)
    loss = _run_chunked(_make_skew_chunk(float(alpha)), [p, q], mask, chunk_size)
    return loss, _n_tokens(mask)


def skew_forward_kl(
    student: torch.Tensor,
    *,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
    alpha: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SFKL: KL(p_T || alpha·p_T + (1-alpha)·p_S)."""
    return skew_kl(teacher, student, mask=mask, chunk_size=chunk_size, alpha=alpha)


def skew_reverse_kl(
    student: torch.Tensor,
    *,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
    alpha: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SRKL: KL(p_S || alpha·p_S + (1-alpha)·p_T)."""
    return skew_kl(student, teacher, mask=mask, chunk_size=chunk_size, alpha=alpha)


def _make_jsd_chunk(beta: float) -> ChunkFn:
    def chunk(t_logits: torch.Tensor, s_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.bool()
        t_logp = F.log_softmax(_select(t_logits, keep), dim=-1)
        s_logp = F.log_softmax(_select(s_logits, keep), dim=-1)
        if beta == 0.0:
            return _kl_rows(t_logp, s_logp)
        if beta == 1.0:
            return _kl_rows(s_logp, t_logp)
        m_logp = _mix_logp(t_logp, s_logp, beta)
        return beta * _kl_rows(t_logp, m_logp) + (1.0 - beta) * _kl_rows(s_logp, m_logp)

    return chunk


def generalized_jsd(
    student: torch.Tensor,
    *,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized JSD(beta) of GKD (Agarwal et al. 2024), per token, summed over the mask.

    For 0 < beta < 1, with M = beta·p_T + (1-beta)·p_S:
        JSD(beta) = beta · KL(p_T || M) + (1-beta) · KL(p_S || M).
    It is symmetric in (p_T, p_S) at beta = 0.5, where it is the usual JSD.
    The endpoints are defined as the two KLs, as in GKD/TRL:
        beta = 0 -> KL(p_T || p_S) (forward KL), beta = 1 -> KL(p_S || p_T) (reverse KL).
    They are the limits of JSD(beta)/beta and JSD(beta)/(1-beta), the scalings
    under which JSD(beta) tends to a non-zero divergence (JSD itself tends to 0).
    """
    _check_unit("beta", beta)
    _check_shapes([teacher, student], mask)
    loss = _run_chunked(_make_jsd_chunk(float(beta)), [teacher, student], mask, chunk_size)
    return loss, _n_tokens(mask)


def _tvd_chunk(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask.bool()
    p = F.softmax(_select(p_logits, keep), dim=-1)
    q = F.softmax(_select(q_logits, keep), dim=-1)
    return 0.5 * (p - q).abs().sum()


def total_variation(
    student: torch.Tensor,
    *,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total variation distance 0.5 · sum_v |p_T - p_S| per token (in [0, 1]), summed over the mask."""
    _check_shapes([teacher, student], mask)
    loss = _run_chunked(_tvd_chunk, [teacher, student], mask, chunk_size)
    return loss, _n_tokens(mask)


DivergenceFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# The loss of each divergence name. The names, and which keyword (``knob``) each reads, are
# promptkd.config.divergences.DIVERGENCES (torch-free, for config validation); a test checks both hold the same names.
DIVERGENCE_FNS: dict[str, DivergenceFn] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
    "sfkl": skew_forward_kl,
    "srkl": skew_reverse_kl,
}


def token_divergence(
    student: torch.Tensor,
    *,
    teacher: torch.Tensor,
    name: str,
    mask: torch.Tensor,
    chunk_size: int | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-student divergence ``name`` (a key of DIVERGENCES).

    beta is JSD's, alpha the skew of sfkl/srkl; each divergence reads only its own (its ``knob``).
    """
    if name not in DIVERGENCE_FNS:
        raise ValueError(f"unknown divergence {name!r}; expected one of {tuple(DIVERGENCES)}")
    knob = DIVERGENCES[name].knob
    params = {knob: {"beta": beta, "alpha": alpha}[knob]} if knob else {}
    return DIVERGENCE_FNS[name](student, teacher=teacher, mask=mask, chunk_size=chunk_size, **params)
