"""Distributed greedy evaluation with 2 and 3 gloo ranks equals the 1-rank result exactly.

The sets have 4, 3, 7 and 7 examples: none is divisible by both world sizes, so padded shard slots are
exercised. The 2- and 3-rank runs are the ``eval_ranks`` scenario of the session's 2-rank and 3-rank launches
(tests/distributed/conftest.py: eval_ranks.py runs the student, the prompted teacher and stage=exposure); the
1-rank references run in this process.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

WORLDS = (2, 3)


@pytest.fixture(scope="module")
def references(eval_inputs) -> Path:
    """The 1-rank greedy evaluations of the student and the prompted teacher, in this process (one thread)."""
    from promptkd.config import load_config
    from promptkd.stages import run_eval
    from tests.fixtures.eval_workspace import eval_overrides

    root = eval_inputs["root"] / "world1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, prompted in (("student", False), ("prompted", True)):
            run_eval(load_config(None, eval_overrides(eval_inputs["ws"], str(root / name), prompted)
                                 + [f"eval.sets={eval_inputs['sets']}"]))
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def launched(scenario_results, results3) -> dict[int, list[dict]]:
    """world size -> each rank's result of the eval_ranks scenario (its output dir, the gathered exposure)."""
    return {2: scenario_results("eval_ranks"), 3: results3("eval_ranks")}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("model", ["student", "prompted"])
def test_distributed_greedy_equals_one_rank(references, launched, world, model):
    ranks = launched[world]
    assert len(ranks) == world and len({r["out"] for r in ranks}) == 1
    out = Path(ranks[0]["out"]) / model / "eval"
    ref = references / model / "eval"
    got, want = json.loads((out / "results.json").read_text()), json.loads((ref / "results.json").read_text())
    assert got["sets"] == want["sets"]
    assert {k: v["n"] for k, v in got["sets"].items()} == {"selfinst": 4, "vicuna": 3, "synth": 7, "echo": 7}
    assert got["models"] == want["models"]                      # every score, per set, seed and category
    name = "prompted_teacher" if model == "prompted" else "model"
    for set_name in ("selfinst", "vicuna", "synth", "echo"):
        a = (out / "answers" / name / f"{set_name}.jsonl").read_text()
        b = (ref / "answers" / name / f"{set_name}.jsonl").read_text()
        assert a == b, f"{set_name}: answers or their order differ with {world} ranks"
    if model == "student":  # the echo set really scores: its even rows are the model's own answers
        assert got["models"][name]["datasets"]["echo"]["rougeL"] > 25.0


@pytest.mark.parametrize("world", WORLDS)
def test_distributed_exposure_is_gathered_once_per_prompt(launched, world):
    ranks = [r["exposure"] for r in launched[world]]
    assert len(ranks) == world and all(r == ranks[0] for r in ranks[1:])  # every rank holds the same result
    row = ranks[0]["students"][0]
    assert row["n_prompts"] == 7 and len(row["R"]) == 4
    assert all(e > 0 for e in row["eps"]) and all(v is not None for v in row["exacc_err"])
    assert (Path(launched[world][0]["out"]) / "exposure" / "exposure" / "results.md").is_file()
