"""Distributed evaluation under W gloo ranks (launched with W = 2 and 3 by test_eval_ranks.py):

    torchrun --nproc_per_node W tests/distributed/eval_ranks.py --ws WS.json --out DIR

Runs greedy stage=eval for the student and for the prompted teacher into DIR/{student,prompted}
(rank 0 writes), and stage=exposure, whose result every rank dumps to DIR/exposure.rank<r>.json.
A failure is recorded in DIR/error.rank<r>.txt and the launch exits non-zero.
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ws", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sets", required=True, help="YAML list for eval.sets")
    args = parser.parse_args()
    dist.init(timeout_s=60)
    from promptkd.config import load_config
    from promptkd.stages import run_eval
    from promptkd.stages import run_exposure
    from tests.fixtures.eval_workspace import OVERRIDES, eval_overrides

    with open(args.ws) as fh:
        ws = json.load(fh)
    try:
        for name, prompted in (("student", False), ("prompted", True)):
            run_eval(load_config(None, eval_overrides(ws, os.path.join(args.out, name), prompted)
                                 + [f"eval.sets={args.sets}"]))
        cfg = load_config(None, [f"tokenizer.path={ws['tokenizer']}", f"eval.file={ws['synth']}",
                                 f"exposure.students=[{ws['student']}]", f"exposure.teacher_path={ws['teacher']}",
                                 "exposure.samples=2", "exposure.max_tokens=4", "stage=exposure",
                                 f"output.dir={os.path.join(args.out, 'exposure')}", *OVERRIDES])
        result = run_exposure(cfg)
        with open(os.path.join(args.out, f"exposure.rank{dist.rank()}.json"), "w") as fh:
            json.dump(result, fh)
        code = 0
    except Exception:  # recorded for the test, then a non-zero exit
        with open(os.path.join(args.out, f"error.rank{dist.rank()}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        code = 1
    dist.shutdown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
