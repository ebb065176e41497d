"""A PromptKD iteration vs a plain on-policy reverse-KL (``rkl``) iteration at equal batch.

    .venv/bin/python bench/promptkd_overhead.py     # -> bench/results/promptkd_overhead.json

Both methods are built in this one process from the same config (same teacher
and student weights, tokenizer, micro-batches and sampling seed) and their
``train_step`` calls are interleaved A B A B ... The ratio is the median of the
per-round ratios. ``cost_model`` explains the ratio from the phase costs that
PromptKD adds (bench/phases.py measures them one by one).
"""
from __future__ import annotations

import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (RunSizes, batches, build_run, emit, init_dist, interleave, make_config,  # noqa: E402
                          make_workspace, n_params, quiet, ratio, set_threads, stats, step_bench_args)

TARGET, GOAL = 2.0, 1.6


def run(sizes: RunSizes, repeats: int = 5, warmup: int = 1, ws: dict | None = None) -> dict[str, Any]:
    init_dist()
    ws = ws or make_workspace(sizes)
    methods = {name: build_run(make_config(ws, sizes, name), name)[:2] for name in ("promptkd", "rkl")}
    mbs = batches(methods["promptkd"][1], sizes.batch, 4)
    tokens: dict[str, list[float]] = {"promptkd": [], "rkl": []}
    phases: dict[str, list[dict]] = {"promptkd": [], "rkl": []}
    step = {"promptkd": 0, "rkl": 0}

    def make(name: str):
        method = methods[name][0]

        def call() -> None:
            i = step[name]
            step[name] += 1
            method.ctx.timer.pop()
            metrics = method.train_step([mbs[i % len(mbs)]], i)
            tokens[name].append(metrics["tokens"])
            phases[name].append(method.ctx.timer.pop())

        return call

    times = interleave({"promptkd": make("promptkd"), "rkl": make("rkl")}, repeats=repeats, warmup=warmup)
    r = ratio(times["promptkd"], times["rkl"])
    phase_med = {name: {k: statistics.median(p[k] for p in phases[name][warmup:]) for k in phases[name][-1]}
                 for name in phases}
    pk = methods["promptkd"][0].ctx
    return {
        "sizes": sizes,
        "params": {"teacher": n_params(pk.teacher.base), "student": n_params(pk.engine.module),
                   "ratio": round(n_params(pk.teacher.base) / n_params(pk.engine.module), 3)},
        "batch": sizes.batch, "max_new_tokens": sizes.max_new_tokens,
        "response_tokens_per_iter_median": {k: statistics.median(v[warmup:]) for k, v in tokens.items()},
        "iteration_seconds": {k: stats(v) for k, v in times.items()},
        "phase_seconds_median": phase_med,
        "ratio_promptkd_over_rkl": r["median_of_round_ratios"],
        "ratio_detail": r,
        "target": TARGET, "goal": GOAL,
        "meets_target": r["median_of_round_ratios"] <= TARGET, "meets_goal": r["median_of_round_ratios"] <= GOAL,
        "repeats": repeats, "warmup": warmup,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = step_bench_args(__doc__.split("\n")[0])
    args = p.parse_args(argv)
    quiet()
    load = list(os.getloadavg())
    init_dist()
    set_threads(args.threads)
    res = run(RunSizes(batch=args.batch, max_new_tokens=args.max_new_tokens), repeats=args.repeats,
              warmup=args.warmup)
    return emit("promptkd_overhead", res, load_before=load)


if __name__ == "__main__":
    main()
