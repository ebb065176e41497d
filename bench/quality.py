"""Quality benchmark under the paper's protocol: every method from one converged SFT student, 3 seeds.

One command (``.venv/bin/python bench/quality.py``), every run through the real launcher:

1. data: the bundled synthetic suite, or ``--data DIR`` (Dolly-format ``train.jsonl``, ``dev.jsonl`` or
   ``valid.jsonl``, ``test.jsonl``; per-category columns come from each record's ``category``); test sets:
   ``eval.sets`` of the run config (e.g. a ``promptkd.data.prepare`` root) or ``test.jsonl``;
2. the SFT teacher (``bench.teacher``: a tiny-from-config spec, an HF dir or a hub id;
   ``bench.teacher_sft_steps``; ``bench.teacher_sft: false`` takes it as already SFT'd) and, for tiny models,
   a BPE tokenizer trained on the train split (an HF model brings its own);
3. the SFT student: early stopping on dev ROUGE-L; its best-dev checkpoint is every method's init,
   the "sft" row included, so continued SFT is a baseline and not a head start (``bench.student_sft: false``:
   ``bench.student`` is that init);
4. each method x training seed with the same budget (``bench.steps``: N student updates, or "N epochs") and its learning
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
(``--fresh`` starts over). ``--smoke`` is the CI version: toy sizes, 2 steps. ``--launcher "deepspeed
--num_gpus 8"`` (or ``torchrun ...``) runs each job under that command instead of ``python``; ``--slurm``
submits the same plan as a chain of dependent SLURM jobs instead (bench/quality_slurm.py).
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
if __name__ == "__main__":  # one module, whichever way it is reached: bench.quality_slurm imports it by name
    sys.modules.setdefault("bench.quality", sys.modules[__name__])
from bench.output import REPO, RESULTS, emit  # noqa: E402
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
# optional keys and their defaults: false = the model is already SFT'd (an HF dir or hub id), used as given
OPTIONAL_KEYS = {"teacher_sft": True, "student_sft": True}
# keys needed only when that SFT runs
SFT_KEYS = {"teacher_sft": ("teacher_sft_steps", "sft_lr", "sft_warmup_steps"),
            "student_sft": ("student_sft_max_steps", "student_sft_dev_interval", "student_sft_patience", "sft_lr",
                            "sft_warmup_steps")}
TINY_KEYS = ("arch", "layers", "hidden", "heads")
BUDGET_KEYS = ("teacher_sft_steps", "student_sft_max_steps", "student_sft_dev_interval", "steps", "dev_interval")


class BenchError(Exception):
    """Bad input to the benchmark: one line, exit code 2."""


@dataclass
class Job:
    label: str
    args: list[str]                  # launcher arguments (kind "data": a description of the data it makes)
    out_dir: str
    group: str = ""                  # jobs of one group never run at the same time (shared caches)
    kind: str = "launch"             # launch (the launcher) | data | report (bench/quality.py itself)
    after: list["Job"] = field(default_factory=list)  # starts once these have finished
    seconds: Optional[float] = None
    error: str = ""
    done: bool = False
    proc: Any = field(default=None, repr=False)
    started: float = 0.0
    run_id: str = ""                 # names this job's finished output; dependents record it

    def inputs(self) -> dict[str, str]:
        # the data job only orders the chain: its files are named by the jobs' own arguments
        return {d.label: d.run_id for d in self.after if d.kind != "data"}

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


def launch_env(launcher: list[str]) -> dict[str, str]:
    """The default launcher is this machine's CPUs (one torch thread per job); a given one keeps the user's env."""
    if launcher:
        return {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def command(launcher: list[str], job: Job) -> list[str]:
    """``python launcher/main.py ARGS``, or ``<launcher> launcher/main.py ARGS`` (deepspeed, torchrun, ...)."""
    return [*(launcher or [sys.executable]), MAIN, *job.args]


def missing_jobs(jobs: list[Job]) -> list[Job]:
    """The jobs to (re)run, in dependency order: not finished before, or a job they run after is rerun."""
    pending: list[Job] = []
    for job in jobs:
        if any(d in pending for d in job.after) or not job.finished_before():
            job.done = False
            pending.append(job)
    return pending


def run_jobs(jobs: list[Job], workers: int, log_dir: str, launcher: Optional[list[str]] = None) -> None:
    """Run ``workers`` jobs at a time (one torch thread each); failures are recorded, not raised."""
    os.makedirs(log_dir, exist_ok=True)
    env = launch_env(launcher or [])
    pending = missing_jobs(jobs)
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
            _start(nxt, env, log_dir, launcher or [])
            busy.add(nxt.group)
            running.append(nxt)
        time.sleep(0.5)
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            _finish(job, log_dir)


def _log_path(log_dir: str, job: Job) -> str:
    return os.path.join(log_dir, job.label.replace("/", "_") + ".log")


def _start(job: Job, env: dict, log_dir: str, launcher: list[str]) -> None:
    if os.path.isdir(job.out_dir):
        shutil.rmtree(job.out_dir)  # an unfinished or changed run: start it over
    os.makedirs(job.out_dir, exist_ok=True)
    log = open(_log_path(log_dir, job), "w")
    log.write(shlex.join(command(launcher, job)) + "\n")
    log.flush()
    job.proc = subprocess.Popen(command(launcher, job), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    job.started = time.perf_counter()
    print(f"[quality] start {job.label}", file=sys.stderr, flush=True)


def _finish(job: Job, log_dir: str) -> None:
    job.seconds = round(time.perf_counter() - job.started, 1)
    if job.proc.returncode != 0:
        job.error = f"exit {job.proc.returncode}: see {_log_path(log_dir, job)}"
    else:
        write_stamp(job)
    print(f"[quality] {'FAILED' if job.error else 'done'} {job.label} in {job.seconds} s", file=sys.stderr,
          flush=True)


def write_stamp(job: Job) -> None:
    """Mark ``job`` finished under a new run id (written last, atomically: a partial stamp is no stamp)."""
    job.done = True
    job.run_id = uuid.uuid4().hex[:16]
    os.makedirs(job.out_dir, exist_ok=True)
    with open(job.stamp + ".tmp", "w") as fh:
        json.dump({"args": job.args, "seconds": job.seconds, "run_id": job.run_id, "inputs": job.inputs()}, fh)
    os.replace(job.stamp + ".tmp", job.stamp)


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
    check_bench(bench, path)
    if smoke:  # toy sizes; a model given as an HF dir or hub id stays the one given
        bench.update({k: v for k, v in SMOKE_BENCH.items() if k not in ("teacher", "student")
                      or isinstance(bench[k], dict)})
    os.makedirs(work_dir, exist_ok=True)
    run_config = os.path.join(work_dir, "run_config.yaml")
    text = yaml.safe_dump(doc, sort_keys=False)
    old = open(run_config).read() if os.path.isfile(run_config) else None
    if text != old:  # unchanged: not rewritten under a job that may be reading it (SLURM)
        with open(run_config + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(run_config + ".tmp", run_config)
    return bench, run_config


def check_bench(bench: dict[str, Any], path: str) -> None:
    """Known keys, the ones this protocol needs, model specs and budgets; fills the optional keys' defaults."""
    unknown = sorted(set(bench) - set(BENCH_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise BenchError(f"{path}: unknown key bench.{unknown[0]} (known: {', '.join([*BENCH_KEYS, *OPTIONAL_KEYS])})")
    for key, default in OPTIONAL_KEYS.items():
        bench.setdefault(key, default)
        if not isinstance(bench[key], bool):
            raise BenchError(f"{path}: bench.{key} must be true or false (got {bench[key]!r})")
    needed = {k for k in BENCH_KEYS if k not in sum(SFT_KEYS.values(), ())}
    needed |= {k for flag, keys in SFT_KEYS.items() if bench[flag] for k in keys}
    missing = [k for k in BENCH_KEYS if k in needed and k not in bench]
    if missing:
        raise BenchError(f"{path}: missing key bench.{missing[0]}")
    for who in ("teacher", "student"):
        spec = bench[who]
        if isinstance(spec, str) and spec.strip():
            if os.path.exists(spec):  # a local dir: absolute, since every job runs from the repo root
                bench[who] = os.path.abspath(spec)
        elif not (isinstance(spec, dict) and set(TINY_KEYS) <= set(spec)):
            raise BenchError(f"{path}: bench.{who} must be an HF dir, a hub id or a tiny model "
                             f"{{{', '.join(TINY_KEYS)}}} (got {spec!r})")
        elif not bench[f"{who}_sft"]:
            raise BenchError(f"{path}: bench.{who}_sft: false needs bench.{who} to be an HF dir or hub id "
                             "(an SFT'd model), not a tiny spec")
    for key in BUDGET_KEYS:
        if key in bench:
            budget(bench[key], f"{path}: bench.{key}")


def budget(value: Any, key: str) -> tuple[int, str]:
    """``N`` or ``"N steps"`` -> (N, "steps"); ``"N epochs"`` -> (N, "epochs")."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, "steps"
    m = re.fullmatch(r"\s*(\d+)\s*(steps?|epochs?)\s*", str(value))
    if not m or isinstance(value, bool):
        raise BenchError(f"{key}: {value!r} is not N, 'N steps' or 'N epochs'")
    return int(m[1]), "epochs" if m[2].startswith("epoch") else "steps"


def budget_args(value: Any, key: str) -> list[str]:
    n, unit = budget(value, f"bench.{key}")
    return [f"train.max_steps={n}"] if unit == "steps" else ["train.max_steps=0", f"train.epochs={n}"]


def interval_args(value: Any, key: str) -> list[str]:
    n, unit = budget(value, f"bench.{key}")
    return [f"eval.dev_interval={n}"] if unit == "steps" else ["eval.dev_interval=0", f"eval.dev_interval_epochs={n}"]


def tokenizer_source(bench: dict[str, Any]) -> str:
    """The tokenizer of a given (HF) student, else of a given teacher; '' = train one (tiny models)."""
    return next((bench[w] for w in ("student", "teacher") if isinstance(bench[w], str)), "")


def test_sets(cfg: dict[str, Any], overrides: list[str]) -> list[str]:
    """``eval.sets`` of the run config, or of a ``--set eval.sets=[...]``; local paths made absolute."""
    sets = (cfg.get("eval") or {}).get("sets") or []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "eval.sets":
            sets = yaml.safe_load(value) or []
    if not isinstance(sets, list):
        raise BenchError(f"eval.sets: a list of name=path entries or prepared dirs (got {sets!r})")
    out = []
    for spec in map(str, sets):
        name, sep, path = spec.partition("=") if "=" in spec else ("", "", spec)
        if os.path.exists(path):
            path = os.path.abspath(path)
        out.append(f"{name}={path}" if sep else path)
    return out


def data_paths(a: argparse.Namespace, cfg: dict[str, Any], base: str, smoke: bool,
               tokenizer: str) -> dict[str, str]:
    """{train, dev, test, tokenizer}: where the data job puts them (nothing is written here)."""
    return {**split_files(a, base), "tokenizer": tokenizer or os.path.join(base, "tokenizer")}


def make_data(a: argparse.Namespace, cfg: dict[str, Any], base: str, smoke: bool, tokenizer: str) -> dict[str, str]:
    """The data job: the synthetic splits (unless ``--data``) and a BPE tokenizer trained on the train split
    (unless the models bring theirs); both kept while their inputs are unchanged."""
    files = data_paths(a, cfg, base, smoke, tokenizer)
    if not a.data:
        make_synthetic(cfg, base, smoke)
    if tokenizer:
        return files
    from promptkd.data import load_examples, train_tokenizer

    vocab = int((cfg.get("tokenizer") or {}).get("vocab_size", 800))
    out = files["tokenizer"]
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
    return files


def data_job(a: argparse.Namespace, cfg: dict[str, Any], base: str, smoke: bool, tokenizer: str) -> Job:
    """The chain's first job: what it makes, as its arguments (a change makes it run again)."""
    source = a.data or f"synthetic {_flow(synthetic_sizes(cfg, smoke))}"
    vocab = int((cfg.get("tokenizer") or {}).get("vocab_size", 800))
    return Job("data", [f"data={source}", f"tokenizer={tokenizer or f'trained, vocab {vocab}'}"],
               os.path.join(base, "data_job"), kind="data")


def split_files(a: argparse.Namespace, base: str) -> dict[str, str]:
    """{train, dev, test} JSONL paths: ``--data DIR`` or the synthetic suite under ``base/data``."""
    if a.data:
        files = {"train": os.path.join(a.data, "train.jsonl"), "test": os.path.join(a.data, "test.jsonl")}
        dev = [os.path.join(a.data, n) for n in ("dev.jsonl", "valid.jsonl")]
        files["dev"] = next((p for p in dev if os.path.isfile(p)), dev[0])
        for split, path in files.items():
            if not os.path.isfile(path):
                extra = " (or valid.jsonl)" if split == "dev" else ""
                raise BenchError(f"--data: no {os.path.basename(path)}{extra} in {a.data}")
        return {k: os.path.abspath(v) for k, v in files.items()}
    return {k: os.path.join(base, "data", f"{k}.jsonl") for k in ("train", "dev", "test")}


def synthetic_sizes(cfg: dict[str, Any], smoke: bool) -> list[int]:
    s = dict((cfg.get("data") or {}).get("synthetic") or {})
    if smoke:
        s.update({k.rsplit(".", 1)[1]: v for k, v in SMOKE_RUN.items() if k.startswith("data.synthetic.")})
    return [int(s.get("n_train", 6000)), int(s.get("n_dev", 200)), int(s.get("n_test", 400)), int(s.get("seed", 1234)),
            int(s.get("level", 1))]


def make_synthetic(cfg: dict[str, Any], base: str, smoke: bool) -> None:
    from promptkd.data import make_synthetic_splits

    out, sizes = os.path.join(base, "data"), synthetic_sizes(cfg, smoke)
    stamp = os.path.join(out, "sizes.json")
    if not (os.path.isfile(stamp) and json.load(open(stamp)) == sizes):
        make_synthetic_splits(out, *sizes)
        with open(stamp, "w") as fh:
            json.dump(sizes, fh)


# ----------------------------------------------------------------------------- jobs

@dataclass
class Plan:
    data: Job                                        # the synthetic splits and tokenizer (kind "data")
    teacher: Optional[Job]                           # None: bench.teacher_sft is false
    student: Optional[Job]                           # None: bench.student_sft is false
    refs: Optional[Job]                              # headline only: teacher and SFT init on dev and test
    runs: dict[tuple[str, int, float], Job]          # (label, seed, lr) -> training job
    evals: dict[tuple[str, int, float], Job]         # headline only: test evaluation of best/ and last
    exposure: Optional[Job]
    teacher_dir: str = ""                            # the SFT teacher every method distills from
    init: str = ""                                   # the SFT student every method starts from
    # (label, seed, lr) -> {"best": name, "last": name}: the run's two models in its eval job's results
    eval_names: dict[tuple[str, int, float], dict[str, str]] = field(default_factory=dict)

    def all_jobs(self) -> list[Job]:
        jobs = [self.data, self.teacher, self.student, self.refs, *self.runs.values(), *self.evals.values(),
                self.exposure]
        return list({id(j): j for j in jobs if j is not None}.values())  # --smoke: runs share eval jobs


def sft_args(bench: dict, model: Any, steps: Any, key: str) -> list[str]:
    source = f"model.student.path={model}" if isinstance(model, str) else f"model.student.init={_flow(model)}"
    return ["method.name=sft", source, *budget_args(steps, key), f"optim.student.lr={bench['sft_lr']}",
            f"optim.student.warmup_steps={bench['sft_warmup_steps']}"]


def base_jobs(bench: dict, shared: list[str], base: str, data: Job) -> tuple[Optional[Job], str, Optional[Job], str]:
    """(teacher SFT job, teacher dir, student SFT job, init dir); a model given as SFT'd has no job."""
    teacher = student = None
    teacher_dir, init = bench["teacher"], bench["student"]
    if bench["teacher_sft"]:
        out = os.path.join(base, "teacher")
        teacher = Job("base/teacher", [*shared, "stage=train", "eval.dev_interval=0",
                                       *sft_args(bench, bench["teacher"], bench["teacher_sft_steps"], "teacher_sft_steps"),
                                       f"output.dir={out}"], out, after=[data])
        teacher_dir = os.path.join(out, "export")
    if bench["student_sft"]:
        out = os.path.join(base, "student")
        student = Job("base/student", [*shared, "stage=train",
                                       *sft_args(bench, bench["student"], bench["student_sft_max_steps"],
                                                 "student_sft_max_steps"),
                                       *interval_args(bench["student_sft_dev_interval"], "student_sft_dev_interval"),
                                       f"train.early_stop_patience={bench['student_sft_patience']}",
                                       f"output.dir={out}"], out, after=[data])
        init = os.path.join(out, "best")
    return teacher, teacher_dir, student, init


def plan_jobs(a: argparse.Namespace, bench: dict, common: list[str], files: dict[str, str], data: Job,
              sets: list[str]) -> Plan:
    """Every job of the run, with what each runs after. ``sets``: the test sets' ``eval.sets`` entries."""
    w = a.work_dir
    base = os.path.join(w, "base")
    data_args = [f"data.train_file={files['train']}", f"data.dev_file={files['dev']}", "data.test_file=",
                 "data.synthetic.enabled=false"]
    shared = [*common, *data_args, "tokenizer.train=false", f"tokenizer.path={files['tokenizer']}"]
    teacher, teacher_dir, student, init = base_jobs(bench, shared, base, data)
    bases = [j for j in (teacher, student) if j] or [data]
    test = f"eval.sets=[{','.join(sets)}]"
    dev_only = a.search or a.ablation  # their reports read dev only: no reference evaluation on test
    refs = None if dev_only else Job("ref", [*shared, "stage=eval", f"eval.models=[teacher={teacher_dir},student={init}]",
                                         f"eval.sets=[dev={files['dev']},{','.join(sets)}]",
                                         f"output.dir={os.path.join(w, 'ref')}"], os.path.join(w, "ref"), after=bases)
    train = [*shared, "stage=train", f"model.teacher.path={teacher_dir}", f"model.student.path={init}",
             *budget_args(bench["steps"], "steps"), *interval_args(bench["dev_interval"], "dev_interval"),
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
                    group="seqkd" if label == "seqkd" else "", after=bases)
                if not dev_only:
                    evals[label, seed, lr] = Job(f"{label}/seed_{seed}/lr_{lr:g}/eval", [
                        *shared, "stage=eval", f"eval.models=[best={out}/best,last={out}/export]", test,
                        f"output.dir={out}/eval_out"], os.path.join(out, "eval_out"), after=[runs[label, seed, lr]])
    eval_names = {key: {"best": "best", "last": "last"} for key in evals}
    if a.smoke and evals:
        evals, eval_names = smoke_evals(w, shared, test, runs, a.workers)
    exposure = None if dev_only else exposure_job(a, bench, shared, files, runs, init, teacher_dir)
    return Plan(data, teacher, student, refs, runs, evals, exposure, teacher_dir, init, eval_names)


def smoke_evals(w: str, shared: list[str], test: str, runs: dict, workers: int) -> tuple[dict, dict]:
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
        job = Job(f"smoke_eval/{i}", [*shared, "stage=eval", f"eval.models=[{models}]", test, f"output.dir={out}"], out,
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
    p.add_argument("--workers", type=int, default=None,
                   help="runs at a time (default: 2, one thread each; 1 with --launcher)")
    p.add_argument("--launcher", default="", metavar="CMD",
                   help='command prefix of every job instead of python, e.g. "deepspeed --num_gpus 8" or '
                        '"torchrun --nproc_per_node 8" (its env is kept; the default pins jobs to the CPU)')
    p.add_argument("--slurm", action="store_true", help="submit the plan as a chain of dependent SLURM jobs "
                                                        "(slurm/quality.sbatch) instead of running it here")
    p.add_argument("--sbatch-args", default="", metavar="OPTS",
                   help='--slurm: sbatch options for every launcher job, e.g. "--partition=gpu --gpus-per-node=8"')
    p.add_argument("--replay", default="", help=argparse.SUPPRESS)       # a job of the chain: the submitter's argv
    p.add_argument("--slurm-stage", default="", choices=("", "data", "stamp", "report"), help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", default=os.path.join(REPO, "runs", "quality"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="launcher overrides for every run")
    p.add_argument("--smoke", action="store_true", help="toy sizes, 2 steps: checks that it all runs")
    p.add_argument("--fresh", action="store_true", help="delete --work-dir first")
    a = p.parse_args(argv)
    if a.replay:  # inside a job of the chain: the submitter's arguments, then this job's own
        with open(a.replay) as fh:
            a = p.parse_args([*json.load(fh)["argv"], *(argv if argv is not None else sys.argv[1:])])
    a.work_dir = os.path.abspath(a.work_dir)
    if a.workers is None:
        a.workers = 1 if a.launcher else 2
    return a


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
    if a.slurm and (a.sizes or a.write_config):
        raise BenchError(f"--slurm: not with {'--sizes' if a.sizes else '--write-config'} (run that here once the "
                         "chain is done: it reuses every finished job)")
    sizes = [parse_size(x) for x in a.sizes]
    if a.fresh and os.path.isdir(a.work_dir):
        shutil.rmtree(a.work_dir)
    load_before, t0 = list(os.getloadavg()), time.perf_counter()
    bench, cfg, files, common, plan = build(a)
    if a.slurm or a.slurm_stage:
        from bench import quality_slurm

        return quality_slurm.main(a, bench, cfg, plan)
    make_data(a, cfg, os.path.join(a.work_dir, "base"), a.smoke, tokenizer_source(bench))
    if not plan.data.finished_before():
        write_stamp(plan.data)
    if sizes:
        return size_study(a, bench, plan, files, sizes, load_before, t0)
    run_jobs([j for j in plan.all_jobs() if j.kind == "launch"], a.workers, os.path.join(a.work_dir, "logs"),
             shlex.split(a.launcher))
    failed = [j.label for j in plan.all_jobs() if j.error]
    if failed:
        print(f"quality: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return write_report(a, bench, plan, time.perf_counter() - t0, load_before)


def build(a: argparse.Namespace) -> tuple[dict, dict, dict, list[str], Plan]:
    """(bench section, run config, data paths, the arguments every launch gets, the plan); writes no data."""
    bench, run_config = load_bench(a.config, a.work_dir, a.smoke)
    a.methods = a.methods or (["rkl", "promptkd", *ABLATIONS] if a.ablation else list(bench["methods"]))
    a.seeds = a.seeds or ([1] if a.smoke else list(bench["seeds"]))
    missing = [m for m in a.methods if m.split("-")[0] not in bench["lr"]] if not a.search else []
    if missing:
        raise BenchError(f"{a.config}: bench.lr has no learning rate for {missing[0]} (run --search)")
    with open(run_config) as fh:
        cfg = yaml.safe_load(fh) or {}
    base, tokenizer = os.path.join(a.work_dir, "base"), tokenizer_source(bench)
    files = data_paths(a, cfg, base, a.smoke, tokenizer)
    common = ["--config", run_config, *(override_args(SMOKE_RUN) if a.smoke else []), *a.set]
    sets = test_sets(cfg, a.set) or [f"test={files['test']}"]
    plan = plan_jobs(a, bench, common, files, data_job(a, cfg, base, a.smoke, tokenizer), sets)
    return bench, cfg, files, common, plan


def write_report(a: argparse.Namespace, bench: dict, plan: Plan, wall: float, load_before: list[float]) -> int:
    meta = {"when": time.strftime("%Y-%m-%d"), "wall_seconds": round(wall, 1), "machine": f"{os.cpu_count()} CPU cores",
            "data": a.data or "bundled synthetic suite", "bench": bench, "methods": a.methods, "seeds": a.seeds,
            "smoke": a.smoke, "workers": a.workers, "load_avg_at_start": load_before,
            "launcher": "slurm" if a.slurm_stage else (a.launcher or "python"),
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


def size_study(a, bench, plan, files, sizes, load_before, t0) -> int:
    """Each size's converged SFT student and the teacher, scored on dev only (sampled and greedy)."""
    if plan.student is None:
        raise BenchError("--sizes: needs bench.student_sft: true (each size is an SFT student)")
    training_only = ("stage", "output.dir", "model.student.init", "model.student.path", "train.max_steps",
                     "train.epochs", "optim.student.lr", "optim.student.warmup_steps", "method.name",
                     "eval.dev_interval", "eval.dev_interval_epochs", "train.early_stop_patience")
    shared = [x for x in plan.student.args if x.split("=", 1)[0] not in training_only]
    students = {}
    for model in sizes:
        name = f"{model['layers']}x{model['hidden']}"
        out = os.path.join(a.work_dir, "sizes", name)
        args = [x for x in plan.student.args
                if not x.startswith(("output.dir=", "model.student.init=", "model.student.path="))]
        students[name] = Job(f"sizes/{name}", [*args, f"model.student.init={_flow(model)}", f"output.dir={out}"], out,
                             after=[plan.data])
    entries = ",".join([f"teacher={plan.teacher_dir}"] + [f"{n}={j.out_dir}/best" for n, j in students.items()])
    out = os.path.join(a.work_dir, "sizes", "eval")
    ev = Job("sizes/eval", [*shared, "stage=eval", f"eval.models=[{entries}]", f"eval.sets=[dev={files['dev']}]",
                            f"output.dir={out}"], out, after=[j for j in (plan.teacher, *students.values()) if j])
    jobs = [j for j in (plan.teacher, *students.values(), ev) if j]
    run_jobs(jobs, a.workers, os.path.join(a.work_dir, "logs"), shlex.split(a.launcher))
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
