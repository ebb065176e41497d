"""The plan as a table: one row per line with the config keys that move it, then the verdict."""
from __future__ import annotations

from promptkd.plan.core import GiB, Line, Plan


def _row(line: Line, indent: str = "") -> str:
    return f"| {indent}{line.term} | {line.bytes / GiB:.2f} | {line.keys} |"


def table(plan: Plan, title: str) -> str:
    peak = plan.peak_phase
    out = [f"memory plan: {title}",
           f"{plan.world_size} rank(s) x {plan.gpu_bytes / GiB:.2f} GiB, train.micro_batch_size={plan.micro_batch}"]
    out += [f"  {note}" for note in plan.notes]
    out += ["", "| per rank | GiB | moved by |", "|---|---:|---|", "| **resident** | | |"]
    out += [_row(line, "  ") for line in plan.resident]
    for name, lines in plan.phases.items():
        mark = " (peak)" if name == peak else ""
        out.append(f"| **phase {name}{mark}** | {plan.phase_total(name) / GiB:.2f} | |")
        out += [_row(line, "  ") for line in lines]
    out.append(_row(plan.overhead))
    out.append(f"| **total: resident + {peak} + overhead** | **{plan.total / GiB:.2f}** | |")
    if plan.cpu:
        out.append("")
        out += [f"CPU memory per rank: {line.term}: {line.bytes / GiB:.2f} GiB ({line.keys})" for line in plan.cpu]
    out.append("")
    out += plan.alternatives
    out.append(verdict(plan))
    return "\n".join(out)


def verdict(plan: Plan) -> str:
    used = f"{plan.total / GiB:.2f} of {plan.gpu_bytes / GiB:.2f} GiB"
    if plan.fits:
        head = f"verdict: fits ({used})"
    else:
        line = plan.first_over()
        head = f"verdict: does not fit ({used}); the sum passes the GPU at: {line.term if line else '?'}"
    best = plan.max_micro_batch
    tail = (f"largest train.micro_batch_size that fits: {best}" if best else
            "no train.micro_batch_size fits: the resident lines alone are too large (see the keys that move them)")
    return f"{head}\n{tail}"
