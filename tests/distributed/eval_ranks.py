"""Distributed evaluation on the current world: greedy stage=eval for the student and for the prompted teacher into
OUT/{student,prompted} (rank 0 writes), and stage=exposure into OUT/exposure, whose gathered result every rank
returns. The ``eval_ranks`` scenario of the session's 2-rank and 3-rank scenario launches runs it
(tests/distributed/conftest.py, tests/distributed/test_eval_ranks.py); alone:

    torchrun --nproc_per_node W tests/distributed/scenarios.py --out DIR --only eval_ranks \
        --eval-ws WS.json --eval-sets "[...]"
"""
from __future__ import annotations

import json
import os


def run(ws_file: str, out: str, sets: str) -> dict:
    """Both greedy evaluations and the exposure run on this world; the exposure result (the same on every rank)."""
    from promptkd.config import load_config
    from promptkd.stages import run_eval, run_exposure
    from tests.fixtures.eval_workspace import OVERRIDES, eval_overrides

    with open(ws_file) as fh:
        ws = json.load(fh)
    for name, prompted in (("student", False), ("prompted", True)):
        run_eval(load_config(None, eval_overrides(ws, os.path.join(out, name), prompted) + [f"eval.sets={sets}"]))
    cfg = load_config(None, [f"tokenizer.path={ws['tokenizer']}", f"eval.file={ws['synth']}",
                             f"exposure.students=[{ws['student']}]", f"exposure.teacher_path={ws['teacher']}",
                             "exposure.samples=2", "exposure.max_tokens=4", "stage=exposure",
                             f"output.dir={os.path.join(out, 'exposure')}", *OVERRIDES])
    return run_exposure(cfg)
