"""Losses against written-out formulas, torch.nn.functional, and their properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from promptkd.losses import (
    PromptLoss,
    cross_entropy,
    forward_kl,
    kl_divergence,
    prompt_loss,
    regularizer_weight,
    reverse_kl,
)
from tests.fixtures.tensors import random_logits, random_mask

B, T, V = 3, 7, 11


def _kl_loops(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """KL(p||q) with explicit loops and math.exp/log, in float64."""
    total = 0.0
    for b in range(p_logits.shape[0]):
        for t in range(p_logits.shape[1]):
            if mask[b, t] == 0:
                continue
            pl = [float(x) for x in p_logits[b, t]]
            ql = [float(x) for x in q_logits[b, t]]
            zp = sum(math.exp(x) for x in pl)
            zq = sum(math.exp(x) for x in ql)
            for v in range(len(pl)):
                p = math.exp(pl[v]) / zp
                total += p * (math.log(p) - math.log(math.exp(ql[v]) / zq))
    return total


def _ce_loops(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    total = 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b, t] == 0:
                continue
            row = [float(x) for x in logits[b, t]]
            z = sum(math.exp(x) for x in row)
            total -= math.log(math.exp(row[int(targets[b, t])]) / z)
    return total


# ---------------------------------------------------------------- KL values


def test_kl_matches_loops_and_torch_kl_div() -> None:
    p, q, m = random_logits(0), random_logits(1), random_mask()
    loss, n = kl_divergence(p, q, mask=m)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert n.item() == m.sum().item()
    assert loss.item() == pytest.approx(_kl_loops(p, q, m), rel=1e-5)
    # F.kl_div(input=log q, target=log p, log_target) computes p (log p - log q).
    per_pos = F.kl_div(
        F.log_softmax(q, -1), F.log_softmax(p, -1), reduction="none", log_target=True
    ).sum(-1)
    assert torch.allclose(loss, (per_pos * m).sum(), rtol=1e-5)


def test_forward_and_reverse_kl_are_the_right_directions() -> None:
    t, s, m = random_logits(2), random_logits(3), random_mask()
    fkl, _ = forward_kl(s, teacher=t, mask=m)
    rkl, _ = reverse_kl(s, teacher=t, mask=m)
    assert fkl.item() == pytest.approx(_kl_loops(t, s, m), rel=1e-5)
    assert rkl.item() == pytest.approx(_kl_loops(s, t, m), rel=1e-5)
    assert abs(fkl.item() - rkl.item()) > 1e-3  # KL is asymmetric here


def test_kl_zero_for_equal_inputs_and_nonnegative() -> None:
    p, m = random_logits(4), random_mask()
    zero, _ = kl_divergence(p, p.clone(), mask=m)
    assert abs(zero.item()) < 1e-5
    # Softmax is shift invariant: adding a per-row constant changes nothing.
    shifted, _ = kl_divergence(p, p + 3.0, mask=m)
    assert abs(shifted.item()) < 1e-4
    for seed in range(5):
        val, _ = kl_divergence(random_logits(10 + seed), random_logits(20 + seed), mask=m)
        assert val.item() >= 0


def test_kl_gradient_matches_formula_on_each_side() -> None:
    p, q, m = random_logits(5), random_logits(6), random_mask()
    p_ref = p.double().requires_grad_(True)
    q_ref = q.double().requires_grad_(True)
    lp, lq = F.log_softmax(p_ref, -1), F.log_softmax(q_ref, -1)
    ((lp.exp() * (lp - lq)).sum(-1) * m.double()).sum().backward()

    p1, q1 = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
    kl_divergence(p1, q1, mask=m)[0].backward()
    assert torch.allclose(p1.grad.double(), p_ref.grad, atol=1e-5)
    assert torch.allclose(q1.grad.double(), q_ref.grad, atol=1e-5)

    # Only the side that requires grad receives one.
    p2 = p.clone().requires_grad_(True)
    kl_divergence(p2, q, mask=m)[0].backward()
    assert p2.grad is not None and torch.allclose(p2.grad.double(), p_ref.grad, atol=1e-5)


# ---------------------------------------------------------------- cross entropy


def test_cross_entropy_matches_loops_and_torch() -> None:
    logits, m = random_logits(7), random_mask()
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    loss, n = cross_entropy(logits, targets=targets, mask=m)
    assert loss.dtype == torch.float32
    assert n.item() == m.sum().item()
    assert loss.item() == pytest.approx(_ce_loops(logits, targets, m), rel=1e-5)
    ref_targets = targets.masked_fill(m == 0, -100)
    ref = F.cross_entropy(logits.reshape(-1, V), ref_targets.reshape(-1), reduction="sum")
    assert torch.allclose(loss, ref, rtol=1e-5)


def test_cross_entropy_ignores_targets_at_masked_positions() -> None:
    logits, m = random_logits(8), random_mask()
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    bad = targets.masked_fill(m == 0, -100)  # would be out of range if gathered
    assert torch.equal(cross_entropy(logits, targets=targets, mask=m)[0], cross_entropy(logits, targets=bad, mask=m)[0])


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("garbage", [1e4, float("inf"), float("nan")])
def test_masked_positions_do_not_affect_values_or_grads(garbage: float) -> None:
    p, q, m = random_logits(9), random_logits(10), random_mask()
    p_bad, q_bad = p.clone(), q.clone()
    hidden = m == 0
    p_bad[hidden] = garbage
    q_bad[hidden] = -garbage
    ref_p = p.clone().requires_grad_(True)
    ref = kl_divergence(ref_p, q, mask=m)[0]
    ref.backward()
    for chunk in (None, 3):
        bad_p = p_bad.clone().requires_grad_(True)
        val = kl_divergence(bad_p, q_bad, mask=m, chunk_size=chunk)[0]
        val.backward()
        assert torch.allclose(val, ref, rtol=1e-6)
        assert torch.isfinite(bad_p.grad).all()
        assert torch.all(bad_p.grad[hidden] == 0)
        assert torch.allclose(bad_p.grad[~hidden], ref_p.grad[~hidden], atol=1e-7)


def test_mask_dtype_does_not_matter() -> None:
    p, q, m = random_logits(11), random_logits(12), random_mask()
    ref = kl_divergence(p, q, mask=m)[0]
    for dtype in (torch.bool, torch.long, torch.bfloat16):
        val, n = kl_divergence(p, q, mask=m.to(dtype))
        assert torch.equal(val, ref)
        assert n.dtype == torch.float32 and n.item() == m.sum().item()


def test_all_masked_gives_zero() -> None:
    p, q = random_logits(13), random_logits(14)
    val, n = kl_divergence(p, q, mask=torch.zeros(B, T))
    assert val.item() == 0.0 and n.item() == 0.0


# ---------------------------------------------------------------- chunking


def _grads_of(fn, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 100])
def test_chunked_equals_unchunked_kl(chunk: int) -> None:
    p, q, m = random_logits(15), random_logits(16), random_mask()
    ref, ref_grads = _grads_of(lambda a, b: kl_divergence(a, b, mask=m)[0], [p, q])
    val, grads = _grads_of(lambda a, b: kl_divergence(a, b, mask=m, chunk_size=chunk)[0], [p, q])
    assert torch.allclose(val, ref, rtol=1e-5)
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g, rg, atol=1e-6)


@pytest.mark.parametrize("chunk", [2, 3])
def test_chunked_equals_unchunked_cross_entropy(chunk: int) -> None:
    logits, m = random_logits(17), random_mask()
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    ref, (rg,) = _grads_of(lambda a: cross_entropy(a, targets=targets, mask=m)[0], [logits])
    val, (g,) = _grads_of(lambda a: cross_entropy(a, targets=targets, mask=m, chunk_size=chunk)[0], [logits])
    assert torch.allclose(val, ref, rtol=1e-5)
    assert torch.allclose(g, rg, atol=1e-6)


def test_chunked_uses_checkpoint_only_with_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    import promptkd.losses.core as losses

    calls: list[int] = []
    real = losses.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        assert kwargs.get("use_reentrant") is False
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "checkpoint", spy)
    logits, m = random_logits(18), random_mask()
    targets = torch.randint(0, logits.shape[-1], m.shape, generator=torch.Generator().manual_seed(0))
    cross_entropy(logits, targets=targets, mask=m, chunk_size=3)
    assert calls == []  # no grad needed: plain loop
    cross_entropy(logits.requires_grad_(True), targets=targets, mask=m, chunk_size=3)[0].backward()
    assert len(calls) == math.ceil(T / 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["p", "q", "both"])
def test_fused_chunked_kl_gradients_match_autograd(dtype: torch.dtype, which: str) -> None:
    """The chunked KL computes its gradients analytically in forward; they must match autograd's,
    scaled by the upstream gradient, for either side or both, in fp32 and bf16."""
    import promptkd.losses.core as losses

    p, q, m = random_logits(21).to(dtype), random_logits(22).to(dtype), random_mask()
    grads = {}
    for chunk in ("autograd", None, 4):
        a = p.clone().requires_grad_(which in ("p", "both"))
        b = q.clone().requires_grad_(which in ("q", "both"))
        if chunk == "autograd":  # the plain formula, differentiated by autograd
            loss = losses._run_chunked(losses._kl_chunk, [a, b], m, None)
        else:
            loss, _ = kl_divergence(a, b, mask=m, chunk_size=chunk)
        (loss * 0.37).backward()
        grads[chunk] = [t.grad for t in (a, b)]
    # bf16: the gradient is rounded to bf16 before the upstream scale is applied, so allow one ulp (2^-8 rel.)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (2 ** -7, 1e-3)
    for g_ref, g in [*zip(grads["autograd"], grads[None]), *zip(grads["autograd"], grads[4])]:
        assert (g_ref is None) == (g is None)
        if g is not None:
            assert g.dtype == dtype and g.abs().max() > 0
            assert torch.allclose(g.float(), g_ref.float(), rtol=rtol, atol=atol), (g.float() - g_ref.float()).abs().max()


def test_kl_keeps_no_fp32_intermediates_for_backward() -> None:
    """The KL's gradient is computed in forward (fused): autograd keeps no fp32 B x T x V tensors,
    whatever the chunk; the autograd formula it replaces keeps at least two of them."""
    import promptkd.losses.core as losses

    big_t, vocab = 64, 512
    p = torch.randn(2, big_t, vocab, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(2, big_t, vocab, dtype=torch.bfloat16)
    m = torch.ones(2, big_t)

    def saved_fp32_bytes(fn) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if t.dtype == torch.float32:
                total += t.numel() * 4
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total

    full_bytes = 2 * big_t * vocab * 4
    assert saved_fp32_bytes(lambda: losses._run_chunked(losses._kl_chunk, [p, q], m, None)) >= full_bytes
    assert saved_fp32_bytes(lambda: kl_divergence(p, q, mask=m, chunk_size=None)) == 0
    assert saved_fp32_bytes(lambda: kl_divergence(p, q, mask=m, chunk_size=8)) == 0


def test_auto_chunk_splits_large_vocabularies_only() -> None:
    from promptkd.losses.fused import FUSED_CHUNK_ELEMENTS, auto_chunk

    assert auto_chunk(torch.empty(16, 32, 915)) >= 32              # a small vocabulary stays one piece
    assert auto_chunk(torch.empty(16, 512, 32000)) == FUSED_CHUNK_ELEMENTS // (16 * 32000) == 8
    assert auto_chunk(torch.empty(64, 8, 200000)) == 1


# ---------------------------------------------------------------- dtypes


def test_bf16_inputs_are_computed_in_fp32() -> None:
    p, q, m = random_logits(20), random_logits(21), random_mask()
    pb, qb = p.bfloat16(), q.bfloat16()
    val, n = kl_divergence(pb, qb, mask=m)
    assert val.dtype == torch.float32 and n.dtype == torch.float32
    # Same as upcasting the rounded bf16 values first: no bf16 arithmetic inside.
    ref = kl_divergence(pb.float(), qb.float(), mask=m)[0]
    assert torch.equal(val, ref)
    ce, _ = cross_entropy(pb, targets=torch.zeros(B, T, dtype=torch.long), mask=m)
    assert ce.dtype == torch.float32
    pb.requires_grad_(True)
    kl_divergence(pb, qb, mask=m, chunk_size=3)[0].backward()
    assert pb.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- prompt loss


def test_prompt_loss_components() -> None:
    pt, s, bt, m = random_logits(30), random_logits(31), random_logits(32), random_mask()
    out = prompt_loss(s, prompted=pt, teacher=bt, mask=m, reg_weight=0.3)
    assert isinstance(out, PromptLoss)
    assert out.guidance.item() == pytest.approx(_kl_loops(pt, s, m), rel=1e-5)
    assert out.regularizer.item() == pytest.approx(_kl_loops(pt, bt, m), rel=1e-5)
    assert out.total.item() == pytest.approx(
        out.guidance.item() + 0.3 * out.regularizer.item(), rel=1e-6
    )
    assert out.n_tokens.item() == m.sum().item()

    rev = prompt_loss(s, prompted=pt, teacher=bt, mask=m, reg_weight=0.3, guidance="student_teacher")
    assert rev.guidance.item() == pytest.approx(_kl_loops(s, pt, m), rel=1e-5)
    assert rev.regularizer.item() == pytest.approx(out.regularizer.item(), rel=1e-6)


def test_prompt_loss_zero_weight_skips_regularizer() -> None:
    pt, s, m = random_logits(33), random_logits(34), random_mask()
    out = prompt_loss(s, prompted=pt, teacher=None, mask=m, reg_weight=0.0)
    assert out.regularizer.item() == 0.0
    assert torch.allclose(out.total, kl_divergence(pt, s, mask=m)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="teacher .* is required"):
        prompt_loss(s, prompted=pt, teacher=None, mask=m, reg_weight=0.5)
    with pytest.raises(ValueError, match="guidance"):
        prompt_loss(s, prompted=pt, teacher=s, mask=m, reg_weight=0.5, guidance="nope")


@pytest.mark.parametrize("guidance", ["teacher_student", "student_teacher"])
def test_prompt_loss_grad_only_reaches_prompted_logits(guidance: str) -> None:
    pt = random_logits(35).requires_grad_(True)
    s = random_logits(36).requires_grad_(True)
    bt = random_logits(37).requires_grad_(True)
    m = random_mask()
    out = prompt_loss(s, prompted=pt, teacher=bt, mask=m, reg_weight=0.7, guidance=guidance)
    out.total.backward()
    assert s.grad is None and bt.grad is None
    assert pt.grad is not None and pt.grad.abs().sum() > 0
    assert not out.guidance.requires_grad and not out.regularizer.requires_grad

    # The gradient equals that of the same objective written with F ops.
    ref_pt = pt.detach().double().requires_grad_(True)
    lpt = F.log_softmax(ref_pt, -1)
    ls = F.log_softmax(s.detach().double(), -1)
    lb = F.log_softmax(bt.detach().double(), -1)
    if guidance == "teacher_student":
        guide = lpt.exp() * (lpt - ls)
    else:
        guide = ls.exp() * (ls - lpt)
    reg = lpt.exp() * (lpt - lb)
    ((guide + 0.7 * reg).sum(-1) * m.double()).sum().backward()
    assert torch.allclose(pt.grad.double(), ref_pt.grad, atol=1e-5)


@pytest.mark.parametrize("guidance", ["teacher_student", "student_teacher"])
@pytest.mark.parametrize("reg_weight", [0.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_prompt_loss_matches_the_autograd_formula(guidance: str, reg_weight: float,
                                                        dtype: torch.dtype) -> None:
    """With a gradient needed the prompt loss runs fused (gradient computed in forward);
    values and gradient equal the chunked autograd formula it replaces."""
    import promptkd.losses.core as losses

    pt, s, bt, m = random_logits(41).to(dtype), random_logits(42).to(dtype), random_logits(43).to(dtype), random_mask()
    fn = losses._make_prompt_chunk(guidance, reg_weight != 0)
    ref_leaf = pt.clone().requires_grad_(True)
    parts = losses._run_chunked(fn, [ref_leaf, s, bt], m, None)
    ref_total = parts[0] + reg_weight * parts[1]
    (ref_total * 1.7).backward()
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (2 ** -7, 1e-3)
    for chunk in (None, 3):
        leaf = pt.clone().requires_grad_(True)
        out = prompt_loss(s, prompted=leaf, teacher=bt, mask=m, reg_weight=reg_weight, guidance=guidance,
                          chunk_size=chunk)
        assert out.total.grad_fn is not None and "Fused" in type(out.total.grad_fn).__name__
        (out.total * 1.7).backward()
        assert torch.allclose(out.total, ref_total.detach(), rtol=1e-5)
        assert torch.allclose(out.guidance, parts[0].detach(), rtol=1e-5)
        assert torch.allclose(out.regularizer, parts[1].detach() if reg_weight else torch.zeros(()), rtol=1e-5)
        assert leaf.grad.dtype == dtype and leaf.grad.abs().max() > 0
        assert torch.allclose(leaf.grad.float(), ref_leaf.grad.float(), rtol=rtol, atol=atol), \
            (leaf.grad.float() - ref_leaf.grad.float()).abs().max()


def test_prompt_loss_chunked_equals_unchunked() -> None:
    pt, s, bt, m = random_logits(38), random_logits(39), random_logits(40), random_mask()
    results = []
    for chunk in (None, 4):
        leaf = pt.clone().requires_grad_(True)
        out = prompt_loss(s, prompted=leaf, teacher=bt, mask=m, reg_weight=0.25, chunk_size=chunk)
        out.total.backward()
        results.append((out, leaf.grad))
    (a, ga), (b, gb) = results
    for name in ("total", "guidance", "regularizer"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-5)
    assert torch.allclose(ga, gb, atol=1e-6)


# ---------------------------------------------------------------- schedule


def test_regularizer_weight_schedules() -> None:
    assert regularizer_weight(0, 100, "linear") == 1.0
    assert regularizer_weight(25, 100, "linear") == pytest.approx(0.75)
    assert regularizer_weight(100, 100, "linear") == 0.0
    assert regularizer_weight(150, 100, "linear") == 0.0  # clamped, never negative
    assert regularizer_weight(7, 100, "constant") == 1.0
    assert regularizer_weight(7, 100, "constant", constant=0.4) == 0.4
    assert regularizer_weight(7, 100, "off") == 0.0
    with pytest.raises(ValueError, match="cosine"):
        regularizer_weight(0, 100, "cosine")
    with pytest.raises(ValueError, match="total_steps"):
        regularizer_weight(0, 0, "linear")


def test_shape_errors_are_clear() -> None:
    p = random_logits(41)
    with pytest.raises(ValueError, match="mask"):
        kl_divergence(p, p, mask=torch.ones(B, T + 1))
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(p, p[:, :-1], mask=torch.ones(B, T))
    with pytest.raises(ValueError, match="chunk_size"):
        kl_divergence(p, p, mask=torch.ones(B, T), chunk_size=0)
