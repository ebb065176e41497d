"""Baseline divergences (skew KL, generalized JSD, TVD) against written-out formulas and their properties."""

from __future__ import annotations

import math

import pytest
import torch

from promptkd.losses import (
    DIVERGENCES,
    forward_kl,
    generalized_jsd,
    kl_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_kl,
    skew_reverse_kl,
    token_divergence,
    total_variation,
)
from tests.fixtures.tensors import random_logits, random_mask

B, T, V = 3, 7, 11


def _probs(row: torch.Tensor) -> list[float]:
    xs = [float(x) for x in row]
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def _per_token(fn, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Sum over masked positions of fn(p, q) with p, q plain-float probability lists."""
    total = 0.0
    for i in range(a.shape[0]):
        for t in range(a.shape[1]):
            if mask[i, t]:
                total += fn(_probs(a[i, t]), _probs(b[i, t]))
    return total


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))


def _skew(alpha: float):
    return lambda p, q: _kl(p, [alpha * pv + (1 - alpha) * qv for pv, qv in zip(p, q)])


def _jsd(beta: float):
    def fn(t: list[float], s: list[float]) -> float:
        m = [beta * tv + (1 - beta) * sv for tv, sv in zip(t, s)]
        return beta * _kl(t, m) + (1 - beta) * _kl(s, m)

    return fn


def _tvd(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(pv - qv) for pv, qv in zip(p, q))


@pytest.fixture
def pair():
    return random_logits(1), random_logits(2), random_mask()


# ----------------------------------------------------------------------------- formulas

@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_skew_kl_matches_formula(pair, alpha):
    a, b, mask = pair
    got, n = skew_kl(a, b, mask=mask, alpha=alpha)
    assert float(got) == pytest.approx(_per_token(_skew(alpha), a, b, mask), rel=1e-5)
    assert float(n) == float(mask.sum())


def test_skew_forward_and_reverse_argument_order(pair):
    t, s, mask = pair
    sfkl = float(skew_forward_kl(s, teacher=t, mask=mask, alpha=0.1)[0])
    srkl = float(skew_reverse_kl(s, teacher=t, mask=mask, alpha=0.1)[0])
    # SFKL = KL(p_T || 0.1 p_T + 0.9 p_S); SRKL = KL(p_S || 0.1 p_S + 0.9 p_T)
    assert sfkl == pytest.approx(_per_token(_skew(0.1), t, s, mask), rel=1e-5)
    assert srkl == pytest.approx(_per_token(_skew(0.1), s, t, mask), rel=1e-5)
    assert sfkl != pytest.approx(srkl, rel=1e-3)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_formula(pair, beta):
    t, s, mask = pair
    got, _ = generalized_jsd(s, teacher=t, mask=mask, beta=beta)
    assert float(got) == pytest.approx(_per_token(_jsd(beta), t, s, mask), rel=1e-5)


def test_tvd_matches_formula(pair):
    a, b, mask = pair
    got, n = total_variation(b, teacher=a, mask=mask)
    assert float(got) == pytest.approx(_per_token(_tvd, a, b, mask), rel=1e-5)
    assert float(n) == float(mask.sum())


# ----------------------------------------------------------------------------- properties

def test_skew_kl_alpha_zero_is_kl_and_alpha_one_is_zero(pair):
    t, s, mask = pair
    assert torch.allclose(skew_forward_kl(s, teacher=t, mask=mask, alpha=0.0)[0],
                          forward_kl(s, teacher=t, mask=mask)[0], rtol=1e-6)
    assert torch.allclose(skew_reverse_kl(s, teacher=t, mask=mask, alpha=0.0)[0],
                          reverse_kl(s, teacher=t, mask=mask)[0], rtol=1e-6)
    assert float(skew_kl(t, s, mask=mask, alpha=1.0)[0]) == pytest.approx(0.0, abs=1e-6)
    # a tiny skew is close to the plain KL through the logsumexp path as well
    assert float(skew_kl(t, s, mask=mask, alpha=1e-6)[0]) == pytest.approx(float(kl_divergence(t, s, mask=mask)[0]),
                                                                            rel=1e-4)


def test_jsd_symmetric_at_half(pair):
    t, s, mask = pair
    ab = float(generalized_jsd(s, teacher=t, mask=mask, beta=0.5)[0])
    ba = float(generalized_jsd(t, teacher=s, mask=mask, beta=0.5)[0])
    assert ab == pytest.approx(ba, rel=1e-6)
    assert 0.0 < ab <= math.log(2) * float(mask.sum())
    # not symmetric away from 0.5
    assert float(generalized_jsd(s, teacher=t, mask=mask, beta=0.2)[0]) != pytest.approx(
        float(generalized_jsd(t, teacher=s, mask=mask, beta=0.2)[0]), rel=1e-3)


def test_jsd_endpoints_are_the_two_kls(pair):
    """Convention: beta=0 -> KL(p_T||p_S) (forward), beta=1 -> KL(p_S||p_T) (reverse)."""
    t, s, mask = pair
    fkl = forward_kl(s, teacher=t, mask=mask)[0]
    rkl = reverse_kl(s, teacher=t, mask=mask)[0]
    assert torch.equal(generalized_jsd(s, teacher=t, mask=mask, beta=0.0)[0], fkl)
    assert torch.equal(generalized_jsd(s, teacher=t, mask=mask, beta=1.0)[0], rkl)
    # ... and they are the limits of JSD(beta)/beta and JSD(beta)/(1-beta)
    eps = 1e-4
    assert float(generalized_jsd(s, teacher=t, mask=mask, beta=eps)[0]) / eps == pytest.approx(float(fkl), rel=2e-2)
    assert float(generalized_jsd(s, teacher=t, mask=mask, beta=1 - eps)[0]) / eps == pytest.approx(float(rkl), rel=2e-2)


def test_tvd_range_symmetry_and_zero(pair):
    a, b, mask = pair
    n = float(mask.sum())
    ab = float(total_variation(b, teacher=a, mask=mask)[0])
    assert 0.0 < ab < n
    assert ab == pytest.approx(float(total_variation(a, teacher=b, mask=mask)[0]), rel=1e-6)
    assert float(total_variation(a, teacher=a, mask=mask)[0]) == 0.0
    # disjoint, near one-hot rows are at distance ~1 per token
    hot_a = torch.full((1, 2, 4), -1e4)
    hot_b = hot_a.clone()
    hot_a[..., 0] = 0.0
    hot_b[..., 3] = 0.0
    assert float(total_variation(hot_b, teacher=hot_a, mask=torch.ones(1, 2))[0]) == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_for_equal_inputs(pair, name):
    a, _, mask = pair
    assert float(token_divergence(a.clone(), name=name, teacher=a, mask=mask)[0]) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunked_equals_unchunked_values_and_grads(pair, name):
    t, s, mask = pair
    grads = []
    for chunk in (None, 2, 3):
        s_ = s.clone().requires_grad_(True)
        t_ = t.clone().requires_grad_(True)
        loss, n = token_divergence(s_, name=name, teacher=t_, mask=mask, chunk_size=chunk, beta=0.3, alpha=0.2)
        loss.backward()
        grads.append((float(loss.detach()), s_.grad.clone(), t_.grad.clone(), float(n)))
    ref = grads[0]
    for val, gs, gt, n in grads[1:]:
        assert val == pytest.approx(ref[0], rel=1e-5)
        assert torch.allclose(gs, ref[1], atol=1e-6) and torch.allclose(gt, ref[2], atol=1e-6)
        assert n == ref[3]
    assert ref[1].abs().sum() > 0  # the student gets a gradient


@pytest.mark.parametrize("name", DIVERGENCES)
def test_masked_garbage_does_not_leak(pair, name):
    t, s, mask = pair
    clean = float(token_divergence(s, name=name, teacher=t, mask=mask)[0])
    t2, s2 = t.clone(), s.clone()
    t2[mask == 0] = float("nan")
    s2[mask == 0] = float("inf")
    s2 = s2.requires_grad_(True)
    loss, _ = token_divergence(s2, name=name, teacher=t2, mask=mask)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(clean, rel=1e-6)
    assert torch.isfinite(s2.grad).all()


def test_dispatch_matches_direct_calls(pair):
    t, s, mask = pair
    direct = {
        "fkl": forward_kl(s, teacher=t, mask=mask)[0],
        "rkl": reverse_kl(s, teacher=t, mask=mask)[0],
        "jsd": generalized_jsd(s, teacher=t, mask=mask, beta=0.3)[0],
        "tvd": total_variation(s, teacher=t, mask=mask)[0],
        "sfkl": skew_forward_kl(s, teacher=t, mask=mask, alpha=0.2)[0],
        "srkl": skew_reverse_kl(s, teacher=t, mask=mask, alpha=0.2)[0],
    }
    for name, want in direct.items():
        assert torch.equal(token_divergence(s, name=name, teacher=t, mask=mask, beta=0.3, alpha=0.2)[0], want), name
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(s, name="hellinger", teacher=t, mask=mask)


@pytest.mark.parametrize("call", [
    lambda t, s, m: generalized_jsd(s, teacher=t, mask=m, beta=1.5),
    lambda t, s, m: skew_kl(t, s, mask=m, alpha=-0.1),
])
def test_out_of_range_weights_raise(pair, call):
    t, s, mask = pair
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        call(t, s, mask)


def test_bf16_inputs_compute_in_fp32(pair):
    t, s, mask = pair
    got = generalized_jsd(s.bfloat16(), teacher=t.bfloat16(), mask=mask)[0]
    assert got.dtype == torch.float32
    ref = generalized_jsd(s.bfloat16().float(), teacher=t.bfloat16().float(), mask=mask)[0]
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
