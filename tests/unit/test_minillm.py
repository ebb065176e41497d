"""MiniLLM: the policy-gradient loss against written-out loops, teacher-mixed sampling, the LM-loss corpus, config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from promptkd.config import ConfigError, help_lines, load_config
from promptkd.data import DataError, TokenizedExample
from promptkd.data.corpus import LMCorpus, collate_lm, read_texts
from promptkd.losses import cross_entropy, reverse_kl
from promptkd.losses.pg import future_returns, importance_weights, minillm_terms, sampled_logprobs
from promptkd.methods import METHODS, StepContext, step_context
from promptkd.methods.base import lm_logits, student_rollout, teacher_logits
from promptkd.methods.minillm import MiniLLM, mixed_rollout
from promptkd.models import PromptedTeacher, build_tiny

B, T, V = 3, 7, 11
VOCAB, PAD, EOS = 64, 0, 1
BASE = ["data.train_file=train.jsonl", "method.name=minillm"]


# ----------------------------------------------------------------------------- loss vs loops

def _logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g, dtype=torch.float64).float() * scale


def _mask() -> torch.Tensor:
    # one contiguous response span per row, as rollouts produce (row 2: a single token)
    m = torch.zeros(B, T)
    m[0, 1:6] = 1
    m[1, 0:7] = 1
    m[2, 4:5] = 1
    return m


def _targets(seed: int = 5) -> torch.Tensor:
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


def _weights(seed: int = 6) -> torch.Tensor:
    return torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) * 2.0 + 0.05


def _probs(row: torch.Tensor) -> list[float]:
    xs = [float(x) for x in row]
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def _loop_loss(s, t, y, w, mask, length_norm: bool, single_step: bool) -> float:
    """The MiniLLM objective with plain python floats, token by token."""
    total = 0.0
    for b in range(B):
        pos = [i for i in range(T) if mask[b, i]]
        ps = {i: _probs(s[b, i]) for i in pos}
        pt = {i: _probs(t[b, i]) for i in pos}
        reward = {i: math.log(pt[i][int(y[b, i])]) - math.log(ps[i][int(y[b, i])]) for i in pos}
        for k, i in enumerate(pos):
            later = [reward[j] for j in pos[k + 1:]]
            ret = (sum(later) / len(later) if length_norm else sum(later)) if later else 0.0
            kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(ps[i], pt[i]))
            term = (kl if single_step else 0.0) - ret * math.log(ps[i][int(y[b, i])])
            total += float(w[b, i]) * term
    return total


@pytest.mark.parametrize("length_norm", [True, False])
@pytest.mark.parametrize("single_step", [True, False])
@pytest.mark.parametrize("chunk", [None, 3])
def test_loss_equals_written_out_loop(length_norm, single_step, chunk):
    s, t, y, w, mask = _logits(1), _logits(2), _targets(), _weights(), _mask()
    loss, n = minillm_loss(s, t, y, w, mask, length_norm=length_norm, single_step=single_step, chunk_size=chunk)
    assert loss.dtype == torch.float32 and float(n) == float(mask.sum())
    assert float(loss) == pytest.approx(_loop_loss(s, t, y, w, mask, length_norm, single_step), rel=1e-5, abs=1e-5)


def test_terms_report_rewards_and_weights():
    s, t, y, w, mask = _logits(1), _logits(2), _targets(), _weights(), _mask()
    terms = minillm_terms(s, teacher=t, targets=y, weights=w, mask=mask)
    ls, lt = sampled_logprobs(s, teacher=t, targets=y, mask=mask)
    assert float(terms.reward_sum) == pytest.approx(float(((lt - ls) * mask).sum()), rel=1e-6)
    assert float(terms.weight_sum) == pytest.approx(float((w * mask).sum()), rel=1e-6)
    assert float(terms.total) == pytest.approx(float(terms.kl + terms.pg), rel=1e-6)
    logp_s = torch.log_softmax(s, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ls, logp_s * mask, atol=1e-6) and (ls[mask == 0] == 0).all()


def test_garbage_at_masked_out_positions_does_not_leak():
    s, t, y, w, mask = _logits(1), _logits(2), _targets(), _weights(), _mask()
    s2, t2 = s.clone(), t.clone()
    s2[mask == 0], t2[mask == 0] = float("nan"), float("inf")
    assert float(minillm_loss(s2, t2, y, w, mask)[0]) == pytest.approx(float(minillm_loss(s, t, y, w, mask)[0]))


def test_single_step_gradient_with_unit_weights_is_the_reverse_kl_gradient():
    s, t, y, mask = _logits(1), _logits(2), _targets(), _mask()
    ls, lt = sampled_logprobs(s, teacher=t, targets=y, mask=mask)
    w = importance_weights(ls, lt, mask, alpha=0.0, clip=3.0)
    a = s.clone().requires_grad_(True)
    minillm_loss(a, t, y, w, mask, long_term=False)[0].backward()
    b = s.clone().requires_grad_(True)
    reverse_kl(b, teacher=t, mask=mask)[0].backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert a.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk", [None, 3])
def test_long_term_gradient_is_reinforce(chunk):
    """d/ds of -w·R·log p_S(y) is -w·R·(onehot(y) - p_S); the return itself is a constant."""
    s, t, y, w, mask = _logits(1), _logits(2), _targets(), _weights(), _mask()
    a = s.clone().requires_grad_(True)
    minillm_loss(a, t, y, w, mask, single_step=False, chunk_size=chunk)[0].backward()
    ls, lt = sampled_logprobs(s, teacher=t, targets=y, mask=mask)
    ret = future_returns((lt - ls) * mask, mask)
    expected = -(w * ret * mask).unsqueeze(-1) * (torch.nn.functional.one_hot(y, V) - torch.softmax(s, -1))
    assert torch.allclose(a.grad, expected, atol=1e-6)
    assert expected.abs().sum() > 0


def test_future_returns_length_normalised():
    r = torch.tensor([[9.0, 1.0, 2.0, 3.0, 7.0], [4.0, 5.0, 6.0, 8.0, 8.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    mean = future_returns(r, mask, length_norm=True)
    assert mean.tolist() == [[0.0, 2.5, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]]  # last token: 0
    total = future_returns(r, mask, length_norm=False)
    assert total.tolist() == [[0.0, 5.0, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]]


def test_importance_weights():
    ls = torch.log(torch.tensor([[0.5, 0.1, 0.9]]))
    lt = torch.log(torch.tensor([[0.5, 0.9, 1e-30]]))
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(importance_weights(ls, lt, mask, 0.0, 3.0), mask.float())
    w = importance_weights(ls, lt, mask, 0.5, 3.0)
    assert w[0].tolist() == pytest.approx([1.0, 0.1 / (0.5 * 0.9 + 0.5 * 0.1), 0.0], rel=1e-5)
    # w <= 1/(1-α): 10 at α = 0.9 when the teacher gives the token no mass; the clip caps it
    high = importance_weights(torch.tensor([[-1.0]]), torch.tensor([[-200.0]]), torch.tensor([[1]]), 0.9, 3.0)
    assert float(high) == 3.0
    with pytest.raises(ValueError, match="alpha"):
        importance_weights(ls, lt, mask, 1.0, 3.0)


# ----------------------------------------------------------------------------- teacher-mixed rollout

def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_tiny("llama", 2, 32, 4, vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD)


def _ex(i: str, prompt: list[int]) -> TokenizedExample:
    return TokenizedExample(id=i, prompt_ids=prompt, response_ids=[3, EOS], references=[], category="")


MB = [_ex("a", [5, 9, 13]), _ex("b", [33, 21]), _ex("c", [8, 8, 50, 3])]


class FakeEngine:
    """What a method needs of a DeepSpeed engine, at world size 1, without DeepSpeed."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.backward_calls = 0

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        assert scale_wrt_gas is False
        self.backward_calls += 1
        loss.backward()

    def step(self) -> None:
        pass


def _ctx(*overrides: str, seed: int = 0, teacher_bias: float = 0.0, tokenizer=None) -> StepContext:
    return _cfg_ctx(*overrides, seed=seed, teacher_bias=teacher_bias, tokenizer=tokenizer)[1]


def _cfg_ctx(*overrides: str, seed: int = 0, teacher_bias: float = 0.0, tokenizer=None):
    cfg = load_config(None, BASE + ["rollout.max_new_tokens=12", *overrides])
    base = _tiny(1)
    if teacher_bias:  # the teacher puts (almost) all its mass on token 7
        base.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out + _bias(out, 7, teacher_bias))
    teacher = PromptedTeacher(base, prompt_length=0, dtype=torch.float32)
    ctx = step_context(cfg, "minillm", FakeEngine(_tiny(0)), pad_id=PAD, eos_id=EOS, vocab_size=VOCAB,
                       total_steps=10, teacher=teacher, tokenizer=tokenizer,
                       generator=torch.Generator().manual_seed(seed))
    return cfg, ctx


def minillm_loss(student_logits, teacher_logits, targets, weights, mask, length_norm=True, single_step=True,
                 long_term=True, chunk_size=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, n_tokens) of ``minillm_terms``, the house's pure-loss form."""
    terms = minillm_terms(student_logits, teacher=teacher_logits, targets=targets, weights=weights, mask=mask,
                          length_norm=length_norm, single_step=single_step, long_term=long_term, chunk_size=chunk_size)
    return terms.total, terms.n_tokens


def _bias(out: torch.Tensor, token: int, value: float) -> torch.Tensor:
    b = torch.zeros_like(out)
    b[..., token] = value
    return b


def test_mixed_rollout_with_alpha_zero_is_the_student_rollout():
    ctx = _ctx(seed=3)
    ctx.engine.module.train()
    mixed = mixed_rollout(ctx, MB, 0.0)
    assert not ctx.engine.module.training  # rollouts set eval mode themselves
    ctx.generator.manual_seed(3)
    plain = student_rollout(ctx, MB)
    assert torch.equal(mixed.input_ids, plain.input_ids) and torch.equal(mixed.loss_mask, plain.loss_mask)
    ctx.generator.manual_seed(4)
    assert not torch.equal(student_rollout(ctx, MB).input_ids, plain.input_ids)  # the check can fail


def test_mixed_rollout_follows_the_teacher_as_alpha_goes_to_one():
    def share_of_7(alpha: float) -> float:
        ctx = _ctx(seed=0, teacher_bias=100.0)
        r = mixed_rollout(ctx, MB, alpha)
        toks = r.input_ids[r.loss_mask.bool()]
        toks = toks[toks != EOS]  # an unfinished row's last token is forced to EOS
        return float((toks == 7).float().mean())

    assert share_of_7(0.999) > 0.95
    assert share_of_7(0.0) < 0.2  # the student alone rarely says 7


# ----------------------------------------------------------------------------- LM-loss corpus

class FakeTokenizer:
    eos_token_id = EOS

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[2 + (ord(c) % 60) for c in text] for text in texts]}


def _corpus_file(tmp_path, n: int = 7) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"document number {i}\n\n" for i in range(n)))
    return str(path)


def test_read_texts_jsonl_and_plain(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    assert read_texts(str(jl)) == ["one", "two"]
    assert read_texts(_corpus_file(tmp_path, 3)) == [f"document number {i}" for i in range(3)]
    jl.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2: .*'text'"):
        read_texts(str(jl))


def test_corpus_order_is_deterministic_resumable_and_split_over_ranks():
    texts = [f"doc {i}" for i in range(10)]
    encode = FakeTokenizer().__call__

    def corpus(rank=0, world=1, seed=0):
        return LMCorpus(texts, lambda ts: encode(ts)["input_ids"], EOS, max_length=4, seed=seed, rank=rank,
                        world_size=world)

    a = corpus()
    a.next_indices(3)
    state = a.state_dict()
    expected = a.next_indices(12)  # crosses into the next epoch
    b = corpus()
    b.load_state_dict(state)
    assert b.next_indices(12) == expected
    assert sorted(corpus().next_indices(10)) == list(range(10))  # an epoch is a permutation
    assert corpus().next_indices(10) != corpus(seed=1).next_indices(10)
    r0, r1 = corpus(0, 2).next_indices(5), corpus(1, 2).next_indices(5)
    assert sorted(r0 + r1) == list(range(10))  # ranks split an epoch
    seqs = corpus().draw(2)
    assert all(len(s) == 4 and s[-1] != EOS for s in seqs)  # "doc N" + EOS cut to max_length
    with pytest.raises(DataError, match="documents"):
        corpus().load_state_dict({"consumed": 1, "n_docs": 99})


def test_collate_lm_right_pads():
    out = collate_lm([[5, 6, 7], [8]], PAD)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_train_step_normalises_and_lm_position_resumes(tmp_path):
    data = _corpus_file(tmp_path)
    overrides = ("method.minillm.lm_coef=0.5", f"method.minillm.lm_data={data}", "train.micro_batch_size=2",
                 "method.minillm.teacher_mix=0.3")
    cfg, ctx = _cfg_ctx(*overrides, seed=1, tokenizer=FakeTokenizer())
    m = MiniLLM.from_config(cfg, ctx)
    start = m.state_dict()
    mbs = [MB[:2], MB[2:]]
    result = m.train_step(mbs, 0)
    metrics = result.metrics
    assert m.corpus.consumed == 4 and ctx.engine.backward_calls == 2
    assert set(metrics) >= {"loss/minillm_kl", "loss/minillm_pg", "minillm/mean_weight", "minillm/mean_reward",
                            "tokens", "loss/lm"}
    assert metrics["loss/minillm_kl"] > 0 and metrics["loss/lm"] > 0
    assert 0 < metrics["minillm/mean_weight"] <= 1 / (1 - 0.3) + 1e-6
    got = {n: p.grad.clone() for n, p in ctx.engine.module.named_parameters()}

    # by hand: the same sequences and LM documents, global (here: whole-step) token counts
    module = ctx.engine.module
    module.zero_grad()
    replay = MiniLLM.from_config(cfg, ctx)
    replay.load_state_dict(start)
    lm = replay.lm_batches(2)
    n = sum(float(r.loss_mask[:, 1:].sum()) for r in result.rollouts)
    n_lm = sum(float(b["attention_mask"][:, 1:].sum()) for b in lm)
    total = 0.0
    for r, b in zip(result.rollouts, lm):
        mask, y = r.loss_mask[:, 1:], r.input_ids[:, 1:]
        with torch.no_grad():
            t = teacher_logits(ctx.teacher, r.input_ids, r.attention_mask, VOCAB, use_prompt=False)
        s = lm_logits(module, r.input_ids, r.attention_mask, VOCAB)
        w = importance_weights(*sampled_logprobs(s, teacher=t, targets=y, mask=mask), mask, 0.3, 3.0)
        ce = cross_entropy(lm_logits(module, b["input_ids"], b["attention_mask"], VOCAB),
                           targets=b["input_ids"][:, 1:], mask=b["attention_mask"][:, 1:])[0]
        total = total + minillm_loss(s, t, y, w, mask)[0] / n + 0.5 * ce / n_lm
    total.backward()
    for name, p in module.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-6, rtol=1e-4), name
    assert metrics["tokens"] == n and metrics["minillm/lm_tokens"] == n_lm


def test_alpha_zero_weights_are_one_and_no_lm_state():
    cfg, ctx = _cfg_ctx("method.minillm.teacher_mix=0")
    m = MiniLLM.from_config(cfg, ctx)
    metrics = m.train_step([MB], 0).metrics
    assert metrics["minillm/mean_weight"] == 1.0
    assert "loss/lm" not in metrics and m.state_dict() == {}


# ----------------------------------------------------------------------------- config

def test_minillm_is_registered_and_documented():
    cfg = load_config(None, BASE)
    assert cfg.method.name == "minillm" and METHODS["minillm"].uses_teacher
    assert METHODS["minillm"].teacher_prompt_length(cfg) == 0  # the plain teacher: no soft prompt
    m = cfg.method.minillm
    assert (m.teacher_mix, m.clip_weight, m.lm_coef) == (0.2, 3.0, 0.0)
    assert m.single_step and m.length_norm
    text = "\n".join(help_lines())
    for key in ("method.minillm.teacher_mix", "method.minillm.clip_weight", "method.minillm.single_step",
                "method.minillm.length_norm", "method.minillm.lm_coef", "method.minillm.lm_data"):
        assert key in text, key


@pytest.mark.parametrize("override, key", [
    ("method.minillm.teacher_mix=1.5", "method.minillm.teacher_mix"),
    ("method.minillm.teacher_mix=1.0", "method.minillm.teacher_mix"),
    ("method.minillm.teacher_mix=-0.1", "method.minillm.teacher_mix"),
    ("method.minillm.clip_weight=0", "method.minillm.clip_weight"),
    ("method.minillm.lm_coef=-1", "method.minillm.lm_coef"),
    ("method.minillm.lm_coef=0.5", "method.minillm.lm_data"),
    ("method.minillm.lm_coef=0.5 method.minillm.lm_data=/nonexistent/c.txt", "method.minillm.lm_data"),
])
def test_bad_minillm_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ": ") as info:
        load_config(None, BASE + override.split())
    assert "\n" not in str(info.value)


def test_lm_data_file_is_accepted(tmp_path):
    data = _corpus_file(tmp_path)
    cfg = load_config(None, BASE + ["method.minillm.lm_coef=1", f"method.minillm.lm_data={data}"])
    assert cfg.method.minillm.lm_data == data
