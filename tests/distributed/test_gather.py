"""ZeRO-3 student gathered once per rollout / dev evaluation: same tokens, far fewer all-gathers (2 gloo ranks)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ranks(scenario_results):
    return scenario_results("gather")  # the session's one 2-rank launch (tests/distributed/conftest.py)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_gathered_rollouts_equal_per_token_gathers(ranks, mode):
    for r in ranks:
        assert r[f"{mode}_always"]["ids"] == r[f"{mode}_never"]["ids"]
        assert r[f"{mode}_auto"]["ids"] == r[f"{mode}_never"]["ids"]   # CPU: auto gathers (tiny model fits)
    # the ranks decoded different prompts, and rows stopped at different lengths
    assert ranks[0][f"{mode}_never"]["ids"] != ranks[1][f"{mode}_never"]["ids"]


def test_gathering_once_cuts_the_all_gathers_per_token(ranks):
    for r in ranks:
        n_params, n_rollouts = r["n_params"], len(r["greedy_always"]["ids"])
        never, once = r["greedy_never"], r["greedy_always"]
        assert never["decode_steps"] >= 4 * n_rollouts        # long rollouts: the per-token cost shows
        # without the gather every decoded token gathers every parameter (gloo: one call per parameter) ...
        assert never["gathers"] >= n_params * never["decode_steps"]
        # ... with it each rollout gathers every parameter once, whatever its length
        assert once["gathers"] <= n_params * n_rollouts
        assert r["greedy_auto"]["gathers"] == once["gathers"]
        assert r["sampled_always"]["gathers"] <= n_params * n_rollouts


def test_dev_eval_gathers_once_and_everything_is_released_after(ranks):
    r0, r1 = ranks
    assert r0["dev_eval"] == r1["dev_eval"]
    # 8 examples, 2 ranks, batch 3, 12 tokens: gathered once for the evaluation, not per token
    assert 0 < r0["dev_eval_gathers"] <= r0["n_params"]
    assert r0["released"] and r1["released"]     # partitioned again after the loops
    assert r0["loss_after"] == r1["loss_after"] and r0["loss_after"] > 0


@pytest.fixture(scope="module")
def teacher_ranks(scenario_results):
    return scenario_results("gather_teacher")


@pytest.mark.parametrize("method", ["minillm", "seqkd"])
def test_a_zero3_teacher_that_decodes_is_gathered_once_per_loop(teacher_ranks, method):
    """MiniLLM's teacher-mixed rollouts and SeqKD's teacher answers: the same tokens, with the ZeRO-3 teacher (and
    MiniLLM's student) gathered once per decode loop instead of every layer per token."""
    for r in teacher_ranks:
        never, once = r[f"{method}_never"], r[f"{method}_always"]
        assert once["ids"] == never["ids"]
        params = r[f"{method}_teacher_params"] + (r[f"{method}_student_params"] if method == "minillm" else 0)
        # every parameter gathered once per loop (gloo: one call each), against every layer per decoded token
        assert 0 < once["gathers"] <= params * len(never["ids"])
        assert once["gathers"] * 4 < never["gathers"]
        # gathered, the decode loop runs without ZeRO-3's per-submodule hooks; they are back afterwards
        before, after = r[f"{method}_zero3_hooks"]
        assert before > 0 and after == before
        assert never["zero3_hooks_seen"] == [before] and once["zero3_hooks_seen"] == [0]
        assert r[f"{method}_released"]
        assert r[f"{method}_loss_after"] is not None and r[f"{method}_loss_after"] > 0
    assert teacher_ranks[0][f"{method}_loss_after"] == teacher_ranks[1][f"{method}_loss_after"]
