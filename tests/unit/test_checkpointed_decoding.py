"""A teacher with activation checkpointing keeps its KV cache while it decodes (issue 19).

Checkpointed frozen layers carry ``training=True`` in an eval-mode teacher. transformers 5.17 (the GPU
image's) drops such a layer's cache even under no_grad, so SeqKD's and MiniLLM's teacher decoding failed at
the second token. transformers here (5.25) keeps it under no_grad, so these tests put 5.17's rule back with a
hook on every layer (a flagged layer gets no cache) and check the decode through the real decode loop: same
tokens as a teacher without checkpointing, a cache one position longer per step, no layer flagged during
decoding, and every flag back afterwards.
"""
from __future__ import annotations

import copy

import pytest
import torch

from promptkd.models import PromptedTeacher, build_tiny
from promptkd.models.prompted_teacher import checkpoint_flags_off
from promptkd.rollout import SamplingParams, generate, mixed_step_fn, teacher_step_fn
from promptkd.models.teacher import checkpoint_frozen_layers

CACHE_KWARGS = ("cache", "past_key_values", "layer_past")


def _layers(teacher: PromptedTeacher) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in teacher.base.modules() if isinstance(m, GradientCheckpointingLayer)]


def _flags(teacher: PromptedTeacher) -> list[bool]:
    return [m.training for m in teacher.modules()]


def _like_transformers_5_17(teacher: PromptedTeacher, seen: list[bool]) -> None:
    """A flagged layer loses its cache whatever the grad mode; record every layer's flag as it runs."""

    def hook(module, args, kwargs):
        seen.append(module.training)
        if module.training:
            kwargs = {k: (None if k in CACHE_KWARGS else v) for k, v in kwargs.items()}
            kwargs["use_cache"] = False
        return args, kwargs

    for layer in _layers(teacher):
        layer.register_forward_pre_hook(hook, with_kwargs=True)


def _teachers(arch: str) -> tuple[PromptedTeacher, PromptedTeacher]:
    torch.manual_seed(0)
    plain = PromptedTeacher(build_tiny(arch, 2, 32, 4, vocab_size=64), prompt_length=3, init="random",
                            dtype=torch.float32, seed=1)
    ckpt = copy.deepcopy(plain)
    checkpoint_frozen_layers(ckpt.base)
    assert _layers(ckpt) and all(m.training for m in _layers(ckpt))
    return plain, ckpt


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator(device="cpu").manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def _cache_lengths(step_fn):
    lengths: list[int] = []

    def step(ids, mask, past):
        logits, cache = step_fn(ids, mask, past)
        lengths.append(int(cache.get_seq_length()))
        return logits, cache

    return step, lengths


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpointed_teacher_decodes_with_its_cache(arch):
    plain, ckpt = _teachers(arch)
    seen: list[bool] = []
    _like_transformers_5_17(ckpt, seen)
    ids, mask = _prompts()
    params = SamplingParams(max_new_tokens=6, do_sample=False)
    before = _flags(ckpt)
    outs = {}
    for name, teacher in (("plain", plain), ("ckpt", ckpt)):
        step, lengths = _cache_lengths(teacher_step_fn(teacher, use_prompt=True))
        outs[name] = (generate(step, ids, mask, params, eos_id=0, pad_id=1, vocab_size=64, force_eos=False),
                      lengths)
    (ref, ref_len), (out, out_len) = outs["plain"], outs["ckpt"]
    assert torch.equal(out.input_ids, ref.input_ids)
    # the prompt (3) + 5 prompt columns on the first step, one more per step after
    assert out_len == ref_len == [3 + 5 + i for i in range(len(out_len))] and len(out_len) == 6
    assert seen and not any(seen), "a checkpointed layer decoded with its training flag set"
    assert all(m.training for m in _layers(ckpt)) and _flags(ckpt) == before, "flags not restored"


def test_teacher_mixture_sampling_keeps_the_cache():
    """MiniLLM's mixture: the teacher half of the step function decodes through the same forward."""
    plain, ckpt = _teachers("llama")
    seen: list[bool] = []
    _like_transformers_5_17(ckpt, seen)
    ids, mask = _prompts()
    student = build_tiny("llama", 1, 32, 4, vocab_size=64).eval()
    from promptkd.rollout import hf_step_fn

    params = SamplingParams(max_new_tokens=4, do_sample=False)
    runs = [generate(mixed_step_fn(hf_step_fn(student), teacher_step_fn(t, use_prompt=False), 0.5, 64), ids, mask,
                     params, eos_id=0, pad_id=1, vocab_size=64, force_eos=False) for t in (plain, ckpt)]
    assert torch.equal(runs[0].input_ids, runs[1].input_ids)
    assert seen and not any(seen)


def test_full_forwards_keep_checkpointing():
    """Without a cache (the prompt step's forward) the layers stay flagged, so they still checkpoint."""
    _, ckpt = _teachers("llama")
    seen: list[bool] = []
    _like_transformers_5_17(ckpt, seen)
    ids, mask = _prompts()
    ckpt(ids, mask)
    assert seen and all(seen)


def test_flags_come_back_after_an_error():
    _, ckpt = _teachers("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with checkpoint_flags_off(_layers(ckpt)):
            assert not any(m.training for m in _layers(ckpt))
            raise RuntimeError("boom")
    assert all(m.training for m in _layers(ckpt))
