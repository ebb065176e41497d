"""Chat families (issue 21): every method one step on tiny Qwen3 / Qwen2 / Llama-3 with chat templates (a one-rank
launch), and PromptKD at ZeRO-3 with a ZeRO-3 teacher on 2 ranks (Qwen3: the ``chat_zero3`` scenario of the
session's 2-rank scenario launch). Scenarios: chat_scenarios.py."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from promptkd.config import METHOD_NAMES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tests", "distributed", "chat_scenarios.py")
FAMILIES = ("qwen3", "qwen2", "llama3")
END = {"qwen3": "<|im_end|>", "qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}


def _start(out, nproc: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = ["timeout", "900", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", SCRIPT, "--out", str(out)]
    with open(os.path.join(out, "launch.log"), "w") as log:  # a file, not a pipe: nobody reads it while they run
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _loader(out, nproc: int, rc: int, log: str):
    def load(name: str) -> list[dict]:
        assert rc == 0, log[-8000:]
        ranks = []
        for r in range(nproc):
            with open(os.path.join(out, f"{name}.rank{r}.json")) as fh:
                data = json.load(fh)
            assert data["ok"], data.get("trace")
            ranks.append(data)
        return ranks

    return load


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """The one-rank launch: every method on each family."""
    out = tmp_path_factory.mktemp("chat_families")
    rc = _start(out, 1).wait()
    return _loader(out, 1, rc, open(os.path.join(out, "launch.log")).read())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_takes_a_step_on_each_chat_family(families, family, method):
    (r,) = families(f"{family}_{method}")
    assert r["loss_finite"] and any(k.startswith("loss/") for k in r["metrics"]), r["metrics"]
    # distributions over the tokenizer's tokens: a padded teacher (64-row multiple) beside an unpadded student
    assert r["vocab"] == r["tokenizer"] == r["student_rows"] == 500
    if method != "sft":
        assert r["teacher_rows"] == 512
    assert r["stops"][0] == END[family] and r["response_end"] == END[family]
    if family == "llama3":
        assert r["stops"] == ["<|eot_id|>", "<|end_of_text|>"]   # end of turn first, then the model's EOS
    assert all(r["rollouts_end_on_stop"])
    if method in ("promptkd", "rkl", "imitkd", "minillm"):
        assert r["rollouts_end_on_stop"], "on-policy methods sample rollouts"


def test_promptkd_with_the_prompt_after_bos(families):
    (r,) = families("llama3_promptkd_after_bos")
    (start,) = families("llama3_promptkd")
    assert r["loss_finite"] and all(r["rollouts_end_on_stop"])
    # the teacher reads the prompt elsewhere: another guidance KL
    assert r["metrics"]["prompt/guidance_kl"] != start["metrics"]["prompt/guidance_kl"]


def test_promptkd_zero3_with_zero3_teacher_on_a_chat_family(scenario_results):
    r0, r1 = scenario_results("chat_zero3")
    assert r0["teacher_partitioned"] and r0["student_partitioned"]
    assert r0["prompts"] == r1["prompts"] and r0["prompts"][0] != r0["prompts"][1]   # one prompt, and it moves
    assert r0["metrics"] == r1["metrics"]
    assert all(math.isfinite(v) for m in r0["metrics"] for v in m.values())
    lengths = [n for step in r0["lengths"] + r1["lengths"] for rows in step for n in rows]
    assert len(set(lengths)) > 1, "the end-of-turn bias should end rows at different lengths"
