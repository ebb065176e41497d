"""The LM head runs on response positions only (logits_to_keep): same logits, aligned masks."""
from __future__ import annotations

import pytest
import torch

from promptkd.methods.base import has_dropout, lm_logits, response_start, shifted_mask, teacher_logits
from promptkd.models import PromptedTeacher, build_tiny
from promptkd.rollout import Rollout

VOCAB = 61


def _rollout(prompt_len: int = 5, resp_len: int = 4) -> Rollout:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (3, prompt_len + resp_len), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :2] = 0          # left padding in the prompt
    attn[2, -1] = 0          # a response that ended early
    loss = torch.zeros_like(ids)
    loss[:, prompt_len:] = attn[:, prompt_len:]
    return Rollout(ids, attn, loss, prompt_len)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_student_logits_window_equals_the_full_logits_slice(arch):
    torch.manual_seed(0)
    model = build_tiny(arch, layers=2, hidden=32, heads=4, vocab_size=VOCAB).eval()
    r = _rollout()
    start = response_start(r)
    assert start == r.prompt_len - 1
    full = lm_logits(model, r.input_ids, r.attention_mask, VOCAB)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, inp, _o: rows.append(inp[0].shape[1]))
    window = lm_logits(model, r.input_ids, r.attention_mask, VOCAB, start)
    hook.remove()
    assert rows == [r.input_ids.shape[1] - start], "the LM head must skip the prompt positions"
    assert window.shape == (3, r.input_ids.shape[1] - 1 - start, VOCAB)
    torch.testing.assert_close(window, full[:, start:], rtol=1e-5, atol=1e-6)
    # the mask lines up: every response token, none of the prompt
    assert shifted_mask(r).shape == window.shape[:2]
    assert torch.equal(shifted_mask(r), r.loss_mask[:, 1:][:, start:])
    assert int(shifted_mask(r).sum()) == int(r.loss_mask.sum())


@pytest.mark.parametrize("use_prompt", [True, False])
def test_teacher_logits_window_equals_the_full_logits_slice(use_prompt):
    torch.manual_seed(1)
    teacher = PromptedTeacher(build_tiny("llama", 2, 32, 4, VOCAB), prompt_length=3, init="random",
                              dtype=torch.float32)
    r = _rollout()
    start = response_start(r)
    full = teacher_logits(teacher, r.input_ids, r.attention_mask, VOCAB, use_prompt)
    window = teacher_logits(teacher, r.input_ids, r.attention_mask, VOCAB, use_prompt, start)
    torch.testing.assert_close(window, full[:, start:], rtol=1e-5, atol=1e-6)


def test_ground_truth_rollouts_keep_every_position():
    r = _rollout()
    gt = Rollout(r.input_ids, r.attention_mask, r.loss_mask, prompt_len=0)
    assert response_start(gt) == 0 and torch.equal(shifted_mask(gt), gt.loss_mask[:, 1:])


def test_has_dropout_reads_modules_and_config_rates():
    assert not has_dropout(build_tiny("llama", 1, 32, 4, VOCAB))
    assert not has_dropout(build_tiny("gpt2", 1, 32, 4, VOCAB))  # build_tiny turns dropout off
    gpt2 = build_tiny("gpt2", 1, 32, 4, VOCAB)
    gpt2.config.resid_pdrop = 0.1
    assert has_dropout(gpt2)
    llama = build_tiny("llama", 1, 32, 4, VOCAB)
    llama.config.attention_dropout = 0.05
    assert has_dropout(llama)
    assert has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.2)))
