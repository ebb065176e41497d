"""Loss kernels whose gradients are computed in the forward, chunk by chunk.

``promptkd.losses`` uses them whenever a gradient is needed: autograd through
``log_softmax`` keeps several fp32 [N, V] tensors per loss and builds the
gradient in backward; writing each chunk's analytic gradient into one buffer of
the input's dtype is faster (bench/README.md) and holds 1x the logits plus one
chunk's fp32 temporaries. Same values as the autograd formulas in
``promptkd.losses`` (tests/unit/test_losses.py compares them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _select(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, T, V] -> [N, V] fp32 rows where ``keep`` is true."""
    return logits[keep].to(torch.float32)


# fp32 elements per fused chunk when chunk_size is None: a [B, chunk, V] slice of ~16 MB, so a
# 32k-vocabulary loss runs in a few cache-friendlier pieces while a small vocabulary stays whole.
FUSED_CHUNK_ELEMENTS = 1 << 22


def auto_chunk(logits: torch.Tensor) -> int:
    """Sequence positions per chunk for the fused losses when the caller gives none."""
    batch, _, vocab = logits.shape
    return max(1, FUSED_CHUNK_ELEMENTS // max(1, batch * vocab))


class _FusedChunkedKL(torch.autograd.Function):
    """Chunked KL(p || q) whose gradients are computed in forward, chunk by chunk.

    Slicing a graph per chunk makes autograd build a full-size gradient per slice
    and sum them (2x the logits in fp32); writing each chunk's analytic gradient
    into one buffer of the input's dtype keeps the extra memory at 1x of it plus
    one fp32 chunk. dKL/da = p (log p - log q - KL_row), dKL/db = q - p.
    Backward may run once (the buffers are scaled in place).
    """

    @staticmethod
    def forward(ctx, p_logits, q_logits, mask, chunk_size):  # type: ignore[override]
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_p = torch.zeros_like(p_logits) if need_p else None
        grad_q = torch.zeros_like(q_logits) if need_q else None
        total = torch.zeros((), dtype=torch.float32, device=p_logits.device)
        for start in range(0, mask.shape[1], chunk_size):
            cols = slice(start, start + chunk_size)
            keep = mask[:, cols].bool()
            # in-place steps keep at most three fp32 [rows, V] buffers alive per chunk
            logp = F.log_softmax(_select(p_logits[:, cols], keep), dim=-1)
            logq = F.log_softmax(_select(q_logits[:, cols], keep), dim=-1)
            p = logp.exp()
            diff = logp.sub_(logq)                                   # log p - log q
            rows = torch.linalg.vecdot(p, diff)                      # KL per row
            total += rows.sum()
            if need_p:
                grad_p[:, cols][keep] = diff.sub_(rows[:, None]).mul_(p).to(grad_p.dtype)
            if need_q:
                grad_q[:, cols][keep] = logq.exp_().sub_(p).to(grad_q.dtype)
        ctx.save_for_backward(*(g for g in (grad_p, grad_q) if g is not None))
        ctx.has = (need_p, need_q)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        grads = [next(saved).mul_(grad_out.to(torch.float32)) if has else None for has in ctx.has]
        return grads[0], grads[1], None, None


class _FusedPromptLoss(torch.autograd.Function):
    """``guidance + w · KL(p ‖ p_T)`` with p = p_T^θ; its gradient w.r.t. the prompted logits is
    computed in the forward, chunk by chunk (as ``_FusedChunkedKL``; the other inputs are constants).

    d KL(p ‖ q) / d a = p (log p − log q − KL_row) and d KL(s ‖ p) / d a = p − s, for p = softmax(a).
    Returns (total, guidance, regularizer); only ``total`` is differentiable.
    """

    @staticmethod
    def forward(ctx, prompted, student, base, mask, chunk_size, teacher_student, reg_weight):  # type: ignore[override]
        grad = torch.zeros_like(prompted)
        sums = torch.zeros(2, dtype=torch.float32, device=prompted.device)
        for start in range(0, mask.shape[1], chunk_size):
            cols = slice(start, start + chunk_size)
            keep = mask[:, cols].bool()
            logp = F.log_softmax(_select(prompted[:, cols], keep), dim=-1)
            p = logp.exp()
            logs = F.log_softmax(_select(student[:, cols], keep), dim=-1)
            if teacher_student:                                   # KL(p ‖ s)
                diff = logp - logs
                rows = torch.linalg.vecdot(p, diff)
                g = diff.sub_(rows[:, None]).mul_(p)
            else:                                                 # KL(s ‖ p)
                s_prob = logs.exp()
                rows = torch.linalg.vecdot(s_prob, logs.sub_(logp))
                g = p - s_prob
            sums[0] += rows.sum()
            if reg_weight != 0.0:                                 # w · KL(p ‖ p_T)
                diff = logp.sub_(F.log_softmax(_select(base[:, cols], keep), dim=-1))
                rows = torch.linalg.vecdot(p, diff)
                sums[1] += rows.sum()
                g.add_(diff.sub_(rows[:, None]).mul_(p), alpha=reg_weight)
            grad[:, cols][keep] = g.to(grad.dtype)
        ctx.save_for_backward(grad)
        guide, reg = sums[0].clone(), sums[1].clone()
        ctx.mark_non_differentiable(guide, reg)
        return sums[0] + reg_weight * sums[1], guide, reg

    @staticmethod
    def backward(ctx, grad_total, _grad_guide, _grad_reg):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total.to(torch.float32)), None, None, None, None, None, None
