"""Distributed greedy evaluation with 2 and 3 gloo ranks equals the 1-rank result exactly.

The sets have 4, 3, 7 and 7 examples: none is divisible by both world sizes, so padded
shard slots are exercised. One torchrun launch per world size (eval_ranks.py runs the student,
the prompted teacher and stage=exposure in it); the 1-rank reference runs in this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures.cli import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "distributed" / "eval_ranks.py"
WORLDS = (2, 3)
LAUNCH_TIMEOUT_S = 480


def _echo_set(ws: dict, ref_dir: Path) -> str:
    """The synthetic prompts with the 1-rank greedy answers as references on even rows: non-zero scores."""
    answers = [json.loads(line)["answer"] for line in
               (ref_dir / "eval" / "answers" / "model" / "synth.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in Path(ws["synth"]).read_text().splitlines()]
    path = Path(ws["root"]) / "echo.jsonl"
    path.write_text("".join(json.dumps({**r, "response": a if i % 2 == 0 else r["response"]}) + "\n"
                            for i, (r, a) in enumerate(zip(rows, answers))))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from promptkd.config import load_config
    from promptkd.stages import run_eval
    from tests.fixtures.eval_workspace import build, eval_overrides

    root = tmp_path_factory.mktemp("eval_ranks")
    ws = build(str(root / "ws"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = root / "first"
        run_eval(load_config(None, eval_overrides(ws, str(first))))
        sets = f"[{ws['sets']}, synth={ws['synth']}, echo={_echo_set(ws, first)}]"
        procs = _start_launches(root, ws, sets)
        # the 1-rank references in this process while the launches import and run
        for name, prompted in (("student", False), ("prompted", True)):
            run_eval(load_config(None, eval_overrides(ws, str(root / "world1" / name), prompted)
                                 + [f"eval.sets={sets}"]))
    finally:
        torch.set_num_threads(threads)
    codes = {world: p.wait() for world, p in procs.items()}
    return root, {w: (codes[w], (root / f"world{w}.log").read_text()) for w in WORLDS}


def _start_launches(root: Path, ws: dict, sets: str) -> dict[int, subprocess.Popen]:
    """Both launches at once: their ~10 s of imports and init overlap."""
    ws_file = root / "ws.json"
    ws_file.write_text(json.dumps(ws))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    procs = {}
    for world in WORLDS:
        out = root / f"world{world}"
        out.mkdir()
        cmd = ["timeout", str(LAUNCH_TIMEOUT_S), sys.executable, "-m", "torch.distributed.run",
               "--nproc_per_node", str(world), "--master_port", str(free_port()), str(SCRIPT),
               "--ws", str(ws_file), "--out", str(out), "--sets", sets]
        with open(root / f"world{world}.log", "w") as log:  # a file, not a pipe: nobody reads it while they run
            procs[world] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return procs


def _launch(runs, world: int) -> Path:
    root, status = runs
    rc, log = status[world]
    errors = "".join(p.read_text() for p in (root / f"world{world}").glob("error.rank*.txt"))
    assert rc == 0, f"world {world}: exit {rc}\n{errors or log[-4000:]}"
    return root / f"world{world}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("model", ["student", "prompted"])
def test_distributed_greedy_equals_one_rank(runs, world, model):
    root, _ = runs
    out = _launch(runs, world) / model / "eval"
    ref = root / "world1" / model / "eval"
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
def test_distributed_exposure_is_gathered_once_per_prompt(runs, world):
    out = _launch(runs, world)
    ranks = [json.loads((out / f"exposure.rank{r}.json").read_text()) for r in range(world)]
    assert all(r == ranks[0] for r in ranks[1:])               # every rank holds the same gathered result
    row = ranks[0]["students"][0]
    assert row["n_prompts"] == 7 and len(row["R"]) == 4
    assert all(e > 0 for e in row["eps"]) and all(v is not None for v in row["exacc_err"])
    assert (out / "exposure" / "exposure" / "results.md").is_file()
