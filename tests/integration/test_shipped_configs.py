"""Every shipped ``configs/*.yaml`` starts and trains: what users launch is what CI runs (DESIGN.md §3, issue 19).

Each config goes through the real launcher for two optimizer steps with only these swapped
(tests/fixtures/shipped.py): model and tokenizer paths -> tiny HF dirs of the config's own family
(gpt2 / opt / llama, saved with ``save_pretrained``), the data -> a small local Dolly-format file with a
4-example dev split, the lengths and evaluation sizes -> small, ``train.max_steps=2``, the output dir.
Everything else is as shipped: the DeepSpeed JSON (optimizer offload included), bf16, the accumulation,
the micro-batch size, teacher placement, checkpointing flags, the method and its dev evaluation.

Configs are found at collection time, so a new one is covered without touching this file. One ZeRO-2
offload config and one ZeRO-1 config run at world size 2 (torchrun, 2 gloo ranks); the rest run as one
process, two at a time (each is one thread: OMP_NUM_THREADS=1).

The pipeline configs are not train runs and are launched by the tests named in COVERED_ELSEWHERE:
- quickstart.yaml (stage=pipeline: 4 trainings + evaluation) runs shrunk through this same launcher in
  tests/integration/test_launcher.py::test_quickstart_pipeline_at_toy_size;
- quality.yaml carries a ``bench:`` section that only bench/quality.py reads (the launcher rejects it as an
  unknown key); its smoke run is tests/unit/test_bench_smoke.py::test_quality_bench_smoke_on_a_dolly_dir_runs_every_method.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from promptkd.config import load_ds_json, zero_stage
from promptkd.config.deepspeed import offloads_optimizer
from tests.fixtures.cli import MAIN, REPO, cli_env, free_port, tail
from tests.fixtures.shipped import build_workspace, shipped_overrides

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# config -> (the test that launches it, the file of that test's code path that names the config)
COVERED_ELSEWHERE = {
    "quickstart.yaml": ("tests/integration/test_launcher.py::test_quickstart_pipeline_at_toy_size",
                        "tests/integration/test_launcher.py"),
    "quality.yaml": ("tests/unit/test_bench_smoke.py::test_quality_bench_smoke_on_a_dolly_dir_runs_every_method",
                     "bench/quality.py"),
    "quality_multi.yaml": ("tests/unit/test_multi_answer.py::test_quality_multi_config_smoke",
                           "tests/unit/test_multi_answer.py"),
}
STEPS = 2
LAUNCH_TIMEOUT_S = 420   # outer `timeout` per launch: a hang fails fast (bf16 on a shared 2-core CPU is slow)
PARALLEL = 2             # one-process launches at a time
TAIL = 60


def _tree(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _is_train_run(path: Path) -> bool:
    tree = _tree(path)
    return tree.get("stage", "train") == "train" and "bench" not in tree


TRAIN_CONFIGS = [p for p in CONFIGS if _is_train_run(p)]


def _ds(path: Path) -> dict:
    return load_ds_json(_tree(path).get("deepspeed", "ds_configs/zero0.json"))


def _two_rank_configs() -> set[str]:
    """The first ZeRO-2 config that offloads the optimizer and the first ZeRO-1 config: launched on 2 ranks."""
    picks = set()
    for want in (lambda ds: zero_stage(ds) == 2 and offloads_optimizer(ds), lambda ds: zero_stage(ds) == 1):
        match = next((p.name for p in TRAIN_CONFIGS if want(_ds(p))), None)
        if match:
            picks.add(match)
    return picks


TWO_RANKS = _two_rank_configs()


def _launch(config: Path, ws: dict, root: Path) -> SimpleNamespace:
    out = root / "runs" / config.stem
    overrides = shipped_overrides(config, ws, out, steps=STEPS) + ["dist_timeout_s=120"]
    world = 2 if config.name in TWO_RANKS else 1
    runner = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port())] if world == 2 else [sys.executable])
    cmd = ["timeout", str(LAUNCH_TIMEOUT_S), *runner, str(MAIN), "--config", str(config), *overrides]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True)
    seconds = time.monotonic() - start  # reported on failure (a slow launch is not a failure)
    log = f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n[launch took {seconds:.0f} s]"
    (root / f"{config.stem}.log").write_text(log)
    return SimpleNamespace(rc=proc.returncode, log=log, out=out, world=world)


@pytest.fixture(scope="module")
def launches(request, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """Launch every config this session selected (two-rank ones alone first, then the rest two at a time)."""
    wanted = {item.callspec.params["config"] for item in request.session.items
              if getattr(item, "callspec", None) and "config" in item.callspec.params
              and item.module is request.module}
    root = tmp_path_factory.mktemp("shipped")
    ws = build_workspace(root / "ws")
    configs = [p for p in TRAIN_CONFIGS if p.name in wanted]
    results = {p.name: _launch(p, ws, root) for p in configs if p.name in TWO_RANKS}
    with ThreadPoolExecutor(PARALLEL) as pool:
        singles = [p for p in configs if p.name not in TWO_RANKS]
        results.update(zip((p.name for p in singles), pool.map(lambda p: _launch(p, ws, root), singles)))
    return results


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("config", [p.name for p in TRAIN_CONFIGS])
def test_shipped_config_trains_two_steps(launches, config):
    res = launches[config]
    assert res.rc == 0, f"{config} exited {res.rc}; log tail:\n{tail(res.log, TAIL)}"
    assert f"world size {res.world}" in res.log, tail(res.log, TAIL)
    assert "Traceback" not in res.log, tail(res.log, TAIL)
    out = res.out
    metrics = _metrics(out)
    last_train = [m for m in metrics if "train/skipped_steps" in m]
    assert last_train and last_train[-1]["step"] == STEPS, metrics
    assert last_train[-1]["train/skipped_steps"] == 0, "an optimizer step was skipped (non-finite)"
    dev = [m for m in metrics if "dev/rougeL" in m]
    assert dev, f"{config}: no dev evaluation in {out / 'metrics.jsonl'}"
    assert (out / "checkpoints" / f"step_{STEPS}" / "COMPLETE").is_file()
    assert (out / "export" / "model.safetensors").is_file() and (out / "export" / "tokenizer.json").is_file()
    assert (out / "best" / "best.json").is_file()
    if (_tree(REPO / "configs" / config).get("method") or {}).get("name", "promptkd") == "promptkd":
        assert (out / "export" / "teacher_prompt" / "teacher_prompt.safetensors").is_file()
    if offloads_optimizer(_ds(REPO / "configs" / config)):
        # the CPU-only fallback is taken and says so (tests/unit/test_optim.py covers the CPU Adam branch)
        assert "torch AdamW on the CPU, not DeepSpeed's CPU Adam: no CUDA accelerator" in res.log


def test_every_config_is_launched_somewhere():
    """A config that is not a train run must name the test that launches it (and that test must exist)."""
    assert len(TRAIN_CONFIGS) >= 17, [p.name for p in TRAIN_CONFIGS]
    assert TWO_RANKS and len(TWO_RANKS) == 2, TWO_RANKS
    for path in CONFIGS:
        if path in TRAIN_CONFIGS:
            continue
        assert path.name in COVERED_ELSEWHERE, f"{path.name} is not a train run: launch it in a test, list it here"
        test_id, names_it = COVERED_ELSEWHERE[path.name]
        test_file, test_name = test_id.split("::")
        assert f"def {test_name}(" in (REPO / test_file).read_text(), test_id
        assert path.name in (REPO / names_it).read_text(), f"{names_it} does not launch {path.name}"
