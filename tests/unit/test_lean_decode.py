"""The decode loop's fast paths (issue 19, item 3): each one must give exactly what the plain path gives.

- a one-token decode step hands SDPA models their [B, 1, 1, L] mask ready-made instead of transformers'
  mask builder: same logits bit for bit, padded batch or not, Llama / GPT-2 / OPT;
- the loop runs under inference_mode when no weight is ZeRO-3 partitioned, and the Rollout it returns is
  made of ordinary tensors that a training forward + backward can use;
- partitioned weights (ZeRO-3) keep no_grad.
"""
from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from promptkd.models import PromptedTeacher, build_tiny
from promptkd.rollout import SamplingParams, generate, hf_step_fn, mixed_step_fn, position_ids, teacher_step_fn
from promptkd.rollout.core import inference_safe, ready_decode_mask

VOCAB = 64
PAD = 0


def _model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "opt":
        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                        max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=PAD,
                        attn_implementation="sdpa")
        return OPTForCausalLM(cfg).eval()
    return build_tiny(arch, 2, 32, 4, vocab_size=VOCAB).eval()


def _prompts(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
        mask[2, :1] = 0
        ids = ids.masked_fill(mask == 0, PAD)
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("padded", [True, False])
def test_ready_decode_mask_gives_the_same_logits(arch, padded):
    model = _model(arch)
    assert model.config._attn_implementation == "sdpa" and ready_decode_mask(model)
    ids, mask = _prompts(padded)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        grown = torch.cat([mask, torch.tensor([[1], [0], [1]])], dim=1)  # row 1 finished: its new column is 0
        fast, _ = hf_step_fn(model)(nxt, grown, first.cache)
        first.cache.crop(-1)  # drop the fast step's token: the plain step decodes it again
        assert first.cache.get_seq_length() == ids.shape[1]
        plain = model(input_ids=nxt, attention_mask=grown, position_ids=position_ids(grown)[:, -1:],
                      cache=first.cache, use_cache=True).logits[:, -1]
    assert torch.equal(fast, plain)


def test_eager_attention_keeps_the_2d_mask():
    model = _model("llama")
    model.config._attn_implementation = "eager"
    assert not ready_decode_mask(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inference_mode_rollout_is_ordinary_and_trains(arch):
    model = _model(arch)
    ids, mask = _prompts(True)
    params = SamplingParams(max_new_tokens=6)
    step = hf_step_fn(model)
    assert step.inference_safe
    r = generate(step, ids, mask, params, eos_id=5, pad_id=PAD, vocab_size=VOCAB,
                 generator=torch.Generator().manual_seed(0))
    # the same tokens as the loop under no_grad (the plain path, as for a partitioned model)
    step.inference_safe = False
    r2 = generate(step, ids, mask, params, eos_id=5, pad_id=PAD, vocab_size=VOCAB,
                  generator=torch.Generator().manual_seed(0))
    for name in ("input_ids", "attention_mask", "loss_mask"):
        t = getattr(r, name)
        assert not t.is_inference(), name
        assert torch.equal(t, getattr(r2, name)), name
    model.train()
    out = model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=position_ids(r.attention_mask))
    (out.logits.float().logsumexp(-1) * r.loss_mask).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_partitioned_weights_keep_no_grad():
    student, teacher_base = _model("llama"), _model("llama", seed=1)
    teacher = PromptedTeacher(teacher_base, prompt_length=2, init="random", dtype=torch.float32)
    assert inference_safe(student) and teacher_step_fn(teacher, True).inference_safe
    mixed = mixed_step_fn(hf_step_fn(student), teacher_step_fn(teacher, False), 0.2, VOCAB)
    assert mixed.inference_safe
    next(student.parameters()).ds_id = 0  # what a ZeRO-3 partitioned parameter carries
    try:
        assert not hf_step_fn(student).inference_safe
        assert not mixed_step_fn(hf_step_fn(student), teacher_step_fn(teacher, False), 0.2, VOCAB).inference_safe
    finally:
        del next(student.parameters()).ds_id


def test_one_host_read_per_decoded_token():
    """The stop check is the loop's only host read per token: transformers' mask builder (can the padding mask
    be dropped?) no longer runs on one-token steps. Counted under no_grad: a dispatch mode sees no op inside
    inference_mode."""
    from tests.unit.test_host_syncs import CountOps

    model = _model("llama")
    ids, mask = _prompts(True)
    step = hf_step_fn(model)
    step.inference_safe = False
    n = 8
    with CountOps() as ops:
        r = generate(step, ids, mask, SamplingParams(max_new_tokens=n), eos_id=10_000, pad_id=PAD, vocab_size=VOCAB,
                     generator=torch.Generator().manual_seed(0))
    assert r.response_ids.shape[1] == n  # no row finished: n decode steps, n stop checks
    # + the prefill's mask check (one 2D-mask forward) + _assemble's one nonzero; before: 2 reads per token
    assert ops.n == {"nonzero": 1, "bool_index": 0, "scalar": n + 2}, ops.n
