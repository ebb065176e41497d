"""The planner's loss lines follow the fused LM head + loss (method.fused_head, issue 22) or today's logits.

Every expected byte count is the formula written out: B sequences, K logit positions, V vocabulary, h hidden,
e bytes per element, rows = the GPU chunk rule's elements // V.
"""
from __future__ import annotations

import os

import pytest
import torch

from promptkd.config import load_config
from promptkd.plan import memory as M
from promptkd.plan import plan_config
from promptkd.plan.arch import load_shipped

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H100 = 81559 * 2 ** 20
# Qwen3-8B -> Qwen3-1.7B at 8,192 tokens, 1,024 of them prompt: K = 7,168 response positions + 1
LONG = ["plan.student_arch=qwen3-1.7b", "plan.teacher_arch=qwen3-8b", "data.max_length=8192",
        "data.max_prompt_length=1024", "train.micro_batch_size=1", "plan.world_size=8", "plan.gpu_memory=81559MiB"]
B, K, V, HS, HT, E = 1, 7169, 151936, 2048, 4096, 2


def test_qwen3_1_7b_shape():
    """28 layers, hidden 2048, 16 heads (head_dim 128), 8 kv heads, MLP 6144, vocab 151,936, tied head."""
    a = load_shipped("qwen3-1.7b", "k")
    assert (a.layers, a.hidden, a.heads, a.kv_heads, a.intermediate, a.vocab, a.head_dim) == \
        (28, 2048, 16, 8, 6144, 151936, 128)
    attn = 2048 * 2048 * 2 + 2 * 2048 * 1024 + 2 * 128       # q, o; k, v; q/k norms
    layer = attn + 3 * 2048 * 6144 + 2 * 2048                 # + MLP, two RMSNorms
    assert a.n_params == 28 * layer + V * 2048 + 2048         # tied: one [V, h] embedding, final norm


def test_device_chunk_rule_is_the_losses_rule(monkeypatch):
    """The planner's automatic loss chunk is promptkd.losses.fused.chunk_elements on a GPU with that much free."""
    from promptkd.losses import fused

    for free in (H100, 80 << 30, 4 << 30, 1 << 30, 100 << 20):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free: (f, f))
        assert M.device_chunk_elements(free) == fused.chunk_elements(torch.device("cuda", 0))
    assert M.device_chunk_elements(H100) == fused.DEVICE_CHUNK_ELEMENTS == 1 << 27


def _plan(fused_head: bool, device: str = "cuda"):
    cfg = load_config(os.path.join(REPO, "configs", "qwen3-8b_to_qwen3-0.6b.yaml"), LONG)
    cfg.method.fused_head = fused_head      # read by the planner with getattr (default true)
    return plan_config(cfg, device=device)


def _lines(plan, phase: str) -> dict[str, float]:
    return {line.term: line.bytes for line in plan.phases[phase]}


def test_fused_head_lines_replace_the_logits_lines():
    fused, today = _plan(True), _plan(False)
    rows = (1 << 27) // V                                     # 883 kept positions per chunk on an 80 GB GPU
    logits = B * K * V * E
    # prompt step: today holds student, p_T and prompted logits and the logits' gradient, [B, K, V] each
    p_today, p_fused = _lines(today, "prompt_step"), _lines(fused, "prompt_step")
    for term in ("student logits", "teacher logits p_T (no grad)", "prompted teacher logits",
                 "prompt loss: gradient buffer"):
        assert p_today[term] == logits
        assert not any(t.startswith(term) for t in p_fused)
    # fused: the hidden states instead, [B, K, h], and one chunk of 3 logits workspaces + 4 fp32 temporaries
    assert p_fused["student head input (fused head)"] == B * K * HS * E
    assert p_fused["teacher head input (fused head) p_T (no grad)"] == B * K * HT * E
    assert p_fused["prompt loss (fused head): hidden-state gradient [B, K, h]"] == B * K * HT * E
    chunk = [b for t, b in p_fused.items() if t.startswith("loss: fused head: fp32 chunk buffers")]
    assert chunk == [(3 + 4) * rows * V * 4]
    shared = {t: b for t, b in p_fused.items() if t in p_today}
    assert shared and all(p_today[t] == b for t, b in shared.items())   # the activations do not move
    # student step: today's teacher logits and gradient buffer go; the fp32 head-weight gradient (+ bf16 cast) comes
    s_today, s_fused = _lines(today, "student_step"), _lines(fused, "student_step")
    assert s_today["teacher logits (no grad)"] == s_today["loss: gradient buffer"] == logits
    assert s_fused["loss (fused head): head-weight gradient, fp32 [V, h] (+ its cast)"] == V * HS * (4 + E)
    assert s_fused["teacher head input (fused head, no grad)"] == B * K * HT * E
    assert [b for t, b in s_fused.items() if t.startswith("loss: fused head")] == [(2 + 3) * rows * V * 4]
    # the difference of the prompt-step totals is exactly those terms
    p_diff = sum(p_today.values()) - sum(p_fused.values())
    t_chunk_today = max(b for t, b in p_today.items() if t.startswith(("backward", "loss")))
    assert p_diff == pytest.approx(4 * logits + t_chunk_today - (B * K * HS * E + 2 * B * K * HT * E + chunk[0]))
    assert fused.total < today.total and fused.max_micro_batch > today.max_micro_batch


def test_cpu_plan_uses_the_cpu_chunk_and_sub_blocks():
    """bench/plan_check.py measures CPU steps: there the fused head's chunk is CPU_CHUNK_ELEMENTS and its
    temporaries are row sub-blocks of SUB_BLOCK_ELEMENTS."""
    from promptkd.losses import fused_head

    rows, sub = fused_head.CPU_CHUNK_ELEMENTS // V, fused_head.SUB_BLOCK_ELEMENTS // V
    s = M.Shape(B, 8192, K)
    assert M.fused_head_chunk(s, V, 0, fused_head.CPU_CHUNK_ELEMENTS, "student", fused_head.SUB_BLOCK_ELEMENTS) == \
        (2 * rows + 3 * sub) * V * 4
    assert M.fused_head_chunk(s, V, 0, 1 << 27, "prompt_student_teacher") == 8 * ((1 << 27) // V) * V * 4
    # never more rows than there are positions
    assert M.fused_head_chunk(M.Shape(1, 20, 10), V, 0, 1 << 27, "student") == 5 * 10 * V * 4
    cpu = _lines(_plan(True, device="cpu"), "prompt_step")
    assert not any(t.startswith("loss: fused head") for t in cpu)     # the teacher's backward is larger there
