"""The fused LM head + loss on 2 gloo ranks at ZeRO-1, 2 and 3 (issue 22, item 1): equal to method.fused_head=false
in fp32; at ZeRO-3 the partitioned head (tied to the embedding, padded) gathered once per loss."""
from __future__ import annotations

import pytest

ZERO3_RUNS = ("promptkd_llama", "promptkd_gpt2_tied", "imitkd_gpt2_tied")
RUNS = ZERO3_RUNS + ("promptkd_llama_zero1", "promptkd_gpt2_tied_zero2", "gkd_llama_zero2")


@pytest.fixture(scope="module")
def ranks(scenario_results):
    return scenario_results("fused_head_zero3")  # the session's one 2-rank launch (tests/distributed/conftest.py)


@pytest.mark.parametrize("run", RUNS)
def test_fused_equals_the_logits_path_at_every_zero_stage(ranks, run):
    for r in ranks:
        got = r[run]
        assert got["student_partitioned"] == (run in ZERO3_RUNS)
        for a, b in zip(got["metrics_fused"], got["metrics_plain"]):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), (run, k)
        assert got["grads_compared"] == got["weights_compared"] > 0
        assert got["max_grad_diff"] <= 1e-6 * max(1.0, got["grad_scale"]), got     # every parameter's full gradient
        assert got["head_grad_scale"] > 0 and got["head_grad_diff"] <= 1e-6
        assert got["max_weight_diff"] <= 1e-6, got                                  # after the step(s)
        assert got["head_moved"] > 1e-5          # the head (or tied embedding) did train: its equality means something
        assert got["head_diff"] <= 1e-6
        if got["prompt_diff"] is not None:
            assert got["prompt_diff"] <= 1e-6
    assert ranks[0][run]["metrics_fused"] == ranks[1][run]["metrics_fused"]   # global metrics agree across ranks


def test_the_tied_padded_case_is_covered(ranks):
    for run in ("promptkd_gpt2_tied", "promptkd_gpt2_tied_zero2"):
        got = ranks[0][run]
        assert got["tied"] and got["head_rows"] % 96 == 0
        assert got["teacher_partitioned"] == (run == "promptkd_gpt2_tied")
    assert not ranks[0]["promptkd_llama"]["tied"] and not ranks[0]["gkd_llama_zero2"]["tied"]


@pytest.mark.parametrize("run", RUNS)
def test_the_head_is_gathered_once_per_loss(ranks, run):
    """Each loss opens one gather of each partitioned head (a chunk of 4 rows makes many chunks per loss);
    the logits path makes none (its head is gathered by DeepSpeed's module hooks)."""
    losses_per_micro_batch = 2 if run.startswith("promptkd") else 1      # prompt loss + student loss
    for r in ranks:
        got = r[run]
        expected = losses_per_micro_batch * got["micro_batches"] if run in ZERO3_RUNS else 0   # whole at ZeRO-1/2
        assert got["fused_student_gathers"] == expected, got
        assert got["plain_student_gathers"] == 0
        if got["teacher_partitioned"]:
            assert got["fused_teacher_gathers"] == got["fused_student_gathers"]
