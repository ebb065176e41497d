"""bench/quality.py --slurm (slurm/quality.sbatch) on the REAL test cluster of test_slurm.py, at toy size.

data -> teacher SFT -> student SFT -> rkl x 1 seed -> evaluation + ExAccErr -> report, as dependent
jobs; the rkl run is requeued in the middle (``scontrol requeue``) and the chain still finishes, with the run
resumed from its checkpoint. A second submission while the chain runs submits nothing, and one after it
finishes finds every job complete. Skipped like test_slurm.py when SLURM is absent (PROMPTKD_SLURM_TESTS=1 fails).
"""
from __future__ import annotations

import json
import os
import sys
import time

import yaml

from tests.integration.test_slurm import FINAL_STATES, REPO, cluster  # noqa: F401 (cluster: the fixture)

STEPS, SAVE_EVERY = 30, 5
BENCH = {"teacher": {"arch": "llama", "layers": 2, "hidden": 64, "heads": 4}, "teacher_sft_steps": 2,
         "student": {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2}, "sft_lr": 1.0e-3, "sft_warmup_steps": 0,
         "student_sft_max_steps": 4, "student_sft_dev_interval": 2, "student_sft_patience": 1, "steps": STEPS,
         "dev_interval": 10, "seeds": [1], "lr_grid": [1.0e-3], "lr": {"rkl": 1.0e-3},
         "methods": ["rkl"], "exposure_methods": ["rkl"], "exposure_prompts": 4}
RUN = {"data": {"synthetic": {"n_train": 96, "n_dev": 8, "n_test": 8}}, "train": {"micro_batch_size": 4},
       "rollout": {"max_new_tokens": 8}, "output": {"save_interval": SAVE_EVERY},
       "eval": {"max_new_tokens": 8, "seeds": [10]}, "exposure": {"max_tokens": 4}, "logging": {"interval": 1}}
LABELS = {"data", "base/teacher", "base/student", "ref", "rkl/seed_1/lr_0.001", "rkl/seed_1/lr_0.001/eval", "exposure",
          "report"}


def _config(path) -> None:
    with open(os.path.join(REPO, "configs", "quality.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    cfg["bench"] = BENCH
    for section, values in RUN.items():
        for key, value in values.items():
            cfg.setdefault(section, {})
            if isinstance(value, dict):
                cfg[section].setdefault(key, {}).update(value)
            else:
                cfg[section][key] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _submit(cluster, root, via_script: bool = False) -> dict:
    args = ["--config", str(root / "quality.yaml"), "--work-dir", str(root / "work"),
            "--sbatch-args", "--ntasks-per-node=1 --gpus-per-node=0"]
    cmd = ["bash", os.path.join(REPO, "slurm", "quality.sbatch"), *args] if via_script else \
        [sys.executable, os.path.join(REPO, "bench", "quality.py"), "--slurm", *args]
    env = {**cluster.env, "BENCH_RESULTS": str(root / "results")}
    proc = cluster.run(*cmd, env=env, cwd=str(root), timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _logs(root) -> str:
    logs = root / "work" / "logs"
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.slurm.out"))) \
        if logs.is_dir() else "(no logs)"


def test_quality_chain_survives_a_requeue_and_a_rerun_submits_only_what_is_missing(cluster, tmp_path):
    from promptkd.training import checkpoint

    root = tmp_path
    _config(root / "quality.yaml")
    start = time.time()
    first = _submit(cluster, root, via_script=True)
    assert set(first["submitted"]) == LABELS and not first["queued"], first
    again = _submit(cluster, root)  # the chain is queued or running: nothing is submitted twice
    assert again["submitted"] == {} and set(again["queued"]) | set(again["complete"]) == LABELS, again
    assert all(again["queued"][k] == first["submitted"][k] for k in again["queued"])

    rkl = first["submitted"]["rkl/seed_1/lr_0.001"]
    run_dir = root / "work" / "runs" / "rkl" / "lr_0.001" / "seed_1"
    deadline = time.time() + 600
    while checkpoint.latest(str(run_dir)) is None:  # mid-run: a checkpoint written, steps left to go
        assert time.time() < deadline, "the rkl run never wrote a checkpoint\n" + _logs(root) + cluster.log_tail()
        assert cluster.job(rkl).get("JobState") not in FINAL_STATES, "rkl ended before it could be requeued\n" \
            + _logs(root)
        time.sleep(0.25)
    cluster.run("scontrol", "requeue", rkl)
    requeued_at = time.time()

    report = first["submitted"]["report"]
    restarts, seen = "0", {}
    while not (root / "work" / "report" / "bench_job.json").exists():
        info = cluster.job(rkl)
        restarts = info.get("Restarts", restarts)
        seen = cluster.job(report) or seen
        assert seen.get("JobState") not in FINAL_STATES or seen.get("JobState") == "COMPLETED", \
            f"report job {seen}\n" + _logs(root)
        assert time.time() < deadline + 600, "the chain did not finish\n" + _logs(root) + cluster.log_tail()
        time.sleep(0.5)
    print(f"\n[test_slurm_quality] chain of {len(LABELS)} jobs: {time.time() - start:.1f} s wall, "
          f"{time.time() - requeued_at:.1f} s after the requeue")

    log = (root / "work" / "logs" / "rkl_seed_1_lr_0.001.slurm.out").read_text()
    assert restarts == "1" and f"job {rkl} restart 1:" in log, f"Restarts={restarts}\n{log[-3000:]}"
    assert "output.resume=auto" in log and "resumed from" in log, log[-3000:]
    assert os.path.basename(checkpoint.latest(str(run_dir))) == f"step_{STEPS}"
    out = json.loads((root / "results" / "quality.json").read_text())
    assert set(out["test_rougeL"]) == {"rkl"} and out["launcher"] == "slurm"
    assert {"rkl", "student (SFT init)"} <= set(out["exposure"])
    assert "| rkl |" in (root / "results" / "quality.md").read_text()

    done = _submit(cluster, root)  # everything complete: nothing to submit
    assert done["submitted"] == {} and done["queued"] == {} and set(done["complete"]) == LABELS, done
