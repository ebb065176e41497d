"""Multi-rank scenarios, run in ONE launch (imports + init cost ~10 s per launch).

    torchrun --nproc_per_node 2 tests/distributed/scenarios.py --out DIR [--only a,b]

Each scenario writes ``DIR/<name>.rank<r>.json``; tests/distributed/test_multirank.py
asserts on them. A scenario's exception is recorded and the next one runs.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import traceback
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from promptkd import distributed as dist  # noqa: E402
from promptkd.config import build_ds_config, load_config, with_overrides  # noqa: E402
from tests.fixtures.calls import CallCounter  # noqa: E402

OUT = ""
SHARED = ""
EVAL = {}  # --eval-ws / --eval-sets: the evaluation workspace of the eval_ranks scenario (test_eval_ranks.py)


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


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a test helper: the library never broadcasts objects)."""
    box = [obj]
    if dist.world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


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
    """(method, splits, tokenizer) through the project's run builder: 10 steps, rollout seed 100 + rank."""
    from promptkd.training.run import build_run as build

    run = build(with_overrides(cfg, {"method.name": method_name}), train=False, total_steps=10, rollout_seed=100)
    return run.method, run.splits, run.tokenizer


def rank_batches(splits, step: int, cfg) -> list:
    """Different examples (and prompt lengths) on each rank."""
    mbs, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    start = (step * dist.world_size() + dist.rank()) * mbs * ga
    # ranks also hold different numbers of prompts: rank r drops r rows from its last micro-batch
    items = splits.train[start:start + mbs * ga - dist.rank()]
    return [items[i:i + mbs] for i in range(0, len(items), mbs)]


# ----------------------------------------------------------------------------- scenarios

def promptkd_steps(ds_json: str, method: str = "promptkd", steps: int = 3, **extra) -> dict:
    cfg = tiny_cfg(ds_json, **extra)
    m, splits, tok = build_run(cfg, method)
    hook = eos_bias_hook(m.ctx.engine.module, tok.eos_token_id)
    out = {"lengths": [], "metrics": [], "prompt": [], "student": []}
    for step in range(steps):
        result = m.step(rank_batches(splits, step, cfg), step)
        out["metrics"].append(result.metrics)
        out["lengths"].append([r.response_lengths.tolist() for r in result.rollouts])
        if m.ctx.teacher is not None and m.ctx.teacher.prompt_length > 0:
            out["prompt"].append(digest(m.ctx.teacher.prompt))
        out["student"].append(digest(torch.cat([v.flatten() for v in full_state(m.ctx.engine.module).values()])))
    hook.remove()
    out["changed"] = out["student"][0] != out["student"][-1]
    return out


def scenario_eval_ranks() -> dict:
    """Greedy stage=eval (student, prompted teacher) and stage=exposure on this world (eval_ranks.py); first, so
    that it runs in a process as fresh as a launch of its own. Skipped without --eval-ws."""
    from tests.distributed import eval_ranks

    if not EVAL:
        return {"skipped": True}
    out = os.path.join(OUT, "eval")  # this launch's own output dir
    return {"out": out, "exposure": eval_ranks.run(EVAL["ws"], out, EVAL["sets"])}


def scenario_promptkd_zero2() -> dict:
    return promptkd_steps("ds_configs/zero2.json")


def scenario_promptkd_zero3() -> dict:
    return promptkd_steps("ds_configs/zero3_tiny_test.json")


def scenario_rkl_zero3() -> dict:
    return promptkd_steps("ds_configs/zero3_tiny_test.json", method="rkl", steps=2)


def scenario_kd_sft_zero3() -> dict:
    out = {}
    for name in ("sft", "kd"):
        cfg = tiny_cfg("ds_configs/zero3_tiny_test.json", **{"method.name": name, "method.kd.ce_weight": 0.5})
        m, splits, _ = build_run(cfg, name)
        metrics = [m.step(rank_batches(splits, s, cfg), s).metrics for s in range(2)]
        out[name] = {"metrics": metrics,
                     "student": digest(torch.cat([v.flatten() for v in full_state(m.ctx.engine.module).values()]))}
    return out


def scenario_normalization() -> dict:
    """2 ranks x accumulation 2 == one process over all 8 sequences (SGD lr=1: update == -grad)."""
    import copy
    import dataclasses

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
    m.ctx = ctx = dataclasses.replace(ctx, engine=engine)
    m.prompt.optimizer = torch.optim.SGD([ctx.teacher.prompt], lr=1.0)
    m.prompt.scheduler = torch.optim.lr_scheduler.LambdaLR(m.prompt.optimizer, lambda _: 1.0)
    ref_prompt = ctx.teacher.prompt.detach().clone()

    def as_rollout(batch) -> Rollout:
        b = collate_full(batch, tok.pad_token_id)
        return Rollout(b["input_ids"], b["attention_mask"], b["loss_mask"], prompt_len=0)

    mine = seqs[dist.rank() * 4:(dist.rank() + 1) * 4]
    rollouts = [as_rollout(mine[:2]), as_rollout(mine[2:])]
    n_global = float(dist.all_reduce_sum(sum(float(r.loss_mask[:, 1:].sum()) for r in rollouts)))
    w = 0.5
    _, kept = m.prompt_update(rollouts, n_global, step=5)  # linear schedule at step 5 of 10: w = 0.5
    m.student_update(rollouts, n_global, kept)
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
    (prompt_loss(s_logits, prompted=prompted, teacher=base, mask=mask, reg_weight=w).total / n_total).backward()
    ref_prompt_delta = -theta.grad.detach().clone()
    with torch.no_grad():
        theta.copy_(ref_prompt + ref_prompt_delta)  # the updated prompt the student step saw
        t_logits = teacher_logits(ctx.teacher, full.input_ids, full.attention_mask, ctx.vocab_size, True)
    s_logits = lm_logits(ref_student, full.input_ids, full.attention_mask, ctx.vocab_size)
    (reverse_kl(s_logits, teacher=t_logits, mask=mask)[0] / n_total).backward()
    ref_after = {n: (p.detach() - p.grad).float() for n, p in ref_student.named_parameters()}
    student_err = max(float((student_after[n] - ref_after[n]).abs().max()) for n in ref_after)
    student_scale = max(float((ref_after[n] - p.detach()).abs().max()) for n, p in ref_student.named_parameters())
    return {"n_global": n_global, "n_total": n_total,
            "prompt_err": float((prompt_delta - ref_prompt_delta).abs().max()),
            "prompt_scale": float(ref_prompt_delta.abs().max()),
            "student_err": student_err, "student_scale": student_scale}


ZERO3_TEACHER = {"model.teacher.placement": "zero3", "model.teacher.deepspeed": "ds_configs/teacher_zero3_tiny_test.json"}


def scenario_zero3_student_zero3_teacher() -> dict:
    """Run with 2 and with 3 ranks: different prompt counts and lengths per rank, no hang."""
    return promptkd_steps("ds_configs/zero3_tiny_test.json", **ZERO3_TEACHER)


def _fixed_rollouts(splits, tok, step: int):
    from promptkd.data import collate_full
    from promptkd.rollout import Rollout

    out = []
    for mb in rank_batches(splits, step, tiny_cfg("ds_configs/zero2.json")):
        b = collate_full(mb, tok.pad_token_id)
        out.append(Rollout(b["input_ids"], b["attention_mask"], b["loss_mask"], prompt_len=0))
    return out


def scenario_teacher_placement() -> dict:
    """Prompted-teacher logits and prompt updates: zero3 teacher == replicated teacher."""
    from promptkd.methods.base import teacher_logits

    result = {}
    for placement, extra in (("replicated", {}), ("zero3", ZERO3_TEACHER)):
        m, splits, tok = build_run(tiny_cfg("ds_configs/zero2.json", **extra), "promptkd")
        ctx = m.ctx
        initial = ctx.teacher.prompt.detach().clone()
        params = list(ctx.teacher.base.parameters())
        # bytes this rank holds for the teacher's weights (a ZeRO-3 param keeps only its partition)
        held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in params)
        rollouts = _fixed_rollouts(splits, tok, step=0)
        with torch.no_grad():
            logits = teacher_logits(ctx.teacher, rollouts[0].input_ids, rollouts[0].attention_mask,
                                    ctx.vocab_size, use_prompt=True)
            plain = teacher_logits(ctx.teacher, rollouts[0].input_ids, rollouts[0].attention_mask,
                                   ctx.vocab_size, use_prompt=False)
        for step in range(2):
            rs = _fixed_rollouts(splits, tok, step)
            n = float(dist.all_reduce_sum(sum(float(r.loss_mask[:, 1:].sum()) for r in rs)))
            m.prompt_update(rs, n, step)
        result[placement] = {"logits": logits, "plain": plain, "prompt": ctx.teacher.prompt.detach().clone(),
                             "initial": initial, "bytes": held,
                             "partitioned": all(p.numel() == 0 for p in params)}
    rep, z3 = result["replicated"], result["zero3"]
    return {"logits_err": float((rep["logits"] - z3["logits"]).abs().max()),
            "plain_err": float((rep["plain"] - z3["plain"]).abs().max()),
            "logits_scale": float(rep["logits"].abs().max()),
            "prompt_err": float((rep["prompt"] - z3["prompt"]).abs().max()),
            "prompt_moved": float((rep["prompt"] - rep["initial"]).abs().max()),
            "prompt_digest": digest(z3["prompt"]),
            "bytes_replicated": rep["bytes"], "bytes_zero3": z3["bytes"],
            "partitioned": [rep["partitioned"], z3["partitioned"]]}


def scenario_export_zero3() -> dict:
    """The export of a ZeRO-3 student loads with from_pretrained and matches the live engine."""
    from transformers import AutoModelForCausalLM

    from promptkd.training.checkpoint import export_student
    from promptkd.methods.base import lm_logits

    cfg = tiny_cfg("ds_configs/zero3_tiny_test.json")
    m, splits, tok = build_run(cfg, "promptkd")
    m.step(rank_batches(splits, 0, cfg), 0)
    out = os.path.join(SHARED, "export_zero3")
    export_student(m.ctx.engine, tok, out)
    batch = _fixed_rollouts(splits, tok, step=1)[0]
    batch = broadcast_object((batch.input_ids, batch.attention_mask))  # the same input everywhere
    engine = m.ctx.engine
    engine.module.eval()
    with torch.no_grad():
        live = lm_logits(engine.module, batch[0], batch[1], m.ctx.vocab_size)
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        again = lm_logits(loaded, batch[0], batch[1], m.ctx.vocab_size)
    return {"err": float((live - again).abs().max()), "scale": float(live.abs().max())}


# ----------------------------------------------------------------------------- baselines (issue 5)

ZERO3 = "ds_configs/zero3_tiny_test.json"


def student_digest(m) -> str:
    return digest(torch.cat([v.flatten() for v in full_state(m.ctx.engine.module).values()]))


def run_steps(m, splits, cfg, steps: int, first: int = 0) -> dict:
    out = {"metrics": [], "student": [], "lengths": []}
    for step in range(first, first + steps):
        result = m.step(rank_batches(splits, step, cfg), step)
        out["metrics"].append(result.metrics)
        out["student"].append(student_digest(m))
        out["lengths"].append([r.response_lengths.tolist() for r in result.rollouts])
    return out


def baseline_run(method: str, steps: int = 2, **extra) -> tuple:
    cfg = tiny_cfg(ZERO3, **{"method.name": method, **extra})
    m, splits, tok = build_run(cfg, method)
    hook = eos_bias_hook(m.ctx.engine.module, tok.eos_token_id)
    out = run_steps(m, splits, cfg, steps)
    hook.remove()
    return m, splits, cfg, out


def scenario_imitkd_tvd_zero3() -> dict:
    """ImitKD (forward KL on student samples) and its on-policy TVD variant."""
    import dataclasses

    m, splits, cfg, imitkd = baseline_run("imitkd")
    # same engine, continued: only the divergence (and chunking) change
    m.ctx = dataclasses.replace(m.ctx, opts=dataclasses.replace(m.ctx.opts, divergence="tvd"), chunk=8)
    hook = eos_bias_hook(m.ctx.engine.module, m.ctx.eos_id)
    tvd = run_steps(m, splits, cfg, 2, first=2)
    hook.remove()
    return {"imitkd": imitkd, "tvd": tvd}


def scenario_gkd_zero3() -> dict:
    # seed 7's shared draws are 0.813, 0.943: with lambda 0.9 step 0 is on-policy, step 1 ground truth
    m, _, _, out = baseline_run("gkd", **{"method.gkd.lmbda": 0.9, "method.gkd.beta": 0.3})
    out["rollout_generator"] = digest(m.ctx.generator.get_state())  # differs per rank
    return out


def scenario_distillm_zero3() -> dict:
    """Fresh, replay and ground-truth steps; buffer survives state_dict and a real checkpoint."""
    from promptkd.training import checkpoint
    from promptkd.methods.distillm import DistiLLM

    # seed 44's draws (u_student, u_replay): (.14, .52) fresh, (.09, .28) replay, (.97, .93) ground truth
    m, _, _, out = baseline_run("distillm", steps=3, seed=44, **{
        "method.distillm.init_prob": 0.5, "method.distillm.replay_ratio": 0.5, "method.distillm.window": 1,
        "method.distillm.prob_step": 0.1, "method.distillm.replay_capacity": 4, "method.distillm.loss": "sfkl"})
    buffer = list(m.buffer.items)
    state = m.state_dict()
    expected_draws = peek_draws(m)
    restored = DistiLLM(m.ctx)
    restored.load_state_dict(state)
    run_dir = os.path.join(SHARED, "distillm_ckpt")
    gen = checkpoint.GeneratorState(m.ctx.generator)
    path = checkpoint.save(run_dir, 3, m.ctx.engine, {"trainer": checkpoint.Snapshot({"step": 3}), "method": m},
                           {"rng": checkpoint.ProcessRNG(), "generator": gen})
    from_disk = DistiLLM(m.ctx)
    checkpoint.load(path, m.ctx.engine, {"method": from_disk}, {"rng": checkpoint.ProcessRNG(), "generator": gen})
    out.update({
        "buffer": digest_items(buffer), "buffer_len": len(buffer),
        "restored_buffer": digest_items(list(restored.buffer.items)),
        "disk_buffer": digest_items(list(from_disk.buffer.items)),
        "phi": m.phi, "restored_phi": restored.phi, "disk_phi": from_disk.phi,
        "draws": expected_draws, "restored_draws": restored.draws.draw(2),
        "disk_draws": from_disk.draws.draw(2)})
    return out


def peek_draws(m) -> list[float]:
    """The method's next two shared draws, without advancing its stream."""
    state = m.draws.state_dict()
    values = m.draws.draw(2)
    m.draws.load_state_dict(state)
    return values


def digest_items(items: list[dict]) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def scenario_seqkd_zero3() -> dict:
    """Teacher generations: cached, reused by a rerun, and rank-synchronous when only one rank misses."""
    from promptkd.methods.seqkd import SeqKD

    cache_dir = os.path.join(SHARED, "seqkd_cache")
    cfg = tiny_cfg(ZERO3, **{"method.name": "seqkd", "method.seqkd.cache_dir": cache_dir})
    m, splits, tok = build_run(cfg, "seqkd")
    hook = eos_bias_hook(m.ctx.teacher.base, tok.eos_token_id)  # teacher answers of different lengths
    calls = CallCounter(m, "_teacher_generate")  # teacher decode loops (a synced no-op row counts too)
    out = {"first": run_steps(m, splits, cfg, 2), "first_calls": calls.n, "first_generated": m.generated}
    dist.barrier()
    rerun = SeqKD.from_config(cfg, m.ctx)  # same settings: everything comes from disk
    calls = CallCounter(rerun, "_teacher_generate")
    out["rerun"] = run_steps(rerun, splits, cfg, 2)
    out["rerun_calls"] = calls.n
    # rank 0 replays its cached step 0 while rank 1 needs new examples: rank 0 must decode along
    partial = SeqKD.from_config(cfg, m.ctx)
    calls = CallCounter(partial, "_teacher_generate")
    batches = rank_batches(splits, 0 if dist.rank() == 0 else 2, cfg)
    out["partial_metrics"] = partial.step(batches, 2).metrics
    out["partial_calls"], out["partial_generated"] = calls.n, partial.generated
    out["student"] = student_digest(partial)
    hook.remove()
    return out


def scenario_minillm_zero3() -> dict:
    """Teacher-mixed rollouts plus the LM loss; the corpus position survives state_dict."""
    from promptkd.methods.minillm import MiniLLM

    corpus = os.path.join(SHARED, "minillm_corpus.txt")
    if dist.is_main():
        with open(corpus, "w") as fh:
            fh.writelines(f"pretraining document {i} is about the number {i * 7}\n" for i in range(20))
    dist.barrier()  # the config checks that the file exists
    m, _, m_cfg, out = baseline_run("minillm", **{"method.minillm.teacher_mix": 0.5,
                                                  "method.minillm.lm_coef": 0.5, "method.minillm.lm_data": corpus})
    state = m.state_dict()
    expected = m.corpus.next_indices(3)
    restored = MiniLLM.from_config(m_cfg, m.ctx)
    restored.load_state_dict(state)
    out.update({"consumed": state["lm_corpus"]["consumed"], "next_lm": expected,
                "restored_next_lm": restored.corpus.next_indices(3)})
    return out


def scenario_promptkd_ablations() -> dict:
    """The paper's ablations as config: guidance direction, reg schedule, prompt length and init."""
    import dataclasses

    from promptkd.methods.soft_prompt import SoftPrompt
    from promptkd.models.teacher import TeacherSpec, load_teacher

    base = tiny_cfg(ZERO3, **{"train.grad_accum": 1, "rollout.max_new_tokens": 8})
    m, splits, tok = build_run(base, "promptkd")
    ctx = m.ctx
    variants = {"student_teacher": {"guidance": "student_teacher"},
                "constant": {"reg_schedule": "constant", "reg_weight": 0.3},
                "off": {"reg_schedule": "off"},
                "random_p3": {"teacher": {"prompt_init": "random", "prompt_length": 3}}}
    hook = eos_bias_hook(ctx.engine.module, tok.eos_token_id)
    out = {}
    for i, (name, change) in enumerate(variants.items()):
        teacher_change = change.pop("teacher", None)
        section = dataclasses.replace(base.method.promptkd, **change)
        cfg = dataclasses.replace(base, method=dataclasses.replace(base.method, promptkd=section))
        if teacher_change:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, teacher=dataclasses.replace(cfg.model.teacher, **teacher_change)))
            teacher = load_teacher(TeacherSpec.for_training(cfg, cfg.model.teacher.prompt_length), tok)
            m.ctx = ctx = dataclasses.replace(ctx, teacher=teacher)
            m.prompt = SoftPrompt(ctx.teacher, cfg.optim.prompt, 10, cfg.train.grad_clip, "tiny")
        m.ctx = ctx = dataclasses.replace(ctx, opts=cfg.method.promptkd)
        before = ctx.teacher.prompt.detach().clone()
        metrics = m.step(rank_batches(splits, i, cfg), 5).metrics
        out[name] = {"metrics": metrics, "prompt_shape": list(ctx.teacher.prompt.shape),
                     "init": digest(before), "prompt": digest(ctx.teacher.prompt),
                     "prompt_changed": not torch.equal(before, ctx.teacher.prompt.detach()),
                     "student": student_digest(m)}
    hook.remove()
    return out


def count_full_forwards(module: torch.nn.Module, counter: dict, key: str):
    """Counts forwards over whole sequences (use_cache off), not the rollout's decode steps, and records under
    ``<key>_grad`` whether each ran with grad."""

    def hook(_m, _args, kwargs):
        if not kwargs.get("use_cache", False):
            counter[key] = counter.get(key, 0) + 1
            counter.setdefault(f"{key}_grad", []).append(torch.is_grad_enabled())

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def scenario_promptkd_shortcuts() -> dict:
    """Issue 7: the reused student forward is exact; the stale-target option saves a teacher forward."""
    out = {}
    variants = {"default": {}, "no_reuse": {"method.promptkd.reuse_student_forward": False},
                "dropout": {}, "stale": {"method.promptkd.stale_student_target": True}}
    for name, extra in variants.items():
        cfg = tiny_cfg(ZERO3, **extra)  # grad_accum 2: the kept forward is the first micro-batch's
        m, splits, tok = build_run(cfg, "promptkd")
        if name == "dropout":
            m.student_has_dropout = True  # as if dropout were on: a separate no-grad forward
        calls: dict = {}
        init = (student_digest(m), digest(m.ctx.teacher.prompt))
        hooks = [eos_bias_hook(m.ctx.engine.module, tok.eos_token_id),
                 count_full_forwards(m.ctx.engine.module, calls, "student"),
                 count_full_forwards(m.ctx.teacher.base, calls, "teacher")]
        res = run_steps(m, splits, cfg, 2)
        for h in hooks:
            h.remove()
        out[name] = {"init": init, "student": res["student"], "prompt": digest(m.ctx.teacher.prompt), "calls": calls,
                     "micro_batches": [len(x) for x in res["lengths"]], "metrics": res["metrics"]}
    return out


def save_dropout_gpt2(name: str, layers: int, hidden: int, vocab: int) -> str:
    """A tiny GPT-2 with dropout 0.1 saved as an HF dir: from_pretrained hands it over in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = os.path.join(SHARED, name)
    if dist.is_main() and not os.path.isdir(path):
        torch.manual_seed(len(name))
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                         resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
        GPT2LMHeadModel(cfg).save_pretrained(path)
    dist.barrier()
    return path


def record_modes(m) -> tuple[list, list, list]:
    """Hooks that log, per forward, (phase, model.training, dropout on, grad enabled) of student and teacher."""
    import contextlib

    ctx, current, student, teacher = m.ctx, ["none"], [], []
    timed = ctx.timer.phase

    @contextlib.contextmanager
    def phase(name):
        current.append(name)
        try:
            with timed(name):
                yield
        finally:
            current.pop()

    ctx.timer.phase = phase

    def dropout_on(model) -> bool:
        return any(d.training for d in model.modules() if isinstance(d, torch.nn.Dropout))

    def on_student(module, _args, _kwargs):
        student.append([current[-1], module.training, dropout_on(module), torch.is_grad_enabled()])

    def on_teacher(module, args, kwargs):
        prompted = bool(kwargs.get("use_prompt", args[2] if len(args) > 2 else True)) and module.prompt_length > 0
        teacher.append([current[-1], prompted, module.base.training, dropout_on(module.base),
                        torch.is_grad_enabled()])

    hooks = [ctx.engine.module.register_forward_pre_hook(on_student, with_kwargs=True)]
    if ctx.teacher is not None:
        hooks.append(ctx.teacher.register_forward_pre_hook(on_teacher, with_kwargs=True))
    return student, teacher, hooks


def scenario_train_eval_modes() -> dict:
    """Issue 11: the official code's train/eval modes, from step 1, with dropout-0.1 GPT-2 models."""
    tok_vocab = 500
    paths = {"model.student.path": save_dropout_gpt2("gpt2_student_dropout", 2, 32, tok_vocab),
             "model.teacher.path": save_dropout_gpt2("gpt2_teacher_dropout", 2, 64, tok_vocab),
             "data.max_length": 112, "data.max_prompt_length": 96}
    out = {}
    teacher_eval = {"method.promptkd.prompt_step_teacher_train": False}
    for label, method, extra in (("promptkd", "promptkd", {}), ("promptkd_teacher_eval", "promptkd", teacher_eval),
                                 ("imitkd", "imitkd", {})):
        cfg = tiny_cfg("ds_configs/zero2.json", **{"method.name": method, **paths, **extra})
        m, splits, tok = build_run(cfg, method)
        out[label + "_initially_training"] = m.ctx.engine.module.training  # from_pretrained: eval mode
        student, teacher, hooks = record_modes(m)
        run_steps(m, splits, cfg, 2)
        for h in hooks:
            h.remove()
        out[label] = {"student": sorted({tuple(x) for x in student}), "teacher": sorted({tuple(x) for x in teacher})}
    return out


def pinned_runs(fused_head: bool, around: Callable[[Any, int], Any] = lambda m, eos: contextlib.nullcontext()) -> dict:
    """10 steps of PromptKD (ZeRO-2, ZeRO-3) and ImitKD (ZeRO-3) on 2 ranks: every logged number and the final
    weights' digests. ``around(method, eos_id)``: a context the steps run in."""
    out = {}
    for label, ds_json, method in (("promptkd_zero2", "ds_configs/zero2.json", "promptkd"),
                                   ("promptkd_zero3", ZERO3, "promptkd"), ("imitkd_zero3", ZERO3, "imitkd")):
        cfg = tiny_cfg(ds_json, **{"method.name": method, "method.fused_head": fused_head})
        m, splits, tok = build_run(cfg, method)
        hook = eos_bias_hook(m.ctx.engine.module, tok.eos_token_id)
        with around(m, tok.eos_token_id):
            res = run_steps(m, splits, cfg, 10)
        hook.remove()
        out[label] = {"metrics": res["metrics"], "student": res["student"][-1],
                      "prompt": digest(m.ctx.teacher.prompt) if method == "promptkd" else None}
    return out


def scenario_pinned_numerics() -> dict:
    """Issue 12: the pinned runs, compared with tests/distributed/pinned_numerics.json. They pin the reference
    path: full logits (method.fused_head=false), as when the pins were made."""
    return pinned_runs(fused_head=False)


def scenario_pinned_numerics_fused() -> dict:
    """Issue 22: the pinned runs on the fused head (the default), compared with the pins to a tolerance."""
    from tests.distributed import fused_scenarios

    return fused_scenarios.pinned_numerics_fused()


# ----------------------------------------------------------------------------- the device-discipline checks (issue 19)
# They live in their own files and run here, in the same launch as everything else: a launch costs ~10 s of
# imports and init.

def scenario_export_gathers() -> dict:
    from tests.distributed import device_ranks

    return device_ranks.export_zero3(OUT)


def scenario_gather() -> dict:
    """Needs gather_scenarios.count_gathers() before the process group exists: main() installs it."""
    from tests.distributed import gather_scenarios

    return gather_scenarios.scenario_gather()


def scenario_gather_teacher() -> dict:
    from tests.distributed import gather_scenarios

    return gather_scenarios.scenario_gather_teacher()


def scenario_fused_head_zero3() -> dict:
    """Issue 22: the fused LM head at ZeRO-3 equals the logits path, and gathers the head once per loss."""
    from tests.distributed import fused_scenarios

    return fused_scenarios.scenario_fused_head_zero3()


def scenario_chat_zero3() -> dict:
    """chat_scenarios.py's PromptKD on a Qwen3 chat pair, student at ZeRO-3 with a ZeRO-3 teacher
    (tests/distributed/test_chat_families.py)."""
    from tests.distributed import chat_scenarios

    root = os.path.join(SHARED, "chat")
    if dist.is_main():
        os.makedirs(root, exist_ok=True)
        chat_scenarios.write_messages(root)
    dist.barrier()
    return chat_scenarios.zero3_promptkd(root, os.path.join(root, "chat.jsonl"))


def scenario_lora() -> dict:
    """tests/distributed/lora_scenarios.py's LoRA checks, in this launch (last: after every other scenario)."""
    from tests.distributed import lora_scenarios

    result: dict = {}
    for name, fn in lora_scenarios.SCENARIOS.items():
        result[name] = guarded(fn)
        dist.barrier()
    return result


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def guarded(fn: Callable[..., dict], *args: Any) -> dict:
    """``{"ok": True, **fn(*args)}``, or the failure with its traceback (recorded: the test reports it)."""
    try:
        return {"ok": True, **fn(*args)}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}


def record(out: str, name: str, result: dict) -> None:
    """This rank's ``<out>/<name>.rank<r>.json``, then a barrier (every rank is done with ``name``)."""
    with open(os.path.join(out, f"{name}.rank{dist.rank()}.json"), "w") as fh:
        json.dump(result, fh, default=str)
    dist.barrier()


def main() -> None:
    global OUT, SHARED
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="")
    parser.add_argument("--skip", default="")
    parser.add_argument("--eval-ws", default="", help="the eval_ranks scenario's workspace (ws.json)")
    parser.add_argument("--eval-sets", default="", help="its eval.sets (YAML list)")
    args = parser.parse_args()
    OUT = args.out
    if args.eval_ws:
        EVAL.update(ws=args.eval_ws, sets=args.eval_sets)
    names = [n for n in SCENARIOS if (not args.only or n in args.only.split(",")) and n not in args.skip.split(",")]
    if any(n.startswith("gather") for n in names):  # wraps torch.distributed's all-gathers: only a launch that counts them pays for it
        from tests.distributed import gather_scenarios

        gather_scenarios.count_gathers()
    dist.init(timeout_s=60)
    SHARED = broadcast_object(tempfile.mkdtemp(prefix="pkd_shared_") if dist.is_main() else None)
    prepare_shared()
    for name in names:
        record(OUT, name, guarded(SCENARIOS[name]))
    dist.shutdown(0)


if __name__ == "__main__":
    # run as the importable module: device_ranks and gather_scenarios import it by name, and must see the same
    # OUT and SHARED (a script's globals live in __main__, a second copy of this file)
    from tests.distributed import scenarios

    scenarios.main()
