"""Multi-rank scenarios, run in ONE launch (imports + init cost ~10 s per launch).

    torchrun --nproc_per_node 2 tests/distributed/scenarios.py --out DIR [--only a,b]

Each scenario writes ``DIR/<name>.rank<r>.json``; tests/distributed/test_multirank.py
asserts on them. A scenario's exception is recorded and the next one runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from promptkd import distributed as dist  # noqa: E402
from promptkd.config import build_ds_config, load_config, with_overrides  # noqa: E402

OUT = ""
SHARED = ""


def tiny_cfg(ds_json: str, **extra):
    data = os.path.join(SHARED, "data")
    base = {
        "stage": "train", "deepspeed": ds_json, "seed": 7, "dist_timeout_s": 60,
        "tokenizer.path": os.path.join(SHARED, "tokenizer"),
        "data.train_file": os.path.join(data, "train.jsonl"), "data.dev_size": 0,
        "data.max_length": 128, "data.max_prompt_length": 96,
        "model.teacher.dtype": "fp32",
        "model.teacher.init": {"arch": "llama", "layers": 2, "hidden": 64, "heads": 4},
        "model.student.init": {"arch": "llama", "layers": 2, "hidden": 32, "heads": 4},
        "rollout.max_new_tokens": 16, "train.micro_batch_size": 3, "train.grad_accum": 2,
        "optim.student.warmup_steps": 0, "optim.prompt.warmup_steps": 0,
        "optim.student.lr": 1e-3, "optim.prompt.lr": 1e-3, "logging.progress_bar": False,
    }
    base.update(extra)
    return with_overrides(load_config(None, ["stage=train", f"data.train_file={base['data.train_file']}"]), base)


def prepare_shared() -> None:
    from promptkd.data import load_examples, make_synthetic_splits, train_tokenizer

    if dist.is_main():
        files = make_synthetic_splits(os.path.join(SHARED, "data"), 200, 10, 23, seed=3)
        texts = [e.prompt + " " + e.references[0] for e in load_examples(files["train"])]
        train_tokenizer(texts, 500, os.path.join(SHARED, "tokenizer"))
    dist.barrier()


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) copies of every parameter, also under ZeRO-3."""
    import deepspeed

    params = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {n: p.detach().clone().float() for n, p in params}


def eos_bias_hook(module: torch.nn.Module, eos_id: int, bias: float = 5.0):
    """Make EOS likely so sampled lengths differ between rows and ranks."""
    head = module.get_output_embeddings()

    def hook(_m, _inp, out):
        out = out.clone()
        out[..., eos_id] += bias
        return out

    return head.register_forward_hook(hook)


def build_run(cfg, method_name: str):
    from promptkd.builders import (build_prompt_optimizer, build_student_engine, build_teacher, build_tokenizer,
                                   load_raw_splits, tokenize_splits, vocab_size)
    from promptkd.methods import METHODS, StepContext, build_method

    tok = build_tokenizer(cfg, OUT)
    splits = tokenize_splits(cfg, tok, load_raw_splits(cfg))
    cls = METHODS[method_name]
    teacher = build_teacher(cfg, tok, use_prompt=cls.trains_prompt) if cls.uses_teacher else None
    engine, ds = build_student_engine(cfg, tok, total_steps=10)
    popt = psched = None
    if teacher is not None and cls.trains_prompt:
        popt, psched = build_prompt_optimizer(cfg, teacher, 10)
    ctx = StepContext(cfg=cfg, engine=engine, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                      vocab_size=vocab_size(tok, teacher, engine.module), total_steps=10, teacher=teacher,
                      prompt_optimizer=popt, prompt_scheduler=psched,
                      generator=torch.Generator().manual_seed(100 + dist.rank()),
                      sync_rollout=ds["zero_optimization"]["stage"] == 3)
    return build_method(method_name, ctx), splits, tok


def rank_batches(splits, step: int, cfg) -> list:
    """Different examples (and prompt lengths) on each rank."""
    mbs, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    start = (step * dist.world_size() + dist.rank()) * mbs * ga
    # ranks also hold different numbers of prompts: rank r drops r rows from its last micro-batch
    items = splits.train[start:start + mbs * ga - dist.rank()]
    return [items[i:i + mbs] for i in range(0, len(items), mbs)]


# ----------------------------------------------------------------------------- scenarios

def promptkd_steps(ds_json: str, method: str = "promptkd", steps: int = 3) -> dict:
    cfg = tiny_cfg(ds_json)
    m, splits, tok = build_run(cfg, method)
    hook = eos_bias_hook(m.ctx.engine.module, tok.eos_token_id)
    out = {"lengths": [], "metrics": [], "prompt": [], "student": []}
    for step in range(steps):
        metrics = m.train_step(rank_batches(splits, step, cfg), step)
        out["metrics"].append(metrics)
        out["lengths"].append([r.response_lengths.tolist() for r in m.last_rollouts])
        if m.ctx.teacher is not None and m.ctx.teacher.prompt_length > 0:
            out["prompt"].append(digest(m.ctx.teacher.prompt))
        out["student"].append(digest(torch.cat([v.flatten() for v in full_state(m.ctx.engine.module).values()])))
    hook.remove()
    out["changed"] = out["student"][0] != out["student"][-1]
    return out


def scenario_promptkd_zero2() -> dict:
    return promptkd_steps("ds_configs/zero2.json")


def scenario_promptkd_zero3() -> dict:
    return promptkd_steps("ds_configs/zero3_tiny_test.json")


def scenario_rkl_zero3() -> dict:
    return promptkd_steps("ds_configs/zero3_tiny_test.json", method="rkl", steps=2)


def scenario_kd_sft_zero3() -> dict:
    out = {}
    for name in ("sft", "kd"):
        cfg = tiny_cfg("ds_configs/zero3_tiny_test.json", **{"method.name": name, "method.kd_ce_weight": 0.5})
        m, splits, _ = build_run(cfg, name)
        metrics = [m.train_step(rank_batches(splits, s, cfg), s) for s in range(2)]
        out[name] = {"metrics": metrics,
                     "student": digest(torch.cat([v.flatten() for v in full_state(m.ctx.engine.module).values()]))}
    return out


def scenario_normalization() -> dict:
    """2 ranks x accumulation 2 == one process over all 8 sequences (SGD lr=1: update == -grad)."""
    import copy

    import deepspeed

    from promptkd.data import collate_full
    from promptkd.rollout import Rollout

    cfg = tiny_cfg("ds_configs/zero2.json", **{"train.micro_batch_size": 2, "train.grad_accum": 2,
                                               "train.grad_clip": 0.0})
    m, splits, tok = build_run(cfg, "promptkd")
    ctx = m.ctx
    seqs = splits.train[:8]
    # Re-create the engine with SGD(lr=1) so that an update *is* the gradient.
    model = ctx.engine.module
    ref_student = copy.deepcopy(model)
    ds = build_ds_config(cfg, dist.world_size())
    ds["zero_allow_untested_optimizer"] = True
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=ds)
    ctx.engine = engine
    ctx.prompt_optimizer = torch.optim.SGD([ctx.teacher.prompt], lr=1.0)
    ctx.prompt_scheduler = None
    ref_prompt = ctx.teacher.prompt.detach().clone()

    def as_rollout(batch) -> Rollout:
        b = collate_full(batch, tok.pad_token_id)
        return Rollout(b["input_ids"], b["attention_mask"], b["loss_mask"], prompt_len=0)

    mine = seqs[dist.rank() * 4:(dist.rank() + 1) * 4]
    rollouts = [as_rollout(mine[:2]), as_rollout(mine[2:])]
    n_global = float(dist.all_reduce_sum(sum(float(r.loss_mask[:, 1:].sum()) for r in rollouts)))
    w = 0.5
    m.prompt_update(rollouts, n_global, step=5)  # linear schedule at step 5 of 10: w = 0.5
    m.student_update(rollouts, n_global)
    prompt_delta = (ctx.teacher.prompt.detach() - ref_prompt)
    student_after = full_state(engine.module)

    # Reference on one process: all 8 sequences, loss summed then divided by the total token count.
    from promptkd.losses import prompt_loss, reverse_kl
    from promptkd.methods.base import lm_logits, teacher_logits

    full = as_rollout(seqs)
    mask = full.loss_mask[:, 1:]
    n_total = float(mask.sum())
    theta = ctx.teacher.prompt
    with torch.no_grad():
        theta.copy_(ref_prompt)
        s_logits = lm_logits(ref_student, full.input_ids, full.attention_mask, ctx.vocab_size)
        base = teacher_logits(ctx.teacher, full.input_ids, full.attention_mask, ctx.vocab_size, False)
    theta.grad = None
    prompted = teacher_logits(ctx.teacher, full.input_ids, full.attention_mask, ctx.vocab_size, True)
    (prompt_loss(prompted, s_logits, base, mask, reg_weight=w).total / n_total).backward()
    ref_prompt_delta = -theta.grad.detach().clone()
    with torch.no_grad():
        theta.copy_(ref_prompt + ref_prompt_delta)  # the updated prompt the student step saw
        t_logits = teacher_logits(ctx.teacher, full.input_ids, full.attention_mask, ctx.vocab_size, True)
    s_logits = lm_logits(ref_student, full.input_ids, full.attention_mask, ctx.vocab_size)
    (reverse_kl(s_logits, t_logits, mask)[0] / n_total).backward()
    ref_after = {n: (p.detach() - p.grad).float() for n, p in ref_student.named_parameters()}
    student_err = max(float((student_after[n] - ref_after[n]).abs().max()) for n in ref_after)
    student_scale = max(float((ref_after[n] - p.detach()).abs().max()) for n, p in ref_student.named_parameters())
    return {"n_global": n_global, "n_total": n_total,
            "prompt_err": float((prompt_delta - ref_prompt_delta).abs().max()),
            "prompt_scale": float(ref_prompt_delta.abs().max()),
            "student_err": student_err, "student_scale": student_scale}


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def main() -> None:
    global OUT, SHARED
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    OUT = args.out
    dist.init(timeout_s=60)
    SHARED = dist.broadcast_object(tempfile.mkdtemp(prefix="pkd_shared_") if dist.is_main() else None)
    prepare_shared()
    names = [n for n in SCENARIOS if not args.only or n in args.only.split(",")]
    for name in names:
        try:
            result = {"ok": True, **SCENARIOS[name]()}
        except Exception as exc:  # recorded, the test reports it
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        with open(os.path.join(OUT, f"{name}.rank{dist.rank()}.json"), "w") as fh:
            json.dump(result, fh, default=str)
        dist.barrier()
    dist.shutdown(0)


if __name__ == "__main__":
    main()
