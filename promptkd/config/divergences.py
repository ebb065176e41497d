"""The token divergences of the on-policy baselines: the one table that names them (no torch).

Config validation (the ``divergence`` choices and their help, DistiLLM's skew losses) and
``Method.fused_loss`` read the facts here; ``promptkd.losses.core.DIVERGENCE_FNS`` maps the
same names to their loss functions. ``tests/unit/test_divergences.py`` checks that the two
tables hold the same names and that no other literal list of divergence names exists in the library.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DivergenceSpec:
    name: str                    # the value of method.<section>.divergence
    formula: str                 # what it computes, for the config help
    knob: Optional[str] = None   # the loss's keyword that the section sets: "beta" (JSD's β), "alpha" (the skew)
    fused: bool = False          # a plain KL: its gradient is computed in the forward (promptkd.losses.fused)


_SPECS = (
    DivergenceSpec("fkl", "KL(p_T‖p_S)", fused=True),
    DivergenceSpec("rkl", "KL(p_S‖p_T)", fused=True),
    DivergenceSpec("jsd", "JSD(β)", knob="beta"),
    DivergenceSpec("tvd", "0.5·Σ|p_T - p_S|"),
    DivergenceSpec("sfkl", "skew forward KL", knob="alpha"),
    DivergenceSpec("srkl", "skew reverse KL", knob="alpha"),
)

DIVERGENCES: dict[str, DivergenceSpec] = {s.name: s for s in _SPECS}
DIVERGENCE_NAMES: tuple[str, ...] = tuple(DIVERGENCES)
# the skew KLs of DistiLLM (their knob is the skew α)
SKEW_DIVERGENCES: tuple[str, ...] = tuple(s.name for s in _SPECS if s.knob == "alpha")


def divergence_help() -> str:
    """``fkl (KL(p_T‖p_S)) | rkl (...) | ...``: the choices with what each computes."""
    return " | ".join(f"{s.name} ({s.formula})" for s in _SPECS)
