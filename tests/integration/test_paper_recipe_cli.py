"""README "Reproducing the paper" quotes the memory planner for every configs/paper/ file: the table must be its
output (any change to the planner or the configs shows here); and its commands run at toy size."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from promptkd.config import REGISTRY, load_config

REPO = Path(__file__).resolve().parents[2]
PAPER = sorted(glob.glob(str(REPO / "configs" / "paper" / "*.yaml")))


def _memory_rows() -> dict[str, list[str]]:
    section = (REPO / "README.md").read_text().split("\n## Reproducing the paper\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[1].endswith("_step"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_memory_table_is_the_planners_output(monkeypatch):
    from promptkd.plan import plan_config
    from promptkd.plan.core import GiB

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the shapes are forced below: no hub look-up
    rows = _memory_rows()
    assert set(rows) == {os.path.basename(p).removesuffix(".yaml") for p in PAPER}
    for name, (_, peak, gib, largest) in rows.items():
        path = str(REPO / "configs" / "paper" / f"{name}.yaml")
        teacher = REGISTRY[load_config(path).method.name].uses_teacher
        cfg = load_config(path, ["stage=plan", "plan.world_size=8", "plan.gpu_memory=80GiB",
                                 "plan.student_arch=" + ("gpt2-xl" if name == "sft_gpt2-xl" else "gpt2")]
                          + (["plan.teacher_arch=gpt2-xl"] if teacher else []))
        plan = plan_config(cfg)
        assert (plan.peak_phase, f"{plan.total / GiB:.2f}", str(plan.max_micro_batch)) == (peak, gib, largest), name


def test_prepare_all_then_a_paper_config_trains_and_the_readme_eval_runs(tmp_path):
    """At toy size: `prepare all` on MiniLLM's layout, a configs/paper/ run on the prepared Dolly split (two steps,
    dev selection), then the README's eval command (eval.models + eval.sets=[root]): one column per set + average."""
    import subprocess
    import sys

    from tests.fixtures.cli import MAIN, cli_env, tail
    from tests.fixtures.eval_workspace import OVERRIDES, build
    from tests.fixtures.minillm_layout import minillm_root

    ws = build(str(tmp_path / "ws"))
    minillm_root(tmp_path / "data")
    root = tmp_path / "eval"
    env = cli_env(HF_HUB_OFFLINE="1")
    prep = subprocess.run([sys.executable, "-m", "promptkd.data.prepare", "all", "--out", str(root), "--raw",
                           str(tmp_path / "data"), "--no-hub", "--dev-size", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, tail(prep.stderr)
    tiny = [f"model.student.path={ws['student']}", f"model.teacher.path={ws['teacher']}",
            f"tokenizer.path={ws['tokenizer']}", "train.precision=fp32", *OVERRIDES]
    train = subprocess.run(
        [sys.executable, str(MAIN), "--config", "configs/paper/gpt2-base_promptkd.yaml", f"output.dir={tmp_path / 'pk'}",
         f"data.train_file={root}/dolly/train.jsonl", f"data.dev_file={root}/dolly/dev.jsonl", "train.max_steps=2",
         "train.grad_accum=1", "deepspeed=ds_configs/zero0.json", "rollout.max_new_tokens=4", *tiny],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, tail(train.stderr)
    assert (tmp_path / "pk" / "best" / "best.json").is_file()
    ev = subprocess.run(
        [sys.executable, str(MAIN), "--config", "configs/paper/gpt2-base_promptkd.yaml", "stage=eval",
         f"output.dir={tmp_path / 'ev'}", f"eval.sets=[{root}]", "eval.seeds=[10,20]",
         f"eval.models=[sft={ws['student']}, promptkd={tmp_path / 'pk' / 'best'}]", *tiny],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, tail(ev.stderr)
    assert "| model | dolly | selfinst | vicuna | sni | unni | average |" in ev.stdout, tail(ev.stdout)
    results = json.loads((tmp_path / "ev" / "eval" / "results.json").read_text())
    five = ["dolly", "selfinst", "vicuna", "sni", "unni"]
    assert list(results["sets"]) == five and list(results["models"]) == ["sft", "promptkd"]
    for scores in results["models"].values():
        assert list(scores["datasets"]) == five and len(scores["average"]["by_seed"]) == 2
