"""Quality benchmark: every method from the same SFT teacher and SFT student, equal budgets, 3 seeds.

One command (``.venv/bin/python bench/quality.py``):

1. ``stage=pipeline`` once: synthetic suite, BPE tokenizer, SFT teacher, SFT student (the shared
   initialization of every run);
2. ``stage=eval`` of that teacher and student on dev and test (the reference rows and the gap);
3. ``stage=train`` of each method × seed from the same two checkpoints, with the same number of
   student updates and the same batch, dev ROUGE-L every ``eval.dev_interval`` steps and greedy
   test ROUGE-L at the end (per task family);
4. ``bench/results/quality.{json,md,png}``: the table (method × family, mean ± std over seeds) and
   dev ROUGE-L against step, one line per method.

Every run goes through the real launcher (``python launcher/main.py``), ``--workers`` at a time
with one thread each. Runs are kept under ``--work-dir``: a rerun reuses every finished run whose
command is unchanged (``--fresh`` starts over). ``--smoke`` is the CI version: toy sizes, 2 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import REPO, RESULTS, emit  # noqa: E402

MAIN = os.path.join(REPO, "launcher", "main.py")
CONFIG = os.path.join(REPO, "configs", "quality.yaml")
# label -> overrides. Every label is one `method.name` (plus its settings); all share the budget.
METHODS: dict[str, dict[str, Any]] = {
    "sft": {"method.name": "sft"},
    "kd": {"method.name": "kd"},
    "seqkd": {"method.name": "seqkd"},
    "imitkd": {"method.name": "imitkd"},
    "gkd": {"method.name": "gkd"},
    "distillm": {"method.name": "distillm"},
    "minillm": {"method.name": "minillm"},
    "rkl": {"method.name": "rkl"},
    "promptkd": {"method.name": "promptkd"},
    # issue 7's shortcut (off by default): the student step's target from before the prompt update
    "promptkd-stale": {"method.name": "promptkd", "method.stale_student_target": True},
}
# The slowest first, so the last jobs to finish are short ones.
COST_ORDER = ["promptkd", "promptkd-stale", "minillm", "imitkd", "rkl", "gkd", "distillm", "seqkd", "kd", "sft"]
SMOKE = {"pipeline.teacher_sft_steps": 2, "pipeline.student_sft_steps": 2, "train.max_steps": 2,
         "eval.dev_interval": 1, "logging.interval": 1, "data.synthetic.n_train": 96, "data.synthetic.n_dev": 8,
         "data.synthetic.n_test": 16, "train.micro_batch_size": 4, "rollout.max_new_tokens": 8,
         "eval.max_new_tokens": 8,
         "model.teacher.init": "{arch: llama, layers: 2, hidden: 64, heads: 4}",
         "model.student.init": "{arch: llama, layers: 1, hidden: 32, heads: 2}"}


@dataclass
class Job:
    label: str
    args: list[str]
    out_dir: str
    group: str = ""                  # jobs of one group never run at the same time (shared caches)
    seconds: Optional[float] = None
    error: str = ""
    proc: Any = field(default=None, repr=False)
    started: float = 0.0

    @property
    def stamp(self) -> str:
        return os.path.join(self.out_dir, "bench_job.json")

    def finished_before(self) -> bool:
        """Same command already ran to the end (its stamp is written last)."""
        try:
            with open(self.stamp) as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            return False
        if old.get("args") == self.args:
            self.seconds = old.get("seconds")
            return True
        return False


def override_args(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]


def run_jobs(jobs: list[Job], workers: int, log_dir: str) -> None:
    """Run ``workers`` jobs at a time (one torch thread each); failures are recorded, not raised."""
    os.makedirs(log_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    pending = [j for j in jobs if not j.finished_before()]
    running: list[Job] = []
    while pending or running:
        busy = {j.group for j in running if j.group}
        while len(running) < workers:
            nxt = next((j for j in pending if not j.group or j.group not in busy), None)
            if nxt is None:
                break
            pending.remove(nxt)
            if os.path.isdir(nxt.out_dir):  # an unfinished or changed run: start it over
                shutil.rmtree(nxt.out_dir)
            log = open(os.path.join(log_dir, nxt.label.replace("/", "_") + ".log"), "w")
            nxt.proc = subprocess.Popen([sys.executable, MAIN, *nxt.args], cwd=REPO, env=env, stdout=log,
                                        stderr=subprocess.STDOUT)
            nxt.started = time.perf_counter()
            busy.add(nxt.group)
            running.append(nxt)
            print(f"[quality] start {nxt.label}", file=sys.stderr, flush=True)
        time.sleep(0.5)
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            job.seconds = round(time.perf_counter() - job.started, 1)
            if job.proc.returncode != 0:
                job.error = f"exit {job.proc.returncode}: see {log_dir}/{job.label.replace('/', '_')}.log"
            else:
                with open(job.stamp, "w") as fh:
                    json.dump({"args": job.args, "seconds": job.seconds}, fh)
            print(f"[quality] {'FAILED' if job.error else 'done'} {job.label} in {job.seconds} s",
                  file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- reading results

def read_eval(run_dir: str, model: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """{set: {"rougeL", "by_category"}} of one model in ``run_dir/eval/results.json``."""
    with open(os.path.join(run_dir, "eval", "results.json")) as fh:
        models = json.load(fh)["models"]
    entry = models[model] if model else next(iter(models.values()))
    return {name: {"rougeL": s["rougeL"], "by_category": s.get("by_category", {})}
            for name, s in entry["datasets"].items()}


def read_dev_curve(run_dir: str) -> list[tuple[int, float]]:
    curve = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            row = json.loads(line)
            if "dev/rougeL" in row:
                curve.append((int(row["step"]), float(row["dev/rougeL"])))
    return curve


def mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(runs: dict[str, dict[int, dict]], families: list[str]) -> dict[str, dict[str, dict]]:
    """method -> column ('all' + families) -> mean/std over seeds of test ROUGE-L."""
    out = {}
    for label, by_seed in runs.items():
        cols = {"all": mean_std([r["test"]["rougeL"] for r in by_seed.values()])}
        for fam in families:
            vals = [r["test"]["by_category"][fam] for r in by_seed.values() if fam in r["test"]["by_category"]]
            if vals:
                cols[fam] = mean_std(vals)
        out[label] = cols
    return out


def markdown(table: dict, refs: dict[str, dict], families: list[str], meta: dict[str, Any]) -> str:
    cols = ["all"] + families
    head = "| method | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    lines = []
    for name, ref in refs.items():
        cells = [f"{ref['test']['rougeL']:.2f}"] + [f"{ref['test']['by_category'].get(f, float('nan')):.2f}"
                                                      for f in families]
        lines.append(f"| *{name}* | " + " | ".join(cells) + " |")
    for label, row in sorted(table.items(), key=lambda kv: -kv[1]["all"]["mean"]):
        cells = [f"{row[c]['mean']:.2f} ± {row[c]['std']:.2f}" if c in row else "–" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return (f"# Quality benchmark ({meta['when']})\n\n"
            f"Greedy test ROUGE-L on the bundled synthetic suite ({meta['n_test']} prompts), mean ± std over "
            f"seeds {meta['seeds']}; every method: {meta['steps']} student updates of {meta['batch']} sequences "
            f"from the same SFT student. Teacher–student gap (SFT): **{meta['gap']:.2f}** ROUGE-L. "
            f"Wall time {meta['wall_min']:.1f} min on {meta['machine']}.\n\n" + head + "\n".join(lines) + "\n")


def plot(curves: dict[str, dict[int, list]], refs_dev: dict[str, float], path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    start = refs_dev.get("student (SFT)")
    for label, by_seed in sorted(curves.items()):
        points: dict[int, list[float]] = {}
        for curve in by_seed.values():
            for step, val in curve:
                points.setdefault(step, []).append(val)
        xs = sorted(points)
        means = [statistics.fmean(points[x]) for x in xs]
        if start is not None:
            xs, means = [0] + xs, [start] + means
        ax.plot(xs, means, marker=".", label=label, linestyle="--" if label in ("sft", "kd") else "-")
    if "teacher (SFT)" in refs_dev:
        ax.axhline(refs_dev["teacher (SFT)"], color="black", linestyle=":", label="teacher (SFT)")
    ax.set_xlabel("student update step")
    ax.set_ylabel("dev ROUGE-L (greedy, mean over seeds)")
    ax.set_xlim(0, steps)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--work-dir", default=os.path.join(REPO, "runs", "quality"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--smoke", action="store_true", help="toy sizes, 2 steps: checks that it all runs")
    p.add_argument("--fresh", action="store_true", help="delete --work-dir first")
    return p.parse_args(argv)


def build_jobs(a: argparse.Namespace, common: list[str], base: str) -> tuple[dict[str, Job], list[Job]]:
    data = {s: os.path.join(base, "data", f"{s}.jsonl") for s in ("train", "dev", "test")}
    sets = f"[dev={data['dev']},test={data['test']}]"
    refs = {name: Job(f"ref/{slug}", [*common, "stage=eval", f"eval.model_path={os.path.join(base, sub, 'export')}",
                                      f"eval.sets={sets}", f"output.dir={os.path.join(a.work_dir, 'ref', slug)}"],
                      os.path.join(a.work_dir, "ref", slug))
            for name, slug, sub in (("teacher (SFT)", "teacher", "teacher_sft"),
                                    ("student (SFT)", "student", "student_sft"))}
    shared = [*common, "stage=train", "data.synthetic.enabled=false", "tokenizer.train=false",
              f"tokenizer.path={os.path.join(base, 'tokenizer')}",
              f"model.teacher.path={os.path.join(base, 'teacher_sft', 'export')}",
              f"model.student.path={os.path.join(base, 'student_sft', 'export')}",
              f"data.train_file={data['train']}", f"data.dev_file={data['dev']}", f"data.test_file={data['test']}",
              f"method.seqkd_cache_dir={os.path.join(a.work_dir, 'seqkd_cache')}"]
    runs = []
    for label in sorted(a.methods, key=COST_ORDER.index):
        for seed in a.seeds:
            out = os.path.join(a.work_dir, "runs", label, f"seed_{seed}")
            runs.append(Job(f"{label}/seed_{seed}", [*shared, *override_args(METHODS[label]), f"seed={seed}",
                                                      f"output.dir={out}"], out,
                            group="seqkd" if label == "seqkd" else ""))
    return refs, runs


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    if a.smoke and a.seeds == [1, 2, 3]:
        a.seeds = [1]
    if a.fresh and os.path.isdir(a.work_dir):
        shutil.rmtree(a.work_dir)
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    common = ["--config", CONFIG, *(override_args(SMOKE) if a.smoke else []), *a.set]
    base = os.path.join(a.work_dir, "base")
    base_job = Job("base", [*common, "stage=pipeline", "train.max_steps=1", f"output.dir={base}"], base)
    run_jobs([base_job], 1, os.path.join(a.work_dir, "logs"))
    if base_job.error:
        print(f"quality: the SFT pipeline failed ({base_job.error})", file=sys.stderr)
        return 1
    refs, runs = build_jobs(a, common, base)
    run_jobs(list(refs.values()) + runs, a.workers, os.path.join(a.work_dir, "logs"))
    failed = [j.label for j in [*refs.values(), *runs] if j.error]
    if failed:
        print(f"quality: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return report(a, refs, runs, base_job, load_before, time.perf_counter() - t0)


def report(a: argparse.Namespace, refs: dict[str, Job], runs: list[Job], base_job: Job, load_before: list[float],
           wall: float) -> int:
    ref_eval = {name: read_eval(j.out_dir) for name, j in refs.items()}
    results: dict[str, dict[int, dict]] = {}
    curves: dict[str, dict[int, list]] = {}
    for job in runs:
        label, seed = job.label.split("/seed_")
        results.setdefault(label, {})[int(seed)] = read_eval(job.out_dir, "student")
        curves.setdefault(label, {})[int(seed)] = read_dev_curve(job.out_dir)
    families = sorted(ref_eval["teacher (SFT)"]["test"]["by_category"])
    table = summarize(results, families)
    gap = ref_eval["teacher (SFT)"]["test"]["rougeL"] - ref_eval["student (SFT)"]["test"]["rougeL"]
    job_args = dict(a.__dict__)
    steps = int(_setting(runs[0].args, "train.max_steps"))
    meta = {"when": time.strftime("%Y-%m-%d"), "n_test": _count_lines(os.path.join(a.work_dir, "base", "data",
                                                                                  "test.jsonl")),
            "seeds": a.seeds, "steps": steps, "batch": int(_setting(runs[0].args, "train.micro_batch_size")), "gap": gap, "wall_min": wall / 60,
            "machine": f"{os.cpu_count()} CPU cores"}
    results_dir = RESULTS
    os.makedirs(results_dir, exist_ok=True)
    md = markdown(table, {k: v for k, v in ref_eval.items()}, families, meta)
    with open(os.path.join(results_dir, "quality.md"), "w") as fh:
        fh.write(md)
    plot(curves, {k: v["dev"]["rougeL"] for k, v in ref_eval.items()}, os.path.join(results_dir, "quality.png"),
         steps)
    out = {"smoke": a.smoke, "methods": a.methods, "seeds": a.seeds, "steps": steps, "batch": meta["batch"],
           "workers": a.workers, "wall_seconds": round(wall, 1), "meets_60_min": wall <= 3600,
           "teacher_student_gap": round(gap, 2), "reference": ref_eval, "test_rougeL": table,
           "per_seed": {label: {s: r["test"]["rougeL"] for s, r in by.items()} for label, by in results.items()},
           "dev_curves": curves, "run_seconds": {j.label: j.seconds for j in [base_job, *refs.values(), *runs]},
           "args": {k: v for k, v in job_args.items() if k != "work_dir"}}
    emit("quality", out, load_before)
    print(md, file=sys.stderr)
    return 0


def _count_lines(path: str) -> int:
    with open(path) as fh:
        return sum(1 for line in fh if line.strip())


def _setting(args: list[str], key: str) -> Any:
    """The value a run gets for ``key``: its last override, else configs/quality.yaml's."""
    given = [v.split("=", 1)[1] for v in args if v.startswith(key + "=")]
    if given:
        return given[-1]
    import yaml

    with open(CONFIG) as fh:
        node = yaml.safe_load(fh)
    for part in key.split("."):
        node = node[part]
    return node


if __name__ == "__main__":
    sys.exit(main())
