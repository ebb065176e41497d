"""The session's multi-rank launches of tests/distributed/scenarios.py: one 2-rank launch for every scenario but
the pinned ones (which run in a launch of their own: tests/distributed/test_multirank.py::pinned), and one 3-rank
launch. The LoRA scenarios (lora_scenarios.py) run in the 2-rank one, last, after the chat ZeRO-3 one
(chat_scenarios.py); the distributed evaluation (eval_ranks.py, tests/distributed/test_eval_ranks.py) runs first in
both, on a workspace built here before them."""
import json
from pathlib import Path

import pytest

from tests.fixtures.pins import FUSED_SCENARIO, SCENARIO
from tests.fixtures.ranks import launch_scenarios


def _echo_set(ws: dict, first: str, path: str) -> str:
    """The synthetic prompts with the 1-rank greedy answers (``first``'s) as references on even rows: the set
    really scores."""
    answers = [json.loads(line)["answer"] for line in
               (Path(first) / "eval" / "answers" / "model" / "synth.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in Path(ws["synth"]).read_text().splitlines()]
    Path(path).write_text("".join(json.dumps({**r, "response": a if i % 2 == 0 else r["response"]}) + "\n"
                                  for i, (r, a) in enumerate(zip(rows, answers))))
    return path


@pytest.fixture(scope="session")
def eval_inputs(tmp_path_factory) -> dict:
    """The evaluation workspace (tests/fixtures/eval_workspace.py), its ws.json and the eval.sets of the
    eval_ranks scenario: two prepared sets, 7 synthetic prompts, and the echo set (one greedy 1-rank run here)."""
    import torch

    from promptkd.config import load_config
    from promptkd.stages import run_eval
    from tests.fixtures.eval_workspace import build, eval_overrides

    root = tmp_path_factory.mktemp("eval_ranks")
    ws = build(str(root / "ws"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = str(root / "first")
        run_eval(load_config(None, eval_overrides(ws, first)))
    finally:
        torch.set_num_threads(threads)
    sets = f"[{ws['sets']}, synth={ws['synth']}, echo={_echo_set(ws, first, str(root / 'echo.jsonl'))}]"
    ws_file = root / "ws.json"
    ws_file.write_text(json.dumps(ws))
    return {"root": root, "ws": ws, "sets": sets, "args": ["--eval-ws", str(ws_file), "--eval-sets", sets]}


@pytest.fixture(scope="session")
def scenario_results(tmp_path_factory, eval_inputs):
    """``load(name)``: each rank's result of scenario ``name`` on 2 ranks (test_multirank, test_gather,
    test_device_ranks, test_lora_ranks, test_fused_ranks, test_eval_ranks, test_chat_families)."""
    return launch_scenarios(tmp_path_factory.mktemp("multirank2"), skip=f"{SCENARIO},{FUSED_SCENARIO}",
                            timeout_s=1200, extra=eval_inputs["args"])


@pytest.fixture(scope="session")
def results3(tmp_path_factory, eval_inputs):
    """The ZeRO-3 teacher scenarios and the distributed evaluation on 3 ranks (each holding a different number of
    prompts; test_multirank, test_eval_ranks)."""
    return launch_scenarios(tmp_path_factory.mktemp("multirank3"), nproc=3,
                            only="eval_ranks,zero3_student_zero3_teacher,teacher_placement", extra=eval_inputs["args"])
