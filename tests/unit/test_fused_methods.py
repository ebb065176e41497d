"""Every method whose loss is a token-level divergence runs it through the fused LM head by default (issue 22,
item 1): one step with method.fused_head on and off gives the same losses and gradients to 1e-6 in fp32, for a
Llama with a padded vocabulary and a tied GPT-2 head (padded too); and the fused step never builds a tensor
of [N, V] for all response positions."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from promptkd.config import load_config
from promptkd.data import TokenizedExample
from promptkd.methods import METHODS, step_context
from promptkd.models import PromptedTeacher, build_tiny
from promptkd.config import uses_fused_head
from promptkd.models.forward import head_inputs

VOCAB, PAD, EOS = 70, 0, 1
PADDED = 80        # the models' head/embedding rows: 10 beyond the tokenizer, never part of a distribution


class FakeEngine:
    """What a method needs of a DeepSpeed engine, at world size 1, without DeepSpeed (gradients accumulate)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.skipped_steps = 0
        self.global_steps = 0

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        loss.backward()

    def step(self) -> None:
        pass


def _models(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = build_tiny(arch, 1, 16, 2, vocab_size=PADDED, eos_token_id=EOS, pad_token_id=PAD)
    teacher = build_tiny(arch, 2, 32, 4, vocab_size=PADDED, eos_token_id=EOS, pad_token_id=PAD)
    if arch == "gpt2":
        assert student.lm_head.weight is student.transformer.wte.weight  # the tied head this test is about
    return student.float(), teacher.float()


def _ex(i: int) -> TokenizedExample:
    g = torch.Generator().manual_seed(i)
    prompt = torch.randint(2, VOCAB, (3 + i % 3,), generator=g).tolist()
    response = torch.randint(2, VOCAB, (4 + i % 4,), generator=g).tolist() + [EOS]
    return TokenizedExample(id=str(i), prompt_ids=prompt, response_ids=response, references=[], category="")


BATCHES = [[_ex(0), _ex(1), _ex(2)], [_ex(3), _ex(4)]]

CASES = {
    "kd": ["method.name=kd"],
    "imitkd": ["method.name=imitkd"],
    "imitkd_tvd": ["method.name=imitkd", "method.imitkd.divergence=tvd"],
    "gkd_on_policy_jsd": ["method.name=gkd", "method.gkd.lmbda=1.0", "method.gkd.beta=0.3"],
    "gkd_ground_truth": ["method.name=gkd", "method.gkd.lmbda=0.0"],
    "distillm": ["method.name=distillm", "method.distillm.init_prob=1.0"],
    "distillm_sfkl": ["method.name=distillm", "method.distillm.loss=sfkl"],
    "promptkd": ["method.name=promptkd"],
    "promptkd_student_teacher_stale": ["method.name=promptkd", "method.promptkd.guidance=student_teacher",
                                       "method.promptkd.stale_student_target=true",
                                       "method.promptkd.prompt_step_teacher_train=false"],
    "promptkd_no_reg": ["method.name=promptkd", "method.promptkd.reg_weight=0.0",
                        "method.promptkd.reg_schedule=constant", "method.promptkd.reuse_student_forward=false"],
    "rkl": ["method.name=rkl"],
}


def _method(overrides: list[str], fused: bool, student, teacher_base):
    cfg = load_config(None, ["data.train_file=unused.jsonl", "rollout.max_new_tokens=8", "model.teacher.prompt_length=3",
                             "model.teacher.prompt_init=random", f"method.fused_head={str(fused).lower()}", *overrides])
    cls = METHODS[cfg.method.name]
    p_len = cls.teacher_prompt_length(cfg)
    teacher = PromptedTeacher(teacher_base, prompt_length=p_len, init="random", dtype=torch.float32, seed=1)
    ctx = step_context(cfg, cls.section, FakeEngine(student), pad_id=PAD, eos_id=EOS, vocab_size=VOCAB,
                       total_steps=10, teacher=teacher, generator=torch.Generator().manual_seed(5))
    assert ctx.fused_head is fused
    return cls.from_config(cfg, ctx)


def _run(overrides: list[str], fused: bool, arch: str):
    student, teacher = _models(arch)
    m = _method(overrides, fused, student, teacher)
    prompt_grads: list[torch.Tensor] = []
    if m.ctx.teacher.prompt_length:
        m.ctx.teacher.prompt.register_hook(lambda g: prompt_grads.append(g.clone()))
    result = m.step(BATCHES, 0)
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    rollouts = [r.input_ids.tolist() for r in result.rollouts]
    return result.metrics, grads, prompt_grads, m.ctx.teacher.prompt.detach().clone(), rollouts


def _close(a, b, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


# every case with a padded Llama (untied head); the tied GPT-2 head with one case per loss kind (a divergence on
# ground truth, on samples with an autograd kernel, PromptKD's prompt loss and reverse KL)
ARCH_CASES = [(c, "llama") for c in sorted(CASES)] + [(c, "gpt2") for c in ("kd", "gkd_on_policy_jsd", "promptkd")]


@pytest.mark.parametrize("case, arch", ARCH_CASES)
def test_one_step_fused_equals_the_logits_path(case, arch):
    on = _run(CASES[case], True, arch)
    off = _run(CASES[case], False, arch)
    metrics_on, metrics_off = on[0], off[0]
    assert on[4] == off[4]                                   # the same samples (rollouts are unchanged)
    assert metrics_on.keys() == metrics_off.keys()
    losses = [k for k in metrics_on if k.startswith(("loss/", "prompt/"))]
    assert any(k.startswith("loss/") for k in losses)
    for k in losses:
        assert metrics_on[k] == pytest.approx(metrics_off[k], rel=1e-6, abs=1e-6), k
    assert on[1].keys() == off[1].keys() and len(on[1]) > 0
    for name in on[1]:
        _close(on[1][name], off[1][name], name)
    head = "lm_head.weight" if "lm_head.weight" in on[1] else "transformer.wte.weight"
    assert on[1][head].abs().sum() > 0                       # the head trains (a tied head through both uses)
    assert on[1][head][VOCAB:].abs().sum() == 0              # padded rows take no gradient
    assert len(on[2]) == len(off[2])
    for g_on, g_off in zip(on[2], off[2]):
        _close(g_on, g_off, "θ gradient")
    if on[2]:
        assert on[2][0].abs().sum() > 0
        _close(on[3], off[3], "θ after the step")


class LargestTensor(TorchDispatchMode):
    """Records the shape of every tensor any op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("case", ["promptkd", "imitkd", "kd"])
def test_the_fused_step_builds_no_logits_for_all_positions(case):
    """With a chunk of 4 rows, no op of the whole step (rollout, forwards, losses, backward) makes a tensor of
    more than 4 rows of a vocabulary (a head weight's own [H, V] transpose aside); the logits path makes
    [B, T, V] ones (the check can fail). Rollouts hold at most [B, V]: the last position only."""
    def most_vocab_rows(fused: bool) -> int:
        student, teacher = _models("llama")
        m = _method(CASES[case] + ["method.loss_chunk_size=4"], fused, student, teacher)
        mode = LargestTensor()
        with mode:
            m.step(BATCHES, 0)
        weights = {(16, PADDED), (32, PADDED), (16, VOCAB), (32, VOCAB)}
        return max((torch.Size(s).numel() // s[-1] for s in mode.shapes
                    if len(s) >= 2 and s[-1] in (VOCAB, PADDED) and s not in weights), default=0)

    fused, plain = most_vocab_rows(True), most_vocab_rows(False)
    assert fused <= 4, fused
    assert plain >= 10, plain                                # all response positions of a micro-batch at once


def test_head_inputs_are_what_the_head_reads():
    """The captured states put through the head give the model's own logits (Llama, tied GPT-2, padded)."""
    for arch in ("llama", "gpt2"):
        student, _ = _models(arch)
        ids = torch.randint(2, VOCAB, (2, 9))
        att = torch.ones_like(ids)
        logits = student(input_ids=ids, attention_mask=att, logits_to_keep=5).logits
        hidden = head_inputs(student, 5, input_ids=ids, attention_mask=att)
        assert hidden.shape == (2, 5, student.config.hidden_size if arch == "llama" else student.config.n_embd)
        torch.testing.assert_close(hidden @ student.get_output_embeddings().weight.T, logits, rtol=1e-6, atol=1e-6)


def test_a_transformed_head_is_refused_by_the_fused_path():
    """A softcapped head (Gemma-2 style) is a config error naming the key, checked before the run starts."""
    from promptkd.config import ConfigError
    from promptkd.models.forward import check_fused_heads

    student, teacher = _models("llama")
    check_fused_heads(student, teacher)  # plain heads pass
    student.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match=r"^method\.fused_head: .*final_logit_softcapping=30\.0.*fused_head=false"):
        check_fused_heads(teacher, student)
    with pytest.raises(ConfigError, match="method.fused_head=false"):
        head_inputs(student, 3, input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_the_config_key_is_documented_and_on_by_default():
    from promptkd.config import help_lines

    cfg = load_config(None, ["data.train_file=unused.jsonl"])
    assert cfg.method.fused_head is True
    assert load_config(None, ["data.train_file=unused.jsonl", "method.fused_head=false"]).method.fused_head is False
    line = next(x for x in help_lines() if "method.fused_head" in x)
    assert "fused LM head" in line


@pytest.mark.parametrize("overrides, fused", [
    *[(o, True) for o in CASES.values()],
    (["method.name=kd", "method.kd.ce_weight=0.5"], False),
    (["method.name=sft"], False), (["method.name=seqkd"], False), (["method.name=minillm"], False),
    (["method.name=promptkd", "method.fused_head=false"], False),
])
def test_uses_fused_head_names_the_methods_that_run_it(overrides, fused):
    assert uses_fused_head(load_config(None, ["data.train_file=unused.jsonl", *overrides])) is fused
