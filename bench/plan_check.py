"""The memory planner against a real step: planned bytes per term vs measured (CPU or GPU).

    .venv/bin/python bench/plan_check.py                         # -> bench/results/plan_check.json
    torchrun --nproc_per_node 2 bench/plan_check.py --cases zero2_bf16,zero3_bf16

Each case builds a tiny PromptKD run through the project's run builder, plans it with
``promptkd.plan`` (from the same config, no weights), then runs two optimizer steps under
``promptkd.plan.measure``:

- model states (student parameters, gradients, optimizer states; teacher weights; the prompt) are
  storage bytes found by walking the engine just before the second optimizer step, when every
  gradient of the step exists and no activation does;
- each phase of the second step (rollout, prompt step, student step, optimizer step) is the peak of the live
  storage bytes created in it, above its start (``LiveBytes``, a dispatch mode), minus the
  gradients it leaves behind (those are a model state).

On a GPU it also reports ``torch.cuda.max_memory_allocated`` of the second step beside the plan.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import RunSizes, batches, emit, init_dist, make_config, make_workspace, quiet  # noqa: E402

ZERO = {0: "zero0.json", 1: "zero1.json", 2: "zero2.json", 3: "zero3_tiny_test.json"}
CASES = {  # name: (ZeRO stage, student precision, teacher dtype, extra overrides)
    "zero0_fp32": (0, "fp32", "fp32", {}),
    "zero0_fp32_ckpt": (0, "fp32", "fp32", {"model.student.gradient_checkpointing": True,
                                            "model.teacher.gradient_checkpointing": True}),
    "zero1_bf16": (1, "bf16", "bf16", {}),
    "zero2_bf16": (2, "bf16", "bf16", {}),
    "zero3_bf16": (3, "bf16", "bf16", {}),
    "zero2_fp32_gpt2": (2, "fp32", "fp32", {"arch": "gpt2"}),
    "zero0_bf16": (0, "bf16", "bf16", {}),
    "sft_zero0_fp32": (0, "fp32", "fp32", {"method.name": "sft"}),  # an autograd (unfused) loss, no teacher
    "zero2_bf16_teacher_zero3": (2, "bf16", "bf16", {
        "model.teacher.placement": "zero3", "model.teacher.deepspeed": "ds_configs/teacher_zero3_tiny_test.json"}),
}
SIZES = dict(teacher_layers=3, teacher_hidden=128, teacher_heads=4, student_layers=2, student_hidden=64,
             student_heads=2, batch=4, max_new_tokens=24, max_prompt_length=40, max_length=64, n_train=64,
             tokenizer_vocab=800)


@contextmanager
def _phases(ctx: Any, live: Any) -> Iterator[None]:
    """The method's timer phases (rollout, prompt_step, student_step) also mark ``live``'s phases."""
    timer_phase = ctx.timer.phase

    @contextmanager
    def both(name: str) -> Iterator[None]:
        gc.collect()  # a phase starts from no garbage (automatic collection is off during the step)
        with timer_phase(name), live.phase(name):
            yield

    ctx.timer.phase = both
    try:
        yield
    finally:
        ctx.timer.phase = timer_phase


def _before_step(engine: Any, out: dict) -> None:
    """Take the engine's states just before each optimizer step (the boundary's gradients exist)."""
    from promptkd.plan.measure import engine_states

    step = engine.step

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not engine.is_gradient_accumulation_boundary():
            return step(*args, **kwargs)
        out.update(engine_states(engine))
        live = out.get("live")
        if live is None:
            return step(*args, **kwargs)
        outer = list(live.current)  # the optimizer step is a phase of its own, not part of the student step's
        live.current.clear()
        gc.collect()
        try:
            with live.phase("optimizer_step"):
                return step(*args, **kwargs)
        finally:
            live.current[:] = outer

    engine.step = wrapped


def measure_case(name: str, ws: dict, work: str, sizes_override: dict | None = None) -> dict[str, Any]:
    from promptkd.plan import plan_config
    from promptkd.plan.measure import LiveBytes, engine_tensors, storage_bytes
    from promptkd.training.run import build_run

    stage, precision, t_dtype, extra = CASES[name]
    extra = dict(extra)
    sizes = RunSizes(**(sizes_override or SIZES), arch=extra.pop("arch", "llama"), precision=precision,
                     teacher_dtype=t_dtype)
    cfg = make_config(ws, sizes, "promptkd", deepspeed=os.path.join(os.path.dirname(__file__), "..", "ds_configs",
                                                                     ZERO[stage]),
                      **{"output.dir": os.path.join(work, name)}, **extra)
    run = build_run(cfg, train=False, total_steps=10, rollout_seed=5)
    method, engine = run.method, run.engine
    states: dict = {}
    _before_step(engine, states)
    seen: dict = {}
    engine.module.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(seq=int(kwargs["input_ids"].shape[1])) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    from promptkd import distributed as dist

    mbs = batches(run.splits, sizes.batch, 2 * (dist.rank() + 1))[-2:]  # each rank its own examples
    method.step([mbs[0]], 0)  # creates the optimizer states
    live = LiveBytes()
    states["live"] = live
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    # storages made before the step are counted too, so that one DeepSpeed frees (and replaces) in the step
    # does not inflate the phase that replaces it
    t_params = list(run.teacher.base.parameters()) if run.teacher is not None else []
    live.adopt(engine_tensors(engine) + [getattr(p, "ds_tensor", p.data) for p in t_params])
    adopted = live.addresses()
    # Python's cyclic collector runs when allocation counts say so: mid-phase it can free garbage from before
    # the phase (seen: a 2-rank optimizer step measured a third low once). Off during the step; each phase
    # starts after a collection.
    gc.disable()
    try:
        with ExitStack() as stack:
            stack.enter_context(_phases(method.ctx, live))
            stack.enter_context(live)
            result = method.step([mbs[1]], 1)
    finally:
        gc.enable()
    if result.rollouts:  # the plan at the lengths this step's rollout reached
        r = result.rollouts[0]
        seq = int(r.input_ids.shape[1])
        lengths = (seq, seq - max(r.prompt_len - 1, 0))
    else:  # off-policy: the batch's padded length, every position through the LM head
        lengths = (seen["seq"], seen["seq"])
    measured = {k: states[k] for k in ("params", "grads", "optimizer")}
    grads_left = live.alive(states["grad_ptrs"] - adopted)  # the gradients the step created (ZeRO-0's .grad)
    states.pop("live")
    for phase, peak in live.phase_peak.items():
        measured[phase] = peak - (grads_left if phase == "student_step" else 0)
    if t_params:  # under ZeRO-3 placement each rank's partition, ds_tensor
        measured["teacher_weights"] = storage_bytes([getattr(p, "ds_tensor", p.data) for p in t_params], set())
    if torch.cuda.is_available():  # the allocator's own peak above the resident bytes, and its absolute peak
        measured["cuda_max_allocated_step"] = torch.cuda.max_memory_allocated() - base_alloc
        measured["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    plan = plan_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")), lengths=lengths,
                       device="cuda" if torch.cuda.is_available() else "cpu")  # the loss-chunk rule of this run
    run.close()
    planned = plan.terms_for_check()
    planned["peak_phase"] = plan.phase_total(plan.peak_phase)
    planned["total_without_overhead"] = plan.total - plan.overhead.bytes
    if "cuda_max_allocated_step" in measured:  # compared with the plan's largest phase / its total
        measured["peak_phase"] = measured["cuda_max_allocated_step"]
        measured["total_without_overhead"] = measured["cuda_max_allocated"]
    error = {k: round(planned[k] / measured[k] - 1, 4) for k in measured if k in planned and measured[k]}
    return {"case": name, "lengths": lengths, "measured": measured, "planned": planned, "relative_error": error}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    quiet()
    init_dist()
    from promptkd import distributed as dist

    ws = make_workspace(RunSizes(**SIZES))
    rows = [measure_case(name, ws, ws["root"]) for name in args.cases.split(",")]
    if dist.is_main():
        result = {"world_size": dist.world_size(), "cases": rows}
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)
        else:
            emit("plan_check", result)


if __name__ == "__main__":
    main()
