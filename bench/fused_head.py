"""Peak memory and time of the loss part of a PromptKD prompt step and student step: fused head ÷ today.

    .venv/bin/python bench/fused_head.py                       # -> bench/results/fused_head.json
    .venv/bin/python bench/fused_head.py --T 2048 --dtypes fp32 --out fused_head_fp32_2k
    .venv/bin/python bench/fused_head.py --T 8192 --variants fused --out fused_head_fp32_8k
    .venv/bin/python bench/fused_head.py --merge bench/results/fused_head_*_*.json --out fused_head

T in {2k, 8k, 16k} by default. On CPU a variant whose estimated peak would not fit in MemAvailable (less
``--margin-gb``) is skipped and recorded under ``skipped`` (the machine may be shared); ``--merge`` joins
runs into one file and adds, per (step, dtype, variant), the line through the measured peaks at the T's
not measured (``extrapolated``, each value marked "measured" or "extrapolated").

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
from promptkd.losses.fused_head import CPU_CHUNK_ELEMENTS, HeadStates, fused_prompt_loss, fused_reverse_kl  # noqa: E402,E501

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


VARIANTS = {"unfused": False, "fused": True}


def estimated_peak(variant: str, t: int, h: int, v: int, dtype: str) -> int:
    """A generous guess of one call's peak (bytes), inputs included, for the memory guard: today's path holds
    up to ~5 fp32-sized [T, V] tensors (measured: 3.5-5x the logits), the fused one ~1.5 GB whatever T."""
    inputs = 2 * v * h * DTYPES[dtype].itemsize + 3 * t * h * 4
    loss = 5 * t * v * 4 + 2 * v * h * 4 if variant == "unfused" else 8 * (1 << 25) * 4 + 2 * v * h * 4
    return inputs + loss


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(step: str, dtype: str, t: int, h: int, v: int, vocab: int, device: torch.device,
             repeats: int, variants: tuple[str, ...] = ("unfused", "fused"), margin_gb: float = 3.0) -> dict[str, Any]:
    """Both variants (or those asked for) of one shape, the profiled call first, then ``repeats`` timed rounds
    interleaved A B A B. On CPU a variant whose estimated peak does not fit in MemAvailable less ``margin_gb``
    is skipped (recorded under ``skipped``): the machine is shared."""
    res: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    if device.type == "cpu":
        for name in variants:
            need, free = estimated_peak(name, t, h, v, dtype), mem_available()
            if need > free - margin_gb * 2 ** 30:
                skipped[name] = f"needs ~{need / 2 ** 30:.1f} GiB, MemAvailable {free / 2 ** 30:.1f} GiB"
    run = [n for n in variants if n not in skipped]
    x = make_inputs(t, h, v, DTYPES[dtype], device) if run else {}
    for name in run:
        res[name] = measured_call(step, x, VARIANTS[name], vocab)
        res[name]["wall_all"], res[name]["cpu_all"] = [res[name]["wall_s"]], [res[name]["cpu_s"]]
    for _ in range(repeats):
        for name in run:
            wall, cpu = timed_call(step, x, VARIANTS[name], vocab)
            res[name]["wall_all"].append(wall)
            res[name]["cpu_all"].append(cpu)
    med = {k: {m: sorted(r[m + "_all"])[len(r[m + "_all"]) // 2] for m in ("wall", "cpu")} for k, r in res.items()}
    for k in res:
        res[k]["wall_median_s"], res[k]["cpu_median_s"] = med[k]["wall"], med[k]["cpu"]
    logits_bytes = t * vocab * DTYPES[dtype].itemsize
    case = {"step": step, "dtype": dtype, "T": t, "H": h, "V": v, "vocab": vocab, "device": device.type,
            "measured": sorted(res), **res, "peak_in_logits": {k: round(r["peak_bytes"] / logits_bytes, 3)
                                                                for k, r in res.items()}}
    if skipped:
        case["skipped"] = skipped
    if len(res) == 2:
        peak_ratio = res["fused"]["peak_bytes"] / max(1, res["unfused"]["peak_bytes"])
        cpu_ratio = med["fused"]["cpu"] / med["unfused"]["cpu"]
        case.update({"peak_ratio_fused_over_unfused": peak_ratio,
                     "wall_ratio_fused_over_unfused": med["fused"]["wall"] / med["unfused"]["wall"],
                     "cpu_ratio_fused_over_unfused": cpu_ratio,
                     "loss_rel_diff": abs(res["fused"]["loss"] - res["unfused"]["loss"])
                     / max(1e-30, abs(res["unfused"]["loss"])),
                     "meets_memory_target": peak_ratio <= MEM_TARGET, "meets_time_target": cpu_ratio <= TIME_TARGET})
    return case


def _fit(ts: list[int], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares line y = a + b T; and its largest relative residual at the measured points."""
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    b = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / max(1e-30, sum((t - mt) ** 2 for t in ts))
    a = my - b * mt
    return a, b, max(abs(a + b * t - y) / y for t, y in zip(ts, ys))


def extrapolate(cases: list[dict], targets: tuple[int, ...] = (2048, 8192, 16384)) -> list[dict]:
    """Peaks at T's not measured here, from a line through the measured T's (per step, dtype, variant).

    Every buffer of both paths is [T, V], [T, H] or T-independent ([V, H] gradients, chunk buffers), so the
    peak is linear in T; the residual at the measured points says how well. NOT a measurement. Each target T
    gives, per variant, the measured peak if there is one, else the line's value, and says which.
    """
    out = []
    for step in sorted({c["step"] for c in cases}):
        for dtype in sorted({c["dtype"] for c in cases}):
            group = [c for c in cases if c["step"] == step and c["dtype"] == dtype]
            if not group:
                continue
            row: dict[int, dict[str, Any]] = {t: {} for t in targets}
            for side in VARIANTS:
                pts = sorted({c["T"]: c[side]["peak_bytes"] for c in group if side in c}.items())
                ts, ys = [p[0] for p in pts], [p[1] for p in pts]
                if side == "fused":   # below one full chunk the workspaces grow with T: not on the line
                    full = [i for i, t in enumerate(ts) if t >= CPU_CHUNK_ELEMENTS // group[0]["vocab"]]
                    ts, ys = [ts[i] for i in full], [ys[i] for i in full]
                fit = _fit(ts, ys) if len(ts) >= 2 else None
                if fit is None and ts and side == "fused":
                    # one full-chunk point: the only [T]-sized buffer left is the hidden-state gradient [T, H]
                    slope = group[0]["H"] * DTYPES[dtype].itemsize
                    fit = (ys[0] - slope * ts[0], slope, 0.0)
                for t in targets:
                    if t in ts:
                        row[t][side] = {"peak_bytes": ys[ts.index(t)], "how": "measured"}
                    elif fit is not None:
                        row[t][side] = {"peak_bytes": int(fit[0] + fit[1] * t), "how": "extrapolated",
                                        "from_T": ts, "fit_max_rel_residual": fit[2],
                                        **({"slope": "H x itemsize (the [T, H] gradient)"} if len(ts) == 1 else {})}
            for t, sides in row.items():
                if len(sides) < 2 or all(s["how"] == "measured" for s in sides.values()):
                    continue
                ratio = sides["fused"]["peak_bytes"] / sides["unfused"]["peak_bytes"]
                out.append({"step": step, "dtype": dtype, "T": t, "extrapolated": True, **sides,
                            "peak_ratio_fused_over_unfused": ratio, "meets_memory_target": ratio <= MEM_TARGET})
    return out


def merge(paths: list[str], out: str) -> dict[str, Any]:
    """One results file from several runs (cases concatenated; each keeps its run's machine/load), extrapolated."""
    cases, runs = [], []
    for path in paths:
        with open(path) as fh:
            done = json.load(fh)
        for c in done["cases"]:
            c["run"] = os.path.basename(path)
        cases += done["cases"]
        runs.append({"file": os.path.basename(path), "machine": done.get("machine"), "repeats": done.get("repeats")})
    res = {"cases": cases, "extrapolated": extrapolate(cases), "memory_target": MEM_TARGET, "time_target": TIME_TARGET,
           "memory_method": MEMORY_METHOD, "runs": runs}
    return emit(out, res)


MEMORY_METHOD = ("CUDA: max_memory_allocated; CPU: torch.profiler allocator trace (peak of the running sum of "
                 "[memory] events of one call)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--steps", nargs="+", choices=sorted(STEPS), default=["student", "prompt"])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["unfused", "fused"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--V", type=int, default=151936, help="head rows")
    p.add_argument("--vocab", type=int, default=0, help="tokenizer size (the first rows of the head); 0: = V")
    p.add_argument("--repeats", type=int, default=0, help="extra unprofiled timed calls per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--margin-gb", type=float, default=3.0, help="CPU: skip a variant that would leave less free")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="fused_head", help="results name: bench/results/<out>.json")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge results files into <out> (and extrapolate)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    set_threads(args.threads)
    quiet()
    load = list(os.getloadavg())
    device = torch.device(args.device)
    cases = []
    for dtype in args.dtypes:
        for t in args.T:
            for step in args.steps:
                cases.append(run_case(step, dtype, t, args.hidden, args.V, args.vocab or args.V, device, args.repeats,
                                      tuple(args.variants), args.margin_gb))
                c = cases[-1]
                print(f"# {step} {dtype} T={t}: " + ", ".join(
                    f"{k} peak {c[k]['peak_bytes'] / 1e6:.0f} MB cpu {c[k]['cpu_median_s']:.1f}s" for k in c["measured"])
                    + (f" skipped {c['skipped']}" if "skipped" in c else ""), file=sys.stderr, flush=True)
                # every case is minutes on CPU: keep what is done if the run is cut short
                os.makedirs(RESULTS, exist_ok=True)
                with open(os.path.join(RESULTS, f"{args.out}.partial.json"), "w") as fh:
                    fh.write(json.dumps({"cases": cases}, indent=2) + "\n")
    res = {"cases": cases, "extrapolated": extrapolate(cases), "memory_target": MEM_TARGET, "time_target": TIME_TARGET,
           "memory_method": MEMORY_METHOD, "repeats": args.repeats, "threads": args.threads}
    out = emit(args.out, res, load_before=load)
    partial = os.path.join(RESULTS, f"{args.out}.partial.json")
    if os.path.exists(partial):
        os.remove(partial)
    return out


if __name__ == "__main__":
    main()
