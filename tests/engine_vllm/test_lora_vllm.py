"""LoRA students with rollout.engine=vllm: the engine gets merged weights (runs where vLLM is installed)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import cli_env

_SPEC = importlib.util.find_spec("vllm")
pytestmark = pytest.mark.skipif(_SPEC is None or _SPEC.origin in (None, "namespace"),
                                reason="vLLM is not installed here (bash scripts/install.sh --vllm)")
HERE = Path(__file__).resolve().parent


def test_lora_student_rollouts_through_vllm_use_merged_weights(tmp_path):
    env = cli_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, str(HERE / "lora_vllm_checks.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "lora_vllm.json").read_text())
    assert res == {"initial_greedy_equal": True, "adapters_moved": True, "base_unchanged": True,
                   "after_steps_greedy_equal": True}, res
