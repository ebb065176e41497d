"""What a Hugging Face model's ``forward`` accepts and where its output keeps the KV cache: found once per class.

The rollout loop, ``lm_logits``/``teacher_logits`` and the prompted teacher all ask here, so
``logits_to_keep`` and the cache keyword are sniffed in one place. The signature is read from the
*class* (once, cached): a per-call ``inspect.signature`` costs more than a small decode step's matmuls,
and an instance's ``forward`` may be a hook wrapper (accelerate) that hides the real parameters.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Optional


def _unwrap(model: Any) -> Any:
    # a DeepSpeed engine forwards keyword arguments to the HF module it wraps
    return getattr(model, "module", model)


@functools.lru_cache(maxsize=None)
def forward_parameters(cls: type) -> frozenset[str]:
    """Names of ``cls.forward``'s parameters (cached per class)."""
    return frozenset(inspect.signature(cls.forward).parameters)


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can compute the LM head for the last positions only."""
    return "logits_to_keep" in forward_parameters(type(_unwrap(model)))


def keep_kwargs(model: Any, n_keep: int, n_positions: Optional[int] = None) -> dict[str, int]:
    """``{"logits_to_keep": n_keep}`` where it saves work and the model accepts it, else ``{}``.

    n_keep <= 0 means every position; with ``n_positions`` (the positions of the forward) given,
    n_keep >= n_positions also means every position, and nothing is passed.
    """
    if n_keep <= 0 or (n_positions is not None and n_keep >= n_positions) or not takes_logits_to_keep(model):
        return {}
    return {"logits_to_keep": n_keep}


def cache_kwarg(model: Any) -> str:
    """The forward's KV-cache keyword: transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    return "cache" if "cache" in forward_parameters(type(_unwrap(model))) else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, or None.

    transformers 5 names the output field ``cache``; 4.x calls it ``past_key_values``. Reading the old
    name on 5.x logs a deprecation warning, so the new one is tested first.
    """
    if hasattr(output, "cache"):
        return output.cache
    return getattr(output, "past_key_values", None)
