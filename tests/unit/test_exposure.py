"""promptkd.evaluation.exposure: ExAccErr on stub models whose value is worked out by hand, its delta-method SE,
the alive-sample convention, and the tiny-HF-model path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from promptkd.data import TokenizedExample
from promptkd.evaluation.exposure import (LM, bootstrap_se, exacc_stats, exposure_table, hf_lm, per_prompt_curve,
                                          prompt_curves, report_positions, teacher_lm, token_kl)

PAD, EOS, A, B, S = 0, 1, 2, 3, 4   # S: the one-token prompt
V = 5


def _logits(probs: dict[int, float]) -> torch.Tensor:
    out = torch.full((V,), float("-inf"))
    for tok, p in probs.items():
        out[tok] = math.log(p)
    return out


def markov_lm(table: dict[int, dict[int, float]]) -> LM:
    """The next-token distribution depends only on the current token."""
    rows = torch.stack([_logits(table.get(t, {A: 0.5, B: 0.5})) for t in range(V)])

    def step(ids, mask, past):
        return rows[ids[:, -1]], None

    return LM(step, lambda ids, mask: rows[ids][:, :-1])


def position_lm(per_pos: list[dict[int, float]]) -> LM:
    """The distribution depends only on how many tokens precede (1 = right after the prompt)."""
    rows = torch.stack([_logits(d) for d in per_pos])

    def step(ids, mask, past):
        return rows[mask.sum(-1) - 1], None

    return LM(step, lambda ids, mask: rows[(mask.cumsum(-1) - 1).clamp(max=len(per_pos) - 1)][:, :-1])


def _prompts(n: int) -> list[TokenizedExample]:
    return [TokenizedExample(f"p{i}", [S], [EOS], ["x"], "") for i in range(n)]


def _kl(p: float, q: float) -> float:
    """KL between (p, 1-p) and (q, 1-q)."""
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


# ----------------------------------------------------------------------------- hand-checked cases

def test_position_only_errors_do_not_compound_exactly():
    """KL depends on the position only, so R(l) = ε(l) = sum_{t<=l} KL_t: ExAccErr = 0 with SE 0."""
    student_p = [0.5, 0.25, 0.1, 0.4]
    teacher = position_lm([{A: 0.5, B: 0.5}] * 4)
    student = position_lm([{A: p, B: 1 - p} for p in student_p])
    a, b = prompt_curves(student, teacher, _prompts(6), n_pos=4, samples=2, vocab=V, eos_id=EOS, pad_id=PAD,
                         batch_size=4, seed=1)
    expected = np.cumsum([_kl(0.5, p) for p in student_p])   # 0, .1438, .5108, .5310 accumulated
    np.testing.assert_allclose(a, np.tile(expected, (6, 1)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    stats = exacc_stats(a, b)
    assert stats["exacc_err"][0] is None and stats["se"][0] is None      # ε(1) = 0: undefined
    assert stats["exacc_err"][1:] == pytest.approx([0.0] * 3, abs=1e-4)
    assert stats["se"][1:] == pytest.approx([0.0] * 3, abs=1e-4)


def test_markov_student_that_gets_stuck_compounds_as_computed_by_hand():
    """Teacher: A/B with 1/2 each, always. Student: 1/2 each after the prompt or A, but P(B|B) = 4/5.

    KL is 0 after A and c = KL((.5,.5) ‖ (.2,.8)) = log 1.25 after B. On teacher samples the previous
    token is B with probability 1/2, so ε(l) = c (l-1)/2. On student samples P(y_t = B) = q_t with
    q_1 = 1/2 and q_{t+1} = 1/2 + 0.3 q_t, so R(l) = c (q_1 + ... + q_{l-1}):
    ExAccErr(2) = 0, ExAccErr(3) = (1.15 - 1)/1 = 15 %, (4) = (1.845 - 1.5)/1.5 = 23 %,
    (5) = (2.5535 - 2)/2 = 27.675 %.
    """
    teacher = markov_lm({})
    student = markov_lm({B: {A: 0.2, B: 0.8}})
    c = math.log(1.25)
    assert _kl(0.5, 0.2) == pytest.approx(c)
    a, b = prompt_curves(student, teacher, _prompts(1500), n_pos=5, samples=4, vocab=V, eos_id=EOS, pad_id=PAD,
                         batch_size=64, seed=3)
    stats = exacc_stats(a, b)
    truth = [None, 0.0, 15.0, 23.0, 27.675]
    eps_truth = [c * (l - 1) / 2 for l in range(1, 6)]
    assert stats["exacc_err"][0] is None
    for l in range(1, 5):
        est, se = stats["exacc_err"][l], stats["se"][l]
        assert 0.3 < se < 3.0, (l, se)                       # k=4, n=1500: one to two percent
        assert abs(est - truth[l]) < 4 * se, (l + 1, est, truth[l], se)
        assert stats["eps"][l] == pytest.approx(eps_truth[l], rel=0.1)
    # the delta-method SE agrees with a bootstrap over prompts
    boot = bootstrap_se(a, b, n_boot=2000, seed=0)
    np.testing.assert_allclose(np.array(stats["se"][2:]), boot[2:], rtol=0.2)


def test_exacc_stats_by_hand():
    a = np.array([[1.0, 3.0, 0.0], [3.0, 5.0, 0.0]])
    b = np.array([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]])
    s = exacc_stats(a, b)
    assert s["R"] == [2.0, 4.0, 0.0] and s["eps"] == [1.0, 2.0, 0.0]
    assert s["exacc_err"][:2] == pytest.approx([100.0, 100.0]) and s["exacc_err"][2] is None
    # B constant: Var(R/ε) = s_A² / (ε² n): l=1: 2 / (1 * 2) -> SE 100 %; l=2: 2 / (4 * 2) -> SE 50 %
    assert s["se"][:2] == pytest.approx([100.0, 50.0]) and s["se"][2] is None
    # paired prompts: when A moves with B the covariance term shrinks the SE
    paired = exacc_stats(np.array([[1.0], [3.0]]), np.array([[0.5], [1.5]]))
    assert paired["exacc_err"] == pytest.approx([100.0]) and paired["se"] == pytest.approx([0.0], abs=1e-9)
    assert exacc_stats(a[:1], b[:1])["se"] == [None, None, None]  # one prompt: no SE


def test_alive_convention_mean_over_live_samples():
    # k=2 samples, one prompt, N=3: sample 2 ends (EOS) at position 2
    err = torch.tensor([[[1.0, 2.0, 4.0]], [[3.0, 6.0, 0.0]]])
    alive = torch.tensor([[[1.0, 1.0, 1.0]], [[1.0, 1.0, 0.0]]])
    # means over alive samples: 2, 4, 4 -> accumulated 2, 6, 10
    assert per_prompt_curve(err, alive).tolist() == [[2.0, 6.0, 10.0]]
    none_alive = per_prompt_curve(err * 0, torch.zeros_like(alive))
    assert none_alive.tolist() == [[0.0, 0.0, 0.0]]


def test_samples_stop_at_eos():
    """After EOS a sample is dead: only the first two positions of a stop-at-2 sampler count."""
    stop = position_lm([{A: 0.5, B: 0.5}, {EOS: 1.0}, {A: 0.5, B: 0.5}])
    student = position_lm([{A: 0.25, B: 0.75}, {EOS: 0.5, A: 0.5}, {A: 0.1, B: 0.9}])
    a, b = prompt_curves(student, stop, _prompts(3), n_pos=3, samples=1, vocab=V, eos_id=EOS, pad_id=PAD,
                         batch_size=3, seed=0)
    first, second = _kl(0.5, 0.25), math.log(1 / 0.5)
    np.testing.assert_allclose(b, np.tile([first, first + second, first + second], (3, 1)), rtol=1e-6)


def test_token_kl_matches_torch_and_ignores_zero_mass():
    t, s = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    ref = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(t, s), ref)
    t[..., 0] = float("-inf")          # p_T = 0 there: no contribution, no NaN
    assert torch.isfinite(token_kl(t, s)).all()
    assert torch.allclose(token_kl(s, s), torch.zeros(2, 3), atol=1e-6)


def test_report_positions_and_table():
    assert report_positions(20) == [1, 2, 4, 8, 16, 20] and report_positions(16) == [1, 2, 4, 8, 16]
    row = {"student": "ckpt", "n_prompts": 3, "exacc_err": [None, 12.345, 20.0, 30.0], "se": [None, 1.0, None, 2.0]}
    table = exposure_table([row], 4)
    assert "| student | prompts | l=1 | l=2 | l=4 |" in table
    assert "| ckpt | 3 | – | 12.3 ± 1.0 | 30.0 ± 2.0 |" in table


def test_tiny_hf_student_equal_to_teacher_has_zero_error():
    from promptkd.models import PromptedTeacher, build_tiny

    torch.manual_seed(0)
    model = build_tiny("llama", 2, 32, 4, vocab_size=40).eval()
    teacher = PromptedTeacher(build_tiny("llama", 2, 32, 4, vocab_size=40), prompt_length=0, dtype=torch.float32)
    teacher.base.load_state_dict(model.state_dict())
    prompts = [TokenizedExample(str(i), [5 + i, 7, 9][: 1 + i % 3], [1], ["x"], "") for i in range(5)]
    a, b = prompt_curves(hf_lm(model), teacher_lm(teacher), prompts, n_pos=6, samples=2, vocab=40, eos_id=1,
                         pad_id=0, batch_size=2, seed=0)
    assert a.shape == b.shape == (5, 6)
    np.testing.assert_allclose(a, 0.0, atol=1e-5)
    np.testing.assert_allclose(b, 0.0, atol=1e-5)
    other = build_tiny("llama", 2, 32, 4, vocab_size=40).eval()
    a2, b2 = prompt_curves(hf_lm(other), teacher_lm(teacher), prompts, n_pos=6, samples=2, vocab=40, eos_id=1,
                           pad_id=0, batch_size=2, seed=0)
    assert (a2[:, 0] > 0).all() and (np.diff(a2, axis=1) >= -1e-9).all()  # positive, accumulating
