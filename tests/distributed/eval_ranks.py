"""Distributed evaluation under W gloo ranks: greedy stage=eval for the student and for the prompted teacher into
OUT/{student,prompted} (rank 0 writes), and stage=exposure into OUT/exposure, whose gathered result every rank
returns. The session's 2-rank and 3-rank scenario launches run it as their ``eval_ranks`` scenario
(tests/distributed/conftest.py, tests/distributed/test_eval_ranks.py); alone:

    torchrun --nproc_per_node W tests/distributed/eval_ranks.py --ws WS.json --sets "[...]" --out DIR

(writes DIR/exposure.rank<r>.json; a failure: DIR/error.rank<r>.txt and a non-zero exit).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from promptkd import distributed as dist  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ws", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sets", required=True, help="YAML list for eval.sets")
    args = parser.parse_args()
    dist.init(timeout_s=60)
    try:
        result = run(args.ws, args.out, args.sets)
        with open(os.path.join(args.out, f"exposure.rank{dist.rank()}.json"), "w") as fh:
            json.dump(result, fh)
        code = 0
    except Exception:  # recorded, then a non-zero exit
        with open(os.path.join(args.out, f"error.rank{dist.rank()}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        code = 1
    dist.shutdown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
