"""``bench/quality.py --slurm``: the benchmark's plan as a chain of dependent SLURM jobs.

data -> teacher SFT -> student SFT -> one job per method x seed -> evaluation (and ExAccErr) -> report,
each job submitted with ``--dependency=afterok:<the jobs it runs after>``. Every job runs
``slurm/quality.sbatch KIND LABEL ARGV_FILE [launcher args]``:

- ``train`` (SFT and every method's run): ``srun launcher/main.py ARGS output.resume=auto``; the job carries
  ``--requeue`` and ``--signal=B:USR1@300`` like slurm/distill.sbatch, so a preempted or requeued job resumes
  from its latest checkpoint;
- ``eval`` (stage=eval, stage=exposure): ``srun launcher/main.py ARGS``, rerun from the start when requeued;
- ``data``, ``report``: ``bench/quality.py --replay ARGV_FILE --slurm-stage data|report`` on one task.

A launcher job that ends with code 0 writes its ``bench_job.json`` stamp (``--slurm-stage stamp``), the same
stamp a local run writes, so local runs and SLURM chains reuse each other's finished jobs. ``ARGV_FILE`` holds
the submitter's arguments and a copy of its config, so every job rebuilds the same plan.

A rerun submits only what is missing: a job whose stamp matches is skipped, a job still queued or running
(``squeue``, by job name: ``pkdq-<work dir hash>-<label>``) is not submitted again, and the rest is submitted
after them. A job left pending on a dependency that failed is cancelled (``--kill-on-invalid-dep=yes``), so
the rerun submits it again; a job that failed half-way resumes from its checkpoint if its command is unchanged.
"""
from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional

from bench.output import REPO
from bench import quality as q

SBATCH = os.path.join(REPO, "slurm", "quality.sbatch")
# squeue states of a job that is over: anything else is still queued, running or about to run again
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
# data and report jobs are one Python process: one task, no GPU
ONE_TASK = ["--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--gpus-per-node=0"]
SUBMITTED = "bench_job.submitted.json"


def main(a: argparse.Namespace, bench: dict, cfg: dict, plan: q.Plan) -> int:
    jobs = [*plan.all_jobs(), report_job(a, plan)]
    if a.slurm_stage:
        return run_stage(a, bench, cfg, plan, jobs)
    return submit(a, jobs)


def report_job(a: argparse.Namespace, plan: q.Plan) -> q.Job:
    """The last job: reads the evaluations (the runs' dev curves for --search / --ablation) and writes the report."""
    reads = [*plan.runs.values()] if (a.search or a.ablation) else [plan.refs, *plan.evals.values(), plan.exposure]
    after = list({id(j): j for j in reads if j is not None}.values())
    return q.Job("report", ["report"], os.path.join(a.work_dir, "report"), kind="report", after=after)


# ----------------------------------------------------------------------------- inside a job

def run_stage(a: argparse.Namespace, bench: dict, cfg: dict, plan: q.Plan, jobs: list[q.Job]) -> int:
    """``--slurm-stage data|stamp|report``: one job's own work, then its stamp."""
    if a.slurm_stage == "data":
        q.make_data(a, cfg, os.path.join(a.work_dir, "base"), a.smoke, q.tokenizer_source(bench))
        plan.data.seconds = a.seconds
        q.write_stamp(plan.data)
        return 0
    q.missing_jobs(jobs)  # in dependency order: every finished job gets its run id
    label = "report" if a.slurm_stage == "report" else a.label
    job = next((j for j in jobs if j.label == label), None)
    if job is None:
        raise q.BenchError(f"--label: no job {label!r} in this plan")
    unfinished = [d.label for d in job.after if not d.done]
    if unfinished:
        raise q.BenchError(f"{label}: runs after {', '.join(unfinished)}, which did not finish")
    if job.kind == "report":
        with open(a.replay) as fh:
            submitted = json.load(fh)["submitted"]
        rc = q.write_report(a, bench, plan, time.time() - submitted, list(os.getloadavg()))
        if rc:
            return rc
    job.seconds = a.seconds
    q.write_stamp(job)
    return 0


# ----------------------------------------------------------------------------- submitting

def submit(a: argparse.Namespace, jobs: list[q.Job]) -> int:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise q.BenchError("--slurm: sbatch/squeue not found (run on a SLURM login node)")
    argv_file = write_argv(a)
    prefix = job_prefix(a.work_dir)
    active = active_jobs(prefix)
    pending = q.missing_jobs(jobs)
    complete = [j.label for j in jobs if j not in pending]
    ids: dict[str, str] = {}
    submitted: dict[str, str] = {}
    queued: dict[str, str] = {}
    fresh: set[int] = set()           # jobs that start from nothing in this chain: their dependents do too
    group_last: dict[str, str] = {}   # jobs of one group (the seqkd cache) run one after the other
    for job in pending:
        name = prefix + job.label
        found = active.get(name)
        if found:
            ids[job.label] = queued[job.label] = found
        else:
            prepare_dir(job, fresh)
            ids[job.label] = submitted[job.label] = sbatch(a, job, name, argv_file, ids, group_last)
        if job.group:
            group_last[job.group] = ids[job.label]
        print(f"[quality] {'queued already' if found else 'submitted'} {job.label}: job {ids[job.label]}",
              file=sys.stderr, flush=True)
    print(json.dumps({"submitted": submitted, "queued": queued, "complete": complete, "argv": argv_file,
                      "prefix": prefix}), flush=True)
    return 0


def job_prefix(work_dir: str) -> str:
    """Job names of one work dir: two benchmarks in other dirs never see each other's jobs."""
    return "pkdq-" + hashlib.sha256(os.path.abspath(work_dir).encode()).hexdigest()[:8] + "-"


def active_jobs(prefix: str) -> dict[str, str]:
    """{job name: job id} of this user's jobs named ``prefix...`` that are queued, running or requeued.

    A job pending on a dependency that can never be met (an older SLURM without --kill-on-invalid-dep, or a
    job submitted without it) is cancelled here and counts as missing."""
    fmt = "%i|%j|%T|%r"
    proc = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", fmt], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode:
        raise q.BenchError(f"--slurm: squeue failed: {proc.stderr.strip()}")
    out = {}
    for line in proc.stdout.splitlines():
        job_id, name, state, reason = (line.split("|") + ["", "", "", ""])[:4]
        if not name.startswith(prefix) or state in FINISHED:
            continue
        if reason == "DependencyNeverSatisfied":
            subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
            continue
        out[name] = job_id
    return out


def prepare_dir(job: q.Job, fresh: set[int]) -> None:
    """Keep a half-done output dir when the same command left it there (the job resumes from its checkpoint);
    start from an empty one when the command changed or a job it runs after starts from nothing."""
    marker = os.path.join(job.out_dir, SUBMITTED)
    try:
        with open(marker) as fh:
            same = json.load(fh) == job.args
    except (OSError, ValueError):
        same = False
    if job.kind != "data" and not (same and not any(id(d) in fresh for d in job.after)):
        if os.path.isdir(job.out_dir):
            shutil.rmtree(job.out_dir)
        fresh.add(id(job))
    os.makedirs(job.out_dir, exist_ok=True)
    with open(marker, "w") as fh:
        json.dump(job.args, fh)


def sbatch(a: argparse.Namespace, job: q.Job, name: str, argv_file: str, ids: dict[str, str],
           group_last: dict[str, str]) -> str:
    deps = [ids[d.label] for d in job.after if d.label in ids]
    parts = ([f"afterok:{':'.join(deps)}"] if deps else []) + \
        ([f"afterany:{group_last[job.group]}"] if job.group in group_last else [])
    kind = job.kind if job.kind != "launch" else ("train" if launch_stage(job.args) == "train" else "eval")
    log = os.path.join(a.work_dir, "logs", job.label.replace("/", "_") + ".slurm.out")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={log}", "--kill-on-invalid-dep=yes",
           *([f"--dependency={','.join(parts)}"] if parts else []), *shlex.split(a.sbatch_args),
           *(ONE_TASK if kind in ("data", "report") else []),
           SBATCH, kind, job.label, argv_file, *(job.args if job.kind == "launch" else [])]
    env = {**os.environ, "PROMPTKD_ROOT": REPO}
    env.setdefault("PYTHON", sys.executable)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode:
        raise q.BenchError(f"--slurm: sbatch of {job.label} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def launch_stage(args: list[str]) -> Optional[str]:
    stages = [x.split("=", 1)[1] for x in args if x.startswith("stage=")]
    return stages[-1] if stages else None


def write_argv(a: argparse.Namespace) -> str:
    """The submitter's arguments and a copy of its config, named by their content: every job of this chain
    rebuilds the same plan, whatever happens to the config file or to a later submission."""
    with open(a.config) as fh:
        config_text = fh.read()
    argv = ["--work-dir", a.work_dir, "--methods", *a.methods, "--seeds", *map(str, a.seeds),
            "--workers", str(a.workers)]
    argv += (["--data", os.path.abspath(a.data)] if a.data else []) + (["--search"] if a.search else []) \
        + (["--ablation"] if a.ablation else []) + (["--smoke"] if a.smoke else [])
    argv += ["--set", *a.set] if a.set else []  # last: --set takes every argument after it
    key = hashlib.sha256(json.dumps([argv, config_text]).encode()).hexdigest()[:12]
    folder = os.path.join(a.work_dir, "slurm")
    os.makedirs(folder, exist_ok=True)
    config = os.path.join(folder, f"config-{key}.yaml")
    with open(config, "w") as fh:
        fh.write(config_text)
    path = os.path.join(folder, f"argv-{key}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump({"argv": ["--config", config, *argv], "submitted": time.time(), "cwd": os.getcwd()}, fh)
    os.replace(path + ".tmp", path)
    return path
