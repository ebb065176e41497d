"""Atomic checkpoints, resume and export.

A checkpoint is written into ``checkpoints/.tmp_step_N``; rank 0 adds the
``COMPLETE`` marker last, renames the dir to ``step_N`` and only then points
``latest`` at it. A dir without the marker is never loaded.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from typing import Any, Callable, Optional

import numpy as np
import torch

from promptkd import distributed as dist
from promptkd.training import faults

log = logging.getLogger(__name__)

MARKER = "COMPLETE"


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save(run_dir: str, step: int, engine: Any, trainer_state: dict, generator: Optional[torch.Generator] = None,
         keep_last: int = 0, tokenizer: Any = None) -> str:
    """Save everything needed to resume at ``step``; returns the final dir (all ranks call).

    ``trainer_state`` holds the loop's state and, under "method", the method's own (e.g. its prompt).
    """
    root = os.path.join(run_dir, "checkpoints")
    name = f"step_{step}"
    tmp, final = os.path.join(root, f".tmp_{name}"), os.path.join(root, name)
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    engine.save_checkpoint(tmp, tag="ds", save_latest=False)
    rank_state = {"rng": _rng_state(), "generator": generator.get_state() if generator is not None else None}
    torch.save(rank_state, os.path.join(tmp, f"rank_{dist.rank()}.pt"))
    if dist.is_main():
        torch.save({"trainer": trainer_state}, os.path.join(tmp, "state.pt"))
        # what `python -m promptkd.consolidate` needs to rebuild an HF model offline
        engine.module.config.to_json_file(os.path.join(tmp, "hf_config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    faults.in_save(step)  # reliability tests: a kill here leaves a torn checkpoint
    dist.barrier()
    if dist.is_main():
        _write_text(os.path.join(tmp, MARKER), f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_text(os.path.join(root, "latest"), name + "\n")
    dist.barrier()  # every rank has finished with the new checkpoint before old ones go
    if dist.is_main():
        _prune(root, keep_last)
    log.info("checkpoint saved: %s", final)
    return final


def _prune(root: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0: keep all), and stale temp dirs (a save
    that died before its rename; the one just saved is renamed already)."""
    names = os.listdir(root)
    complete = sorted((int(n.split("_")[1]), n) for n in names
                      if n.startswith("step_") and os.path.exists(os.path.join(root, n, MARKER)))
    stale = [n for n in names if n.startswith(".tmp_step_")] + ([n for _, n in complete[:-keep_last]] if keep_last
                                                                 else [])
    for name in stale:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def latest(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint dir, or None; incomplete dirs are reported and skipped."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    candidates = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not name.startswith("step_") or not os.path.isdir(path):
            continue
        if not os.path.exists(os.path.join(path, MARKER)):
            log.warning("skipping incomplete checkpoint %s (no %s marker)", path, MARKER)
            continue
        candidates.append((int(name.split("_")[1]), path))
    return max(candidates)[1] if candidates else None


def load(path: str, engine: Any, generator: Optional[torch.Generator] = None) -> dict:
    """Restore the engine, RNG and generator; returns ``{"trainer": ...}``.

    A checkpoint of an older version kept the prompt beside the trainer state; it is moved
    into the method's state, where it lives now.
    """
    if not os.path.exists(os.path.join(path, MARKER)):
        raise ValueError(f"resume: {path} is not a complete checkpoint (no {MARKER} marker)")
    engine.load_checkpoint(path, tag="ds")
    state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    rank_file = os.path.join(path, f"rank_{dist.rank()}.pt")
    if os.path.exists(rank_file):
        rank_state = torch.load(rank_file, weights_only=False)
        _set_rng_state(rank_state["rng"])
        if generator is not None and rank_state["generator"] is not None:
            generator.set_state(rank_state["generator"])
    if state.get("prompt") is not None:
        state["trainer"].setdefault("method", {}).setdefault("prompt", state.pop("prompt"))
    log.info("resumed from %s (step %s)", path, state["trainer"].get("step"))
    return state


def export_student(engine: Any, tokenizer: Any, out_dir: str, extra: Optional[Callable[[str], None]] = None) -> None:
    """HF ``save_pretrained`` dir of the student (ZeRO-3 weights gathered first); all ranks call.

    ``extra(dir)`` adds the method's files (e.g. its learned prompt) before the dir is swapped in.
    """
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    if zero3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if dist.is_main() else None
    else:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if dist.is_main() else None
    if dist.is_main():
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    dist.barrier()


BEST = "best"


def save_best(run_dir: str, step: int, score: float, engine: Any, tokenizer: Any,
              extra: Optional[Callable[[str], None]] = None, metric: str = "dev/rougeL") -> str:
    """Export the student (and the method's files) as ``<run_dir>/best`` with ``best.json``; all ranks call.

    The new export is staged next to ``best/`` and swapped in by renames, so ``best/``
    always holds one complete model with its matching prompt and step.
    """
    final, staging = os.path.join(run_dir, BEST), os.path.join(run_dir, f".{BEST}_staging")
    export_student(engine, tokenizer, staging, extra)
    if dist.is_main():
        _write_text(os.path.join(staging, "best.json"),
                    json.dumps({"step": step, "metric": metric, "score": score}, indent=2) + "\n")
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    log.info("best so far (%s %.4g at step %d) exported to %s", metric, score, step, final)
    return final
