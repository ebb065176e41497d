"""2-rank ZeRO-3 checks of gathering the student once per decode loop (issue 19, item 3).

Run as the scenario ``gather`` of tests/distributed/scenarios.py (one launch for the session); test_gather.py
asserts on its ``gather.rank<r>.json``. The parameter
all-gathers are counted by wrapping torch.distributed's all-gather functions before the process
group exists (DeepSpeed's comm backend keeps references to them).
"""
from __future__ import annotations

import dataclasses
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch.distributed as tdist  # noqa: E402

GATHERS = {"n": 0}


def count_gathers() -> None:
    for name in ("all_gather_into_tensor", "all_gather", "_all_gather_base"):
        fn = getattr(tdist, name, None)
        if fn is None:
            continue

        def wrapper(*args, __fn=fn, **kwargs):
            GATHERS["n"] += 1
            return __fn(*args, **kwargs)

        setattr(tdist, name, wrapper)


def rollouts(m, batches, policy: str, seed: int) -> tuple[list[list[list[int]]], int, int]:
    """Rollout token ids of ``batches`` under gather ``policy``, the all-gathers they cost and the decode steps."""
    from promptkd.methods.base import student_rollout

    m.ctx = dataclasses.replace(m.ctx, gather_student=policy)
    m.ctx.generator.manual_seed(seed)
    before = GATHERS["n"]
    out, steps = [], 0
    for mb in batches:
        r = student_rollout(m.ctx, mb)
        out.append(r.input_ids.tolist())
        steps += r.input_ids.shape[1] - r.prompt_len
    return out, GATHERS["n"] - before, steps


def scenario_gather() -> dict:
    from promptkd.rollout import SamplingParams
    from promptkd.training.run import dev_eval_fn
    from promptkd.config import EvalConfig
    from tests.distributed import scenarios as sc

    cfg = sc.tiny_cfg(sc.ZERO3)
    m, splits, tok = sc.build_run(cfg, "rkl")
    batches = sc.rank_batches(splits, 0, cfg)  # one step: 2 micro-batches per rank, each rank its own prompts
    out: dict = {}
    hook = None
    for mode, sampling in (("greedy", SamplingParams(max_new_tokens=16, do_sample=False)),
                           ("sampled", m.ctx.sampling)):
        m.ctx = dataclasses.replace(m.ctx, sampling=sampling)
        if mode == "sampled":  # likely EOS: rows and ranks stop at different lengths
            hook = sc.eos_bias_hook(m.ctx.engine.module, tok.eos_token_id, bias=3.0)
        for policy in ("never", "always", "auto"):
            ids, gathers, steps = rollouts(m, batches, policy, seed=123)
            out[f"{mode}_{policy}"] = {"ids": ids, "gathers": gathers, "decode_steps": steps}
    ev = EvalConfig(batch_size=3, max_new_tokens=12)
    before = GATHERS["n"]
    out["dev_eval"] = dev_eval_fn(ev, m.ctx.engine, tok, m.ctx.vocab_size, splits.train[:8])(0)
    out["dev_eval_gathers"] = GATHERS["n"] - before
    out["n_params"] = len(list(m.ctx.engine.module.parameters()))
    out["released"] = all(p.ds_status.name == "NOT_AVAILABLE" for p in m.ctx.engine.module.parameters())
    hook.remove()
    # training still works after a gathered rollout (the weights were partitioned again)
    result = m.step(sc.rank_batches(splits, 3, cfg), 3)
    out["loss_after"] = result.metrics["loss/rkl"]
    return out


def _teacher_loops(m, batches, policy: str, decode) -> tuple[list[list[list[int]]], int]:
    """Token ids of ``decode(mb)`` over ``batches`` with ``policy`` for every decoding model, and its all-gathers."""
    m.ctx = dataclasses.replace(m.ctx, gather_student=policy)
    m.ctx.generator.manual_seed(321)
    before = GATHERS["n"]
    ids = [decode(mb).input_ids.tolist() for mb in batches]
    return ids, GATHERS["n"] - before


def scenario_gather_teacher() -> dict:
    """A ZeRO-3 teacher that decodes (MiniLLM's mixed rollouts, SeqKD's answers) is gathered once per loop."""
    from promptkd.methods.minillm import mixed_rollout
    from tests.distributed import scenarios as sc

    out: dict = {}
    for method in ("minillm", "seqkd"):
        extra = {"method.minillm.teacher_mix": 0.5} if method == "minillm" else {
            "method.seqkd.cache_dir": os.path.join(sc.SHARED, "seqkd_gather_cache")}
        cfg = sc.tiny_cfg(sc.ZERO3, **{"method.name": method, **sc.ZERO3_TEACHER, **extra})
        m, splits, _tok = sc.build_run(cfg, method)
        batches = sc.rank_batches(splits, 0, cfg)
        decode = (lambda mb: mixed_rollout(m.ctx, mb, 0.5)) if method == "minillm" else m._teacher_generate
        # ZeRO-3's hooks on the teacher that each decoded token's forward meets (our own hook is not one of them)
        offload = m.ctx.teacher.zero3_engine.optimizer
        seen: list[int] = []
        probe = m.ctx.teacher.base.register_forward_pre_hook(lambda *_: seen.append(len(offload.forward_hooks)))
        hooks_before = len(offload.forward_hooks)
        for policy in ("never", "always"):
            seen.clear()
            ids, gathers = _teacher_loops(m, batches, policy, decode)
            out[f"{method}_{policy}"] = {"ids": ids, "gathers": gathers, "zero3_hooks_seen": sorted(set(seen))}
        probe.remove()
        out[f"{method}_zero3_hooks"] = [hooks_before, len(offload.forward_hooks)]
        out[f"{method}_teacher_params"] = len(list(m.ctx.teacher.parameters()))
        out[f"{method}_student_params"] = len(list(m.ctx.engine.module.parameters()))
        out[f"{method}_released"] = all(p.ds_status.name == "NOT_AVAILABLE" for p in m.ctx.teacher.parameters()
                                        if hasattr(p, "ds_id"))
        # training still works after the gathered loops (the teacher was partitioned again)
        m.ctx = dataclasses.replace(m.ctx, gather_student="auto")
        loss_key = "loss/minillm_kl" if method == "minillm" else "loss/ce"
        out[f"{method}_loss_after"] = m.step(sc.rank_batches(splits, 1, cfg), 1).metrics.get(loss_key)
    return out
