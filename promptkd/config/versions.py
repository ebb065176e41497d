"""The oldest torch / deepspeed / transformers the code is right with, and the check that says so at start.

pyproject.toml's floors must be at least these (tests/unit/test_versions.py reads both); each floor says
what breaks below it.
"""
from __future__ import annotations

import re

MINIMUM = {
    # memory-efficient SDPA returns NaN for fully masked rows (our left-padded prompts) before 2.5
    "torch": "2.5",
    # non-reentrant activation recompute over frozen ZeRO-3 parameters (the partitioned teacher) needs 0.19.8
    "deepspeed": "0.19.8",
    # every transformers API the code calls exists in 5.0.0 (checked in its wheel): from_pretrained(dtype=),
    # Cache objects, transformers.modeling_layers.GradientCheckpointingLayer, HfDeepSpeedConfig. Newer names
    # (activation_checkpointing_enable, the ``cache`` forward kwarg) are detected at run time with a fallback.
    # Below 5.0, 4.x before 4.56 silently ignores dtype= (the teacher would load in fp32).
    "transformers": "5.0",
}


def parse(version: str) -> tuple[int, ...]:
    """(2, 13, 0) from "2.13.0+cpu", "0.19.8", "5.0.0rc1": the leading dotted numbers."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if not match:
        raise ValueError(f"cannot read version {version!r}")
    return tuple(int(x) for x in match.group(0).split("."))


def at_least(found: str, minimum: str) -> bool:
    a, b = parse(found), parse(minimum)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def too_old(found: dict[str, str]) -> list[str]:
    """One line per library in ``found`` ({name: version}) that is older than MINIMUM."""
    return [f"{name} {version} is older than the {MINIMUM[name]} this code needs"
            for name, version in found.items() if name in MINIMUM and not at_least(version, MINIMUM[name])]


def check_installed() -> None:
    """Raise a clear RuntimeError when the imported torch / deepspeed / transformers are too old."""
    import deepspeed
    import torch
    import transformers

    problems = too_old({"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                        "transformers": transformers.__version__})
    if problems:
        raise RuntimeError("; ".join(problems) + " (see promptkd/config/versions.py for why; pip install -U)")
