"""Seconds per phase of one PromptKD iteration, and tokens/s.

    .venv/bin/python bench/phases.py            # -> bench/results/phases.json

The breakdown times the real ``PromptKD.train_step`` (promptkd/methods/promptkd.py): its
timer's finer spans (``PhaseTimer.lap``: ``prompt/loss``, ``student/bwd``, ...) are turned on,
with a device sync at every span boundary, so modes, dropout and checkpointing are those of
training. The same step with the spans off is timed interleaved with it (A B A B ...):
``instrumented_vs_real`` close to 1 shows the syncs cost little and the breakdown adds up to
what training pays. Single process, world size 1, ZeRO-0 engine from the project's builders.
"""
from __future__ import annotations

import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (RunSizes, batches, build_run, init_dist, interleave, make_config,  # noqa: E402
                          make_workspace, n_params, ratio, stats, step_bench_main, sync)

PHASES = (
    "rollout",
    "prompt/student_fwd", "prompt/teacher_base_fwd_nograd", "prompt/teacher_prompted_fwd",
    "prompt/loss", "prompt/teacher_bwd", "prompt/optimizer",
    "student/teacher_fwd_nograd", "student/fwd", "student/loss", "student/bwd", "student/optimizer",
)


def timed_step(method: Any, micro_batch: list, step: int, detailed: bool) -> tuple[dict[str, float], float]:
    """One real optimizer step (one micro-batch): (seconds per timer span, global response tokens).

    Without dropout the prompt step's student forward runs with grad and is the student step's
    forward too (``student/fwd`` is then about 0); with ``method.promptkd.stale_student_target``
    the student step reuses the prompt step's teacher logits.
    """
    timer = method.ctx.timer
    timer.pop()
    timer.detail(sync, on=detailed)
    try:
        result = method.step([micro_batch], step)
    finally:
        timer.detail(on=False)
    return timer.pop(), result.global_tokens() or 0.0


def run(sizes: RunSizes, repeats: int = 5, warmup: int = 1, ws: dict | None = None) -> dict[str, Any]:
    """Core of the bench (also used by bench/gpu_bench.py and the smoke test)."""
    init_dist()
    ws = ws or make_workspace(sizes)
    cfg = make_config(ws, sizes, "promptkd")
    method, splits, tok = build_run(cfg, "promptkd")
    mbs = batches(splits, sizes.batch, 4)
    state = {"i": 0, "tokens_real": [], "seq_tokens": []}
    per_phase: dict[str, list[float]] = {p: [] for p in PHASES}

    def one(detailed: bool) -> None:
        mb = mbs[state["i"] % len(mbs)]
        state["i"] += 1
        spans, tokens = timed_step(method, mb, state["i"], detailed)
        if detailed:
            state["seq_tokens"].append(sum(len(ex.prompt_ids) for ex in mb))
            for p in PHASES:
                per_phase[p].append(spans.get(p, 0.0))
        else:
            state["tokens_real"].append(tokens)

    times = interleave({"instrumented": lambda: one(True), "real": lambda: one(False)}, repeats=repeats,
                       warmup=warmup)
    for p in PHASES:  # drop the warm-up rounds
        per_phase[p] = per_phase[p][warmup:]
    med = {p: statistics.median(v) for p, v in per_phase.items()}
    total = statistics.median(times["real"])
    resp_tokens = statistics.median(state["tokens_real"][warmup:])
    groups = {"rollout": ["rollout"], "prompt_step": [p for p in PHASES if p.startswith("prompt/")],
              "student_step": [p for p in PHASES if p.startswith("student/")]}
    teacher = method.ctx.teacher.base
    student = method.ctx.engine.module
    return {
        "sizes": sizes,
        "params": {"teacher": n_params(teacher), "student": n_params(student),
                   "ratio": round(n_params(teacher) / n_params(student), 3)},
        "vocab": method.ctx.vocab_size, "prompt_length": method.ctx.teacher.prompt_length,
        "batch": sizes.batch, "mean_prompt_tokens": statistics.mean(state["seq_tokens"]) / sizes.batch,
        "response_tokens_per_iter": resp_tokens,
        # 4 significant digits, not fixed decimals: a reused forward's span is ~1e-5 s and must not read as 0
        "seconds_per_phase_median": {p: float(f"{v:.4g}") for p, v in med.items()},
        "seconds_per_group_median": {g: float(f"{sum(med[p] for p in ps):.4g}") for g, ps in groups.items()},
        "share_of_iteration": {p: round(v / max(sum(med.values()), 1e-12), 4) for p, v in med.items()},
        "iteration_seconds": {"real_train_step": stats(times["real"]), "instrumented": stats(times["instrumented"])},
        "instrumented_vs_real": ratio(times["instrumented"], times["real"]),
        "response_tokens_per_s": resp_tokens / total,
        "repeats": repeats, "warmup": warmup,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return step_bench_main("phases", __doc__.split("\n")[0], run, argv)


if __name__ == "__main__":
    main()
