"""LoRA students on 2 gloo ranks (lora_scenarios.py, the ``lora`` scenario of the session's one 2-rank launch) and
an exact kill-and-resume (one process)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.cli import cli_env
from tests.fixtures.parallel import Launch, run_side_by_side
from tests.fixtures.ranks import REPO
from tests.fixtures.tiny_run import write_tiny_run


@pytest.fixture(scope="module")
def ranks(scenario_results):
    return scenario_results("lora")  # the session's one 2-rank launch (tests/distributed/conftest.py)


def _ok(case: dict) -> dict:
    assert case["ok"], case.get("trace") or case.get("error")
    return case


def test_promptkd_zero3_student_and_teacher_trains_adapters_only(ranks):
    r0, r1 = (_ok(r["promptkd_zero3_teacher"]) for r in ranks)
    for r in (r0, r1):
        assert r["partitioned"]  # the student (base and adapters) is ZeRO-3 partitioned
        assert r["gathered_once"]  # its rollouts gather it once per decode loop, then train on (trace reset)
        assert r["before"]["base"] == r["after"]["base"]  # the frozen base is bitwise unchanged
        assert r["before"]["adapters"] != r["after"]["adapters"]
        # the optimizer holds this rank's partition of the adapters only, not of the base
        assert 0 < r["optimizer_numel"] <= -(-r["counts"]["trainable"] // 2) + 64
        # r=8 on every linear layer of 2 layers, h=32, MLP 128: q,k,v,o 8·(32+32), gate, up, down 8·(32+128)
        assert r["counts"]["trainable"] == 2 * 8 * (4 * 64 + 3 * 160) == 11_776 < r["counts"]["frozen"]
    assert r0["after"] == r1["after"]  # the ranks agree
    losses = [m["loss/rkl"] for m in r0["metrics"]]
    assert losses[-1] < losses[0] and sum(losses[-2:]) < sum(losses[:2]), losses  # same prompts: the loss falls
    assert [m["loss/rkl"] for m in r1["metrics"]] == losses


def test_every_method_trains_only_the_adapters_at_every_stage(ranks):
    for r in ranks:
        cases = {**{f"{m}@zero3": c for m, c in r["methods_zero3"].items() if m != "ok"},
                 **{f"promptkd@{ds}": c for ds, c in r["promptkd_zero0_to_2"].items() if ds != "ok"}}
        assert len(cases) == 11
        for name, case in cases.items():
            _ok(case)
            assert case["before"]["base"] == case["after"]["base"], name
            assert case["before"]["adapters"] != case["after"]["adapters"], name


def test_merged_vllm_stream_and_export_under_zero3(ranks):
    for r in ranks:
        case = _ok(r["merged_sync_and_export_zero3"])
        assert case["sync_names"] and case["sync_err"] == 0.0
        assert case["export_err"] <= 1e-5 * max(1.0, case["scale"])
        assert case["adapter_files"] == ["adapter_config.json", "adapter_model.safetensors"]
        assert "adapter" in case["top_files"] and "model.safetensors" in case["top_files"]


def _launch(cfg, out, *extra, fault: str = "") -> Launch:
    cmd = [sys.executable, os.path.join(REPO, "launcher", "main.py"), "--config", str(cfg), f"output.dir={out}",
           "deepspeed=ds_configs/zero3_tiny_test.json", "model.student.lora.r=4", *extra]
    return Launch(cmd, env=cli_env(**({"PROMPTKD_FAULT": fault} if fault else {})), timeout_s=400)


def test_kill_and_resume_restores_the_adapters_bitwise(tmp_path):
    cfg = write_tiny_run(tmp_path, steps=4, save_interval=1)
    # the uninterrupted run and the killed one are independent one-process launches: side by side
    procs = run_side_by_side({"full": _launch(cfg, tmp_path / "full"),
                              "killed": _launch(cfg, tmp_path / "killed", fault="sigkill@step=3")})
    full, killed = procs["full"], procs["killed"]
    assert full.returncode == 0, full.stderr[-3000:]
    assert killed.returncode != 0 and not (tmp_path / "killed" / "export").exists()
    resumed = run_side_by_side({"resumed": _launch(cfg, tmp_path / "killed", "output.resume=auto")})["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    for rel in ("export/model.safetensors", "export/adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "full" / rel)), load_file(str(tmp_path / "killed" / rel))
        assert a.keys() == b.keys() and a
        for name in a:
            assert torch.equal(a[name], b[name]), f"{rel}: {name} differs after resume"
    adapter = load_file(str(tmp_path / "full" / "export/adapter/adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())  # it trained
