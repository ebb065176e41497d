"""Stop tokens of a decode loop: one EOS id, or several (a chat model's end-of-turn token and its EOS ids).

``eos`` arguments across the rollout code take an int or a sequence of ints. The first id is the one a
forced EOS writes (the template's end-of-turn token); any of them ends a response, and the loss mask
runs through the first one a response holds.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

StopIds = Union[int, Sequence[int]]


def stop_tuple(eos: StopIds) -> tuple[int, ...]:
    """The stop ids as a non-empty tuple."""
    out = (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)
    if not out:
        raise ValueError("no stop token ids")
    return out


def forced_id(eos: StopIds) -> int:
    """The id written at the end of a response that hit the length limit."""
    return stop_tuple(eos)[0]


def stop_tensor(eos: StopIds, device: torch.device) -> torch.Tensor:
    """[S] long tensor of the stop ids on ``device`` (built once per loop, outside the per-token steps)."""
    return torch.tensor(stop_tuple(eos), dtype=torch.long, device=device)


def is_stop(tokens: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """Bool tensor shaped like ``tokens``: which are stop ids (on the device, no host sync)."""
    return torch.isin(tokens, stops)


def first_stop(ids: Sequence[int], eos: StopIds) -> int:
    """Index of the first stop id in ``ids``, or -1."""
    stops = set(stop_tuple(eos))
    return next((i for i, tok in enumerate(ids) if tok in stops), -1)


def as_eos(stops: Sequence[int]) -> StopIds:
    """A single stop id as a plain int (what single-EOS code and cache keys always saw), several as a tuple."""
    stops = stop_tuple(stops)
    return stops[0] if len(stops) == 1 else stops
