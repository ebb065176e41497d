"""Peak memory and time of the loss part of a PromptKD prompt step and student step: fused head ÷ today.

    .venv/bin/python bench/fused_head.py                       # -> bench/results/fused_head.json
    .venv/bin/python bench/fused_head.py --T 512 1024 2048 --dtypes fp32 bf16 --steps student prompt

"The loss part" is what sits between the models' last hidden states and their gradients: the LM heads,
the loss, and the backward through the heads. Inputs: one sequence of T response positions (every one
in the mask), hidden size H = 1024 for the student and the teacher, a head of V = 151,936 rows (Qwen3's)
per model, random weights and hidden states made before the measurement (not counted).

* student step: ``L = KL(p_S || p_T^θ)``; the student's hidden states and head weight train, the teacher's
  side is a constant (its logits made under no_grad, as the methods do).
  today: ``s = F.linear(h_S, W_S)``, ``t = F.linear(h_T, W_T)`` (no_grad), ``core.reverse_kl``, ``backward()``;
  fused: ``fused_reverse_kl(HeadStates(h_S, W_S), teacher=HeadStates(h_T, W_T))``, ``backward()``.
* prompt step: ``KL(p_T^θ || p_S) + w KL(p_T^θ || p_T)`` (w = 0.5); only the prompted teacher's hidden
  states train (θ sits behind them); the student's and the plain teacher's logits are no_grad constants.
  today: three ``F.linear`` + ``core.prompt_loss``; fused: ``fused_prompt_loss``.

Outputs (gradients of h and W) are counted on both sides: they are what the loss part hands on.

Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call. CPU:
torch's CPU allocations are invisible to ``tracemalloc`` and torch keeps no CPU allocator statistics, so
the allocator trace of ``torch.profiler(profile_memory=True)`` is used (as bench/loss_memory.py, where it
agreed with the kernel's RSS high-water mark to 0.01 %): every torch allocation and free is an event
with its byte count, and the running sum of the events of one call, in time order, is the exact peak of
live torch bytes above what was allocated before.

Time: wall and process-CPU seconds of the same profiled call (the profiler records a few events per op on
both sides; the head matmuls dominate), plus ``--repeats`` extra unprofiled calls, A B A B. One thread by
default: on a shared 2-core machine the CPU seconds are the steadier number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import RESULTS, emit, quiet, set_threads, traced_peak  # noqa: E402
from promptkd.losses import core  # noqa: E402
from promptkd.losses.fused_head import HeadStates, fused_prompt_loss, fused_reverse_kl  # noqa: E402

MEM_TARGET, TIME_TARGET = 1 / 8, 1.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REG_WEIGHT = 0.5


def make_inputs(t: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    return {"h_s": rand(1, t, h), "h_t": rand(1, t, h), "h_base": rand(1, t, h),
            "w_s": rand(v, h, scale=h ** -0.5), "w_t": rand(v, h, scale=h ** -0.5),
            "mask": torch.ones(1, t, dtype=torch.long, device=device)}


def _core_rkl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor):
    return core.reverse_kl(student, teacher=teacher, mask=mask)


def _core_prompt(prompted: torch.Tensor, student: torch.Tensor, base: torch.Tensor, mask: torch.Tensor):
    return core.prompt_loss(student, prompted=prompted, teacher=base, mask=mask, reg_weight=REG_WEIGHT)


def student_step(x: dict, fused: bool, vocab: int) -> float:
    h_s, w_s = x["h_s"].requires_grad_(True), x["w_s"].requires_grad_(True)
    if fused:
        loss, _ = fused_reverse_kl(HeadStates(h_s, w_s), teacher=HeadStates(x["h_t"], x["w_t"]), mask=x["mask"],
                                   vocab=vocab)
    else:
        s_logits = F.linear(h_s, w_s)[..., :vocab]
        with torch.no_grad():
            t_logits = F.linear(x["h_t"], x["w_t"])[..., :vocab]
        loss, _ = _core_rkl(s_logits, t_logits, x["mask"])
    loss.backward()
    return float(loss.detach())


def prompt_step(x: dict, fused: bool, vocab: int) -> float:
    h_p = x["h_t"].requires_grad_(True)          # the prompted teacher's states (θ behind them)
    if fused:
        out = fused_prompt_loss(HeadStates(x["h_s"].detach(), x["w_s"].detach()),
                                prompted=HeadStates(h_p, x["w_t"]), teacher=HeadStates(x["h_base"], x["w_t"]),
                                mask=x["mask"], vocab=vocab, reg_weight=REG_WEIGHT)
    else:
        with torch.no_grad():
            s_logits = F.linear(x["h_s"], x["w_s"])[..., :vocab]
            b_logits = F.linear(x["h_base"], x["w_t"])[..., :vocab]
        p_logits = F.linear(h_p, x["w_t"])[..., :vocab]
        out = _core_prompt(p_logits, s_logits, b_logits, x["mask"])
    out.total.backward()
    return float(out.total.detach())


STEPS: dict[str, Callable[[dict, bool, int], float]] = {"student": student_step, "prompt": prompt_step}


def _clear(x: dict) -> None:
    for k in ("h_s", "h_t", "w_s"):
        x[k].grad = None
        x[k].requires_grad_(False)


def measured_call(step: str, x: dict, fused: bool, vocab: int) -> dict[str, Any]:
    """One call: peak bytes above the start (see the module docstring), wall and CPU seconds, the loss."""
    _clear(x)
    device = x["mask"].device
    fn = STEPS[step]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn(x, fused, vocab)
        torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = torch.cuda.max_memory_allocated(device) - base
        retained = torch.cuda.memory_allocated(device) - base
    else:
        wall, cpu = time.perf_counter(), time.process_time()
        value, peak, retained = traced_peak(lambda: fn(x, fused, vocab))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    _clear(x)
    return {"peak_bytes": int(peak), "retained_bytes": int(retained), "wall_s": wall, "cpu_s": cpu, "loss": value}


def timed_call(step: str, x: dict, fused: bool, vocab: int) -> tuple[float, float]:
    _clear(x)
    wall, cpu = time.perf_counter(), time.process_time()
    STEPS[step](x, fused, vocab)
    if x["mask"].device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    _clear(x)
    return wall, cpu


def run_case(step: str, dtype: str, t: int, h: int, v: int, vocab: int, device: torch.device,
             repeats: int) -> dict[str, Any]:
    x = make_inputs(t, h, v, DTYPES[dtype], device)
    res = {name: measured_call(step, x, fused, vocab) for name, fused in (("unfused", False), ("fused", True))}
    for name in res:
        res[name]["wall_all"], res[name]["cpu_all"] = [res[name]["wall_s"]], [res[name]["cpu_s"]]
    for _ in range(repeats):
        for name, fused in (("unfused", False), ("fused", True)):
            wall, cpu = timed_call(step, x, fused, vocab)
            res[name]["wall_all"].append(wall)
            res[name]["cpu_all"].append(cpu)
    med = {k: {m: sorted(r[m + "_all"])[len(r[m + "_all"]) // 2] for m in ("wall", "cpu")} for k, r in res.items()}
    logits_bytes = t * vocab * DTYPES[dtype].itemsize
    peak_ratio = res["fused"]["peak_bytes"] / max(1, res["unfused"]["peak_bytes"])
    cpu_ratio = med["fused"]["cpu"] / med["unfused"]["cpu"]
    return {"step": step, "dtype": dtype, "T": t, "H": h, "V": v, "vocab": vocab, "device": device.type,
            "unfused": res["unfused"], "fused": res["fused"],
            "peak_in_logits": {k: round(r["peak_bytes"] / logits_bytes, 3) for k, r in res.items()},
            "peak_ratio_fused_over_unfused": peak_ratio,
            "wall_ratio_fused_over_unfused": med["fused"]["wall"] / med["unfused"]["wall"],
            "cpu_ratio_fused_over_unfused": cpu_ratio,
            "loss_rel_diff": abs(res["fused"]["loss"] - res["unfused"]["loss"])
            / max(1e-30, abs(res["unfused"]["loss"])),
            "meets_memory_target": peak_ratio <= MEM_TARGET, "meets_time_target": cpu_ratio <= TIME_TARGET}


def _fit(ts: list[int], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares line y = a + b T; and its largest relative residual at the measured points."""
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    b = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / max(1e-30, sum((t - mt) ** 2 for t in ts))
    a = my - b * mt
    return a, b, max(abs(a + b * t - y) / y for t, y in zip(ts, ys))


def extrapolate(cases: list[dict], targets: tuple[int, ...] = (8192, 16384)) -> list[dict]:
    """Peaks at T's too large to run here, from a line through the measured T's (per step, dtype, side).

    Every buffer of both paths is [T, V], [T, H] or T-independent ([V, H] gradients, chunk buffers), so the
    peak is linear in T; the residual at the measured points says how well. NOT a measurement.
    """
    out = []
    for step in sorted({c["step"] for c in cases}):
        for dtype in sorted({c["dtype"] for c in cases}):
            group = sorted((c for c in cases if c["step"] == step and c["dtype"] == dtype), key=lambda c: c["T"])
            ts = [c["T"] for c in group]
            if len(set(ts)) < 2:
                continue
            fits = {side: _fit(ts, [c[side]["peak_bytes"] for c in group]) for side in ("unfused", "fused")}
            for t in targets:
                if t in ts:
                    continue
                peak = {side: a + b * t for side, (a, b, _) in fits.items()}
                out.append({"step": step, "dtype": dtype, "T": t, "from_T": ts, "extrapolated": True,
                            "peak_bytes": {k: int(v) for k, v in peak.items()},
                            "peak_ratio_fused_over_unfused": peak["fused"] / peak["unfused"],
                            "fit_max_rel_residual": {k: f[2] for k, f in fits.items()},
                            "meets_memory_target": peak["fused"] / peak["unfused"] <= MEM_TARGET})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--steps", nargs="+", choices=sorted(STEPS), default=["student", "prompt"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--V", type=int, default=151936, help="head rows")
    p.add_argument("--vocab", type=int, default=0, help="tokenizer size (the first rows of the head); 0: = V")
    p.add_argument("--repeats", type=int, default=0, help="extra unprofiled timed calls per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="fused_head", help="results name: bench/results/<out>.json")
    p.add_argument("--extrapolate-only", metavar="JSON", help="add the linear extrapolation to a results file")
    args = p.parse_args(argv)
    if args.extrapolate_only:
        with open(args.extrapolate_only) as fh:
            done = json.load(fh)
        done["extrapolated"] = extrapolate(done["cases"])
        with open(args.extrapolate_only, "w") as fh:
            fh.write(json.dumps(done, indent=2) + "\n")
        return done
    set_threads(args.threads)
    quiet()
    load = list(os.getloadavg())
    device = torch.device(args.device)
    cases = []
    for dtype in args.dtypes:
        for t in args.T:
            for step in args.steps:
                cases.append(run_case(step, dtype, t, args.hidden, args.V, args.vocab or args.V, device, args.repeats))
                print(f"# {cases[-1]['step']} {dtype} T={t}: peak x{cases[-1]['peak_ratio_fused_over_unfused']:.3f} "
                      f"cpu x{cases[-1]['cpu_ratio_fused_over_unfused']:.3f}", file=sys.stderr, flush=True)
                # every case is minutes on CPU: keep what is done if the run is cut short
                os.makedirs(RESULTS, exist_ok=True)
                with open(os.path.join(RESULTS, f"{args.out}.partial.json"), "w") as fh:
                    fh.write(json.dumps({"cases": cases}, indent=2) + "\n")
    res = {"cases": cases, "extrapolated": extrapolate(cases), "memory_target": MEM_TARGET, "time_target": TIME_TARGET,
           "memory_method": "CUDA: max_memory_allocated; CPU: torch.profiler allocator trace (peak of the running "
                            "sum of [memory] events of one call)", "repeats": args.repeats, "threads": args.threads}
    out = emit(args.out, res, load_before=load)
    partial = os.path.join(RESULTS, f"{args.out}.partial.json")
    if os.path.exists(partial):
        os.remove(partial)
    return out


if __name__ == "__main__":
    main()
