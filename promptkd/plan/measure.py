"""Measured memory of a real step on any device, to check the planner against (bench/plan_check.py).

Two instruments, both counting tensor storage bytes (what the allocator is asked for, before its
rounding and caching):

- ``LiveBytes``: a dispatch mode that sees every tensor an operator creates while it is active and
  counts it until its storage is freed; it keeps the peak of each named phase above the live bytes
  at that phase's start;
- ``engine_states``: a walk over a DeepSpeed engine's parameters, gradients and optimizer that sorts
  every storage it holds into parameters, optimizer states (fp32 master weights and AdamW moments)
  and gradients (the rest: gradients, ZeRO buckets and partitions).
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Storage bytes created under the mode and still alive; the peak per phase above its start.

    A storage is known by its Python object, which PyTorch keeps for as long as the storage lives, so that
    its ``id`` names one storage at a time and its finalizer runs when the storage dies. Addresses are not
    identities: the allocator reuses them at once, and a storage can move to new memory in place (an
    ``out=`` operator or ``resize_`` grows it), leaving its old address free for a new storage. Each
    storage is re-read whenever an operator returns it, and the storage last recorded at an address is
    re-read when a new one turns up there. Frees may come from any thread (a collective's worker drops
    its tensors), so the counts change under a lock.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._storages: dict[int, tuple[weakref.ref, int, int]] = {}  # id(storage) -> (ref, address, bytes)
        self._at: dict[int, int] = {}  # address -> id of the storage recorded there
        self.live = 0
        self.phase_start: dict[str, int] = {}
        self.phase_peak: dict[str, int] = {}
        self.current: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def adopt(self, tensors: list[torch.Tensor]) -> None:
        """Count storages made before the mode too, so that freeing one (e.g. a buffer DeepSpeed replaces by a
        new one) is seen; call it before a phase starts."""
        for t in tensors:
            self._track(t)

    def addresses(self) -> set[int]:
        """Addresses of the live storages counted."""
        with self._lock:
            return set(self._at)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        with self._lock:
            if key not in self._storages:
                weakref.finalize(storage, self._free, key)
                self._storages[key] = (weakref.ref(storage), 0, 0)
            self._refresh(key, storage)

    def _refresh(self, key: int, storage: torch.UntypedStorage) -> None:
        """Record ``storage``'s current memory; a storage it displaces from its address is re-read."""
        ref, address, n = self._storages[key]
        now, now_n = storage.data_ptr(), storage.nbytes()
        if (now, now_n) == (address, n):
            return
        self._release(key)
        if now == 0:
            return
        other = self._at.get(now)
        if other is not None and other != key:
            other_storage = self._storages[other][0]()
            if other_storage is not None and other_storage.data_ptr() == now:
                return  # an alias of memory counted already (e.g. a tensor made from another's buffer)
            if other_storage is not None:  # it moved (resized in place): count it where it is now
                self._refresh(other, other_storage)
            else:
                self._release(other)
        self._storages[key] = (ref, now, now_n)
        self._at[now] = key
        self.live += now_n
        for name in self.current:
            self.phase_peak[name] = max(self.phase_peak[name], self.live - self.phase_start[name])

    def _release(self, key: int) -> None:
        """Stop counting the memory recorded for ``key`` (the storage stays known)."""
        ref, address, n = self._storages[key]
        if not n and not address:
            return
        self.live -= n
        if self._at.get(address) == key:
            del self._at[address]
        self._storages[key] = (ref, 0, 0)

    def _free(self, key: int) -> None:
        with self._lock:
            if key in self._storages:
                self._release(key)
                del self._storages[key]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Peak of the live bytes above their value when the phase starts (phases may nest)."""
        with self._lock:
            self.phase_start[name] = self.live
            self.phase_peak.setdefault(name, 0)
            self.current.append(name)
        try:
            yield
        finally:
            with self._lock:
                self.current.remove(name)

    def alive(self, addresses: set[int]) -> int:
        """Bytes of the storages at ``addresses`` that were created under the mode and are alive."""
        with self._lock:
            return sum(self._storages[self._at[a]][2] for a in addresses if a in self._at)


def _tensors_in(obj: Any, out: list[torch.Tensor], seen: set[int], depth: int = 0) -> None:
    """Every tensor reachable from ``obj`` through containers and object attributes."""
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)) and \
            type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        _tensors_in(item, out, seen, depth + 1)


def storage_bytes(tensors: list[torch.Tensor], taken: set[int]) -> int:
    """Bytes of the storages of ``tensors`` not already in ``taken`` (which they join)."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in taken and t.device.type != "meta":
            taken.add(ptr)
            total += storage.nbytes()
    return total


def engine_tensors(engine: Any) -> list[torch.Tensor]:
    """Every tensor the engine's module and optimizer hold (parameters, partitions, gradients, states)."""
    params = list(engine.module.parameters())
    out = [p.data for p in params] + [p.ds_tensor for p in params if hasattr(p, "ds_tensor")]
    out += [p.grad for p in params if p.grad is not None]
    _tensors_in(engine.optimizer, out, set())
    return out


def engine_states(engine: Any) -> dict[str, Any]:
    """Bytes of the student engine's parameters, optimizer states and gradients (device tensors only).

    Parameters are the module's (under ZeRO-3 each rank's partition, ``ds_tensor``). Optimizer states are
    the inner optimizer's per-parameter state and the parameters it updates when those are not the
    module's (ZeRO's fp32 master partitions). Gradients are every other storage the engine's optimizer
    and the parameters hold: ``.grad`` tensors, ZeRO's buckets and gradient partitions. Also returns the
    data pointers of the gradient storages, for ``LiveBytes.alive``.
    """
    taken: set[int] = set()
    params = list(engine.module.parameters())
    partitions = [p.ds_tensor for p in params if hasattr(p, "ds_tensor")]
    param_bytes = storage_bytes(partitions or [p.data for p in params], taken)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state: list[torch.Tensor] = []
    _tensors_in(inner.state, state, set())
    master = [p for g in inner.param_groups for p in g["params"]]
    # ZeRO-3 swaps its fp32 partitions in and out of the inner optimizer's groups; take them by name
    master += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    opt_bytes = storage_bytes(state + [m.data for m in master], taken)
    rest: list[torch.Tensor] = [p.grad for p in params if p.grad is not None] + \
        [m.grad for m in master if m.grad is not None]
    _tensors_in(engine.optimizer, rest, set())
    before = set(taken)
    grad_bytes = storage_bytes(rest, taken)
    return {"params": param_bytes, "optimizer": opt_bytes, "grads": grad_bytes, "grad_ptrs": taken - before}
