"""Rewrite this CPU kind's entry of tests/distributed/pinned_numerics.json from a fresh 2-rank run.

    python scripts/repin_numerics.py

The test (tests/distributed/test_multirank.py::test_pinned_loss_curve_and_weights) only compares; pins change
only here. Run it for a CPU kind that has no pin yet, with code that reproduces the existing pins (the test
passes on another kind to 1e-5), or, for a change meant to alter numerics, on every CPU kind that has one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.pins import PINNED, REPO, SCENARIO, hardware, load_pins, result_of  # noqa: E402


def run_scenario(out: str, nproc: int = 2) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    cmd = ["timeout", "600", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", str(REPO / "tests" / "distributed" / "scenarios.py"), "--out", out, "--only", SCENARIO]
    subprocess.run(cmd, env=env, cwd=REPO, check=True)
    ranks = []
    for r in range(nproc):
        with open(os.path.join(out, f"{SCENARIO}.rank{r}.json")) as fh:
            data = json.load(fh)
        if not data["ok"]:
            sys.exit(f"the scenario failed on rank {r}:\n{data.get('trace')}")
        ranks.append(data)
    return ranks


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="repin_") as out:
        got = result_of(run_scenario(out))
    pins, here = load_pins(), hardware()
    print(f"{'replacing' if here in pins else 'adding'} the pin of {here}")
    pins[here] = got
    with open(PINNED, "w") as fh:
        json.dump(pins, fh, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
