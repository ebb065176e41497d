"""Seconds per phase of one PromptKD iteration, and tokens/s.

    .venv/bin/python bench/phases.py            # -> bench/results/phases.json

The instrumented iteration below calls the same library functions as
``PromptKD.train_step`` (promptkd/methods/promptkd.py) in the same order, with a
device sync and a clock read between them. The real ``train_step`` is timed
interleaved with it (A B A B ...): ``instrumented_vs_real`` close to 1 shows the
breakdown adds up to what training pays. Single process, world size 1, ZeRO-0
engine from the project's builders.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import (RunSizes, batches, build_run, init_dist, interleave, make_config,  # noqa: E402
                          make_workspace, n_params, ratio, stats, step_bench_main, sync)

PHASES = (
    "rollout",
    "prompt/student_fwd", "prompt/teacher_base_fwd_nograd", "prompt/teacher_prompted_fwd",
    "prompt/loss", "prompt/teacher_bwd", "prompt/optimizer",
    "student/teacher_fwd_nograd", "student/fwd", "student/loss", "student/bwd", "student/optimizer",
)


class Clock:
    """Per-phase wall seconds with a device sync at each boundary."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - start


def instrumented_iteration(method: Any, micro_batch: list, step: int, clock: Clock) -> float:
    """One PromptKD iteration (one micro-batch), phase by phase, as ``PromptKD.train_step`` runs it.

    Returns the response tokens. Without dropout the prompt step's student forward runs with
    grad and is the student step's forward too (``student/fwd`` is then 0); with
    ``method.promptkd.stale_student_target`` the student step reuses the prompt step's teacher logits.
    """
    from promptkd.losses import prompt_loss, regularizer_weight, reverse_kl
    from promptkd.methods.base import lm_logits, response_start, shifted_mask, student_rollout, teacher_logits

    ctx, m = method.ctx, method.ctx.opts
    vocab = ctx.vocab_size
    with clock("rollout"):
        r = student_rollout(ctx, micro_batch)
    start, mask = response_start(r), shifted_mask(r)
    n_global = float(mask.sum())
    ids, att = r.input_ids, r.attention_mask
    # ---- prompt update (only theta trains)
    w = regularizer_weight(step, ctx.total_steps, m.reg_schedule, m.reg_weight)
    method.prompt.zero_grad()
    kept = None
    with clock("prompt/student_fwd"):
        if m.reuse_student_forward and not method.student_has_dropout:
            kept = lm_logits(ctx.engine, ids, att, vocab, start)
            s_logits = kept.detach()
        else:
            with torch.no_grad():
                s_logits = lm_logits(ctx.engine.module, ids, att, vocab, start)
    with clock("prompt/teacher_base_fwd_nograd"), torch.no_grad():
        base = teacher_logits(ctx.teacher, ids, att, vocab, False, start) if w > 0 else None
    with clock("prompt/teacher_prompted_fwd"):
        prompted = teacher_logits(ctx.teacher, ids, att, vocab, True, start)
    with clock("prompt/loss"):
        pl = prompt_loss(s_logits, prompted=prompted, teacher=base if base is not None else prompted.detach(),
                         mask=mask, reg_weight=w, guidance=m.guidance, chunk_size=ctx.chunk)
        loss = pl.total / max(n_global, 1.0)
    with clock("prompt/teacher_bwd"):
        loss.backward()
    stale = prompted.detach() if m.stale_student_target else None
    del s_logits, base, prompted, pl, loss
    with clock("prompt/optimizer"):
        method.prompt.step()
    # ---- student update with the new prompt
    with clock("student/teacher_fwd_nograd"), torch.no_grad():
        t_logits = stale if stale is not None else teacher_logits(ctx.teacher, ids, att, vocab, True, start)
    with clock("student/fwd"):
        s_logits = kept if kept is not None else lm_logits(ctx.engine, ids, att, vocab, start)
    with clock("student/loss"):
        rkl, _ = reverse_kl(s_logits, teacher=t_logits, mask=mask, chunk_size=ctx.chunk)
    with clock("student/bwd"):
        ctx.engine.backward(rkl / max(n_global, 1.0), scale_wrt_gas=False)
    with clock("student/optimizer"):
        ctx.engine.step()
    return n_global


def run(sizes: RunSizes, repeats: int = 5, warmup: int = 1, ws: dict | None = None) -> dict[str, Any]:
    """Core of the bench (also used by bench/gpu_bench.py and the smoke test)."""
    init_dist()
    ws = ws or make_workspace(sizes)
    cfg = make_config(ws, sizes, "promptkd")
    method, splits, tok = build_run(cfg, "promptkd")
    mbs = batches(splits, sizes.batch, 4)
    state = {"i": 0, "tokens_instr": [], "tokens_real": [], "seq_tokens": []}
    per_phase: dict[str, list[float]] = {p: [] for p in PHASES}

    def instrumented() -> None:
        clock = Clock()
        mb = mbs[state["i"] % len(mbs)]
        state["i"] += 1
        state["tokens_instr"].append(instrumented_iteration(method, mb, state["i"], clock))
        state["seq_tokens"].append(sum(len(ex.prompt_ids) for ex in mb))
        for p in PHASES:
            per_phase[p].append(clock.t.get(p, 0.0))

    def real() -> None:
        mb = mbs[state["i"] % len(mbs)]
        state["i"] += 1
        metrics = method.step([mb], state["i"]).metrics
        state["tokens_real"].append(metrics["tokens"])

    times = interleave({"instrumented": instrumented, "real": real}, repeats=repeats, warmup=warmup)
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
        "seconds_per_phase_median": {p: round(v, 5) for p, v in med.items()},
        "seconds_per_group_median": {g: round(sum(med[p] for p in ps), 5) for g, ps in groups.items()},
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
