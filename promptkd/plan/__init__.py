"""Memory planner: per-rank bytes of a run config before launch, from model shapes only (stage=plan)."""
import os

from promptkd.plan.core import Line, Models, Plan, plan_config, resolve_models, world_size_of
from promptkd.plan.report import table, verdict

__all__ = ["Line", "Models", "Plan", "plan_config", "resolve_models", "run_plan", "table", "verdict",
           "world_size_of"]


def run_plan(cfg, title: str = "") -> Plan:
    """stage=plan: print the table of ``cfg`` and return its plan (no process group, no weights)."""
    plan = plan_config(cfg)
    if os.environ.get("RANK", "0") == "0":  # under a launcher every rank plans; one prints
        print(table(plan, title or cfg.output.dir), flush=True)
    return plan
