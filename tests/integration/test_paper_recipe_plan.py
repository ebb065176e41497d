"""README "Reproducing the paper" quotes the memory planner for every configs/paper/ file: the table must be its
output (any change to the planner or the configs shows here). In-process, ~10 s: the integration tier."""
from __future__ import annotations

import glob
import os
from pathlib import Path

from promptkd.config import REGISTRY, load_config

REPO = Path(__file__).resolve().parents[2]
PAPER = sorted(glob.glob(str(REPO / "configs" / "paper" / "*.yaml")))


def _memory_rows() -> dict[str, list[str]]:
    section = (REPO / "README.md").read_text().split("\n## Reproducing the paper\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[1].endswith("_step"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_memory_table_is_the_planners_output(monkeypatch):
    from promptkd.plan import plan_config
    from promptkd.plan.core import GiB

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the shapes are forced below: no hub look-up
    rows = _memory_rows()
    assert set(rows) == {os.path.basename(p).removesuffix(".yaml") for p in PAPER}
    for name, (_, peak, gib, largest) in rows.items():
        path = str(REPO / "configs" / "paper" / f"{name}.yaml")
        teacher = REGISTRY[load_config(path).method.name].uses_teacher
        cfg = load_config(path, ["stage=plan", "plan.world_size=8", "plan.gpu_memory=80GiB",
                                 "plan.student_arch=" + ("gpt2-xl" if name == "sft_gpt2-xl" else "gpt2")]
                          + (["plan.teacher_arch=gpt2-xl"] if teacher else []))
        plan = plan_config(cfg)
        assert (plan.peak_phase, f"{plan.total / GiB:.2f}", str(plan.max_micro_batch)) == (peak, gib, largest), name
