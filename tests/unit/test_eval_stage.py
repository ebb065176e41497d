"""stage=eval over several prepared sets (one process, tiny saved models): results.json / results.md,
answers per model and set keyed by id, TensorBoard scalars; ``promptkd.evaluation.compare``; stage=exposure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from promptkd.config import load_config
from promptkd.stages import STAGES, run_eval
from tests.fixtures.eval_workspace import OVERRIDES, build, eval_overrides

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("eval_ws")))


@pytest.fixture(scope="module")
def greedy_run(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_greedy")
    run_eval(load_config(None, eval_overrides(ws, str(out))))
    return out


def test_results_cover_every_set_in_order(greedy_run):
    res = json.loads((greedy_run / "eval" / "results.json").read_text())
    model = res["models"]["model"]
    assert list(model["datasets"]) == ["selfinst", "vicuna", "synth"]
    assert {k: v["n"] for k, v in res["sets"].items()} == {"selfinst": 4, "vicuna": 3, "synth": 7}
    assert res["sets"]["selfinst"]["format"] == "prompt_output" and res["sets"]["synth"]["format"] == "dolly"
    assert res["decoding"]["do_sample"] is False and res["decoding"]["seeds"] == [10]
    per_set = [model["datasets"][d]["rougeL"] for d in ("selfinst", "vicuna", "synth")]
    assert model["average"]["rougeL"] == pytest.approx(sum(per_set) / 3)
    assert all(0.0 <= v <= 100.0 for v in per_set)
    md = (greedy_run / "eval" / "results.md").read_text()
    assert "| model | selfinst | vicuna | synth | average |" in md


def test_answers_are_keyed_by_prepared_ids(greedy_run):
    rows = [json.loads(line) for line in
            (greedy_run / "eval" / "answers" / "model" / "vicuna.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["vicuna-1", "vicuna-68", "vicuna-80"]
    assert len(rows[0]["references"]) == 2 and all(r["seed"] == 10 for r in rows)
    assert all(isinstance(r["answer"], str) for r in rows)
    synth = (greedy_run / "eval" / "answers" / "model" / "synth.jsonl").read_text().splitlines()
    assert len(synth) == 7


def test_tensorboard_has_per_set_scalars(greedy_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(greedy_run / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("eval/selfinst/rougeL", "eval/vicuna/exact_match", "eval/synth/rougeL_std", "eval/average/rougeL"):
        assert tag in tags, tags
    res = json.loads((greedy_run / "eval" / "results.json").read_text())
    assert acc.Scalars("eval/vicuna/rougeL")[0].value == pytest.approx(
        res["models"]["model"]["datasets"]["vicuna"]["rougeL"], rel=1e-6)


def test_prompted_teacher_and_sampling_seeds(ws, tmp_path):
    cfg = load_config(None, eval_overrides(ws, str(tmp_path), prompted=True)
                      + ["eval.do_sample=true", "eval.seeds=[10, 20]", f"eval.sets=[vic={ws['sets']}/vicuna]"])
    out = run_eval(cfg)
    assert list(out) == ["prompted_teacher"] and list(out["prompted_teacher"]) == ["vic"]
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    vic = res["models"]["prompted_teacher"]["datasets"]["vic"]
    assert [s["seed"] for s in vic["by_seed"]] == [10, 20] and "average" not in res["models"]["prompted_teacher"]
    rows = (tmp_path / "eval" / "answers" / "prompted_teacher" / "vic.jsonl").read_text().splitlines()
    assert [json.loads(r)["seed"] for r in rows] == [10, 10, 10, 20, 20, 20]


def test_compare_prints_runs_side_by_side(greedy_run, tmp_path, capsys):
    from promptkd.evaluation.compare import main

    legacy = tmp_path / "old" / "eval" / "results.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"student": {"n": 5, "rougeL": 12.5, "rougeL_std": 0.0, "exact_match": 0.0,
                                              "by_category": {}, "by_seed": [{"seed": 10}]}}))
    assert main([str(greedy_run / "eval" / "results.json"), str(legacy), "--metric", "rougeL"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ROUGE-L" and out[1] == "| model | selfinst | vicuna | synth | test | average |"
    assert out[3].startswith(f"| {greedy_run}: model | ")
    assert out[4] == f"| {tmp_path / 'old'}: student | – | – | – | 12.50 | – |"
    with pytest.raises(SystemExit):
        main([str(legacy), "--labels", "A", "B"])  # one label per file
    assert main([str(tmp_path / "missing.json")]) == 2


def test_compare_cli_entry_point(greedy_run):
    proc = subprocess.run([sys.executable, "-m", "promptkd.compare", str(greedy_run / "eval" / "results.json"), "--labels",
                           "tiny"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| tiny: model |" in proc.stdout and "Exact match" in proc.stdout


def test_stage_exposure_table_per_checkpoint(ws, tmp_path):
    assert "exposure" in STAGES
    cfg = load_config(None, [f"tokenizer.path={ws['tokenizer']}", f"eval.file={ws['synth']}",
                             f"exposure.students=[{ws['student']}, {ws['student']}]",
                             f"exposure.teacher_path={ws['teacher']}", f"exposure.prompt_path={ws['prompt']}",
                             "exposure.samples=2", "exposure.max_tokens=5", "stage=exposure",
                             f"output.dir={tmp_path}", *OVERRIDES])
    STAGES["exposure"](cfg)
    res = json.loads((tmp_path / "exposure" / "results.json").read_text())
    assert res["positions"] == 5 and res["samples"] == 2 and len(res["students"]) == 2
    a, b = res["students"]
    assert a["exacc_err"] == b["exacc_err"]            # same student, same seed: same samples
    assert a["n_prompts"] == 7 and len(a["R"]) == 5 and all(x > 0 for x in a["eps"])
    assert all(v is not None for v in a["exacc_err"]) and all(s is not None and s >= 0 for s in a["se"])
    md = (tmp_path / "exposure" / "results.md").read_text()
    assert "| student | prompts | l=1 | l=2 | l=4 | l=5 |" in md and md.count(ws["student"]) == 2
