"""Fused LM head + loss (issue 22) against the unfused path: ``promptkd.losses.core`` on full logits.

Every divergence, the prompt loss, padded vocabularies, biases, masks with gaps, a tied head (GPT-2):
values and gradients (hidden states, head weight/bias, the prompted teacher's hidden states and the θ
behind them) agree to 1e-6 in fp32 and in float64 (both paths compute the divergence in fp32).
"""
from __future__ import annotations


import pytest
import torch

from promptkd.losses import core
from promptkd.losses.fused_head import HeadStates, fused_prompt_loss, fused_token_divergence
from tests.unit.test_host_syncs import CountOps

B, T, HS, HT, VPAD, VOCAB = 3, 9, 8, 12, 23, 19
# core computes the divergence in fp32 whatever the input dtype (so do we): 1e-6 in both
TOL = {torch.float32: 1e-6, torch.float64: 1e-6}
# core's function per divergence, and whether its old (pre student-first) positional order is (student, teacher)
CORE = {"fkl": "forward_kl", "rkl": "reverse_kl", "jsd": "generalized_jsd", "tvd": "total_variation",
        "sfkl": "skew_forward_kl", "srkl": "skew_reverse_kl"}


def core_divergence(name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, **kw):
    """The unfused loss on full logits."""
    return getattr(core, CORE[name])(student, teacher=teacher, mask=mask, **kw)


def core_prompt_loss(prompted, student, base, mask, **kw) -> core.PromptLoss:
    """core.prompt_loss on full logits (``teacher`` there is the plain teacher)."""
    return core.prompt_loss(student, prompted=prompted, teacher=base, mask=mask, **kw)


def gapped_mask(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.35).long()
    mask[0, 3:6] = 0                  # a gap inside a row
    mask[1, :2] = 0                   # left padding
    mask[2, -1] = 0
    mask[0, 0] = 1
    return mask


def make_side(hidden: int, dtype: torch.dtype, seed: int, grad: bool, bias: bool = True) -> HeadStates:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, hidden, generator=g, dtype=dtype).requires_grad_(grad)
    w = (torch.randn(VPAD, hidden, generator=g, dtype=dtype) / hidden ** 0.5).requires_grad_(grad)
    b = (0.3 * torch.randn(VPAD, generator=g, dtype=dtype)).requires_grad_(grad) if bias else None
    return HeadStates(h, w, b)


def full_logits(side: HeadStates) -> torch.Tensor:
    """What the model's head gives, cut to the tokenizer's vocabulary (methods/base.lm_logits does the cut)."""
    out = side.hidden @ side.weight.t()
    if side.bias is not None:
        out = out + side.bias
    return out[..., :VOCAB]


def leaves(*sides: HeadStates) -> list[torch.Tensor]:
    return [t for s in sides for t in (s.hidden, s.weight, s.bias) if t is not None and t.requires_grad]


def grads_of(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,kw", [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.2}),
                                     ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("tvd", {}),
                                     ("sfkl", {"alpha": 0.1}), ("srkl", {"alpha": 0.3})])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_divergence_equals_unfused(dtype, name, kw, chunk):
    """Student trains (hidden, weight, bias); the teacher's hidden states also need a gradient here, so
    both sides' gradient paths are checked; padded head (23 rows, vocabulary 19); mask with gaps."""
    student, teacher = make_side(HS, dtype, 1, True), make_side(HT, dtype, 2, False)
    teacher.hidden.requires_grad_(True)
    mask = gapped_mask()
    ref, n_ref = core_divergence(name, full_logits(student), full_logits(teacher), mask, **kw)
    ref_grads = grads_of(ref, leaves(student, teacher))
    out, n = fused_token_divergence(student, teacher=teacher, name=name, mask=mask, vocab=VOCAB, chunk_size=chunk,
                                    **kw)
    assert out.dtype == torch.float32 and n == n_ref == mask.sum()
    assert_close(out, ref.to(torch.float32), TOL[dtype] * max(1.0, abs(ref.item())))
    assert ref.item() != 0.0
    for got, want in zip(grads_of(out, leaves(student, teacher)), ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, TOL[dtype])
    # the padded rows of the head never count: their gradient is exactly zero
    weight_grad = grads_of(fused_token_divergence(student, teacher=teacher, name=name, mask=mask, vocab=VOCAB,
                                                  **kw)[0], [student.weight])[0]
    assert weight_grad[VOCAB:].abs().max() == 0 and weight_grad[:VOCAB].abs().max() > 0


@pytest.mark.parametrize("guidance", ["teacher_student", "student_teacher"])
@pytest.mark.parametrize("reg_weight", [0.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prompt_loss_equals_unfused_into_theta(guidance, reg_weight, dtype):
    """The gradient reaches the prompted teacher's hidden states and, through autograd, θ behind them."""
    student, base = make_side(HS, dtype, 3, False), make_side(HT, dtype, 4, False)
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(HT, generator=g, dtype=dtype, requires_grad=True)
    mix = torch.randn(HT, HT, generator=g, dtype=dtype) / HT ** 0.5

    def prompted() -> HeadStates:   # a stand-in for the prompted forward: hidden states that depend on θ
        return HeadStates(torch.tanh(base.hidden + theta @ mix), base.weight, base.bias)

    mask = gapped_mask(1)
    ref = core_prompt_loss(full_logits(prompted()), full_logits(student), full_logits(base), mask,
                           reg_weight=reg_weight, guidance=guidance)
    (ref_theta,) = grads_of(ref.total, [theta])
    side = prompted()
    side.hidden.retain_grad()
    out = fused_prompt_loss(student, prompted=side, teacher=base if reg_weight else None, mask=mask, vocab=VOCAB,
                            reg_weight=reg_weight, guidance=guidance, chunk_size=2)
    tol = TOL[dtype]
    assert_close(out.total, ref.total.float(), tol * abs(ref.total.item()))
    assert_close(out.guidance, ref.guidance.float(), tol * abs(ref.total.item()))
    assert_close(out.regularizer, ref.regularizer.float(), tol * abs(ref.total.item()))
    assert (out.regularizer != 0) == (reg_weight != 0)
    assert out.n_tokens == mask.sum()
    out.total.backward()
    assert_close(theta.grad, ref_theta, tol)
    assert theta.grad.abs().max() > 0
    # the student and the plain teacher are constants of the prompt step
    assert student.hidden.grad is None and base.weight.grad is None


def test_tied_gpt2_head_weight_gradient():
    """GPT-2 ties lm_head.weight to wte.weight: the fused path's head gradient adds to the embedding's,
    and the sum equals the unfused model's; the head is padded (tokenizer 50 of 64 rows)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                       attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)).double()
    assert model.lm_head.weight is model.transformer.wte.weight
    vocab = 50
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    teacher = torch.randn(2, 9, vocab, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    ref, _ = core_divergence("rkl", model(ids).logits[:, :-1, :vocab], teacher, mask)
    ref.backward()
    ref_grad = model.transformer.wte.weight.grad.clone()
    model.zero_grad(set_to_none=True)

    hidden = model.transformer(ids).last_hidden_state[:, :-1]
    # a frozen teacher whose head is the identity on the first `vocab` hidden units gives back `teacher`
    eye = torch.eye(vocab, dtype=torch.float64)
    out, _ = fused_token_divergence(HeadStates(hidden, model.lm_head.weight), teacher=HeadStates(teacher, eye),
                                    name="rkl", mask=mask, vocab=vocab, chunk_size=3)
    out.backward()
    assert_close(out, ref.float(), 1e-6 * ref.item())
    assert_close(model.transformer.wte.weight.grad, ref_grad, 1e-6)
    # both uses contributed: the embedding rows of the ids and the head rows of the vocabulary
    assert ref_grad[vocab:].abs().max() == 0


def test_masked_rows_never_read_and_no_grad_mode():
    """inf/nan hidden states at masked-out positions change nothing; under no_grad the value is the same."""
    student, teacher = make_side(HS, torch.float64, 6, True), make_side(HT, torch.float64, 7, False)
    mask = gapped_mask(2)
    clean, _ = fused_token_divergence(student, teacher=teacher, name="rkl", mask=mask, vocab=VOCAB)
    (clean_grad,) = grads_of(clean, [student.hidden])
    with torch.no_grad():
        student.hidden[mask == 0] = float("nan")
        teacher.hidden[mask == 0] = float("inf")
    dirty, _ = fused_token_divergence(student, teacher=teacher, name="rkl", mask=mask, vocab=VOCAB, chunk_size=2)
    (dirty_grad,) = grads_of(dirty, [student.hidden])
    assert torch.isfinite(dirty) and dirty == clean
    assert torch.equal(dirty_grad, clean_grad) and dirty_grad[mask == 0].abs().max() == 0
    with torch.no_grad():
        again, _ = fused_token_divergence(student, teacher=teacher, name="rkl", mask=mask, vocab=VOCAB)
    assert again == clean and not again.requires_grad


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_one_host_sync_per_loss(chunk):
    """One nonzero per loss (the kept rows), however many chunks; no boolean indexing, no .item()."""
    student, teacher = make_side(HS, torch.float32, 8, True), make_side(HT, torch.float32, 9, False)
    mask = gapped_mask(3)
    with CountOps() as ops:
        out, _ = fused_token_divergence(student, teacher=teacher, name="jsd", mask=mask, vocab=VOCAB,
                                        chunk_size=chunk)
        out.backward()
    assert ops.n == {"nonzero": 1, "bool_index": 0, "scalar": 0}, ops.n


def test_bf16_matches_unfused_roughly():
    """bf16 heads: the fused path rounds where the model's head would; it stays within bf16 noise."""
    student, teacher = make_side(HS, torch.bfloat16, 10, True, bias=False), make_side(HT, torch.bfloat16, 11, False)
    mask = gapped_mask(4)
    ref, _ = core_divergence("rkl", full_logits(student), full_logits(teacher), mask)
    ref_grads = grads_of(ref, leaves(student))
    out, _ = fused_token_divergence(student, teacher=teacher, name="rkl", mask=mask, vocab=VOCAB, chunk_size=4)
    got = grads_of(out, leaves(student))
    assert_close(out, ref, 1e-2 * ref.item())
    for a, b in zip(got, ref_grads):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3)


def test_bad_input_names_the_problem():
    student, teacher = make_side(HS, torch.float32, 12, True), make_side(HT, torch.float32, 13, False)
    with pytest.raises(ValueError, match="vocab"):
        fused_token_divergence(student, teacher=teacher, name="rkl", mask=gapped_mask(), vocab=VPAD + 1)
    with pytest.raises(ValueError, match="mask"):
        fused_token_divergence(student, teacher=teacher, name="rkl", mask=gapped_mask()[:, 1:], vocab=VOCAB)
    with pytest.raises(ValueError, match="unknown divergence"):
        fused_token_divergence(student, teacher=teacher, name="kl", mask=gapped_mask(), vocab=VOCAB)
    with pytest.raises(ValueError, match="plain teacher"):
        fused_prompt_loss(student, prompted=teacher, teacher=None, mask=gapped_mask(), vocab=VOCAB, reg_weight=1.0)


@pytest.mark.parametrize("step", ["student", "prompt"])
def test_bench_case_at_toy_size(step):
    """bench/fused_head.py's two sides compute the same loss, and its peak measurement sees the logits."""
    from bench import fused_head as bench

    case = bench.run_case(step, "fp32", t=16, h=8, v=70, vocab=64, device=torch.device("cpu"), repeats=0)
    assert case["loss_rel_diff"] < 1e-6 and case["unfused"]["loss"] > 0
    # today's path holds at least one full [T, vocab] fp32 logits tensor; the peaks are real byte counts
    assert case["unfused"]["peak_bytes"] >= 16 * 64 * 4 and case["fused"]["peak_bytes"] > 0


@pytest.mark.parametrize("name,kw", [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}),
                                     ("srkl", {"alpha": 0.2})])
def test_row_sub_blocks_equal_unfused(monkeypatch, name, kw):
    """On CPU the divergence runs over row sub-blocks of each chunk, its gradient written back over the
    chunk's logits (a workspace reused across chunks): 2-row sub-blocks in 5-row chunks, ragged at both ends."""
    from promptkd.losses import fused_head

    monkeypatch.setattr(fused_head, "SUB_BLOCK_ELEMENTS", 2 * VOCAB)
    student, teacher = make_side(HS, torch.float32, 14, True), make_side(HT, torch.float32, 15, False)
    mask = gapped_mask(5)
    ref, _ = core_divergence(name, full_logits(student), full_logits(teacher), mask, **kw)
    ref_grads = grads_of(ref, leaves(student))
    out, _ = fused_token_divergence(student, teacher=teacher, name=name, mask=mask, vocab=VOCAB, chunk_size=5, **kw)
    assert_close(out, ref, 1e-6 * abs(ref.item()))
    for got, want in zip(grads_of(out, leaves(student)), ref_grads):
        assert_close(got, want, 1e-6)


@pytest.mark.parametrize("guidance", ["teacher_student", "student_teacher"])
def test_prompt_loss_row_sub_blocks(monkeypatch, guidance):
    """The prompt kernel over 1-row sub-blocks of 4-row chunks equals the unfused prompt loss (fp32)."""
    from promptkd.losses import fused_head

    monkeypatch.setattr(fused_head, "SUB_BLOCK_ELEMENTS", VOCAB)
    student, base = make_side(HS, torch.float32, 16, False), make_side(HT, torch.float32, 17, False)
    prompted = HeadStates(base.hidden.detach().clone().requires_grad_(True), base.weight, base.bias)
    mask = gapped_mask(6)
    ref = core_prompt_loss(full_logits(prompted), full_logits(student), full_logits(base), mask, reg_weight=0.4,
                           guidance=guidance)
    (ref_grad,) = grads_of(ref.total, [prompted.hidden])
    out = fused_prompt_loss(student, prompted=prompted, teacher=base, mask=mask, vocab=VOCAB, reg_weight=0.4,
                            guidance=guidance, chunk_size=4)
    assert_close(out.total, ref.total, 1e-6 * abs(ref.total.item()))
    (got,) = grads_of(out.total, [prompted.hidden])
    assert_close(got, ref_grad, 1e-6)


def test_bf16_cpu_head_runs_in_fp32_blocks(monkeypatch):
    """A bf16 head on CPU: fp32 matmuls over upcast weight blocks (3 rows: ragged), logits rounded to bf16.
    The value then equals the unfused loss on logits made the same way (fp32 GEMM of the bf16 operands,
    rounded to bf16: what a GPU's bf16 GEMM gives); gradients stay within bf16 noise of autograd's."""
    from promptkd.losses import fused_head

    monkeypatch.setattr(fused_head, "VOCAB_BLOCK", 3)
    student, teacher = make_side(HS, torch.bfloat16, 18, True), make_side(HT, torch.bfloat16, 19, False)
    mask = gapped_mask(7)

    def gpu_like(side: HeadStates) -> torch.Tensor:
        out = side.hidden.float() @ side.weight.float().t() + side.bias.float()
        return out[..., :VOCAB].to(torch.bfloat16)

    ref, _ = core_divergence("fkl", gpu_like(student), gpu_like(teacher), mask)
    out, _ = fused_token_divergence(student, teacher=teacher, name="fkl", mask=mask, vocab=VOCAB, chunk_size=4)
    assert_close(out, ref.float(), 1e-5 * abs(ref.item()))
    auto, _ = core_divergence("fkl", full_logits(student), full_logits(teacher), mask)
    got = grads_of(out, leaves(student))
    for a, b in zip(got, grads_of(auto, leaves(student))):
        assert a.dtype == torch.bfloat16 and a.abs().max() > 0
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3)
    assert got[1][VOCAB:].abs().max() == 0        # the padded rows of the head never count


def test_bench_extrapolation_labels_and_lines():
    """bench/fused_head.py's extrapolation: a line per (step, dtype, variant) through the measured peaks; fused
    points below one full chunk are off the line; one full-chunk fused point takes the [T, H] gradient's slope;
    every value says whether it was measured or extrapolated."""
    from bench import fused_head as bench

    def case(t, **peaks):
        return {"step": "student", "dtype": "fp32", "T": t, "H": 1024, "vocab": 151936,
                **{k: {"peak_bytes": v} for k, v in peaks.items()}}

    cases = [case(512, unfused=1000 + 512 * 10), case(1024, unfused=1000 + 1024 * 10, fused=5000 + 1024 * 7),
             case(2048, fused=5000 + 2048 * 7), case(100, fused=10)]
    rows = {e["T"]: e for e in bench.extrapolate(cases, targets=(2048, 8192))}
    assert rows[2048]["fused"] == {"peak_bytes": 5000 + 2048 * 7, "how": "measured"}
    assert rows[2048]["unfused"]["how"] == "extrapolated" and rows[2048]["unfused"]["peak_bytes"] == 1000 + 20480
    assert rows[8192]["fused"]["peak_bytes"] == 5000 + 8192 * 7 and rows[8192]["fused"]["from_T"] == [1024, 2048]
    assert rows[8192]["peak_ratio_fused_over_unfused"] == (5000 + 8192 * 7) / (1000 + 81920)
    one = bench.extrapolate([case(512, unfused=2000), case(1024, unfused=3000), case(2048, fused=9000)],
                            targets=(8192,))[0]
    assert one["fused"]["peak_bytes"] == 9000 + (8192 - 2048) * 1024 * 4 and one["unfused"]["peak_bytes"] == 17000


def test_a_16_bit_head_gradient_is_summed_in_fp32_row_blocks(monkeypatch):
    """The fp32 sum of a 16-bit head's weight gradient lives in row blocks whose edges are multiples of
    VOCAB_BLOCK: ``rows`` covers any row range exactly once, and rounding gives what rounding the whole
    fp32 sum gives, bit for bit."""
    from promptkd.losses import fused_head

    monkeypatch.setattr(fused_head, "VOCAB_BLOCK", 3)
    like = torch.zeros(100, 5, dtype=torch.bfloat16)
    acc, whole = fused_head._RowBlocks(like), torch.zeros(100, 5)
    assert len(acc.blocks) == 12 and all(s % 3 == 0 for s in acc.starts)       # 3·ceil(100/48) = 9 rows each
    gen = torch.Generator().manual_seed(0)
    for v0, v1 in ((0, 100), (4, 31), (27, 28), (0, 9), (95, 100)):
        update = torch.randn(v1 - v0, 5, generator=gen)
        covered = []
        for rows, lo, hi in acc.rows(v0, v1):
            rows.add_(update[lo:hi])
            covered.extend(range(lo, hi))
        assert covered == list(range(v1 - v0))
        whole[v0:v1].add_(update)
    out = acc.rounded(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, whole.to(torch.bfloat16))
    assert all(b is None for b in acc.blocks)


def test_rounding_a_16_bit_head_gradient_never_holds_the_fp32_sum_and_its_copy_together():
    """At the end of a bf16 student step's fused loss the fp32 head-gradient sum (4 bytes per entry) and its
    bf16 copy (2) were alive together: 6 bytes per entry at the peak. Rounded block by block, at most the fp32
    sum's 4 bytes plus one block are (allocator trace, as bench/fused_head.py measures)."""
    from bench.common import traced_peak
    from promptkd.losses import fused_head

    like = torch.zeros(8 * fused_head.VOCAB_BLOCK, 64, dtype=torch.bfloat16)
    fp32_bytes = like.numel() * 4

    def summed_then_rounded(blocked: bool) -> torch.Tensor:
        if blocked:
            acc = fused_head._RowBlocks(like)
            for rows, _, _ in acc.rows(0, like.shape[0]):
                rows.fill_(1.5)
            return acc.rounded(torch.bfloat16)
        whole = torch.full(like.shape, 1.5)
        return whole.to(torch.bfloat16)

    _, naive, _ = traced_peak(lambda: summed_then_rounded(False))
    assert naive >= fp32_bytes * 3 // 2                  # the test sees the problem it guards against
    out, peak, _ = traced_peak(lambda: summed_then_rounded(True))
    assert out.shape == like.shape and torch.equal(out, torch.full(like.shape, 1.5, dtype=torch.bfloat16))
    assert peak <= fp32_bytes + fp32_bytes // 8, peak    # 8 blocks here: the fp32 sum plus one block
