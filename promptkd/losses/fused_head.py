"""Fused LM head + divergence: the loss takes hidden states and head weights, never whole logits.

The unfused path builds ``[N, V]`` logits per distribution (the models' LM heads) and then runs a loss
of ``promptkd.losses.core`` on them; at a 152k vocabulary and 8k positions that is 5 GB of fp32 per
distribution, three of them in PromptKD's prompt step. Here the loss walks over chunks of the kept
positions: per chunk it applies each side's head (``hidden @ W[:vocab].T + b``), computes the
divergence and its gradient w.r.t. those chunk logits, and turns that gradient at once into the
gradients of the hidden states (``g @ W``) and, where the head trains, of the head weight and bias
(``g.T @ h``, accumulated in fp32). The gradients are computed in the forward (as in
``promptkd.losses.fused``), so backward only scales them: no recompute, and at most one chunk's logits
(one fp32 ``[chunk, V]`` workspace per side, reused by every chunk, and the divergence's temporaries) are
alive at a time, next to the ``[V, H]`` head-weight gradient
and the ``[N, H]`` hidden-state gradients.

Conventions (those of ``promptkd.losses``): hidden states ``[B, T, H]`` (or ``[N, H]``) aligned with a
``[B, T]`` (or ``[N]``) 0/1 mask, already shifted (position t gives the logits that the unfused path's
``logits[:, t]`` holds); results are ``(sum, n_tokens)`` fp32 scalars, normalized by the caller by a
global token count. Distributions are over the first ``vocab`` rows of the head (a padded head's extra
rows never count). The kept rows are found with ONE ``nonzero`` per loss; the chunk loop never syncs
with the host. Masked-out rows are never read, so garbage there cannot leak. A tied head (GPT-2's
``lm_head.weight is wte.weight``) gets its gradient through autograd like any other input.

Values and gradients equal the unfused path to 1e-6 in fp32 (tests/unit/test_fused_head.py). In bf16,
the logits are rounded to bf16 as the model's head would, the chunk's logit gradient is rounded to
bf16 before the head matmuls as autograd would, and the head-weight gradient is summed in fp32. On CPU a
16-bit head's matmuls run in fp32 on upcast weight blocks (fp32 accumulation, as a GPU's bf16 GEMM): this
CPU has no native bf16 GEMM (bench/README.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from promptkd.config.divergences import SKEW_DIVERGENCES
from promptkd.losses.core import DIVERGENCES, GUIDANCE_CHOICES, PromptLoss
from promptkd.losses.fused import chunk_elements

# Kept rows per chunk on CPU when the caller gives none: ~32 M fp32 logits (128 MB per side's workspace,
# allocated once per loss; the divergence's temporaries are row sub-blocks) - at a 152k vocabulary, 220 rows,
# enough for the head matmul to run at full speed (smaller chunks re-read the [V, H] weight more often than
# they compute). On CUDA: promptkd.losses.fused's memory-sized budget, the divergence over the whole chunk.
CPU_CHUNK_ELEMENTS = 1 << 25


@dataclass
class HeadStates:
    """One model's side of a fused loss.

    hidden: [B, T, H] or [N, H], the states that enter the LM head, aligned with the mask;
    weight: [V_pad, H], the head's weight (possibly padded beyond the tokenizer, possibly tied);
    bias: [V_pad] or None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None

    def detached(self) -> "HeadStates":
        return HeadStates(self.hidden.detach(), self.weight.detach(),
                          None if self.bias is None else self.bias.detach())


def head_chunk_rows(vocab: int, device: torch.device) -> int:
    """Kept rows per chunk when the caller gives no ``chunk_size``."""
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else chunk_elements(device)
    return max(1, budget // max(1, vocab))


# ----------------------------------------------------------------------------- per-chunk kernels
#
# A kernel takes a list of one fp32 [n, V] logits chunk per side (None for an absent side; the kernel may
# set entries to None once read, so their memory goes early) and which sides need a
# gradient; it returns (parts [k] fp32 sums over the chunk's rows, the gradient of the objective
# sum_i coeffs[i] * parts[i] w.r.t. each side's logits, or None).

Kernel = Callable[[Sequence[Optional[torch.Tensor]], Sequence[bool]],
                  tuple[torch.Tensor, list[Optional[torch.Tensor]]]]


def _kl_with_grads(logp_a: torch.Tensor, logp_b: torch.Tensor, need_a: bool, need_b: bool):
    """KL(a || b) summed over rows, d/d logits_a = p_a (log p_a - log p_b - KL_row), d/d logits_b = p_b - p_a.

    Consumes its inputs (in-place steps keep the chunk's fp32 buffers few)."""
    p = logp_a.exp()
    diff = logp_a.sub_(logp_b)
    rows = torch.linalg.vecdot(p, diff)
    grad_b = logp_b.exp_().sub_(p) if need_b else None
    grad_a = diff.sub_(rows[:, None]).mul_(p) if need_a else None
    return rows.sum(), grad_a, grad_b


def _kl_kernel(a: int, b: int) -> Kernel:
    """KL(side a || side b), analytic gradients."""

    def kernel(logits, need):
        # the kernel owns the chunk's logits: dropping them as soon as read keeps fewer fp32 buffers alive
        logp_a = F.log_softmax(logits[a], dim=-1)
        logits[a] = None
        logp_b = F.log_softmax(logits[b], dim=-1)
        logits[b] = None
        total, grad_a, grad_b = _kl_with_grads(logp_a, logp_b, need[a], need[b])
        grads: list[Optional[torch.Tensor]] = [None] * len(logits)
        grads[a], grads[b] = grad_a, grad_b
        return total.reshape(1), grads

    return kernel


def _autograd_kernel(value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Kernel:
    """A two-sided (student, teacher) objective whose chunk gradient autograd computes (small graph)."""

    def kernel(logits, need):
        with torch.enable_grad():
            leaves = [z.detach().requires_grad_(n) for z, n in zip(logits, need)]
            total = value(leaves[0], leaves[1])
            wanted = [leaf for leaf, n in zip(leaves, need) if n]
            found = iter(torch.autograd.grad(total, wanted) if wanted else ())
        return total.detach().reshape(1), [next(found) if n else None for n in need]

    return kernel


def _rows_kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    return (logp_a.exp() * (logp_a - logp_b)).sum()


def _mix(logp_a: torch.Tensor, logp_b: torch.Tensor, w_a: float) -> torch.Tensor:
    """log(w_a p_a + (1 - w_a) p_b), stably (core's formula)."""
    return torch.logsumexp(torch.stack([logp_a + math.log(w_a), logp_b + math.log1p(-w_a)]), dim=0)


def _jsd_value(beta: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def value(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        t_logp, s_logp = F.log_softmax(t_logits, dim=-1), F.log_softmax(s_logits, dim=-1)
        m_logp = _mix(t_logp, s_logp, beta)
        return beta * _rows_kl(t_logp, m_logp) + (1.0 - beta) * _rows_kl(s_logp, m_logp)

    return value


def _skew_value(alpha: float, student_first: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """KL(p || alpha p + (1 - alpha) q): p = student for srkl, teacher for sfkl."""

    def value(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        s_logp, t_logp = F.log_softmax(s_logits, dim=-1), F.log_softmax(t_logits, dim=-1)
        p, q = (s_logp, t_logp) if student_first else (t_logp, s_logp)
        mixed = p if alpha == 1.0 else (q if alpha == 0.0 else _mix(p, q, alpha))
        return _rows_kl(p, mixed)

    return value


def _tvd_value(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softmax(t_logits, dim=-1) - F.softmax(s_logits, dim=-1)).abs().sum()


def divergence_kernel(name: str, beta: float = 0.5, alpha: float = 0.1) -> Kernel:
    """Kernel of ``name`` (one of DIVERGENCES) over sides (student, teacher)."""
    for label, x in (("beta", beta), ("alpha", alpha)):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{label} must be in [0, 1], got {x}")
    if name == "fkl" or (name == "jsd" and beta == 0.0):
        return _kl_kernel(1, 0)
    if name == "rkl" or (name == "jsd" and beta == 1.0):
        return _kl_kernel(0, 1)
    if name == "jsd":
        return _autograd_kernel(_jsd_value(float(beta)))
    if name == "tvd":
        return _autograd_kernel(_tvd_value)
    if name in SKEW_DIVERGENCES:  # srkl skews toward the student, sfkl toward the teacher
        return _autograd_kernel(_skew_value(float(alpha), student_first=name == "srkl"))
    raise ValueError(f"unknown divergence {name!r}; expected one of {DIVERGENCES}")


def prompt_kernel(teacher_student: bool, reg_weight: float) -> Kernel:
    """Sides (student, prompted, base): parts (guidance, regularizer); only the prompted side trains."""

    def kernel(logits, need):
        logp = F.log_softmax(logits[1], dim=-1)
        p = logp.exp()
        logs = F.log_softmax(logits[0], dim=-1)
        logits[0] = logits[1] = None                         # owned by the kernel (as in _kl_kernel)
        if teacher_student:                                   # KL(p_T^θ || p_S)
            diff = logp - logs
            del logs                                          # one [n, V] buffer fewer at the regularizer's peak
            rows = torch.linalg.vecdot(p, diff)
            grad = diff.sub_(rows[:, None]).mul_(p) if need[1] else None
        else:                                                 # KL(p_S || p_T^θ)
            s_prob = logs.exp()
            rows = torch.linalg.vecdot(s_prob, logs.sub_(logp))
            grad = p - s_prob if need[1] else None
            del s_prob, logs
        guide = rows.sum()
        reg = torch.zeros((), dtype=torch.float32, device=p.device)
        if reg_weight != 0.0:                                 # w · KL(p_T^θ || p_T)
            diff = logp.sub_(F.log_softmax(logits.pop(2), dim=-1))
            rows = torch.linalg.vecdot(p, diff)
            reg = rows.sum()
            if grad is not None:
                grad.add_(diff.sub_(rows[:, None]).mul_(p), alpha=reg_weight)
        return torch.stack([guide, reg]), [None, grad, None]

    return kernel


# ----------------------------------------------------------------------------- the chunk driver
#
# CPU speed (bench/fused_head.py): every buffer of a chunk lives in a workspace allocated once per loss (a
# fresh 134 MB tensor per chunk is a fresh mmap on CPU, whose page faults cost as much as the softmax
# math), the divergence runs over row sub-blocks of SUB_BLOCK_ELEMENTS (its temporaries then stay in
# cache and come from the heap), and its gradient is written back over the chunk's logits (no extra
# buffer). 16-bit heads on CPU: this CPU's bf16 GEMMs (no AVX512-BF16) run at 1-10 GFLOP/s against ~50 in
# fp32, so the head matmuls run in fp32 on upcast blocks of VOCAB_BLOCK rows of the weight - what a GPU's
# bf16 GEMM does too (bf16 operands, fp32 accumulation) - and the logits are rounded to the model's dtype
# as its head would; the gradient is rounded likewise before the head's backward, and the hidden-state
# gradient is accumulated in fp32 over the vocabulary blocks and rounded once.

# fp32 elements of one row sub-block of the divergence math on CPU (~4 MB: a few rows at a 152k vocabulary)
SUB_BLOCK_ELEMENTS = 1 << 20
# weight rows upcast at once for a 16-bit head on CPU (8 MB of fp32 at H = 1024)
VOCAB_BLOCK = 2048


@dataclass(frozen=True)
class _Plan:
    kernel: Kernel
    coeffs: tuple[float, ...]       # objective = sum_i coeffs[i] * parts[i]
    vocab: int
    chunk: int
    kept: torch.Tensor              # [n_kept] flat indices of the masked-in rows
    need: tuple[bool, ...]          # per flat input (hidden, weight, bias per side)


def _upcast_on_cpu(t: torch.Tensor) -> bool:
    """A 16-bit head on CPU: its matmuls run in fp32 over upcast weight blocks (see above)."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _head_into(out: torch.Tensor, hs: list, weights: list, biases: list, vocab: int) -> None:
    """``out[i] = hs[i] @ W_i[:vocab].T + b_i`` in the model's dtype, stored as fp32 (one [n, V] buffer per side)."""
    for i, h in enumerate(hs):
        if h is None or _upcast_on_cpu(h):
            continue
        w, b = weights[i][:vocab], biases[i]
        if h.dtype == torch.float32:
            if b is None:
                torch.mm(h, w.t(), out=out[i])
            else:
                torch.addmm(b[:vocab], h, w.t(), out=out[i])
        else:                                     # 16-bit on an accelerator: its native GEMM, then fp32
            out[i].copy_(F.linear(h, w, None if b is None else b[:vocab]))
    slow = [i for i, h in enumerate(hs) if h is not None and _upcast_on_cpu(h)]
    if not slow:
        return
    h32 = {i: hs[i].to(torch.float32) for i in slow}
    for v0 in range(0, vocab, VOCAB_BLOCK):
        v1 = min(vocab, v0 + VOCAB_BLOCK)
        blocks: dict[int, torch.Tensor] = {}      # one upcast per distinct weight (the prompt step shares W_T)
        for i in slow:
            w = weights[i]
            wb = blocks.setdefault(id(w), w[v0:v1].to(torch.float32))
            b = biases[i]
            z = torch.mm(h32[i], wb.t()) if b is None else torch.addmm(b[v0:v1].to(torch.float32), h32[i], wb.t())
            out[i][:, v0:v1].copy_(z.to(hs[i].dtype))   # rounded as the model's head output is


def _run_kernel(plan: _Plan, logits: list, need: list, parts: torch.Tensor) -> list[bool]:
    """The divergence over row sub-blocks of the chunk; each side's logit gradient overwrites its logits."""
    n = next(z for z in logits if z is not None).shape[0]
    on_cpu = next(z for z in logits if z is not None).device.type == "cpu"
    step = max(1, SUB_BLOCK_ELEMENTS // plan.vocab) if on_cpu else n
    has_grad = [False] * len(logits)
    for r0 in range(0, n, step):
        views = [None if z is None else z[r0:r0 + step] for z in logits]
        chunk_parts, grads = plan.kernel(views, need)
        parts += chunk_parts
        for i, g in enumerate(grads):
            if g is not None:
                logits[i][r0:r0 + step].copy_(g)
                has_grad[i] = True
    return has_grad


class _RowBlocks:
    """The fp32 sum of a 16-bit head's weight gradient, ``[V_pad, H]``, held as blocks of rows.

    Summed in fp32 over the chunks and rounded once, as autograd's one GEMM would; held whole, the fp32 sum
    (622 MB at V = 151,936, H = 1,024) and its 16-bit copy (311 MB) would be alive together at the end of
    the loss - the largest term of a bf16 student step's fused peak. In blocks, each is rounded and freed in
    turn, and the 16-bit blocks are joined once the fp32 ones are gone: the end of the loss then holds at most
    the fp32 sum (plus one block). Block edges are multiples of VOCAB_BLOCK, so an upcast vocabulary block
    (``_accumulate_upcast``) always falls in one block.
    """

    N_BLOCKS = 16

    def __init__(self, like: torch.Tensor) -> None:
        rows = like.shape[0]
        per = VOCAB_BLOCK * max(1, math.ceil(rows / (VOCAB_BLOCK * self.N_BLOCKS)))
        self.starts = list(range(0, rows, per))
        self.blocks: list[Optional[torch.Tensor]] = [
            torch.zeros((min(rows, r0 + per) - r0, *like.shape[1:]), dtype=torch.float32, device=like.device)
            for r0 in self.starts]

    def rows(self, v0: int, v1: int) -> Iterator[tuple[torch.Tensor, int, int]]:
        """(view of the sum's rows, lo, hi) covering rows [v0, v1); lo/hi count from v0."""
        for r0, block in zip(self.starts, self.blocks):
            assert block is not None, "the sum was already rounded"
            lo, hi = max(v0, r0), min(v1, r0 + block.shape[0])
            if lo < hi:
                yield block[lo - r0:hi - r0], lo - v0, hi - v0

    def rounded(self, dtype: torch.dtype) -> torch.Tensor:
        """The sum in ``dtype``, one block at a time (each fp32 block freed once rounded)."""
        parts = []
        for i in range(len(self.blocks)):
            parts.append(self.blocks[i].to(dtype))
            self.blocks[i] = None
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _weight_rows(g_weight, v0: int, v1: int) -> Iterator[tuple[torch.Tensor, int, int]]:
    """Rows [v0, v1) of a head-weight gradient sum (a tensor or _RowBlocks), as ``_RowBlocks.rows``."""
    if isinstance(g_weight, _RowBlocks):
        yield from g_weight.rows(v0, v1)
    else:
        yield g_weight[v0:v1], 0, v1 - v0


def _weight_grad_sum(weight: torch.Tensor):
    """Where a head weight's gradient is summed over the chunks: fp32, in row blocks for a 16-bit head."""
    if weight.dtype == torch.float32 or weight.dim() != 2:
        return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    return _RowBlocks(weight)


def _accumulate(plan: _Plan, grads: list, side: int, idx: torch.Tensor, h: torch.Tensor,
                weight: torch.Tensor, g_logits: torch.Tensor) -> None:
    """Chunk logit gradient -> the side's hidden/weight/bias gradients (the head's backward)."""
    v = plan.vocab
    g_hidden, g_weight, g_bias = grads[3 * side: 3 * side + 3]
    if _upcast_on_cpu(weight):
        _accumulate_upcast(v, g_hidden, g_weight, g_bias, idx, h, weight, g_logits)
        return
    g = g_logits.to(weight.dtype)                 # what autograd would hand the head: the logits' dtype
    if g_hidden is not None:
        g_hidden.index_copy_(0, idx, (g @ weight[:v]).to(g_hidden.dtype))
    if g_weight is not None:
        g32_t, h32 = g.t().to(torch.float32), h.to(torch.float32)
        for rows, lo, hi in _weight_rows(g_weight, 0, v):
            rows.addmm_(g32_t[lo:hi], h32)
    if g_bias is not None:
        g_bias[:v].add_(g.to(torch.float32).sum(0))


def _accumulate_upcast(v: int, g_hidden, g_weight, g_bias, idx: torch.Tensor, h: torch.Tensor,
                       weight: torch.Tensor, g_logits: torch.Tensor) -> None:
    """The head's backward for a 16-bit head on CPU, in fp32 over upcast vocabulary blocks."""
    dt = weight.dtype
    h32 = h.to(torch.float32)
    acc = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if g_hidden is not None else None
    for v0 in range(0, v, VOCAB_BLOCK):
        v1 = min(v, v0 + VOCAB_BLOCK)
        g = g_logits[:, v0:v1].to(dt).to(torch.float32)   # rounded as autograd hands it to the head
        if acc is not None:
            acc.addmm_(g, weight[v0:v1].to(torch.float32))
        if g_weight is not None:
            for rows, lo, hi in _weight_rows(g_weight, v0, v1):
                rows.addmm_(g[:, lo:hi].t(), h32)
        if g_bias is not None:
            g_bias[v0:v1].add_(g.sum(0))
    if acc is not None:
        g_hidden.index_copy_(0, idx, acc.to(g_hidden.dtype))


class _FusedHead(torch.autograd.Function):
    """Forward walks the chunks and computes every needed gradient; backward scales them (once)."""

    @staticmethod
    def forward(ctx, plan: _Plan, *flat):  # type: ignore[override]
        n_sides = len(flat) // 3
        hiddens = [None if flat[3 * i] is None else flat[3 * i].reshape(-1, flat[3 * i].shape[-1])
                   for i in range(n_sides)]
        weights = [flat[3 * i + 1] for i in range(n_sides)]
        biases = [flat[3 * i + 2] for i in range(n_sides)]
        grads: list[Optional[torch.Tensor]] = []
        for i, t in enumerate(flat):
            if not plan.need[i]:
                grads.append(None)
            elif i % 3 == 0:
                grads.append(torch.zeros_like(hiddens[i // 3]))
            else:                                 # weight/bias: summed over chunks in fp32
                grads.append(_weight_grad_sum(t))
        need_logits = [any(plan.need[3 * i: 3 * i + 3]) for i in range(n_sides)]
        device = next(t for t in flat if t is not None).device
        parts = torch.zeros(len(plan.coeffs), dtype=torch.float32, device=device)
        n_kept = plan.kept.numel()
        rows = min(plan.chunk, n_kept)
        # the chunk's logits, one fp32 [rows, V] buffer per side, allocated once per loss
        work = [None if h is None else torch.empty(rows, plan.vocab, dtype=torch.float32, device=device)
                for h in hiddens]
        for start in range(0, n_kept, plan.chunk):
            idx = plan.kept[start:start + plan.chunk]
            n = min(plan.chunk, n_kept - start)
            hs = [None if h is None else h.index_select(0, idx) for h in hiddens]
            logits = [None if z is None else z[:n] for z in work]
            _head_into(logits, hs, weights, biases, plan.vocab)
            has_grad = _run_kernel(plan, logits, need_logits, parts)
            for i, got in enumerate(has_grad):
                if got:
                    _accumulate(plan, grads, i, idx, hs[i], weights[i], logits[i])
        del work
        for i, t in enumerate(flat):
            if isinstance(grads[i], _RowBlocks):
                grads[i] = grads[i].rounded(t.dtype)
            elif grads[i] is not None:
                grads[i] = grads[i].reshape(t.shape).to(t.dtype)
        ctx.grads = grads
        # python-float coefficients: no host-to-device copy (a tensor of them would be one on CUDA)
        objective = parts[0] * plan.coeffs[0]
        for i in range(1, len(plan.coeffs)):
            objective = objective + parts[i] * plan.coeffs[i]
        ctx.mark_non_differentiable(parts)
        return objective, parts

    @staticmethod
    def backward(ctx, grad_objective, _grad_parts):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        return (None, *[None if g is None else g.mul_(grad_objective.to(g.dtype)) for g in grads])


def _check(sides: Sequence[Optional[HeadStates]], mask: torch.Tensor, vocab: int) -> None:
    for side in sides:
        if side is None:
            continue
        h, w = side.hidden, side.weight
        if h.shape[:-1] != mask.shape:
            raise ValueError(f"hidden states {tuple(h.shape)} do not match the mask {tuple(mask.shape)}")
        if w.dim() != 2 or w.shape[1] != h.shape[-1] or w.shape[0] < vocab:
            raise ValueError(f"head weight {tuple(w.shape)} must be [V_pad >= vocab={vocab}, H={h.shape[-1]}]")
        if side.bias is not None and side.bias.shape != w.shape[:1]:
            raise ValueError(f"head bias {tuple(side.bias.shape)} must be [{w.shape[0]}]")


def run_fused(sides: Sequence[Optional[HeadStates]], mask: torch.Tensor, vocab: int, kernel: Kernel,
              coeffs: tuple[float, ...], chunk_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, parts [k]) of ``kernel`` over the kept rows; only the objective is differentiable."""
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if vocab <= 0:
        raise ValueError(f"vocab must be positive, got {vocab}")
    _check(sides, mask, vocab)
    flat: list[Optional[torch.Tensor]] = []
    for side in sides:
        flat.extend((None, None, None) if side is None else (side.hidden, side.weight, side.bias))
    grad_on = torch.is_grad_enabled()
    need = tuple(grad_on and t is not None and t.requires_grad for t in flat)
    kept = mask.reshape(-1).bool().nonzero().squeeze(1)      # the loss's one host sync
    device = mask.device
    chunk = chunk_size or head_chunk_rows(vocab, device)
    return _FusedHead.apply(_Plan(kernel, coeffs, int(vocab), int(chunk), kept, need), *flat)


def _n_tokens(mask: torch.Tensor) -> torch.Tensor:
    return mask.detach().to(torch.float32).sum()


# ----------------------------------------------------------------------------- public losses


def fused_token_divergence(
    student: HeadStates,
    *,
    teacher: HeadStates,
    name: str,
    mask: torch.Tensor,
    vocab: int,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-student divergence ``name`` (fkl, rkl, jsd(beta), tvd, sfkl/srkl(alpha)) through the heads.

    Same value as ``promptkd.losses.core``'s function of that name on the full logits
    ``hidden @ W[:vocab].T + b``; gradients flow to every tensor that requires grad (the student's hidden
    states and head, and the teacher's if they require it - detach at the call site for a constant).
    Returns (sum over kept rows, n_tokens). ``chunk_size``: kept rows per chunk (None: sized for the device).
    """
    total, _ = run_fused([student, teacher], mask, vocab, divergence_kernel(name, beta, alpha), (1.0,), chunk_size)
    return total, _n_tokens(mask)


def fused_forward_kl(student: HeadStates, *, teacher: HeadStates, mask: torch.Tensor, vocab: int,
                     chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_T || p_S) through the heads."""
    return fused_token_divergence(student, teacher=teacher, name="fkl", mask=mask, vocab=vocab, chunk_size=chunk_size)


def fused_reverse_kl(student: HeadStates, *, teacher: HeadStates, mask: torch.Tensor, vocab: int,
                     chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_S || p_T) through the heads (PromptKD's student update)."""
    return fused_token_divergence(student, teacher=teacher, name="rkl", mask=mask, vocab=vocab, chunk_size=chunk_size)


def fused_prompt_loss(
    student: HeadStates,
    *,
    prompted: HeadStates,
    teacher: Optional[HeadStates],
    mask: torch.Tensor,
    vocab: int,
    reg_weight: float,
    guidance: str = "teacher_student",
    chunk_size: Optional[int] = None,
) -> PromptLoss:
    """PromptKD's prompt objective ``guidance + reg_weight · KL(p_T^θ || p_T)`` through the heads.

    As ``promptkd.losses.core.prompt_loss``: the student and the plain teacher (``teacher``) are constants
    (detached here); the gradient flows into the prompted teacher's hidden states (and on to θ through
    autograd). ``teacher`` may be None when reg_weight == 0 (the regularizer is then not computed, reported 0).
    """
    if guidance not in GUIDANCE_CHOICES:
        raise ValueError(f"guidance must be one of {GUIDANCE_CHOICES}, got {guidance!r}")
    with_reg = reg_weight != 0
    if with_reg and teacher is None:
        raise ValueError("fused_prompt_loss: teacher (the plain teacher's states) is required when reg_weight != 0")
    w = float(reg_weight) if with_reg else 0.0
    sides = [student.detached(), prompted, teacher.detached() if with_reg and teacher is not None else None]
    total, parts = run_fused(sides, mask, vocab, prompt_kernel(guidance == "teacher_student", w), (1.0, w),
                             chunk_size)
    return PromptLoss(total=total, guidance=parts[0].clone(), regularizer=parts[1].clone(), n_tokens=_n_tokens(mask))
