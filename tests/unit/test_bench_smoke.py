"""bench/ does not rot: every bench module imports and its core function runs at toy sizes.

Not a benchmark: sizes are tiny and nothing is timed against a target. The
benches build DeepSpeed engines and initialise a (world-of-one) process group,
so the toy runs happen in ONE child process; this pytest process stays clean.
Results go to a temp dir (BENCH_RESULTS), never over bench/results/.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = ("common", "phases", "promptkd_overhead", "loss_memory", "rollout", "vs_trl", "gpu_bench", "quality")


@pytest.mark.parametrize("name", MODULES)
def test_bench_module_imports(name):
    sys.path.insert(0, REPO)
    module = importlib.import_module(f"bench.{name}")
    assert callable(getattr(module, "run", None) or getattr(module, "emit", None))


@pytest.fixture(scope="module")
def bench_children(tmp_path_factory) -> dict:
    """The toy-size child (``_toy_runs``) and ``bash bench/gpu.sh --dry-run``, side by side: each is one process
    with one thread at a time, so on 2 quiet cores the child (~12 s of CPU) runs beside the dry run (~42 s)
    instead of before it. name -> (the finished process, its temp dir)."""
    from tests.fixtures.parallel import Launch, run_side_by_side

    toy, gpu = tmp_path_factory.mktemp("bench_toy"), tmp_path_factory.mktemp("gpu_dry")
    base = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    procs = run_side_by_side({
        "toy": Launch([sys.executable, os.path.abspath(__file__)], timeout_s=300,
                      env={**base, "BENCH_RESULTS": str(toy / "results"), "PYTHONPATH": REPO}),
        "gpu": Launch(["bash", os.path.join(REPO, "bench", "gpu.sh"), "--dry-run"], timeout_s=300,
                      env={**base, "OUT": str(gpu / "out"), "BENCH_RESULTS": str(gpu / "results"),
                           "PYTHON": sys.executable}),
    })
    return {"toy": (procs["toy"], toy), "gpu": (procs["gpu"], gpu)}


def test_bench_core_functions_run_at_toy_sizes(bench_children):
    proc, tmp_path = bench_children["toy"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    ph = out["phases"]
    # every span is timed inside the real train_step (PhaseTimer laps): one that never fires stays at 0
    from bench.phases import PHASES

    assert set(ph["seconds_per_phase_median"]) == set(PHASES)
    assert all(v > 0 for v in ph["seconds_per_phase_median"].values()), ph["seconds_per_phase_median"]
    assert ph["params"]["teacher"] > ph["params"]["student"] > 0 and ph["response_tokens_per_s"] > 0

    ov = out["overhead"]
    assert ov["ratio_promptkd_over_rkl"] > 0 and set(ov["iteration_seconds"]) == {"promptkd", "rkl", "promptkd-stale"}
    assert ov["ratio_promptkd_stale_over_rkl"] > 0

    ro = out["rollout"]
    assert ro["ratio_ours_over_hf_tokens_per_s"] > 0 and ro["logits_to_keep_effect"]["same_tokens"]

    lm = out["loss_memory"]["configs"]
    assert {(c["loss"], c["dtype"]) for c in lm} == {("rkl", "fp32"), ("fkl", "fp32"), ("rkl", "bf16"),
                                                      ("fkl", "bf16")}
    for c in lm:
        assert c["value_chunked"] == pytest.approx(c["value_unchunked"], rel=1e-4)
        # the allocator trace sees at least the gradient of the student logits
        grad_bytes = 1 * 16 * 64 * (4 if c["dtype"] == "fp32" else 2)
        assert c["memory"]["unchunked"]["peak_bytes"] >= grad_bytes
    first = lm[0]["memory"]["unchunked"]
    assert "rss_peak_bytes" in first or "rss_error" in first

    assert out["padded_vocab"] == 1500, "--vocab pads the tokenizer to the asked size"
    assert out["vs_trl"] in ("ran", "unavailable")
    assert not (tmp_path / "results").exists() or not os.listdir(tmp_path / "results")  # run() cores do not write


# ----------------------------------------------------------------------------- bench/gpu.sh (the lent GPU's bench)

GPU_ORDER = ["launcher", "timeout_probe", "mfu", "phases", "plan", "rollout", "vllm_rollout", "launcher_vllm"]
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back from $OUT (at most 8 files)


def test_gpu_sh_dry_run_runs_every_section_in_order_with_full_logs(bench_children):
    """bash bench/gpu.sh --dry-run: the launcher first, a forced timeout caught and recorded, the next section still
    run, every section's whole log in $OUT, and every import the bench needs on the GPU image or carried."""
    proc, tmp_path = bench_children["gpu"]
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "gpu_dryrun.json").read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1])["sections"].keys() == summary["sections"].keys()
    sections = summary["sections"]
    assert summary["order"] == GPU_ORDER and list(sections) == GPU_ORDER
    shown = {k: (v["status"], v.get("log_tail", "")[-600:]) for k, v in sections.items()}

    launcher = sections["launcher"]  # the quickstart pipeline through launcher/main.py, bf16, sampled eval
    assert launcher["status"] == "ok" and launcher["rc"] == 0, shown
    res = launcher["result"]
    assert res["stages_started"] == ["pipeline 1/4", "pipeline 2/4", "pipeline 3/4", "pipeline 4/4"], res
    assert res["eval_written"] and res["promptkd_step_seconds_median"] > 0, res
    assert "teacher + learned prompt" in res["eval_models"], res
    log = Path(launcher["log"]).read_text()
    assert log.startswith("$ ") and "pipeline 1/4" in log and "pipeline 4/4" in log  # the whole log, not a tail
    assert "model.teacher.dtype=bf16" in log.splitlines()[0] and "train.precision=bf16" in log.splitlines()[0]

    probe = sections["timeout_probe"]  # hangs past its 2 s timeout: killed, recorded, and the next one runs
    assert probe["status"] == "timeout" and probe["rc"] is None and probe["timeout_s"] == 2, probe
    assert "killed after" in Path(probe["log"]).read_text()
    for name in ("mfu", "phases", "plan", "rollout"):
        assert sections[name]["status"] == "ok" and sections[name]["rc"] == 0, shown
        assert Path(sections[name]["log"]).read_text().startswith("$ "), name
    assert sections["mfu"]["result"]["tokens_per_s"] > 0
    assert [c["case"] for c in sections["plan"]["result"]["cases"]] == ["zero2_bf16"]
    for name in ("vllm_rollout", "launcher_vllm"):
        assert sections[name]["status"] in ("skipped", "ok"), shown
    for entry in sections.values():
        assert entry["seconds"] >= 0 and entry["status"] in ("ok", "failed", "timeout", "skipped", "no_time")
        assert entry["log"] is None or Path(entry["log"]).parent == out

    files = sorted(os.listdir(out))  # what comes back from the device machine
    assert len(files) <= 8 and all(OUT_NAME.match(f) and (out / f).is_file() for f in files), files
    assert "gpu_dryrun.json" in files and "gpu_launcher.log" in files
    # every distribution the sections imported is on the GPU image or carried (bench/gpu_wheels.txt)
    assert {"deepspeed", "rouge-score", "nltk", "torch"} <= set(summary["imported_distributions"])
    assert summary["not_on_image_nor_carried"] == [], summary["not_on_image_nor_carried"]
    assert all(origin != "MISSING" for origin in summary["wheels"].values()), summary["wheels"]


def test_carried_wheel_list_matches_bench_whl():
    """bench/gpu_wheels.txt is the one list of what the image lacks; bench/.whl (after gpu_wheels.sh) holds one
    wheel for each, for CPython 3.12 on x86-64, small enough to carry."""
    from bench.gpu_bench import carried

    wanted = carried()
    assert {"deepspeed", "rouge_score", "nltk", "pydantic", "pydantic_core", "hjson"} <= set(wanted)
    for module in wanted:  # the list names real import names (this venv has every one of them)
        importlib.import_module(module)
    whl = Path(REPO) / "bench" / ".whl"
    if not whl.is_dir():
        pytest.skip("bench/.whl not built here (bash bench/gpu_wheels.sh needs PyPI)")
    norm = lambda n: re.sub(r"[-_.]+", "_", n).lower()  # noqa: E731
    files = sorted(whl.glob("*.whl"))
    by_dist: dict[str, list[str]] = {}
    for f in files:
        by_dist.setdefault(norm(f.name.split("-")[0]), []).append(f.name)
    assert {norm(d) for d in wanted.values()} == set(by_dist), (sorted(by_dist), wanted)
    assert all(len(names) == 1 for names in by_dist.values()), by_dist  # two versions stop the whole install
    for f in files:
        tags = f.name[:-4].split("-")[-3:]  # python, abi, platform
        assert tags[2] == "any" or ("cp312" in tags[0] and "x86_64" in tags[2] and "manylinux" in tags[2]), f.name
    assert sum(f.stat().st_size for f in files) < 48 * 2 ** 20  # with the repo, under the 64 MiB a call carries


def _quality(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "quality.py"), "--smoke", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _tiny_hf_models(root: Path, train_file: Path) -> dict[str, str]:
    """A tiny teacher and student saved with save_pretrained, each beside the BPE tokenizer trained on the train
    split: what a user's HF dirs look like to bench/quality.py."""
    import torch

    from promptkd.data import load_examples, train_tokenizer
    from promptkd.models.loading import build_tiny

    texts = [e.prompt + " " + e.references[0] for e in load_examples(str(train_file), "dolly", split="train")]
    tok = train_tokenizer(texts, 800, str(root / "tokenizer"))
    out = {}
    for name, (layers, hidden, heads) in {"teacher": (2, 64, 4), "student": (1, 32, 2)}.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            model = build_tiny("llama", layers, hidden, heads, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        out[name] = str(root / name)
        model.save_pretrained(out[name])
        tok.save_pretrained(out[name])
    return out


def test_quality_bench_smoke_on_a_dolly_dir_runs_every_method(tmp_path):
    """CI's version of bench/quality.py: toy sizes, 2 steps, every method, one launch: HF-dir models (the teacher
    given as SFT'd, the student SFT'd from its dir), a user's Dolly-format split (valid.jsonl as the dev file) and
    two test sets from a prepare-style root, under a --launcher prefix."""
    import yaml

    from bench import quality as q
    from promptkd.data.synthetic import generate_synthetic

    data, sets = tmp_path / "dolly", tmp_path / "sets"
    for folder, name, n, seed in ((data, "train", 96, 1), (data, "valid", 8, 2), (sets / "dolly", "test", 8, 3),
                                  (sets / "selfinst", "test", 6, 4)):
        folder.mkdir(parents=True, exist_ok=True)
        rows = generate_synthetic(n, seed)
        rows[0] = {**rows[0], "category": "my_category"}
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "test.jsonl").write_text((sets / "dolly" / "test.jsonl").read_text())
    models = _tiny_hf_models(tmp_path / "models", data / "train.jsonl")
    cfg = yaml.safe_load(open(q.CONFIG))
    cfg["bench"].update(teacher=models["teacher"], teacher_sft=False, student=models["student"])
    cfg["eval"]["sets"] = [str(sets)]  # a prepare root: one column per set
    (tmp_path / "quality.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, BENCH_RESULTS=str(tmp_path / "results"), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    work = str(tmp_path / "work")
    methods = cfg["bench"]["methods"]  # every method; the ablation variants' plans: tests/unit/test_quality_plan.py
    argv = ["--config", str(tmp_path / "quality.yaml"), "--data", str(data), "--work-dir", work, "--workers", "2"]
    proc = _quality([*argv, "--launcher", f"{sys.executable} -u"], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["data"] == str(data) and set(out["test_rougeL"]) == set(methods)
    assert out["sets"] == ["dolly", "selfinst"]  # the prepare root's sets, the paper's order
    assert "start base/teacher" not in proc.stderr and "base/teacher" not in out["job_seconds"]  # given as SFT'd
    student_log = (Path(work) / "logs" / "base_student.log").read_text().splitlines()[0]
    assert student_log.startswith(f"{sys.executable} -u ") and f"model.student.path={models['student']}" in student_log
    assert f"model.teacher.path={models['teacher']}" in (Path(work) / "logs" / "rkl_seed_1_lr_0.0003.log").read_text()
    ref = out["reference_test"]["sampled"]["teacher"]
    assert ref["rougeL"] == pytest.approx((ref["sets"]["dolly"] + ref["sets"]["selfinst"]) / 2)
    for label, row in out["test_rougeL"].items():
        assert set(row) == {"sampled/best", "sampled/last", "greedy/best", "greedy/last"}, label
        assert all(0.0 <= v["mean"] <= 100.0 for v in row.values())
        for view, ms in row.items():  # the average column is the mean of the set columns
            per_set = out["per_set"][label][view]
            assert set(per_set) == {"dolly", "selfinst"}
            assert ms["mean"] == pytest.approx((per_set["dolly"]["mean"] + per_set["selfinst"]["mean"]) / 2)
        assert [step for step, _ in out["curves"][label]["1"]["dev/rougeL"]] == [1, 2], label
        assert out["best_step"][label][0] in (1, 2)
    assert out["curves"]["promptkd"]["1"]["prompt/guidance_kl"] and out["curves"]["promptkd"]["1"]["prompt/reg_kl"]
    assert set(out["paired"]) >= {"rkl"}  # one training seed: no interval, but the rows exist
    assert {"sft", "rkl", "promptkd", "student (SFT init)"} <= set(out["exposure"])
    gap = out["teacher_student_gap"]["sampled"]
    assert gap == pytest.approx(ref["rougeL"] - out["reference_test"]["sampled"]["student"]["rougeL"])
    results = tmp_path / "results"
    table = (results / "quality.md").read_text()
    assert table.splitlines()[2].startswith("What was measured:")
    assert "| method | dolly | selfinst | average |" in table
    assert all(f"| {label} |" in table for label in methods) and "ExAccErr" in table
    assert (results / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun would start nothing: every job's stamp matches its command and inputs (checked without a launch)
    plan = q.build(q.parse_args(["--smoke", *argv]))[-1]
    assert q.missing_jobs(plan.all_jobs()) == []


def test_quality_lr_search_picks_on_dev_and_writes_the_config(tmp_path):
    from bench.quality import CONFIG

    cfg = tmp_path / "quality.yaml"
    cfg.write_text(open(CONFIG).read())
    env = dict(os.environ, BENCH_RESULTS=str(tmp_path / "results"), DS_ACCELERATOR="cpu")
    proc = _quality(["--search", "--write-config", "--config", str(cfg), "--work-dir", str(tmp_path / "work"),
                     "--methods", "rkl"], env)  # one method: the grid, the pick and the write are per method
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["dev_best"]) == {"rkl"}
    grid = out["dev_best"]["rkl"]
    assert set(grid) == {"0.0001", "0.001"}  # the smoke grid
    assert grid[f"{out['chosen_lr']['rkl']:g}"] == max(grid.values())
    import yaml

    before = yaml.safe_load(open(CONFIG))["bench"]["lr"]
    written = yaml.safe_load(cfg.read_text())["bench"]["lr"]
    assert written["rkl"] == out["chosen_lr"]["rkl"]
    assert {k: v for k, v in written.items() if k != "rkl"} == {k: v for k, v in before.items() if k != "rkl"}
    rows = [l for l in (tmp_path / "results" / "quality_lr_search.md").read_text().splitlines() if l.startswith("| ")]
    assert sum("←" in r for r in rows) == 1  # one chosen lr per method
    bad = _quality(["--data", str(tmp_path / "nowhere"), "--work-dir", str(tmp_path / "w2")], env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --data: no train.jsonl")
    # the student-size study reuses the teacher the search built (same command) and scores on dev only
    sizes = _quality(["--sizes", "1x16:2", "1x32", "--config", str(cfg), "--work-dir", str(tmp_path / "work")], env)
    assert sizes.returncode == 0, sizes.stderr[-4000:]
    assert "start base/teacher" not in sizes.stderr
    study = json.loads(sizes.stdout.strip().splitlines()[-1])["sizes"]
    assert set(study) == {"teacher", "1x16", "1x32"}
    assert study["1x32"]["gap_sampled"] == pytest.approx(study["teacher"]["sampled"] - study["1x32"]["sampled"])
    assert "| 1x16 |" in (tmp_path / "results" / "quality_sizes.md").read_text()


def _toy_runs() -> dict:
    """Child process: each bench's core function at toy sizes; one JSON line on stdout."""
    from bench import loss_memory, phases, promptkd_overhead, rollout, vs_trl
    from bench.common import RunSizes, make_workspace, set_threads

    set_threads(1)
    toy = RunSizes(teacher_layers=2, teacher_hidden=32, teacher_heads=4, student_layers=1, student_hidden=16,
                   student_heads=2, batch=2, max_new_tokens=4, n_train=40)
    ws = make_workspace(toy)
    out = {
        "phases": phases.run(toy, repeats=1, warmup=0, ws=ws),
        "overhead": promptkd_overhead.run(toy, repeats=1, warmup=0, ws=ws),
        "rollout": rollout.run(toy, repeats=1, warmup=0, ws=ws),
        "loss_memory": loss_memory.run(1, 16, 64, chunk=4, repeats=1, warmup=0, rss="first"),
    }
    if vs_trl.trl_available():  # only inside bench/.venv-trl
        vs_trl.run(toy, repeats=1, warmup=0, ws=ws)
        out["vs_trl"] = "ran"
    else:
        assert "setup_trl_venv.sh" in vs_trl.unavailable_reason()
        out["vs_trl"] = "unavailable"
    from promptkd.data import load_tokenizer

    out["padded_vocab"] = len(load_tokenizer(make_workspace(RunSizes(n_train=40, vocab=1500))["tokenizer"]))
    return out


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    result = _toy_runs()
    print(json.dumps(result, default=str))
    from promptkd import distributed as dist

    dist.shutdown(0)


def test_quality_job_reuse_follows_its_inputs(tmp_path):
    """A finished run is reused only while the runs it started from are the same outputs."""
    from types import SimpleNamespace

    from bench.quality import Job, _finish

    def job(label, after=()):
        return Job(label, [f"output.dir={tmp_path / label}"], str(tmp_path / label), after=list(after))

    def finish(j):
        os.makedirs(j.out_dir, exist_ok=True)
        j.proc, j.started = SimpleNamespace(returncode=0), 0.0
        _finish(j, str(tmp_path / "logs"))

    student = job("student")
    run = job("run", after=[student])
    finish(student)
    finish(run)
    again_student = job("student")
    assert again_student.finished_before() and again_student.run_id == student.run_id
    assert job("run", after=[again_student]).finished_before()      # same inputs: reused
    rebuilt = job("student")
    finish(rebuilt)                                                  # e.g. a new student size
    assert rebuilt.run_id != student.run_id
    assert not job("run", after=[rebuilt]).finished_before()        # stale: it started from the old one
    assert not Job("run", ["output.dir=elsewhere"], run.out_dir, after=[rebuilt]).finished_before()
