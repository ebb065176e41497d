"""Chat-family scenarios (issue 21):

    torchrun --nproc_per_node 1 tests/distributed/chat_scenarios.py --out DIR

families: for Qwen3, Qwen2 and Llama-3 (tiny models from config, a tokenizer trained here with the family's
special tokens and chat template, messages-format data rendered by it), every method takes one step. The
teacher's embedding is padded to a multiple of 64 rows, the student's is not: distributions are taken over
the tokenizer's tokens. Each result is written to ``DIR/<name>.rank<r>.json``. ``zero3_promptkd`` (PromptKD on
2 ranks, student at ZeRO-3 and a ZeRO-3 teacher, on Qwen3) is the ``chat_zero3`` scenario of the session's
2-rank scenario launch (tests/distributed/scenarios.py). tests/distributed/test_chat_families.py reads both.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from promptkd import distributed as dist  # noqa: E402
from promptkd.config import METHOD_NAMES, load_config, with_overrides  # noqa: E402
from tests.distributed import scenarios as sc  # noqa: E402

FAMILIES = {"qwen3": "chatml", "qwen2": "chatml", "llama3": "llama3"}
ZERO3 = "ds_configs/zero3_tiny_test.json"
ZERO3_TEACHER = {"model.teacher.placement": "zero3",
                 "model.teacher.deepspeed": "ds_configs/teacher_zero3_tiny_test.json"}


def write_messages(root: str) -> str:
    """The synthetic suite as messages records (every third with a system turn, every fifth two user turns)."""
    from promptkd.data import load_examples, make_synthetic_splits

    files = make_synthetic_splits(os.path.join(root, "syn"), 60, 4, 4, seed=3)
    path = os.path.join(root, "chat.jsonl")
    with open(path, "w") as fh:
        for i, ex in enumerate(load_examples(files["train"], template="none")):
            msgs = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
            if i % 5 == 0:
                msgs += [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]
            msgs += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.references[0]}]
            fh.write(json.dumps({"id": ex.id, "messages": msgs}) + "\n")
    return path


def family_cfg(root: str, data: str, family: str, ds_json: str = "ds_configs/zero0.json", **extra):
    from promptkd.data import load_examples, train_tokenizer

    tok_dir = os.path.join(root, f"tok_{family}")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")) and dist.is_main():
        texts = [" ".join(m["content"] for m in e.messages) + " " + e.references[0]
                 for e in load_examples(data, "messages", template="chat")]
        train_tokenizer(texts, 500, tok_dir, chat=FAMILIES[family])
    dist.barrier()
    values = {
        "stage": "train", "deepspeed": ds_json, "seed": 7, "dist_timeout_s": 60, "tokenizer.path": tok_dir,
        "data.train_file": data, "data.format": "messages", "data.template": "chat", "data.dev_size": 0,
        "data.max_length": 160, "data.max_prompt_length": 128,
        "data.template_kwargs": {"enable_thinking": False} if family == "qwen3" else {},
        "model.teacher.dtype": "fp32",
        "model.teacher.init": {"arch": family, "layers": 2, "hidden": 64, "heads": 4, "vocab_multiple": 64},
        "model.student.init": {"arch": family, "layers": 2, "hidden": 32, "heads": 4},
        "model.student.attn_implementation": "eager", "model.teacher.attn_implementation": "sdpa",
        "rollout.max_new_tokens": 12, "train.micro_batch_size": 3, "train.grad_accum": 1,
        "optim.student.warmup_steps": 0, "optim.prompt.warmup_steps": 0,
        "optim.student.lr": 1e-3, "optim.prompt.lr": 1e-3, "logging.progress_bar": False,
        "method.seqkd.cache_dir": os.path.join(root, f"seqkd_{family}"),
    }
    values.update(extra)
    return with_overrides(load_config(None, ["stage=train", f"data.train_file={data}"]), values)


def _ends(rollouts, stops: tuple[int, ...]) -> list[bool]:
    """Whether every row's last response token (in its loss mask) is a stop id."""
    out = []
    for r in rollouts:
        resp, mask = r.response_ids, r.loss_mask[:, r.prompt_len:]
        last = mask.sum(-1) - 1
        out += [int(resp[i, int(last[i])]) in stops for i in range(resp.shape[0]) if int(last[i]) >= 0]
    return out


def one_step(cfg, method: str) -> dict:
    from promptkd.training.run import build_run

    run = build_run(with_overrides(cfg, {"method.name": method}), train=False, total_steps=4, rollout_seed=100)
    m, tok = run.method, run.tokenizer
    stops = m.ctx.eos_id if isinstance(m.ctx.eos_id, tuple) else (m.ctx.eos_id,)
    start = dist.rank() * 3
    result = m.step([run.splits.train[start:start + 3]], 0)
    teacher_rows = m.ctx.teacher.base.get_input_embeddings().weight.shape[0] if m.ctx.teacher is not None else 0
    out = {"loss_finite": all(math.isfinite(float(v)) for k, v in result.metrics.items()
                              if isinstance(v, (int, float)) and "loss" in k),
           "metrics": {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))},
           "vocab": m.ctx.vocab_size, "tokenizer": len(tok), "teacher_rows": teacher_rows,
           "student_rows": m.ctx.engine.module.get_input_embeddings().weight.shape[0],
           "stops": tok.convert_ids_to_tokens(list(stops)),
           "rollouts_end_on_stop": _ends(result.rollouts or [], stops),
           "response_end": tok.convert_ids_to_tokens(run.splits.train[0].response_ids[-1])}
    if m.ctx.teacher is not None and m.ctx.teacher.prompt_length:
        out["prompt_norm"] = float(m.ctx.teacher.prompt.detach().float().norm())
    run.close()
    return out


def mode_families(root: str, data: str) -> dict[str, dict]:
    results = {}
    for family in FAMILIES:
        cfg = family_cfg(root, data, family)
        for method in METHOD_NAMES:
            results[f"{family}_{method}"] = lambda cfg=cfg, method=method: one_step(cfg, method)
    after_bos = family_cfg(root, data, "llama3", **{"model.teacher.prompt_position": "after_bos"})
    results["llama3_promptkd_after_bos"] = lambda: one_step(after_bos, "promptkd")
    return results


def zero3_promptkd(root: str, data: str) -> dict:
    cfg = family_cfg(root, data, "qwen3", ZERO3, **ZERO3_TEACHER)
    from promptkd.training.run import build_run

    run = build_run(with_overrides(cfg, {"method.name": "promptkd"}), train=False, total_steps=4, rollout_seed=100)
    m = run.method
    end = m.ctx.eos_id if isinstance(m.ctx.eos_id, int) else m.ctx.eos_id[0]
    # the end-of-turn token made likely: rows and ranks finish at different lengths (synchronous stopping)
    head = m.ctx.engine.module.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, _i, out: out.index_add(-1, torch.tensor([end]),
                                                                          torch.full_like(out[..., :1], 4.0)))
    prompts, losses, lengths = [], [], []
    for step in range(2):
        start = (step * dist.world_size() + dist.rank()) * 3
        res = m.step([run.splits.train[start:start + 3 - dist.rank()]], step)
        losses.append({k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))})
        prompts.append(float(m.ctx.teacher.prompt.detach().float().sum()))
        lengths.append([r.response_lengths.tolist() for r in res.rollouts])
    hook.remove()
    teacher_partitioned = any(hasattr(p, "ds_id") for p in m.ctx.teacher.base.parameters())
    student_partitioned = any(hasattr(p, "ds_id") for p in m.ctx.engine.module.parameters())
    run.close()
    return {"prompts": prompts, "metrics": losses, "lengths": lengths, "teacher_partitioned": teacher_partitioned,
            "student_partitioned": student_partitioned}


def main() -> None:
    """The families: every method one step on each chat family (one rank: tests/distributed/test_chat_families.py)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init(timeout_s=60)
    root = sc.broadcast_object(tempfile.mkdtemp(prefix="pkd_chat_") if dist.is_main() else None)
    if dist.is_main():
        write_messages(root)
    dist.barrier()
    for name, job in mode_families(root, os.path.join(root, "chat.jsonl")).items():
        sc.record(args.out, name, sc.guarded(job))
    dist.shutdown(0)


if __name__ == "__main__":
    main()
