"""Activation checkpointing (teacher and student): same gradients, layers really recomputed, dropout off."""
from __future__ import annotations

import torch

from promptkd.models.teacher import checkpoint_frozen_layers
from promptkd.models import PromptedTeacher, build_tiny


def _prompt_grad(checkpointing: bool) -> tuple[torch.Tensor, int]:
    torch.manual_seed(0)
    base = build_tiny("llama", 2, 32, 4, vocab_size=64)
    teacher = PromptedTeacher(base, prompt_length=3, init="random", dtype=torch.float32, seed=1)
    calls = {"n": 0}
    first = base.model.layers[0].self_attn  # inside the checkpointed forward: runs again on recompute
    first.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    if checkpointing:
        checkpoint_frozen_layers(teacher.base)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    logits, _ = teacher(ids, mask)
    logits.float().logsumexp(-1).sum().backward()
    return teacher.prompt.grad.detach().clone(), calls["n"]


def test_checkpointing_gives_the_same_prompt_gradient_and_recomputes():
    plain, calls_plain = _prompt_grad(False)
    ckpt, calls_ckpt = _prompt_grad(True)
    assert plain.abs().max() > 0
    torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)
    assert calls_plain == 1 and calls_ckpt == 2  # the layer ran again in backward


def test_checkpointing_keeps_dropout_off():
    base = build_tiny("gpt2", 2, 32, 4, vocab_size=64)
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5  # would randomize outputs if dropout were active
    teacher = PromptedTeacher(base, prompt_length=2, init="random", dtype=torch.float32)
    checkpoint_frozen_layers(teacher.base)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    a, _ = teacher(ids, torch.ones_like(ids))
    b, _ = teacher(ids, torch.ones_like(ids))
    assert torch.equal(a, b)
    assert all(not m.training for m in base.modules() if isinstance(m, torch.nn.Dropout))


def test_student_checkpointing_option_gives_the_same_gradients(tmp_path):
    """model.student.gradient_checkpointing=true: same gradients, and the layers really recompute."""
    from promptkd.training.builders import build_student_module
    from promptkd.config import load_config
    from promptkd.data import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat", "a dog ran"] * 20, 300, str(tmp_path / "tok"))
    grads, calls = {}, {}
    for flag in (False, True):
        cfg = load_config(None, ["data.train_file=x", f"model.student.gradient_checkpointing={str(flag).lower()}"])
        model = build_student_module(cfg, tok, {"zero_optimization": {"stage": 0}})
        model.train()
        n = {"calls": 0}
        model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: n.__setitem__("calls", n["calls"] + 1))
        ids = torch.randint(0, len(tok), (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads[flag] = torch.cat([p.grad.flatten() for p in model.parameters()])
        calls[flag] = n["calls"]
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)
    assert calls == {False: 1, True: 2}
