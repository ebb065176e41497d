"""A LoRA student's rollouts through vLLM (merged weights synced) decode as the adapted student does.

    python tests/engine_vllm/lora_vllm_checks.py OUT_DIR     (in the vLLM venv, one process)

Writes ``OUT_DIR/lora_vllm.json``; tests/engine_vllm/test_lora_vllm.py asserts on it.
"""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from promptkd import distributed as dist  # noqa: E402
from tests.engine_vllm.vllm_checks import hf_greedy, same, tiny_run, vllm_greedy  # noqa: E402


def main(out_dir: str) -> None:
    dist.init(timeout_s=600)
    torch.manual_seed(0)
    run = tiny_run(out_dir, **{"model.student.lora.r": 8, "model.student.lora.alpha": 16.0})
    m, ctx = run.method, run.method.ctx
    module = ctx.engine.module
    base = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    batches = [run.splits.train[0:3], run.splits.train[3:6]]
    res = {"initial_greedy_equal": same(vllm_greedy(ctx, batches), hf_greedy(ctx, batches))}
    for step in range(3):  # optimizer steps with rollouts through vLLM; B moves off zero
        m.step(batches, step)
    b_max = max(float(p.abs().max()) for n, p in module.named_parameters() if ".lora_B." in n)
    res["adapters_moved"] = b_max > 0
    res["base_unchanged"] = all(torch.equal(p, base[n]) for n, p in module.named_parameters() if n in base)
    res["after_steps_greedy_equal"] = same(vllm_greedy(ctx, batches), hf_greedy(ctx, batches))
    with open(os.path.join(out_dir, "lora_vllm.json"), "w") as fh:
        json.dump(res, fh)
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1])
    dist.shutdown(0)
