"""The plan of every configs/*.yaml on its paper hardware and on one 8 x H100 80GB node (markdown).

    .venv/bin/python bench/plan_table.py            # -> bench/results/plan_table.md (the README's table)

Paper hardware: 8 x A100 80GB for the GPT-2 configs, 4 x A100 80GB for OPT and LLaMA, one GPU for
the CPU configs (quickstart, quality). Where a config does not fit, the last column gives the first
of a short list of changes that makes it fit at its micro-batch, else the largest micro-batch.
"""
from __future__ import annotations

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS, REPO, quiet  # noqa: E402

A100, H100 = "80GiB", "81559MiB"   # what nvidia-smi reports for an A100 80GB and an H100 80GB HBM3
CHANGES = [
    {"model.student.gradient_checkpointing": True},
    {"model.teacher.gradient_checkpointing": True},
    {"model.student.gradient_checkpointing": True, "model.teacher.gradient_checkpointing": True},
    {"model.student.gradient_checkpointing": True, "model.teacher.gradient_checkpointing": True,
     "model.teacher.placement": "zero3"},
]


def paper_gpus(name: str) -> int:
    if name.startswith(("quickstart", "quality")):
        return 1
    return 8 if "gpt2" in name else 4


def first_fix(cfg, world: int) -> str:
    from promptkd.config import with_overrides
    from promptkd.plan import plan_config

    for change in CHANGES:
        plan = plan_config(with_overrides(cfg, change), world_size=world)
        if plan.fits:
            keys = " ".join(f"{k}={str(v).lower()}" for k, v in change.items())
            return f"{keys} ({plan.total / 2 ** 30:.1f} GiB)"
    return ""


def row(path: str, gpus: int, memory: str, label: str) -> str:
    from promptkd.config import load_config
    from promptkd.plan import plan_config

    cfg = load_config(path, [f"plan.world_size={gpus}", f"plan.gpu_memory={memory}"])
    plan = plan_config(cfg)
    gib = 2 ** 30
    name = os.path.basename(path)[:-5]
    if plan.fits:
        todo = ""
    else:
        fix = first_fix(cfg, gpus)
        best = plan.max_micro_batch
        todo = fix or (f"train.micro_batch_size={best} (raise train.grad_accum to keep the batch)" if best else
                       "does not fit at micro-batch 1: shard more (ZeRO-3, offload) or use more GPUs")
    return (f"| {name} | {label} | {plan.micro_batch} | {plan.peak_phase} | {plan.total / gib:.1f} | "
            f"{'fits' if plan.fits else '**no**'} | {plan.max_micro_batch} | {todo} |")


# A long-response chat pair (issue 22): Qwen3-8B -> Qwen3-1.7B at 8,192 tokens (1,024 of prompt) on one 8 x H100
# node, micro-batch 1, with the fused LM head + loss (method.fused_head, the default) and without it.
LONG_CONFIG = "qwen3-8b_to_qwen3-0.6b.yaml"
LONG_OVERRIDES = ["plan.student_arch=qwen3-1.7b", "plan.teacher_arch=qwen3-8b", "data.max_length=8192",
                  "data.max_prompt_length=1024", "train.micro_batch_size=1"]


def long_rows() -> list[str]:
    from promptkd.config import load_config
    from promptkd.plan import plan_config

    out = []
    for fused in (True, False):
        cfg = load_config(os.path.join(REPO, "configs", LONG_CONFIG),
                          LONG_OVERRIDES + ["plan.world_size=8", f"plan.gpu_memory={H100}"])
        # set directly: the planner reads it with getattr (it works before and after the config key exists)
        cfg.method.fused_head = fused
        plan = plan_config(cfg)
        gib = 2 ** 30
        label = f"qwen3-8b_to_qwen3-1.7b, 8k tokens (long response), method.fused_head={str(fused).lower()}"
        out.append(f"| {label} | 8 x H100 80GB | {plan.micro_batch} | {plan.peak_phase} | {plan.total / gib:.1f} | "
                   f"{'fits' if plan.fits else '**no**'} | {plan.max_micro_batch} |  |")
    return out


def table() -> list[str]:
    """The table's lines: two rows per run config, then the long-response pair."""
    lines = ["| config | GPUs | micro-batch | peak phase | GiB per GPU | fits | largest micro-batch | to fit |",
             "|---|---|---:|---|---:|---|---:|---|"]
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))):
        if os.path.basename(path).startswith("quality"):  # the quality benchmarks' configs, not run configs
            continue
        name = os.path.basename(path)
        n = paper_gpus(name)
        lines.append(row(path, n, A100, f"{n} x A100 80GB"))
        lines.append(row(path, 8 if n > 1 else 1, H100, f"{8 if n > 1 else 1} x H100 80GB"))
    return lines + long_rows()


def main() -> None:
    quiet()
    text = "\n".join(table()) + "\n"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "plan_table.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
