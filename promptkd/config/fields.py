"""The field helper ``_f`` and the validation that reads its metadata.

A field states its own constraints (``choices``, ``positive``, ``min``, ``unit``, ...)
where it is declared; ``validate`` walks the dataclass tree, checks every leaf against
its metadata and then calls the section's ``check(prefix, root)`` hook, if it has one,
for the rules that span several fields.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import field
from typing import Any, Callable, Optional


class ConfigError(ValueError):
    """A one-line, user-facing configuration error naming the key or file."""


# metadata flag -> (the test a set value must pass, what the message says it must be).
# Checked in this order, so e.g. top_p = 0 reads "> 0" and top_p = 1.5 reads "in (0, 1]".
BOUNDS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("positive", lambda v: v > 0, "> 0"),
    ("at_most_one", lambda v: v <= 1.0, "in (0, 1]"),  # with positive: (0, 1]
    ("unit", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("below_one", lambda v: v < 1.0, "in [0, 1)"),     # with unit: [0, 1)
)


def _f(default: Any, help: str, *, choices: Optional[tuple] = None, positive: bool = False,
       min: Optional[float] = None, unit: bool = False, below_one: bool = False,
       at_most_one: bool = False) -> Any:
    """A dataclass field with its help text and constraints.

    choices: allowed values; positive: > 0; min: >= min; unit: in [0, 1];
    below_one: < 1 (with unit: [0, 1)); at_most_one: <= 1 (with positive: (0, 1]).
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min,
            "positive": positive, "unit": unit, "below_one": below_one, "at_most_one": at_most_one}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        # a deep copy: nested sections of two configs never share an object
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_field(key: str, value: Any, meta: Any) -> None:
    """Raise the one-line ConfigError for the first constraint in ``meta`` that ``value`` breaks."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))} (got {value!r})")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}: must be >= {meta['min']:g} (got {value!r})")
    for flag, ok, wanted in BOUNDS:
        if meta.get(flag) and not ok(value):
            raise ConfigError(f"{key}: must be {wanted} (got {value!r})")


def validate_tree(node: Any, root: Any, prefix: str = "") -> None:
    """Check every field of ``node`` (depth first), then the section's own ``check`` hook."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value, root, prefix + f.name + ".")
        else:
            check_field(prefix + f.name, value, f.metadata)
    hook = getattr(node, "check", None)
    if hook is not None:
        hook(prefix, root)


def validate(cfg: Any) -> None:
    """Strict validation of a whole config tree; raises ConfigError naming the dotted key."""
    validate_tree(cfg, cfg)


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
