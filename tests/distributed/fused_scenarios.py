"""2-rank ZeRO-3 checks of the fused LM head + loss (issue 22, item 1): method.fused_head on and off give the same
losses and the same updated weights (the partitioned head and the tied embedding included), and each loss gathers
the head once (not per chunk). Run as the scenario ``fused_head_zero3`` of tests/distributed/scenarios.py (the
session's one launch); tests/distributed/test_fused_ranks.py asserts on its output.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

ONE_HEAD = 2   # a GatheredParameters call of at most (weight, bias): the fused loss's head gather, not a whole model


@contextlib.contextmanager
def head_gathers(weights: list[torch.Tensor]) -> Iterator[list[int]]:
    """Counts the GatheredParameters calls that hold only a head (one count per weight in ``weights``)."""
    import deepspeed

    real = deepspeed.zero.GatheredParameters
    counts = [0] * len(weights)

    def counting(params, *args, **kwargs):
        ps = list(params) if isinstance(params, (list, tuple)) else [params]
        if len(ps) <= ONE_HEAD:
            for i, w in enumerate(weights):
                counts[i] += any(p is w for p in ps)
        return real(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = counting
    try:
        yield counts
    finally:
        deepspeed.zero.GatheredParameters = real


def first_step_grads(engine) -> dict[str, torch.Tensor]:
    """Fills with every parameter's full gradient (gathered, fp32) at the first optimizer step, just before it."""
    from deepspeed.utils import safe_get_full_grad

    grads: dict[str, torch.Tensor] = {}
    real_step = engine.step

    def step(*args, **kwargs):
        if not grads and engine.is_gradient_accumulation_boundary():
            for name, p in engine.module.named_parameters():   # a collective under ZeRO-3: every rank, same order
                grads[name] = safe_get_full_grad(p).detach().clone().float()
        return real_step(*args, **kwargs)

    engine.step = step
    return grads


def one_run(label: str, fused: bool, steps: int, ds_json: str = "", **extra) -> dict:
    from tests.distributed import scenarios as sc

    # Adam's first step moves a weight by lr·g/(|g| + eps): where |g| is near eps, it turns a 1e-12 difference of
    # gradients into lr·1e-12/eps of weight. eps = 1e-6 (not 1e-8) keeps that below 1e-6 at lr 1e-3; the
    # gradients themselves are compared too (``first_step_grads``), independent of the optimizer.
    cfg = sc.tiny_cfg(ds_json or sc.ZERO3, **{"method.fused_head": fused, "method.loss_chunk_size": 4, "optim.student.eps": 1e-6,
                                   **extra})
    m, splits, _ = sc.build_run(cfg, cfg.method.name)
    student = m.ctx.engine.module
    heads = [student.get_output_embeddings().weight, m.ctx.teacher.base.get_output_embeddings().weight]
    before = sc.full_state(student)
    grads = first_step_grads(m.ctx.engine)
    with head_gathers(heads) as counts:
        res = sc.run_steps(m, splits, cfg, steps)
    micro_batches = sum(len(sc.rank_batches(splits, s, cfg)) for s in range(steps))
    state = sc.full_state(student)
    prompt = m.ctx.teacher.prompt.detach().clone().float() if m.ctx.teacher.prompt_length else None
    out = {"metrics": res["metrics"], "state": state, "before": before, "grads": grads, "prompt": prompt, "student_gathers": counts[0],
           "teacher_gathers": counts[1], "micro_batches": micro_batches,
           "tied": student.get_output_embeddings().weight is student.get_input_embeddings().weight,
           "head_rows": int(state[next(n for n in state if "wte" in n or "lm_head" in n)].shape[0]),
           "teacher_partitioned": hasattr(heads[1], "ds_id"), "student_partitioned": hasattr(heads[0], "ds_id")}
    return out


def compare(label: str, steps: int, ds_json: str = "", **extra) -> dict:
    on, off = one_run(label, True, steps, ds_json, **extra), one_run(label, False, steps, ds_json, **extra)
    diffs = {n: float((on["state"][n] - off["state"][n]).abs().max()) for n in on["state"]}
    grad_diffs = {n: float((on["grads"][n] - off["grads"][n]).abs().max()) for n in on["grads"]}
    head = next(n for n in diffs if "lm_head" in n) if any("lm_head" in n for n in diffs) else \
        next(n for n in diffs if "wte" in n)
    return {
        "metrics_fused": on["metrics"], "metrics_plain": off["metrics"],
        "max_weight_diff": max(diffs.values()), "max_grad_diff": max(grad_diffs.values()),
        "grad_scale": max(float(g.abs().max()) for g in off["grads"].values()), "grads_compared": len(grad_diffs),
        "head_grad_diff": grad_diffs[head], "head_grad_scale": float(off["grads"][head].abs().max()),
        "head_name": head, "head_diff": diffs[head],
        "head_moved": float((on["state"][head] - on["before"][head]).abs().max()), "weights_compared": len(diffs),
        "prompt_diff": None if on["prompt"] is None else float((on["prompt"] - off["prompt"]).abs().max()),
        "fused_student_gathers": on["student_gathers"], "fused_teacher_gathers": on["teacher_gathers"],
        "plain_student_gathers": off["student_gathers"], "micro_batches": on["micro_batches"],
        "tied": on["tied"], "head_rows": on["head_rows"], "teacher_partitioned": on["teacher_partitioned"],
        "student_partitioned": on["student_partitioned"],
    }


def scenario_fused_head_zero3() -> dict:
    """PromptKD with a Llama student (untied head), and ImitKD + PromptKD with a tied, padded GPT-2 student and a
    ZeRO-3 teacher: fused vs method.fused_head=false at ZeRO-3, fp32; and PromptKD (Llama; tied padded GPT-2) and
    GKD at ZeRO-1 and ZeRO-2."""
    from tests.distributed import scenarios as sc

    gpt2 = {"model.student.init": {"arch": "gpt2", "layers": 2, "hidden": 32, "heads": 4, "vocab_multiple": 96},
            **sc.ZERO3_TEACHER}
    gpt2_plain_teacher = {k: v for k, v in gpt2.items() if k.startswith("model.student")}
    return {"promptkd_llama": compare("promptkd_llama", 2, **{"method.name": "promptkd"}),
            "promptkd_gpt2_tied": compare("promptkd_gpt2_tied", 1, **{"method.name": "promptkd", **gpt2}),
            "imitkd_gpt2_tied": compare("imitkd_gpt2_tied", 1, **{"method.name": "imitkd", **gpt2}),
            # ZeRO-1/2: the head is whole on every rank (no gather), its gradient reduced by DeepSpeed's buckets
            "promptkd_llama_zero1": compare("promptkd_llama_zero1", 2, "ds_configs/zero1.json",
                                            **{"method.name": "promptkd"}),
            "promptkd_gpt2_tied_zero2": compare("promptkd_gpt2_tied_zero2", 2, "ds_configs/zero2.json",
                                                **{"method.name": "promptkd", **gpt2_plain_teacher}),
            "gkd_llama_zero2": compare("gkd_llama_zero2", 1, "ds_configs/zero2.json", **{"method.name": "gkd"})}


@contextlib.contextmanager
def eos_bias_in_the_head(m, eos_id: int, bias: float = 5.0) -> Iterator[None]:
    """The pinned runs' ``eos_bias_hook`` (+bias on the student's EOS logit), for the fused loss too.

    The hook acts on the head's output, which the fused path never makes: it still steers the rollouts (they
    keep the logits path), but the fused loss would see the student's logits without it. The pins were made
    with it in the loss, so here the student's head gets it as a bias vector (bias at EOS, 0 elsewhere), which
    is what the hook adds: ``hidden @ W.T + b`` in the fused loss.
    """
    from promptkd.methods import fused
    from promptkd.models.forward import output_head

    real = fused.head_params
    student_head = output_head(m.ctx.engine)

    @contextlib.contextmanager
    def with_bias(model):
        with real(model) as (weight, b):
            if output_head(model) is not student_head:
                yield weight, b
                return
            assert b is None  # a head without a bias (Llama): the hook's +bias is all there is
            vec = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            vec[eos_id] = bias
            yield weight, vec

    fused.head_params = with_bias
    try:
        yield
    finally:
        fused.head_params = real


def pinned_numerics_fused() -> dict:
    from tests.distributed import scenarios as sc

    return sc.pinned_runs(fused_head=True, around=eos_bias_in_the_head)
