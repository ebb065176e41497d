"""bench/quality.py's plan without running it: HF-dir models, optional SFT, budgets in epochs, test sets,
the launcher prefix, and the SLURM chain's submission (sbatch and squeue replaced by fakes)."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import yaml

from bench import quality as q
from bench import quality_report as qr
from bench import quality_slurm as qs


def _config(tmp_path, **bench) -> str:
    cfg = yaml.safe_load(open(q.CONFIG))
    cfg["bench"].update(bench)
    path = tmp_path / "quality.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _plan(tmp_path, *extra: str, **bench):
    a = q.parse_args(["--config", _config(tmp_path, **bench), "--work-dir", str(tmp_path / "work"),
                      "--methods", "sft", "rkl", "seqkd", *extra])
    return a, q.build(a)


def _arg(job, key):
    return [x.split("=", 1)[1] for x in job.args if x.startswith(key + "=")][-1]


def test_hf_models_given_as_sftd_have_no_sft_job_and_bring_the_tokenizer(tmp_path):
    teacher, student = tmp_path / "t", tmp_path / "s"
    teacher.mkdir()
    student.mkdir()
    _, (_, _, files, _, plan) = _plan(tmp_path, teacher=str(teacher), teacher_sft=False, student="org/student-1b",
                                      student_sft=False, steps="2 epochs", dev_interval="1 epoch")
    assert plan.teacher is None and plan.student is None
    assert plan.teacher_dir == str(teacher) and plan.init == "org/student-1b"
    assert files["tokenizer"] == "org/student-1b" and plan.data.args[1] == "tokenizer=org/student-1b"
    run = plan.runs["rkl", 1, float(yaml.safe_load(open(q.CONFIG))["bench"]["lr"]["rkl"])]
    assert _arg(run, "model.teacher.path") == str(teacher) and _arg(run, "model.student.path") == "org/student-1b"
    assert (_arg(run, "train.max_steps"), _arg(run, "train.epochs")) == ("0", "2")
    assert (_arg(run, "eval.dev_interval"), _arg(run, "eval.dev_interval_epochs")) == ("0", "1")
    assert [d.label for d in run.after] == ["data"] and run.inputs() == {}  # the data job orders, it is no input


def test_an_hf_student_is_sftd_from_its_dir_and_tiny_specs_keep_their_old_commands(tmp_path):
    _, (_, _, _, _, hf) = _plan(tmp_path, student="org/student")
    assert _arg(hf.student, "model.student.path") == "org/student" and hf.init.endswith("base/student/best")
    assert _arg(hf.teacher, "tokenizer.path") == "org/student"
    _, (_, _, files, _, tiny) = _plan(tmp_path)
    # the commands of a tiny-spec benchmark are the ones older versions ran: their finished runs are reused
    assert _arg(tiny.teacher, "model.student.init") == "{arch: llama, heads: 8, hidden: 256, layers: 4}"
    assert _arg(tiny.teacher, "train.max_steps") == "4000" and "train.epochs" not in " ".join(tiny.teacher.args)
    assert _arg(tiny.refs, "eval.sets") == f"[dev={files['dev']},test={files['test']}]"
    assert [d.label for d in tiny.refs.after] == ["base/teacher", "base/student"]


def test_bad_bench_sections_are_one_line_errors(tmp_path):
    with pytest.raises(q.BenchError, match="bench.teacher_sft: false needs bench.teacher to be an HF dir"):
        _plan(tmp_path, teacher_sft=False)
    with pytest.raises(q.BenchError, match=r"bench.steps: '3 weeks' is not N, 'N steps' or 'N epochs'"):
        _plan(tmp_path, steps="3 weeks")
    with pytest.raises(q.BenchError, match="bench.student must be an HF dir, a hub id or a tiny model"):
        _plan(tmp_path, student={"layers": 2})
    cfg = yaml.safe_load(open(q.CONFIG))
    del cfg["bench"]["teacher_sft_steps"]
    cfg["bench"].update(teacher="org/t", teacher_sft=False)  # an SFT that does not run needs no budget
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(cfg))
    q.build(q.parse_args(["--config", str(tmp_path / "ok.yaml"), "--work-dir", str(tmp_path / "w")]))


def test_test_sets_come_from_eval_sets_and_set_overrides(tmp_path):
    root = tmp_path / "prepared"
    root.mkdir()
    assert q.test_sets({"eval": {"sets": ["prepared"]}}, []) == ["prepared"]  # not here: kept as given
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert q.test_sets({"eval": {"sets": ["prepared", "x=hub/ds"]}}, []) == [str(root), "x=hub/ds"]
        assert q.test_sets({}, [f"eval.sets=[a={root}]"]) == [f"a={root}"]
    finally:
        os.chdir(cwd)
    _, (_, _, files, _, plan) = _plan(tmp_path, "--set", f"eval.sets=[{root}]")
    assert _arg(plan.refs, "eval.sets") == f"[dev={files['dev']},{root}]"
    assert all(_arg(e, "eval.sets") == f"[{root}]" for e in plan.evals.values())


def test_launcher_prefix_and_its_env():
    job = q.Job("x", ["stage=train"], "/tmp/x")
    assert q.command([], job)[1:] == [q.MAIN, "stage=train"]
    assert q.command(["deepspeed", "--num_gpus", "8"], job) == ["deepspeed", "--num_gpus", "8", q.MAIN, "stage=train"]
    assert q.launch_env([])["DS_ACCELERATOR"] == "cpu" and q.launch_env([])["OMP_NUM_THREADS"] == "1"
    env = q.launch_env(["torchrun"])
    assert env.get("DS_ACCELERATOR") == os.environ.get("DS_ACCELERATOR")  # a GPU launcher keeps the user's env
    assert q.parse_args(["--launcher", "torchrun --nproc_per_node 8"]).workers == 1 and q.parse_args([]).workers == 2


def test_report_averages_the_sets_with_the_std_of_the_per_seed_average():
    def stats(*by_seed):
        return {"rougeL": sum(by_seed) / len(by_seed), "rougeL_std": 9.0,
                "by_seed": [{"seed": i, "rougeL": v} for i, v in enumerate(by_seed)]}
    r = qr.ref_score({"dev": stats(99.0, 99.0), "a": stats(10.0, 20.0), "b": stats(30.0, 30.0)})
    assert r["sets"] == {"a": 15.0, "b": 30.0} and r["rougeL"] == pytest.approx(22.5)  # dev is no test set
    assert r["rougeL_std"] == pytest.approx(3.5355339)  # per-seed averages 20 and 25
    one = qr.ref_score({"dev": stats(1.0), "test": stats(40.0, 50.0)})
    assert one["rougeL"] == 45.0 and one["rougeL_std"] == 9.0


# ----------------------------------------------------------------------------- the SLURM chain

class FakeSlurm:
    """sbatch gives ids 100, 101, ...; squeue lists what the test puts in ``queue``."""

    def __init__(self):
        self.calls, self.queue, self.next, self.cancelled = [], [], 100, []

    def __call__(self, cmd, **kw):
        if cmd[0] == "scancel":
            self.cancelled.append(cmd[1])
            return SimpleNamespace(returncode=0, stdout="", stderr="")
        if cmd[0] == "squeue":
            return SimpleNamespace(returncode=0, stdout="".join(f"{line}\n" for line in self.queue), stderr="")
        assert cmd[0] == "sbatch", cmd
        self.calls.append(cmd)
        self.next += 1
        return SimpleNamespace(returncode=0, stdout=f"{self.next - 1}\n", stderr="")


def _submit(tmp_path, monkeypatch, fake, capsys):
    monkeypatch.setattr(qs.subprocess, "run", fake)
    monkeypatch.setattr(qs.shutil, "which", lambda name: f"/usr/bin/{name}")
    a, (bench, cfg, _, _, plan) = _plan(tmp_path, "--slurm", "--seeds", "1", "2")
    assert qs.main(a, bench, cfg, plan) == 0
    return a, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_slurm_chain_depends_afterok_and_serialises_the_seqkd_cache(tmp_path, monkeypatch, capsys):
    fake = FakeSlurm()
    a, out = _submit(tmp_path, monkeypatch, fake, capsys)
    ids = out["submitted"]
    by_label = {c[c.index(qs.SBATCH) + 2]: c for c in fake.calls}
    assert list(by_label)[:3] == ["data", "base/teacher", "base/student"] and list(by_label)[-1] == "report"
    assert f"--dependency=afterok:{ids['data']}" in by_label["base/teacher"]
    run = by_label["rkl/seed_2/lr_0.0003"]
    assert f"--dependency=afterok:{ids['base/teacher']}:{ids['base/student']}" in run
    assert run[run.index(qs.SBATCH) + 1] == "train" and "stage=train" in run
    assert by_label["ref"][by_label["ref"].index(qs.SBATCH) + 1] == "eval"
    seqkd2 = [x for x in by_label["seqkd/seed_2/lr_0.0003"] if x.startswith("--dependency=")][0]
    assert seqkd2.endswith(f",afterany:{ids['seqkd/seed_1/lr_0.0003']}")  # one seqkd run at a time
    assert by_label["data"][-3:] == ["data", "data", out["argv"]] and "--gpus-per-node=0" in by_label["data"]
    report = [x for x in by_label["report"] if x.startswith("--dependency=")][0]
    assert ids["exposure"] in report and ids["ref"] in report and ids["rkl/seed_1/lr_0.0003/eval"] in report
    assert all(c[1] == "--parsable" and f"--job-name={out['prefix']}" in " ".join(c) for c in fake.calls)
    # every job of the chain rebuilds the same plan from the argv file
    replay = q.parse_args(["--replay", out["argv"], "--slurm-stage", "stamp", "--label", "ref"])
    assert q.build(replay)[-1].refs.args == q.build(a)[-1].refs.args


def test_slurm_rerun_submits_only_what_is_missing(tmp_path, monkeypatch, capsys):
    fake = FakeSlurm()
    _, first = _submit(tmp_path, monkeypatch, fake, capsys)
    prefix, ids = first["prefix"], first["submitted"]
    # data and the teacher finished (stamped); the student runs; nothing else is queued any more
    a, (_, _, _, _, plan) = _plan(tmp_path, "--seeds", "1", "2")
    for job in (plan.data, plan.teacher):
        q.missing_jobs([plan.data, plan.teacher])
        q.write_stamp(job)
    fake.queue = [f"{ids['base/student']}|{prefix}base/student|RUNNING|None",
                  f"999|{prefix}ref|PENDING|DependencyNeverSatisfied",     # cancelled and submitted again
                  f"998|{prefix}sft/seed_1/lr_0.0001|COMPLETED|None",       # over: not queued any more
                  "997|someone-else-ref|PENDING|None"]
    os.makedirs(plan.runs["rkl", 1, 0.0003].out_dir + "/checkpoints", exist_ok=True)  # a half-done run, same command
    fake.calls.clear()
    _, again = _submit(tmp_path, monkeypatch, fake, capsys)
    assert set(again["complete"]) == {"data", "base/teacher"} and again["queued"] == {"base/student": ids["base/student"]}
    labels = [c[c.index(qs.SBATCH) + 2] for c in fake.calls]
    assert "base/student" not in labels and "data" not in labels and "ref" in labels and fake.cancelled == ["999"]
    rkl = fake.calls[labels.index("rkl/seed_1/lr_0.0003")]
    assert f"--dependency=afterok:{ids['base/student']}" in rkl  # the teacher is done: no dependency on it
    assert os.path.isdir(plan.runs["rkl", 1, 0.0003].out_dir + "/checkpoints")  # kept: it resumes


def test_a_changed_command_or_a_rebuilt_input_starts_the_dir_over(tmp_path):
    data = q.Job("data", ["x"], str(tmp_path / "d"), kind="data")
    student = q.Job("student", ["a=1"], str(tmp_path / "s"), after=[data])
    run = q.Job("run", ["b=1"], str(tmp_path / "r"), after=[student])
    fresh: set[int] = set()
    for j in (data, student, run):
        qs.prepare_dir(j, fresh)
    for j in (student, run):
        (tmp_path / j.out_dir / "ckpt").mkdir()
    fresh.clear()
    qs.prepare_dir(student, fresh)
    qs.prepare_dir(run, fresh)
    assert (tmp_path / "s" / "ckpt").is_dir() and (tmp_path / "r" / "ckpt").is_dir()  # same commands: resumed
    student.args = ["a=2"]
    qs.prepare_dir(student, fresh)
    qs.prepare_dir(run, fresh)
    assert not (tmp_path / "s" / "ckpt").exists() and not (tmp_path / "r" / "ckpt").exists()


def test_slurm_without_sbatch_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(qs.shutil, "which", lambda name: None)
    argv = ["--slurm", "--config", _config(tmp_path), "--work-dir", str(tmp_path / "work")]
    assert q.main(argv) == 2
    assert capsys.readouterr().err.strip() == "error: --slurm: sbatch/squeue not found (run on a SLURM login node)"
    assert q.main([*argv, "--sizes", "1x16"]) == 2
    assert capsys.readouterr().err.startswith("error: --slurm: not with --sizes")


def test_ablation_variants_are_promptkd_with_their_knob(tmp_path):
    a = q.parse_args(["--config", _config(tmp_path), "--work-dir", str(tmp_path / "work"), "--ablation"])
    plan = q.build(a)[-1]
    runs = {label: job for (label, _, _), job in plan.runs.items()}
    assert set(runs) == {"rkl", "promptkd", *q.ABLATIONS} and not plan.evals and plan.refs is None  # dev only
    lr = float(_arg(runs["promptkd"], "optim.student.lr"))
    assert float(_arg(runs["promptkd-plr10"], "optim.prompt.lr")) == pytest.approx(10 * lr)
    assert _arg(runs["promptkd-P3"], "model.teacher.prompt_length") == "3"
    assert _arg(runs["promptkd-regoff"], "method.promptkd.reg_schedule") == "off"
    assert all(_arg(j, "method.name") == "promptkd" for k, j in runs.items() if k != "rkl")
