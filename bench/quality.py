"""Quality benchmark under the paper's protocol: every method from one converged SFT student, 3 seeds.

One command (``.venv/bin/python bench/quality.py``), every run through the real launcher:

1. data: the bundled synthetic suite, or ``--data DIR`` (Dolly-format ``train.jsonl``, ``dev.jsonl`` or
   ``valid.jsonl``, ``test.jsonl``; per-category columns come from each record's ``category``);
2. the SFT teacher (``bench.teacher``, ``bench.teacher_sft_steps``) and its BPE tokenizer;
3. the SFT student: early stopping on dev ROUGE-L; its best-dev checkpoint is every method's init,
   the "sft" row included, so continued SFT is a baseline and not a head start;
4. each method x training seed with the same budget (``bench.steps`` student updates) and its learning
   rate from ``bench.lr`` (the prompt's lr equals the student's), dev ROUGE-L every ``bench.dev_interval``
   steps, and best/ (the best-dev checkpoint, the official code's choice) beside the last step;
5. test evaluation of best/ and of the last step: sampled as the paper (top_p 1, top_k 0, temperature 1,
   eval seeds 10..50, mean) and greedy as a second view; ExAccErr (``stage=exposure``) for
   ``bench.exposure_methods``;
6. ``bench/results/quality.{json,md,png}`` (``bench/quality_report.py``).

``--search`` runs the learning-rate grid instead (``bench.lr_grid``, training seed 1, every method), picks
each method's lr on best dev ROUGE-L (never on test) and writes ``quality_lr_search.{json,md}``;
``--write-config`` also stores the choice in ``bench.lr`` of the config. The headline run's seed-1 runs
are the same commands as the chosen grid runs, so a search followed by the headline reuses them.

Runs are kept under ``--work-dir``: a rerun reuses every finished job whose command is unchanged
(``--fresh`` starts over). ``--smoke`` is the CI version: toy sizes, 2 steps.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import REPO, RESULTS, emit  # noqa: E402
from bench import quality_report as qr  # noqa: E402

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
    "promptkd-stale": {"method.name": "promptkd", "method.promptkd.stale_student_target": True},
}
# `--ablation`: PromptKD's own knobs on dev (seed 1, PromptKD's lr), beside promptkd and rkl themselves.
ABLATIONS: dict[str, dict[str, Any]] = {
    "promptkd-P3": {"method.name": "promptkd", "model.teacher.prompt_length": 3},
    "promptkd-P14": {"method.name": "promptkd", "model.teacher.prompt_length": 14},
    "promptkd-plr0.1": {"method.name": "promptkd"},   # prompt lr = 0.1 x the student's
    "promptkd-plr10": {"method.name": "promptkd"},    # prompt lr = 10 x the student's
    "promptkd-regconst": {"method.name": "promptkd", "method.promptkd.reg_schedule": "constant"},
    "promptkd-regoff": {"method.name": "promptkd", "method.promptkd.reg_schedule": "off"},
}
PROMPT_LR_SCALE = {"promptkd-plr0.1": 0.1, "promptkd-plr10": 10.0}
METHODS.update(ABLATIONS)
# The slowest first, so the last jobs to finish are short ones.
COST_ORDER = ["promptkd", "promptkd-stale", *ABLATIONS, "minillm", "imitkd", "rkl", "gkd", "distillm", "seqkd", "kd", "sft"]
SMOKE_BENCH = {"teacher": {"arch": "llama", "layers": 2, "hidden": 64, "heads": 4}, "teacher_sft_steps": 2,
               "student": {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2}, "student_sft_max_steps": 4,
               "student_sft_dev_interval": 2, "student_sft_patience": 1, "steps": 2, "dev_interval": 1,
               "lr_grid": [1.0e-4, 1.0e-3], "exposure_prompts": 4}
SMOKE_RUN = {"logging.interval": 1, "data.synthetic.n_train": 96, "data.synthetic.n_dev": 8,
             "data.synthetic.n_test": 16, "train.micro_batch_size": 4, "rollout.max_new_tokens": 8,
             "eval.max_new_tokens": 8, "eval.seeds": "[10,20]", "exposure.max_tokens": 4}
BENCH_KEYS = ("teacher", "teacher_sft_steps", "student", "sft_lr", "sft_warmup_steps", "student_sft_max_steps",
              "student_sft_dev_interval", "student_sft_patience", "steps", "dev_interval", "seeds", "lr_grid", "lr",
              "methods", "exposure_methods", "exposure_prompts")


class BenchError(Exception):
    """Bad input to the benchmark: one line, exit code 2."""


@dataclass
class Job:
    label: str
    args: list[str]                  # launcher arguments
    out_dir: str
    group: str = ""                  # jobs of one group never run at the same time (shared caches)
    after: list["Job"] = field(default_factory=list)  # starts once these have finished
    seconds: Optional[float] = None
    error: str = ""
    done: bool = False
    proc: Any = field(default=None, repr=False)
    started: float = 0.0
    run_id: str = ""                 # names this job's finished output; dependents record it

    def inputs(self) -> dict[str, str]:
        return {d.label: d.run_id for d in self.after}

    @property
    def stamp(self) -> str:
        return os.path.join(self.out_dir, "bench_job.json")

    def finished_before(self) -> bool:
        """The same command already ran to the end (its stamp is written last) on the same inputs.

        Inputs are the outputs of the jobs it runs after, by their run ids: a rebuilt SFT student
        makes every run that started from the old one stale, in this invocation and in later ones.
        """
        try:
            with open(self.stamp) as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            return False
        if old.get("args") != self.args or old.get("inputs", {}) != self.inputs():
            return False
        self.seconds, self.done = old.get("seconds"), True
        self.run_id = old.get("run_id") or hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
        return True


def override_args(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()  # one line


def run_jobs(jobs: list[Job], workers: int, log_dir: str) -> None:
    """Run ``workers`` jobs at a time (one torch thread each); failures are recorded, not raised."""
    os.makedirs(log_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    pending: list[Job] = []
    for job in jobs:  # in dependency order: a job whose input is rebuilt is rebuilt too
        if any(d in pending for d in job.after) or not job.finished_before():
            job.done = False
            pending.append(job)
    running: list[Job] = []
    while pending or running:
        for job in [j for j in pending if any(d.error for d in j.after)]:
            pending.remove(job)
            job.error = "skipped: " + ", ".join(d.label for d in job.after if d.error) + " failed"
        busy = {j.group for j in running if j.group}
        while len(running) < workers:
            nxt = next((j for j in pending if (not j.group or j.group not in busy)
                        and all(d.done for d in j.after)), None)
            if nxt is None:
                break
            pending.remove(nxt)
            _start(nxt, env, log_dir)
            busy.add(nxt.group)
            running.append(nxt)
        time.sleep(0.5)
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            _finish(job, log_dir)


def _log_path(log_dir: str, job: Job) -> str:
    return os.path.join(log_dir, job.label.replace("/", "_") + ".log")


def _start(job: Job, env: dict, log_dir: str) -> None:
    if os.path.isdir(job.out_dir):
        shutil.rmtree(job.out_dir)  # an unfinished or changed run: start it over
    os.makedirs(job.out_dir, exist_ok=True)
    log = open(_log_path(log_dir, job), "w")
    log.write(shlex.join([sys.executable, MAIN, *job.args]) + "\n")
    log.flush()
    job.proc = subprocess.Popen([sys.executable, MAIN, *job.args], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    job.started = time.perf_counter()
    print(f"[quality] start {job.label}", file=sys.stderr, flush=True)


def _finish(job: Job, log_dir: str) -> None:
    job.seconds = round(time.perf_counter() - job.started, 1)
    if job.proc.returncode != 0:
        job.error = f"exit {job.proc.returncode}: see {_log_path(log_dir, job)}"
    else:
        job.done = True
        job.run_id = uuid.uuid4().hex[:16]
        with open(job.stamp, "w") as fh:
            json.dump({"args": job.args, "seconds": job.seconds, "run_id": job.run_id, "inputs": job.inputs()}, fh)
    print(f"[quality] {'FAILED' if job.error else 'done'} {job.label} in {job.seconds} s", file=sys.stderr,
          flush=True)


# ----------------------------------------------------------------------------- config and data

def load_bench(path: str, work_dir: str, smoke: bool) -> tuple[dict[str, Any], str]:
    """(the ``bench:`` section, path of the run config = the file without it, written to work_dir)."""
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BenchError(f"--config: cannot read {path}: {exc}") from None
    bench = doc.pop("bench", None)
    if not isinstance(bench, dict):
        raise BenchError(f"{path}: no 'bench:' section (the benchmark protocol)")
    unknown = sorted(set(bench) - set(BENCH_KEYS))
    if unknown:
        raise BenchError(f"{path}: unknown key bench.{unknown[0]} (known: {', '.join(BENCH_KEYS)})")
    missing = [k for k in BENCH_KEYS if k not in bench]
    if missing:
        raise BenchError(f"{path}: missing key bench.{missing[0]}")
    if smoke:
        bench.update(SMOKE_BENCH)
    os.makedirs(work_dir, exist_ok=True)
    run_config = os.path.join(work_dir, "run_config.yaml")
    with open(run_config, "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    return bench, run_config


def data_files(a: argparse.Namespace, cfg: dict[str, Any], base: str, smoke: bool) -> dict[str, str]:
    """{train, dev, test, tokenizer}: the data and a BPE tokenizer trained on its train split."""
    files = split_files(a, cfg, base, smoke)
    from promptkd.data import load_examples, train_tokenizer

    vocab = int((cfg.get("tokenizer") or {}).get("vocab_size", 800))
    out = os.path.join(base, "tokenizer")
    st = os.stat(files["train"])  # a changed file at the same path gets a new tokenizer
    stamp, key = os.path.join(out, "bench_source.json"), [files["train"], st.st_size, st.st_mtime_ns, vocab]
    if not (os.path.isfile(stamp) and json.load(open(stamp)) == key):
        try:
            examples = load_examples(files["train"], "dolly", split="train")
        except Exception as exc:  # noqa: BLE001 - any unreadable split is bad input
            raise BenchError(f"--data: {exc}") from None
        train_tokenizer([e.prompt + " " + e.references[0] for e in examples], vocab, out)
        with open(stamp, "w") as fh:
            json.dump(key, fh)
    return {**files, "tokenizer": out}


def split_files(a: argparse.Namespace, cfg: dict[str, Any], base: str, smoke: bool) -> dict[str, str]:
    """{train, dev, test} JSONL paths: ``--data DIR`` or the synthetic suite written under ``base/data``."""
    if a.data:
        files = {"train": os.path.join(a.data, "train.jsonl"), "test": os.path.join(a.data, "test.jsonl")}
        dev = [os.path.join(a.data, n) for n in ("dev.jsonl", "valid.jsonl")]
        files["dev"] = next((p for p in dev if os.path.isfile(p)), dev[0])
        for split, path in files.items():
            if not os.path.isfile(path):
                extra = " (or valid.jsonl)" if split == "dev" else ""
                raise BenchError(f"--data: no {os.path.basename(path)}{extra} in {a.data}")
        return {k: os.path.abspath(v) for k, v in files.items()}
    from promptkd.data import make_synthetic_splits

    s = dict((cfg.get("data") or {}).get("synthetic") or {})
    if smoke:
        s.update({k.rsplit(".", 1)[1]: v for k, v in SMOKE_RUN.items() if k.startswith("data.synthetic.")})
    out = os.path.join(base, "data")
    sizes = (int(s.get("n_train", 6000)), int(s.get("n_dev", 200)), int(s.get("n_test", 400)), int(s.get("seed", 1234)),
             int(s.get("level", 1)))
    stamp = os.path.join(out, "sizes.json")
    if not (os.path.isfile(stamp) and json.load(open(stamp)) == list(sizes)):
        make_synthetic_splits(out, *sizes)
        with open(stamp, "w") as fh:
            json.dump(list(sizes), fh)
    return {k: os.path.join(out, f"{k}.jsonl") for k in ("train", "dev", "test")}


# ----------------------------------------------------------------------------- jobs

@dataclass
class Plan:
    teacher: Job
    student: Job
    refs: Optional[Job]                              # headline only: teacher and SFT init on dev and test
    runs: dict[tuple[str, int, float], Job]          # (label, seed, lr) -> training job
    evals: dict[tuple[str, int, float], Job]         # headline only: test evaluation of best/ and last
    exposure: Optional[Job]
    # (label, seed, lr) -> {"best": name, "last": name}: the run's two models in its eval job's results
    eval_names: dict[tuple[str, int, float], dict[str, str]] = field(default_factory=dict)

    def all_jobs(self) -> list[Job]:
        jobs = [self.teacher, self.student, *([self.refs] if self.refs else []), *self.runs.values(),
                *self.evals.values(), *([self.exposure] if self.exposure else [])]
        return list({id(j): j for j in jobs}.values())  # --smoke: every run shares one eval job


def sft_args(bench: dict, model: dict, steps: int) -> list[str]:
    return ["method.name=sft", f"model.student.init={_flow(model)}", f"train.max_steps={steps}",
            f"optim.student.lr={bench['sft_lr']}", f"optim.student.warmup_steps={bench['sft_warmup_steps']}"]


def plan_jobs(a: argparse.Namespace, bench: dict, common: list[str], files: dict[str, str]) -> Plan:
    w = a.work_dir
    base = os.path.join(w, "base")
    data = [f"data.train_file={files['train']}", f"data.dev_file={files['dev']}", "data.test_file=",
            "data.synthetic.enabled=false"]
    shared = [*common, *data, "tokenizer.train=false", f"tokenizer.path={files['tokenizer']}"]
    teacher = Job("base/teacher", [*shared, "stage=train", "eval.dev_interval=0",
                                   *sft_args(bench, bench["teacher"], bench["teacher_sft_steps"]),
                                   f"output.dir={os.path.join(base, 'teacher')}"], os.path.join(base, "teacher"))
    student = Job("base/student", [*shared, "stage=train", *sft_args(bench, bench["student"],
                                                                      bench["student_sft_max_steps"]),
                                   f"eval.dev_interval={bench['student_sft_dev_interval']}",
                                   f"train.early_stop_patience={bench['student_sft_patience']}",
                                   f"output.dir={os.path.join(base, 'student')}"], os.path.join(base, "student"))
    teacher_dir, init = os.path.join(base, "teacher", "export"), os.path.join(base, "student", "best")
    sets = f"eval.sets=[dev={files['dev']},test={files['test']}]"
    dev_only = a.search or a.ablation  # their reports read dev only: no reference evaluation on test
    refs = None if dev_only else Job("ref", [*shared, "stage=eval", f"eval.models=[teacher={teacher_dir},student={init}]",
                                         sets, f"output.dir={os.path.join(w, 'ref')}"], os.path.join(w, "ref"),
                                     after=[teacher, student])
    train = [*shared, "stage=train", f"model.teacher.path={teacher_dir}", f"model.student.path={init}",
             f"train.max_steps={bench['steps']}", f"eval.dev_interval={bench['dev_interval']}",
             f"method.seqkd.cache_dir={os.path.join(w, 'seqkd_cache')}"]
    runs, evals = {}, {}
    seeds = [1] if dev_only else a.seeds
    for label in sorted(a.methods, key=COST_ORDER.index):
        lrs = bench["lr_grid"] if a.search else [float(bench["lr"][label.split("-")[0]])]
        for seed in seeds:
            for lr in lrs:
                out = run_dir(w, label, seed, lr)
                runs[label, seed, lr] = Job(f"{label}/seed_{seed}/lr_{lr:g}", [
                    *train, *override_args(METHODS[label]), f"seed={seed}", f"optim.student.lr={lr}",
                    f"optim.prompt.lr={lr * PROMPT_LR_SCALE.get(label, 1.0):g}", f"output.dir={out}"], out,
                    group="seqkd" if label == "seqkd" else "", after=[teacher, student])
                if not dev_only:
                    evals[label, seed, lr] = Job(f"{label}/seed_{seed}/lr_{lr:g}/eval", [
                        *shared, "stage=eval", f"eval.models=[best={out}/best,last={out}/export]",
                        f"eval.sets=[test={files['test']}]", f"output.dir={out}/eval_out"],
                        os.path.join(out, "eval_out"), after=[runs[label, seed, lr]])
    eval_names = {key: {"best": "best", "last": "last"} for key in evals}
    if a.smoke and evals:
        evals, eval_names = smoke_evals(w, shared, files, runs, a.workers)
    exposure = None if dev_only else exposure_job(a, bench, shared, files, runs, init, teacher_dir)
    return Plan(teacher, student, refs, runs, evals, exposure, eval_names)


def smoke_evals(w: str, shared: list[str], files: dict[str, str], runs: dict, workers: int) -> tuple[dict, dict]:
    """--smoke: ``workers`` eval launches, each for the best/ and last export of its share of the runs, instead of
    one launch per run (a launch is ~10 s of imports on 2 cores, a toy evaluation about one)."""
    names = {key: {c: f"{job.label}/{c}" for c in ("best", "last")} for key, job in runs.items()}
    keys = list(runs)
    evals = {}
    for i in range(min(workers, len(keys))):
        share = keys[i::workers]
        models = ",".join(f"{names[k][c]}={runs[k].out_dir}/{d}" for k in share
                          for c, d in (("best", "best"), ("last", "export")))
        out = os.path.join(w, "smoke_eval", str(i))
        job = Job(f"smoke_eval/{i}", [*shared, "stage=eval", f"eval.models=[{models}]",
                                      f"eval.sets=[test={files['test']}]", f"output.dir={out}"], out,
                  after=[runs[k] for k in share])
        evals.update({k: job for k in share})
    return evals, names


def run_dir(work_dir: str, label: str, seed: int, lr: float) -> str:
    return os.path.join(work_dir, "runs", label, f"lr_{lr:g}", f"seed_{seed}")


def exposure_job(a, bench, shared, files, runs, init, teacher_dir) -> Optional[Job]:
    """ExAccErr of the SFT init and of the best/ of every seed of ``bench.exposure_methods``."""
    picked = {k: j for k, j in runs.items() if k[0] in bench["exposure_methods"]}
    if not picked:
        return None
    students = [init] + [os.path.join(j.out_dir, "best") for j in picked.values()]
    out = os.path.join(a.work_dir, "exposure")
    return Job("exposure", [*shared, "stage=exposure", f"exposure.teacher_path={teacher_dir}",
                            f"exposure.students=[{','.join(students)}]", f"eval.file={files['dev']}",
                            f"eval.max_examples={bench['exposure_prompts']}", f"output.dir={out}"], out,
               after=list(picked.values()))


# ----------------------------------------------------------------------------- main

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=CONFIG, help="the benchmark's config (bench: section + run config)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="default: bench.methods of the config")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds (default: bench.seeds)")
    p.add_argument("--data", default="", metavar="DIR", help="Dolly-format train/dev (or valid)/test JSONL "
                                                             "instead of the bundled synthetic suite")
    p.add_argument("--search", action="store_true", help="run the lr grid (seed 1) and pick each method's lr on dev")
    p.add_argument("--write-config", action="store_true", help="with --search: store the chosen lrs in bench.lr")
    p.add_argument("--ablation", action="store_true",
                   help="PromptKD's knobs on dev instead (prompt length, prompt lr ratio, regularizer schedule; "
                        "seed 1) beside promptkd and rkl")
    p.add_argument("--sizes", nargs="+", default=[], metavar="LxH[:HEADS]",
                   help="student-size study instead: converge an SFT student of each size (early stopping, as the "
                        "benchmark's init) and score it and the teacher on dev, e.g. 1x32 2x64:4")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--work-dir", default=os.path.join(REPO, "runs", "quality"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="launcher overrides for every run")
    p.add_argument("--smoke", action="store_true", help="toy sizes, 2 steps: checks that it all runs")
    p.add_argument("--fresh", action="store_true", help="delete --work-dir first")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    try:
        return _main(a)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(a: argparse.Namespace) -> int:
    if a.write_config and not a.search:
        raise BenchError("--write-config: only with --search")
    sizes = [parse_size(x) for x in a.sizes]
    if a.fresh and os.path.isdir(a.work_dir):
        shutil.rmtree(a.work_dir)
    bench, run_config = load_bench(a.config, a.work_dir, a.smoke)
    a.methods = a.methods or (["rkl", "promptkd", *ABLATIONS] if a.ablation else list(bench["methods"]))
    a.seeds = a.seeds or ([1] if a.smoke else list(bench["seeds"]))
    missing = [m for m in a.methods if m.split("-")[0] not in bench["lr"]] if not a.search else []
    if missing:
        raise BenchError(f"{a.config}: bench.lr has no learning rate for {missing[0]} (run --search)")
    load_before, t0 = list(os.getloadavg()), time.perf_counter()
    base = os.path.join(a.work_dir, "base")
    files = data_files(a, yaml.safe_load(open(run_config)), base, a.smoke)
    common = ["--config", run_config, *(override_args(SMOKE_RUN) if a.smoke else []), *a.set]
    if sizes:
        return size_study(a, bench, common, files, sizes, load_before, t0)
    plan = plan_jobs(a, bench, common, files)
    run_jobs(plan.all_jobs(), a.workers, os.path.join(a.work_dir, "logs"))
    failed = [j.label for j in plan.all_jobs() if j.error]
    if failed:
        print(f"quality: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - t0
    meta = {"when": time.strftime("%Y-%m-%d"), "wall_seconds": round(wall, 1), "machine": f"{os.cpu_count()} CPU cores",
            "data": a.data or "bundled synthetic suite", "bench": bench, "methods": a.methods, "seeds": a.seeds,
            "smoke": a.smoke, "workers": a.workers, "load_avg_at_start": load_before,
            "job_seconds": {j.label: j.seconds for j in plan.all_jobs()}}
    if a.ablation:
        emit("quality_ablation", qr.ablation_report(plan, bench, meta, RESULTS), load_before)
        return 0
    if a.search:
        out = qr.search_report(plan, bench, meta, RESULTS)
        if a.write_config:
            write_lrs(a.config, {**bench["lr"], **out["chosen_lr"]})
        emit("quality_lr_search", out, load_before)
        return 0
    out = qr.headline_report(plan, bench, meta, RESULTS)
    emit("quality", out, load_before)
    return 0


def parse_size(text: str) -> dict[str, Any]:
    """``LxH`` or ``LxH:HEADS`` -> a tiny-model init (heads default: H // 16, at least 2)."""
    m = re.fullmatch(r"(\d+)x(\d+)(?::(\d+))?", text)
    if not m:
        raise BenchError(f"--sizes: {text!r} is not LAYERSxHIDDEN[:HEADS]")
    layers, hidden = int(m[1]), int(m[2])
    heads = int(m[3]) if m[3] else max(2, hidden // 16)
    if hidden % heads:
        raise BenchError(f"--sizes: {text}: hidden {hidden} is not divisible by {heads} heads")
    return {"arch": "llama", "layers": layers, "hidden": hidden, "heads": heads}


def size_study(a, bench, common, files, sizes, load_before, t0) -> int:
    """Each size's converged SFT student and the teacher, scored on dev only (sampled and greedy)."""
    plan = plan_jobs(a, bench, common, files)
    training_only = ("stage", "output.dir", "model.student.init", "train.max_steps", "optim.student.lr",
                     "optim.student.warmup_steps", "method.name", "eval.dev_interval", "train.early_stop_patience")
    shared = [x for x in plan.student.args if x.split("=", 1)[0] not in training_only]
    students = {}
    for model in sizes:
        name = f"{model['layers']}x{model['hidden']}"
        out = os.path.join(a.work_dir, "sizes", name)
        args = [x for x in plan.student.args if not x.startswith(("output.dir=", "model.student.init="))]
        students[name] = Job(f"sizes/{name}", [*args, f"model.student.init={_flow(model)}", f"output.dir={out}"], out)
    teacher_dir = os.path.join(plan.teacher.out_dir, "export")
    entries = ",".join([f"teacher={teacher_dir}"] + [f"{n}={j.out_dir}/best" for n, j in students.items()])
    out = os.path.join(a.work_dir, "sizes", "eval")
    ev = Job("sizes/eval", [*shared, "stage=eval", f"eval.models=[{entries}]", f"eval.sets=[dev={files['dev']}]",
                            f"output.dir={out}"], out, after=[plan.teacher, *students.values()])
    jobs = [plan.teacher, *students.values(), ev]
    run_jobs(jobs, a.workers, os.path.join(a.work_dir, "logs"))
    failed = [j.label for j in jobs if j.error]
    if failed:
        print(f"quality: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    out = qr.size_report(ev.out_dir, students, sizes, bench, time.perf_counter() - t0, RESULTS)
    emit("quality_sizes", out, load_before)
    return 0


def write_lrs(path: str, chosen: dict[str, float]) -> None:
    """Replace the one-line ``lr: {...}`` mapping of the bench section, keeping the file's comments."""
    with open(path) as fh:
        text = fh.read()
    line = "  lr: " + _flow({k: float(v) for k, v in chosen.items()})
    new, n = re.subn(r"(?m)^  lr: \{.*\}.*$", line + "  # chosen by bench/quality.py --search", text)
    if n != 1:
        raise BenchError(f"--write-config: {path} needs exactly one '  lr: {{...}}' line in bench:")
    with open(path + ".tmp", "w") as fh:
        fh.write(new)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
