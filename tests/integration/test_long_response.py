"""An 8k-token PromptKD step on CPU (issue 22, item 2): rollout, prompt step and student step at data.max_length
8192 through build_run, on the fused LM head (the default), with no tensor of more than one chunk of vocabulary
rows in either update (tests/integration/long_response_run.py; ~50 s on 2 free cores, most of it the 8k-token
decode)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_an_8k_token_promptkd_step_runs_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(["timeout", "400", sys.executable, str(REPO / "tests" / "integration" / "long_response_run.py"),
                           str(tmp_path)], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((tmp_path / "result.json").read_text())
    assert got["fused_head"]
    assert got["max_new_tokens"] == 8192 - 64
    assert got["response_tokens"] == got["max_new_tokens"] == got["metrics"]["tokens"]   # no early EOS
    assert got["seq_len"] == got["prompt_len"] + got["response_tokens"] >= 8150
    # neither update held [N, V] for the 8k response positions: one chunk of rows at most
    assert 0 < got["most_vocab_rows"] <= got["chunk"] < got["response_tokens"] // 4
    for key in ("prompt/loss", "prompt/guidance_kl", "loss/rkl", "prompt/grad_norm"):
        assert math.isfinite(got["metrics"][key]) and got["metrics"][key] > 0, key
    assert got["student_moved"] > 0 and got["prompt_moved"] > 0     # both updates happened
