"""Loss kernels whose gradients are computed in the forward, chunk by chunk.

``promptkd.losses`` uses them whenever a gradient is needed: autograd through
``log_softmax`` keeps several fp32 [N, V] tensors per loss and builds the
gradient in backward; writing each chunk's analytic gradient into one buffer of
the input's dtype is faster (bench/README.md) and holds 1x the logits plus one
chunk's fp32 temporaries. Same values as the autograd formulas in
``promptkd.losses`` (tests/unit/test_losses.py compares them).

Chunks are slices of the kept rows' indices (one ``nonzero`` per loss): the chunk
loop itself never waits for the device (tests/unit/test_host_syncs.py counts it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _select(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, T, V] -> [N, V] fp32 rows where ``keep`` is true."""
    return logits[keep].to(torch.float32)


# fp32 elements per fused chunk when chunk_size is None, on CPU: a [rows, V] slice of ~16 MB, so a
# 32k-vocabulary loss runs in a few cache-friendlier pieces while a small vocabulary stays whole.
FUSED_CHUNK_ELEMENTS = 1 << 22
# On an accelerator the chunk is sized by memory, not by a cache: up to this many elements (the fp32
# temporaries of a chunk are ~3 such buffers, 1.5 GiB at the cap), and at most 1/64 of the free memory
# in bytes. At 16 x 512 positions and a 32k vocabulary (the OPT/LLaMA configs) that is one chunk where the
# CPU size takes 64: the chunk loop costs no host sync either way, but fewer, larger kernels run faster.
DEVICE_CHUNK_ELEMENTS = 1 << 27


def chunk_elements(device: torch.device) -> int:
    """Elements of one automatic fused chunk on ``device`` (CPU: the cache size; CUDA: a memory budget)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(FUSED_CHUNK_ELEMENTS, min(DEVICE_CHUNK_ELEMENTS, free // 64))
    return FUSED_CHUNK_ELEMENTS


def auto_chunk(logits: torch.Tensor) -> int:
    """Sequence positions per chunk for the fused losses when the caller gives none."""
    batch, _, vocab = logits.shape
    return max(1, chunk_elements(logits.device) // max(1, batch * vocab))


def kept_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, position) indices of the masked-in positions, row-major: ONE nonzero (a host sync) per loss.

    Chunks then slice these index vectors, so the chunk loop itself never waits for the device
    (boolean-mask indexing per chunk would sync once per chunk and per input).
    """
    return mask.bool().nonzero(as_tuple=True)


def row_chunks(mask: torch.Tensor, chunk_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Index pairs of ``chunk_size`` positions' worth of kept rows each (chunk_size x B rows: the
    elements a [B, chunk_size, V] slice holds), in row-major order."""
    b_idx, t_idx = kept_rows(mask)
    rows = max(1, chunk_size * mask.shape[0])
    return [(b_idx[s:s + rows], t_idx[s:s + rows]) for s in range(0, b_idx.shape[0], rows)]


def _rows(logits: torch.Tensor, idx: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[B, T, V] -> [N, V] fp32 rows at ``idx`` (a gather: no host sync, any strides)."""
    return logits[idx].to(torch.float32)


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
        for idx in row_chunks(mask, chunk_size):
            # in-place steps keep at most three fp32 [rows, V] buffers alive per chunk
            logp = F.log_softmax(_rows(p_logits, idx), dim=-1)
            logq = F.log_softmax(_rows(q_logits, idx), dim=-1)
            p = logp.exp()
            diff = logp.sub_(logq)                                   # log p - log q
            rows = torch.linalg.vecdot(p, diff)                      # KL per row
            total += rows.sum()
            if need_p:
                grad_p[idx] = diff.sub_(rows[:, None]).mul_(p).to(grad_p.dtype)
            if need_q:
                grad_q[idx] = logq.exp_().sub_(p).to(grad_q.dtype)
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
        for idx in row_chunks(mask, chunk_size):
            logp = F.log_softmax(_rows(prompted, idx), dim=-1)
            p = logp.exp()
            logs = F.log_softmax(_rows(student, idx), dim=-1)
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
                diff = logp.sub_(F.log_softmax(_rows(base, idx), dim=-1))
                rows = torch.linalg.vecdot(p, diff)
                sums[1] += rows.sum()
                g.add_(diff.sub_(rows[:, None]).mul_(p), alpha=reg_weight)
            grad[idx] = g.to(grad.dtype)
        ctx.save_for_backward(grad)
        guide, reg = sums[0].clone(), sums[1].clone()
        ctx.mark_non_differentiable(guide, reg)
        return sums[0] + reg_weight * sums[1], guide, reg

    @staticmethod
    def backward(ctx, grad_total, _grad_guide, _grad_reg):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total.to(torch.float32)), None, None, None, None, None, None
