"""2 gloo ranks, ZeRO-3: the export gathers one module at a time and equals the consolidated checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tests", "distributed", "device_ranks.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = ["timeout", "300", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           SCRIPT, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = []
    for r in range(2):
        with open(out / f"export.rank{r}.json") as fh:
            data = json.load(fh)
        assert data["ok"], data.get("trace")
        results.append(data)
    print(json.dumps(results))
    return results


def test_zero3_export_equals_the_consolidated_weights(ranks):
    r0 = ranks[0]
    assert r0["partitioned"], "the student was not ZeRO-3 partitioned: the test would prove nothing"
    assert r0["keys_equal"] and not r0["missing"], r0
    assert r0["n_tensors"] > 10 and r0["max_err"] == 0.0, r0


def test_zero3_export_gathers_one_module_at_a_time(ranks):
    for r in ranks:
        assert r["gathers"] > 1
        # never more than the largest single module's parameters at once, far below the whole model
        assert 0 < r["peak"] <= r["largest_module"] < r["total"], r
