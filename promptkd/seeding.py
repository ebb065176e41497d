"""One rule for every seed the library derives: ``derive_seed(seed, purpose, rank=, step=, micro_batch=, index=)``.

``seed`` is the run's ``seed`` (or an eval seed of ``eval.seeds``); ``purpose`` names what the draws are for.
Each purpose has a base, ``scale · seed + offset``, and reads only the coordinates it lists (the others must
be 0, so a call site cannot pass a coordinate that silently changes nothing). Two kinds:

- *streams* (``hashed=False``): the seed of a generator that then keeps drawing,
  ``base + rank + index``. Their draws do not depend on what ran before because each stream is its own
  generator, only ever drawn from for its purpose:
  - ``rollout``: the rank's rollout generator (student samples, teacher samples, mixtures), one continuing
    stream per rank. It is not re-derived per step: its *state* is checkpointed, so a resumed run draws what
    an uninterrupted one draws (``training.checkpoint``);
  - ``shared``: ``SharedDraws``, the on/off-policy and replay choices; the same on every rank (no rank in it),
    state checkpointed with the method;
  - ``eval``: a fresh generator per (eval seed, rank) for each call of ``generate_answers`` / the exposure
    metric, so eval draws never depend on training or on an earlier set;
  - ``lm_corpus``: the order of MiniLLM's LM corpus in epoch ``index``, a fresh generator per epoch;
  - ``model_init``: the weights of a tiny model built from config, ``index`` 0 the teacher, 1 the student.
- *per-request* seeds (``hashed=True``, vLLM): a hash of (base, step, rank, index), so every request's draws
  follow from where it sits in the run, never from an engine's state:
  - ``rollout_request``: a student rollout through vLLM, at (optimizer step, rank, row of the step's batch);
  - ``request``: eval answers through vLLM (``index``: the example's position in its set) and SeqKD's
    vLLM teacher samples (``index``: a hash of the example id), independent of ranks and batching.

The constants reproduce the seeds of the four schemes this replaced, so sampled numbers (the pinned loss
curve, eval ROUGE-L) did not move: rollout ``7919·seed + rank``, shared ``seed + 104729``, eval
``1000·seed + rank``, vLLM ``sha256("seed/step/rank/index")``. ``micro_batch`` enters a per-request hash
only when it is non-zero, for the same reason (today's callers number requests across the step's batch).
Purposes give distinct seeds for seeds 1..20 and 8 ranks (tests/unit/test_seeding.py); at seed 0 the
``rollout`` and ``eval`` streams of a rank coincide (both are ``rank``), kept for the same reason.
The library does no other arithmetic on seeds (the same test scans for it).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

COORDINATES = ("rank", "step", "micro_batch", "index")


@dataclass(frozen=True)
class Purpose:
    scale: int                         # base = scale · seed + offset
    offset: int = 0
    uses: tuple[str, ...] = ()         # the coordinates it reads (of COORDINATES)
    hashed: bool = False               # per-request seed (a hash) rather than a stream's start


PURPOSES: dict[str, Purpose] = {
    "rollout": Purpose(7919, uses=("rank",)),
    "shared": Purpose(1, 104_729),
    "eval": Purpose(1000, uses=("rank",)),
    "lm_corpus": Purpose(1_000_003, uses=("index",)),
    "model_init": Purpose(1, uses=("index",)),
    "rollout_request": Purpose(7919, uses=("step", "rank", "micro_batch", "index"), hashed=True),
    "request": Purpose(1, uses=("index",), hashed=True),
}

_SEED_MASK = 0x7FFFFFFF  # 31 bits: every engine takes it


def derive_seed(seed: int, purpose: str, *, rank: int = 0, step: int = 0, micro_batch: int = 0, index: int = 0,
                base: Optional[int] = None) -> int:
    """The seed for ``purpose`` at (rank, step, micro_batch, index) of a run seeded ``seed`` (see the module doc).

    ``base`` replaces ``scale · seed + offset`` (build_run's ``rollout_seed``, for benchmarks and tests).
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}; expected one of {tuple(PURPOSES)}")
    p = PURPOSES[purpose]
    coords = {"rank": rank, "step": step, "micro_batch": micro_batch, "index": index}
    unused = {k: v for k, v in coords.items() if v and k not in p.uses}
    if unused:
        raise ValueError(f"seed purpose {purpose!r} reads {p.uses or 'no coordinate'}, got {unused}")
    if min(coords.values()) < 0:
        raise ValueError(f"seed coordinates must be >= 0, got {coords}")
    start = p.scale * seed + p.offset if base is None else base
    if not p.hashed:
        return start + rank + index
    key = f"{start}/{step}/{rank}/{index}" + (f"/{micro_batch}" if micro_batch else "")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") & _SEED_MASK
