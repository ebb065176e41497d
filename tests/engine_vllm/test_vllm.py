"""rollout.engine=vllm (runs where vLLM is installed: `bash scripts/install.sh --vllm`, then
`.venv-vllm/bin/python -m pytest tests/engine_vllm`; skipped elsewhere)."""
from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures.cli import cli_env

_SPEC = importlib.util.find_spec("vllm")
pytestmark = pytest.mark.skipif(_SPEC is None or _SPEC.origin in (None, "namespace"),
                                reason="vLLM is not installed here (bash scripts/install.sh --vllm)")
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm")
    env = cli_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, str(HERE / "vllm_checks.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "vllm_checks.json").read_text())


@pytest.mark.parametrize("key", ["initial_greedy_equal", "after_step_greedy_equal", "sampled_masks_ok",
                                 "sampled_repeatable", "prompt_len_like_hf", "student_moved", "export_loads",
                                 "eval_greedy_answers_equal", "eval_greedy_rouge_equal", "eval_sampled_repeatable",
                                 "eval_sampled_seeds_differ"])
def test_vllm_engine(checks, key):
    assert checks[key] is True, checks


def test_vllm_engine_zero3_two_ranks(tmp_path):
    env = cli_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "vllm_checks.py"), "--zero3", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"vllm_zero3.rank{rank}.json").read_text())
        assert res == {"zero3_initial_greedy_equal": True, "zero3_after_step_greedy_equal": True}, (rank, res)


def test_kill_and_resume_with_vllm_is_exact(tmp_path):
    """SIGKILL after step 2, resume from its checkpoint: the same final weights as an uninterrupted run."""
    from safetensors.torch import load_file

    from tests.fixtures.cli import MAIN
    from tests.fixtures.tiny_run import write_tiny_run

    cfg = write_tiny_run(tmp_path, steps=4, save_interval=1)
    common = ["--config", str(cfg), "deepspeed=ds_configs/zero0.json", "method.name=rkl", "rollout.engine=vllm",
              "model.student.init={arch: llama, layers: 2, hidden: 64, heads: 2}"]  # head_dim 32 for vLLM's CPU kernels

    def launch(out, *extra, **env_extra):
        env = cli_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", **env_extra)
        return subprocess.run([sys.executable, str(MAIN), *common, f"output.dir={out}", *extra], env=env,
                              capture_output=True, text=True, timeout=600)

    full = launch(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = launch(tmp_path / "killed", PROMPTKD_FAULT="sigkill@step=3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]  # killed at the start of step 3
    resumed = launch(tmp_path / "killed", "output.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'killed' / 'checkpoints' / 'step_2'}" in resumed.stdout + resumed.stderr
    a = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quickstart_pipeline_with_vllm_engines(tmp_path):
    """The quickstart at toy size with rollout.engine=vllm eval.engine=vllm (head_dim 32 for vLLM's CPU kernels)."""
    from tests.fixtures.cli import MAIN, REPO

    out = tmp_path / "qs"
    env = cli_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([
        sys.executable, str(MAIN), "--config", str(REPO / "configs" / "quickstart.yaml"), f"output.dir={out}",
        "rollout.engine=vllm", "eval.engine=vllm", "eval.no_repeat_ngram_size=0",
        "pipeline.teacher_sft_steps=2", "pipeline.student_sft_steps=3", "train.max_steps=2", "eval.dev_interval=1",
        "data.synthetic.n_train=64", "data.synthetic.n_dev=6", "data.synthetic.n_test=8", "train.micro_batch_size=4",
        "rollout.max_new_tokens=6", "eval.max_new_tokens=6", "eval.seeds=[10,20]",
        "model.teacher.init={arch: llama, layers: 2, hidden: 64, heads: 2}",
        "model.student.init={arch: llama, layers: 1, hidden: 32, heads: 1}"],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    sampled = json.loads((out / "eval" / "results.json").read_text())["models"]
    assert len(sampled) == 4 and "teacher + learned prompt" in sampled  # the prompted teacher: on the hf engine
    assert "starting a colocated vLLM engine" in proc.stdout + proc.stderr
    assert (out / "distill" / "export" / "teacher_prompt" / "teacher_prompt.safetensors").is_file()


def test_seqkd_teacher_through_vllm(tmp_path):
    env = cli_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, str(HERE / "vllm_checks.py"), "--seqkd", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "vllm_seqkd.json").read_text())
    assert res == {"seqkd_greedy_equal": True, "seqkd_own_cache": True, "seqkd_cached": True}, res
