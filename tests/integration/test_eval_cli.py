"""The evaluation workflow through its real CLIs, single process:
``python -m promptkd.data.prepare`` on every raw fixture -> ``launcher/main.py stage=eval eval.sets=[root]``
-> ``promptkd.evaluation.compare``'s main, and ``launcher/main.py stage=exposure`` (beside the eval).
The bad exposure input and the comparison run in process: one launch each is elsewhere
(tests/integration/test_bad_inputs.py, tests/unit/test_eval_stage.py::test_compare_cli_entry_point)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import cli_env, last_line, main_in_process
from tests.fixtures.parallel import Launch, run_side_by_side
from tests.fixtures.eval_workspace import OVERRIDES, RAW, build

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "launcher" / "main.py"
TIMEOUT_S = 240
PREPARE = {"dolly": ["--test-size", "3", "--dev-size", "2"], "selfinst": [], "vicuna": [], "sni": [], "unni": []}


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


@pytest.fixture(scope="module")
def cli_runs(prepared, ws, tmp_path_factory) -> dict:
    """The eval over every prepared set and stage=exposure: independent one-process launches, side by side."""
    root = tmp_path_factory.mktemp("cli_runs")
    launches = {
        "eval": Launch([sys.executable, str(MAIN), "stage=eval", f"eval.model_path={ws['student']}",
                        f"eval.sets=[{prepared}]", "eval.do_sample=false", "eval.seeds=[10]",
                        f"output.dir={root / 'eval_run'}", *OVERRIDES], timeout_s=TIMEOUT_S),
        "exposure": Launch([sys.executable, str(MAIN), "stage=exposure", f"tokenizer.path={ws['tokenizer']}",
                            f"eval.file={ws['synth']}", f"exposure.students=[{ws['student']}]",
                            f"exposure.teacher_path={ws['teacher']}", f"exposure.prompt_path={ws['prompt']}",
                            "exposure.max_tokens=4", f"output.dir={root / 'exposure_run'}", *OVERRIDES],
                           timeout_s=TIMEOUT_S),
    }
    return {"root": root, **run_side_by_side(launches)}


def test_one_eval_command_over_all_sets_then_compare(cli_runs, capsys):
    from promptkd.evaluation.compare import main as compare

    out = cli_runs["root"] / "eval_run"
    res = cli_runs["eval"]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| model | dolly | selfinst | vicuna | sni | unni | average |" in res.stdout
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results["models"]["model"]["datasets"]) == ["dolly", "selfinst", "vicuna", "sni", "unni"]
    ids = [json.loads(line)["id"] for line in (out / "eval" / "answers" / "model" / "sni.jsonl").read_text().splitlines()]
    assert ids == ["task1356-aaa1", "task1356-aaa3", "task102-bbb1"]
    assert list((out / "tb").iterdir()), "no TensorBoard events"
    # the comparison of the written results, in process (tests/unit/test_eval_stage.py launches its CLI)
    capsys.readouterr()
    assert compare([str(out / "eval" / "results.json"), str(out / "eval" / "results.json"),
                    "--labels", "first", "again", "--metric", "rougeL"]) == 0
    stdout = capsys.readouterr().out
    rows = [line for line in stdout.splitlines() if line.startswith("| first") or line.startswith("| again")]
    assert len(rows) == 2 and rows[0].split("|")[2:] == rows[1].split("|")[2:]


def test_stage_exposure_cli(cli_runs, ws, monkeypatch, capsys):
    res = cli_runs["exposure"]
    assert res.returncode == 0, res.stderr[-3000:]
    table = (cli_runs["root"] / "exposure_run" / "exposure" / "results.md").read_text()
    assert "| student | prompts | l=1 | l=2 | l=4 |" in table
    # no teacher: bad input, in process (tests/integration/test_bad_inputs.py launches the one real process)
    rc, stderr = main_in_process(["stage=exposure", f"eval.file={ws['synth']}",
                                  f"output.dir={cli_runs['root'] / 'x'}"], monkeypatch, capsys)
    assert rc == 2 and "exposure.teacher_path" in last_line(stderr)
