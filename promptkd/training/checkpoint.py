"""Atomic checkpoints, resume and export.

A checkpoint is written into ``checkpoints/.tmp_step_N``; rank 0 adds the
``COMPLETE`` marker last and renames the dir to ``step_N``. A dir without the
marker is never loaded, and the newest dir with one is the run's latest
checkpoint (``latest``): the marker and the rename are the one commit point,
so no second pointer file can disagree with them (a pointer written after the
rename lags it when a run dies in between, and goes stale when a dir is
removed or copied by hand).

What a checkpoint holds beside the DeepSpeed engine is a set of named
``Stateful`` objects (the loop, the method, the data sampler; per rank: the
RNGs and the rollout generator) that save and load themselves:
``state.pt`` = {name: obj.state_dict()}, ``rank_<r>.pt`` likewise per rank.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import random
import shutil
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from promptkd import distributed as dist
from promptkd.models import lora
from promptkd.training import faults

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
ADAPTER_CONFIG_DIR = "lora"  # a LoRA student's adapter_config.json, for offline consolidation


@runtime_checkable
class Stateful(Protocol):
    """What a checkpoint saves and restores (torch's ``state_dict`` convention). Every rank calls both, at the
    same point: either may be a collective."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ProcessRNG:
    """This rank's Python, NumPy, torch CPU and accelerator RNGs (DeepSpeed saves none of them)."""

    def state_dict(self) -> dict:
        return _rng_state()

    def load_state_dict(self, state: dict) -> None:
        _set_rng_state(state, f"rank_{dist.rank()}.pt")


class GeneratorState:
    """A ``torch.Generator`` (e.g. the rank's rollout stream); its state is a CPU byte tensor."""

    def __init__(self, generator: Optional[torch.Generator]) -> None:
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: Any) -> None:
        saved = state.get("state") if isinstance(state, dict) else state  # older files: the bare tensor
        if self.generator is not None and saved is not None:
            self.generator.set_state(saved)


class Snapshot:
    """A plain dict as a ``Stateful`` (tools and tests that save values, not objects)."""

    def __init__(self, state: Optional[dict] = None) -> None:
        self.state = dict(state or {})

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def _accelerator() -> Any:
    """DeepSpeed's accelerator when it has an RNG of its own (CUDA, XPU, ...); None on the CPU, whose RNG is torch's."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    return None if accel.device_name() == "cpu" else accel


def _rng_state() -> dict:
    """Every RNG a step draws from; the accelerator's is the current device's (one device per rank)."""
    accel = _accelerator()
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": accel.get_rng_state() if accel is not None else None}


def _set_rng_state(state: dict, where: str) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    accel, saved = _accelerator(), state.get("accelerator")
    if accel is not None and saved is not None:
        accel.set_rng_state(saved)
    elif accel is not None:  # written on a CPU machine, or before accelerator states were saved
        log.warning("resume: %s holds no accelerator RNG state: this rank's accelerator RNG (dropout on the "
                    "device) is not restored; it keeps this run's seeding", where)
    elif saved is not None:
        log.warning("resume: %s holds an accelerator RNG state and this run has no accelerator: it is not "
                    "restored", where)


def _warn_missing_rank_file(path: str) -> None:
    saved = len(glob.glob(os.path.join(path, "rank_*.pt")))
    log.warning("resume: %s has no rank_%d.pt (written by %d ranks, this run has %d): rank %d's Python, NumPy, "
                "torch CPU and accelerator RNG states and its rollout generator are not restored; they keep "
                "this run's seeding", path, dist.rank(), saved, dist.world_size(), dist.rank())


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save(run_dir: str, step: int, engine: Any, state: Mapping[str, Stateful],
         rank_state: Optional[Mapping[str, Stateful]] = None, *, keep_last: int = 0, tokenizer: Any = None) -> str:
    """Save everything needed to resume at ``step``; returns the final dir (all ranks call).

    ``state``: objects the same on every rank (rank 0 writes ``state.pt``); ``rank_state``: each rank's own
    (``rank_<r>.pt``; default: its RNGs).
    """
    rank_state = {"rng": ProcessRNG()} if rank_state is None else rank_state
    shared = _state_dicts(state)  # on every rank: a state_dict may be a collective (DistiLLM gathers its buffers)
    root = os.path.join(run_dir, "checkpoints")
    name = f"step_{step}"
    tmp, final = os.path.join(root, f".tmp_{name}"), os.path.join(root, name)
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    engine.save_checkpoint(tmp, tag="ds", save_latest=False)
    torch.save(_state_dicts(rank_state), os.path.join(tmp, f"rank_{dist.rank()}.pt"))
    if dist.is_main():
        torch.save(shared, os.path.join(tmp, "state.pt"))
        # what `python -m promptkd.consolidate` needs to rebuild an HF model offline
        engine.module.config.to_json_file(os.path.join(tmp, "hf_config.json"))
        lora.save_adapter_config(engine.module, os.path.join(tmp, ADAPTER_CONFIG_DIR))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    faults.in_save(step)  # reliability tests: a kill here leaves a torn checkpoint
    dist.barrier()
    if dist.is_main():
        _write_text(os.path.join(tmp, MARKER), f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
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


def _state_dicts(objects: Mapping[str, Stateful]) -> dict[str, dict]:
    return {name: obj.state_dict() for name, obj in objects.items()}


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


def load(path: str, engine: Any, state: Optional[Mapping[str, Stateful]] = None,
         rank_state: Optional[Mapping[str, Stateful]] = None) -> dict:
    """Restore the engine and every object of ``state`` / ``rank_state`` (as ``save`` took them) from ``path``.

    An object the checkpoint holds nothing for keeps its state. Returns what ``state.pt`` held (``read_state``).
    """
    rank_state = {"rng": ProcessRNG()} if rank_state is None else rank_state
    if not os.path.exists(os.path.join(path, MARKER)):
        raise ValueError(f"resume: {path} is not a complete checkpoint (no {MARKER} marker)")
    engine.load_checkpoint(path, tag="ds")
    saved = read_state(path)
    for name, obj in (state or {}).items():
        if name in saved:
            obj.load_state_dict(saved[name])
    rank_file = os.path.join(path, f"rank_{dist.rank()}.pt")
    if os.path.exists(rank_file):
        # RNG states must be CPU tensors; rank 0 wrote the others from its own device
        mine = torch.load(rank_file, map_location="cpu", weights_only=False)
        for name, obj in rank_state.items():
            if name in mine:
                obj.load_state_dict(mine[name])
    else:
        _warn_missing_rank_file(path)
    log.info("resumed from %s (step %s)", path, saved.get("trainer", {}).get("step"))
    return saved


def read_state(path: str) -> dict:
    """``state.pt`` of a checkpoint dir as {name: state}, older layouts moved to where they live now.

    Older versions nested the method's state (and, before that, the prompt beside the loop's) and the data
    position inside the loop's state ("trainer"); each is moved to its own object's name.
    """
    # On the CPU: each consumer copies onto its rank's device (the prompt into its parameter, optimizer state
    # to the parameter's device)
    saved = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    trainer = saved.get("trainer", {})
    if "prompt" in saved and saved["prompt"] is not None:
        trainer.setdefault("method", {}).setdefault("prompt", saved.pop("prompt"))
    if "method" in trainer:
        saved.setdefault("method", trainer.pop("method"))
    if "epoch" in trainer:
        saved.setdefault("sampler", {"epoch": trainer.pop("epoch"), "batch_in_epoch": trainer.pop("batch_in_epoch", 0)})
    return saved


def export_student(engine: Any, tokenizer: Any, out_dir: str, extra: Optional[Callable[[str], None]] = None) -> None:
    """HF ``save_pretrained`` dir of the student (ZeRO-3 weights gathered first); all ranks call.

    ``extra(dir)`` adds the method's files (e.g. its learned prompt) before the dir is swapped in.
    """
    module = engine.module
    zero3 = any(hasattr(p, "ds_id") for p in module.parameters())
    if zero3:
        state = _gathered_state_dict(module)
    else:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if dist.is_main() else None
    if dist.is_main():
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        state = lora.export_state(module, state, tmp)  # LoRA: merged weights; the adapter goes to tmp/adapter
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    dist.barrier()


def _gathered_state_dict(module: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """``module.state_dict()`` as CPU copies on rank 0 (None elsewhere), from a ZeRO-3 module; all ranks call.

    One submodule's own parameters are gathered at a time, copied to the CPU by rank 0 and released, so the
    device holds one module's weights on top of the shards, never the whole model at once.
    """
    import deepspeed

    state: Optional[dict[str, torch.Tensor]] = {} if dist.is_main() else None
    for prefix, sub in module.named_modules(remove_duplicate=False):
        own = [p for p in sub.parameters(recurse=False) if hasattr(p, "ds_id")]
        gather = deepspeed.zero.GatheredParameters(own, modifier_rank=None) if own else contextlib.nullcontext()
        with gather:
            if state is not None:
                part: dict[str, torch.Tensor] = {}
                # the module's own parameters and persistent buffers, under the keys state_dict() gives them
                sub._save_to_state_dict(part, prefix + "." if prefix else "", keep_vars=False)
                state.update((k, v.detach().cpu().clone()) for k, v in part.items())
    return state


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
