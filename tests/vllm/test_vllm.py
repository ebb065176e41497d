"""rollout.engine=vllm (runs where vLLM is installed: `bash scripts/install.sh --vllm`, then
`.venv-vllm/bin/python -m pytest tests/vllm`; skipped elsewhere)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import cli_env

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
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
                                 "sampled_repeatable", "prompt_len_like_hf", "student_moved", "export_loads"])
def test_vllm_engine(checks, key):
    assert checks[key] is True, checks
