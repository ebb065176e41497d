"""The evaluation workflow through its real CLIs, single process:
``python -m promptkd.data.prepare`` on every raw fixture -> ``launcher/main.py stage=eval eval.sets=[root]``
-> ``python -m promptkd.compare``, and ``launcher/main.py stage=exposure``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import cli_env
from tests.fixtures.eval_workspace import OVERRIDES, RAW, build

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "launcher" / "main.py"
TIMEOUT_S = 240
PREPARE = {"dolly": ["--test-size", "3", "--dev-size", "2"], "selfinst": [], "vicuna": [], "sni": [], "unni": []}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", str(TIMEOUT_S), sys.executable, *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """All five sets converted by five concurrent ``python -m promptkd.data.prepare`` processes."""
    root = tmp_path_factory.mktemp("prepared")
    procs = {name: subprocess.Popen([sys.executable, "-m", "promptkd.data.prepare", name, "--source", str(RAW / name),
                                     "--out", str(root), *extra], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, extra in PREPARE.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        assert f"{name} test:" in out
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, str]:
    return build(str(tmp_path_factory.mktemp("ws")))


def test_prepare_cli_layout(prepared):
    assert sorted(p.name for p in prepared.iterdir()) == sorted(PREPARE)
    assert sorted(p.name for p in (prepared / "dolly").iterdir()) == ["dev.jsonl", "meta.json", "test.jsonl",
                                                                     "train.jsonl"]
    counts = {n: json.loads((prepared / n / "meta.json").read_text())["splits"]["test"]["n"] for n in PREPARE}
    assert counts == {"dolly": 3, "selfinst": 4, "vicuna": 3, "sni": 3, "unni": 4}


def test_one_eval_command_over_all_sets_then_compare(prepared, ws, tmp_path):
    out = tmp_path / "eval_run"
    res = _run([str(MAIN), "stage=eval", f"eval.model_path={ws['student']}", f"eval.sets=[{prepared}]",
                "eval.do_sample=false", "eval.seeds=[10]", f"output.dir={out}", *OVERRIDES])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| model | dolly | selfinst | vicuna | sni | unni | average |" in res.stdout
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results["models"]["model"]["datasets"]) == ["dolly", "selfinst", "vicuna", "sni", "unni"]
    ids = [json.loads(line)["id"] for line in (out / "eval" / "answers" / "model" / "sni.jsonl").read_text().splitlines()]
    assert ids == ["task1356-aaa1", "task1356-aaa3", "task102-bbb1"]
    assert list((out / "tb").iterdir()), "no TensorBoard events"
    cmp = _run(["-m", "promptkd.evaluation.compare", str(out / "eval" / "results.json"), str(out / "eval" / "results.json"),
                "--labels", "first", "again", "--metric", "rougeL"])
    assert cmp.returncode == 0, cmp.stderr
    rows = [line for line in cmp.stdout.splitlines() if line.startswith("| first") or line.startswith("| again")]
    assert len(rows) == 2 and rows[0].split("|")[2:] == rows[1].split("|")[2:]


def test_stage_exposure_cli(ws, tmp_path):
    res = _run([str(MAIN), "stage=exposure", f"tokenizer.path={ws['tokenizer']}", f"eval.file={ws['synth']}",
                f"exposure.students=[{ws['student']}]", f"exposure.teacher_path={ws['teacher']}",
                f"exposure.prompt_path={ws['prompt']}", "exposure.max_tokens=4", f"output.dir={tmp_path}", *OVERRIDES])
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / "exposure" / "results.md").read_text()
    assert "| student | prompts | l=1 | l=2 | l=4 |" in table
    missing = _run([str(MAIN), "stage=exposure", f"eval.file={ws['synth']}", f"output.dir={tmp_path / 'x'}"])
    assert missing.returncode == 2 and "exposure.teacher_path" in missing.stderr.strip().splitlines()[-1]
