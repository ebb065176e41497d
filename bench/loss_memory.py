"""Peak memory and time of the KL losses (forward + backward), chunked vs unchunked.

    .venv/bin/python bench/loss_memory.py     # -> bench/results/loss_memory.json

``promptkd.losses.reverse_kl`` / ``forward_kl`` on [B, T, V] = [4, 512, 32000]
logits (fp32 and bf16 inputs, every position in the mask), gradient to the
student side, ``loss.backward()`` included. "chunked" is the library's fused
kernel with ``--chunk`` positions per piece; "unchunked" is the plain KL formula
over every position, differentiated by autograd.

How peak memory is measured (torch CPU allocations are invisible to tracemalloc):

* ``peak_bytes`` (primary): the allocator trace of ``torch.profiler`` with
  ``profile_memory=True``. Every torch allocation and free is an event with its
  byte count; the running sum over the events of one forward+backward, in time
  order, gives the exact peak of live torch bytes above what was allocated
  before (the input logits are not counted; the gradient of the student logits,
  which is the loss's output, is).
* ``rss_peak_bytes`` (cross-check; by default for the first configuration only,
  ``--rss all`` for every one): a fresh subprocess per variant with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (so large blocks are mmapped and returned to
  the OS on free), the kernel's RSS high-water mark reset just before the call
  (``/proc/self/clear_refs`` = 5) and read after it (``VmHWM``), minus the RSS
  just before. It sees what the OS really had to provide.

Time: in this one process, unchunked and chunked calls interleaved A B A B ...,
medians over the repeats. One thread by default, and the process CPU time is
reported next to the wall time: on a shared machine it is the steadier number.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import emit, interleave, quiet, ratio, set_threads, stats, traced_peak  # noqa: E402

MEM_TARGET, TIME_TARGET = 0.25, 1.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(b: int, t: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(b, t, v, generator=g, dtype=dtype)
    mask = torch.ones(b, t, dtype=torch.long)
    return student, teacher, mask


def fwd_bwd(loss: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
            chunk: Optional[int]) -> float:
    from promptkd.losses import core as losses

    student.grad = None
    p, q = (student, teacher) if loss == "rkl" else (teacher, student)
    if chunk is None:
        # the baseline: the plain formula over every position, differentiated by autograd (what the loss
        # computes without a gradient, and what it computed with one before the fused kernels)
        value = losses._run_chunked(losses._kl_chunk, [p, q], mask, None)
    else:
        value, _ = losses.kl_divergence(p, q, mask=mask, chunk_size=chunk)
    value.backward()
    return float(value.detach())


def profiler_peak(loss: str, inputs, chunk: Optional[int]) -> dict[str, int]:
    """Peak of live torch CPU bytes during one forward+backward (allocator trace)."""
    student, teacher, mask = inputs
    student.grad = None
    value, peak, live = traced_peak(lambda: fwd_bwd(loss, student, teacher, mask, chunk))
    student.grad = None
    return {"peak_bytes": peak, "retained_bytes": live, "loss_value": value}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_child(loss: str, dtype: str, chunk: Optional[int], b: int, t: int, v: int) -> dict[str, Any]:
    """Runs in a fresh process: RSS high-water above the RSS just before one forward+backward."""
    inputs = make_inputs(b, t, v, DTYPES[dtype])
    fwd_bwd(loss, *inputs, chunk=chunk)  # warm: lazy init of kernels / thread pools
    inputs[0].grad = None
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the high-water mark (VmHWM) to the current RSS
    fwd_bwd(loss, *inputs, chunk=chunk)
    return {"rss_peak_bytes": (_status_kb("VmHWM") - before) * 1024,
            "rss_retained_bytes": (_status_kb("VmRSS") - before) * 1024}


def rss_peak(loss: str, dtype: str, chunk: Optional[int], b: int, t: int, v: int, threads: int) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", loss, dtype, str(chunk or 0), str(b), str(t), str(v),
           "--threads", str(threads)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:  # reported, not fatal
        return {"rss_error": f"{type(exc).__name__}: {exc}"}


def _measure_in_process(loss: str, inputs, chunk: int, repeats: int, warmup: int):
    # the profiled calls come first and so also warm both variants up
    mem = {name: profiler_peak(loss, inputs, c) for name, c in (("unchunked", None), ("chunked", chunk))}
    cpu: dict[str, list[float]] = {}
    times = interleave({"unchunked": lambda: fwd_bwd(loss, *inputs, chunk=None),
                        "chunked": lambda: fwd_bwd(loss, *inputs, chunk=chunk)}, repeats=repeats, warmup=warmup,
                       cpu_times=cpu)
    return mem, times, cpu


def run(b: int = 4, t: int = 512, v: int = 32000, chunk: int = 64, repeats: int = 5, warmup: int = 1,
        losses=("rkl", "fkl"), dtypes=("fp32", "bf16"), rss: str = "first", threads: int = 1) -> dict[str, Any]:
    configs = []
    for dtype in dtypes:
        for loss in losses:
            mem, times, cpu = _measure_in_process(loss, make_inputs(b, t, v, DTYPES[dtype]), chunk, repeats, warmup)
            if rss == "all" or (rss == "first" and not configs):
                for name, c in (("unchunked", None), ("chunked", chunk)):
                    mem[name].update(rss_peak(loss, dtype, c, b, t, v, threads))
            mem_ratio = mem["chunked"]["peak_bytes"] / max(mem["unchunked"]["peak_bytes"], 1)
            t_ratio = ratio(times["chunked"], times["unchunked"])
            grad_bytes = b * t * v * DTYPES[dtype].itemsize  # d loss / d student logits: the loss's output
            entry = {
                "loss": loss, "dtype": dtype, "chunk_size": chunk,
                "peak_in_units_of_the_logits_gradient": {k: round(m["peak_bytes"] / grad_bytes, 3)
                                                         for k, m in mem.items()},
                "value_unchunked": mem["unchunked"]["loss_value"], "value_chunked": mem["chunked"]["loss_value"],
                "memory": mem, "seconds": {k: stats(x) for k, x in times.items()},
                "peak_ratio_chunked_over_unchunked": mem_ratio,
                "time_ratio_chunked_over_unchunked": t_ratio["median_of_round_ratios"], "time_ratio_detail": t_ratio,
                "cpu_seconds": {k: stats(x) for k, x in cpu.items()},
                "cpu_time_ratio_chunked_over_unchunked": ratio(cpu["chunked"], cpu["unchunked"])[
                    "median_of_round_ratios"],
                "meets_memory_target": mem_ratio <= MEM_TARGET,
                "meets_time_target": t_ratio["median_of_round_ratios"] <= TIME_TARGET,
            }
            if "rss_peak_bytes" in mem["chunked"] and "rss_peak_bytes" in mem["unchunked"]:
                entry["rss_peak_ratio_chunked_over_unchunked"] = (mem["chunked"]["rss_peak_bytes"]
                                                                  / max(mem["unchunked"]["rss_peak_bytes"], 1))
            configs.append(entry)
    return {"shape": {"B": b, "T": t, "V": v},
            "input_tensor_bytes": {k: b * t * v * DTYPES[k].itemsize for k in dtypes},
            "configs": configs, "memory_target": MEM_TARGET, "time_target": TIME_TARGET,
            "meets_all_targets": all(c["meets_memory_target"] and c["meets_time_target"] for c in configs),
            "memory_method": "torch.profiler allocator trace (peak of running sum of [memory] events); cross-check: "
                             "VmHWM after clear_refs in a fresh subprocess, MALLOC_MMAP_THRESHOLD_=65536",
            "repeats": repeats, "warmup": warmup}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=0, help="extra warm-up rounds (the profiled calls already warm up)")
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--shape", type=int, nargs=3, default=[4, 512, 32000], metavar=("B", "T", "V"))
    p.add_argument("--rss", choices=("first", "all", "none"), default="first",
                   help="RSS cross-check (a subprocess per variant) for the first configuration, all, or none")
    p.add_argument("--child", nargs=6, metavar=("LOSS", "DTYPE", "CHUNK", "B", "T", "V"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.child:
        loss, dtype, c, b, t, v = args.child
        print(json.dumps(rss_child(loss, dtype, int(c) or None, int(b), int(t), int(v))))
        return {}
    quiet()
    load = list(os.getloadavg())
    b, t, v = args.shape
    res = run(b, t, v, chunk=args.chunk, repeats=args.repeats, warmup=args.warmup, rss=args.rss,
              threads=args.threads)
    return emit("loss_memory", res, load_before=load)


if __name__ == "__main__":
    main()
