"""The only module that talks to torch.distributed / deepspeed.init_distributed.

Everything else calls these small helpers, which also work in a single process
(world size 1) so the library never branches on "is distributed".
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import torch

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[003-005,9],cpu1``."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return prefix + first


def _tasks_on_node(spec: str, node_id: int) -> str:
    """Entry ``node_id`` of a SLURM tasks-per-node list such as ``2(x3),1``."""
    counts: list[str] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:  # only sizes CPU thread pools: not worth failing a launch over
            return "1"
        counts += [match.group(1)] * int(match.group(2) or 1)
    return counts[min(node_id, len(counts) - 1)]


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host) if host else ""
    except OSError:
        return ""


def _slurm_node_addr(node: str) -> str:
    """The node's ``NodeAddr`` from slurm.conf, for node names that do not resolve (e.g. several slurmd per host)."""
    try:
        text = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    match = re.search(r"\bNodeAddr=(\S+)", text)
    return match.group(1) if match else ""


def env_from_slurm(env: dict[str, str]) -> dict[str, str]:
    """Map an ``srun`` task's SLURM variables to the torch.distributed ones.

    Variables that are already set (torchrun / deepspeed launcher) win.
    """
    if "SLURM_PROCID" not in env or "RANK" in env:
        return {}
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": _tasks_on_node(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE")
                                           or env.get("SLURM_TASKS_PER_NODE", "1"), int(env.get("SLURM_NODEID", 0))),
    }
    if "MASTER_ADDR" not in env:
        host = _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        out["MASTER_ADDR"] = _resolve(host) or _resolve(_slurm_node_addr(host)) or host
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_env() -> None:
    os.environ.update(env_from_slurm(dict(os.environ)))
    if "RANK" not in os.environ:  # plain `python launcher/main.py`: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")


def _limit_cpu_threads(local_world_size: int) -> None:
    # The deepspeed launcher does not set OMP_NUM_THREADS; N ranks each using
    # every core oversubscribe the CPU (~2.5x slower measured on 2 cores).
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))


def device_index(local_rank: int, n_devices: int) -> int:
    """The CUDA ordinal of a rank: its local rank among the devices this process sees.

    ``srun --gpus-per-task=1`` (or ``--gpu-bind``) leaves each task one visible device, cuda:0,
    while SLURM_LOCALID still counts 0..N-1 on the node; a launcher that exposes every device
    gives each rank its own. ``local_rank % n_devices`` is right for both.
    """
    if n_devices < 1:
        raise ValueError(f"no CUDA device visible to local rank {local_rank}")
    return local_rank % n_devices


def _bind_device() -> None:
    """Pin this process to its device before the process group (NCCL) or DeepSpeed sees it.

    DeepSpeed takes LOCAL_RANK as the device ordinal (init_process_group's device_id, the engine's
    set_device), and so does vLLM's external launcher: it is rewritten to the ordinal when they differ.
    """
    if not torch.cuda.is_available():
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    index = device_index(local_rank, torch.cuda.device_count())
    if index != local_rank:
        log.info("local rank %d sees %d CUDA device(s): using cuda:%d (LOCAL_RANK=%d for DeepSpeed)", local_rank,
                 torch.cuda.device_count(), index, index)
        os.environ["LOCAL_RANK"] = str(index)
    torch.cuda.set_device(index)


def init(timeout_s: int = 1800) -> None:
    """Initialise the process group (gloo on CPU, nccl on GPU) with a timeout."""
    _prepare_env()
    node_local_rank = int(os.environ.get("LOCAL_RANK", 0))
    _bind_device()
    import deepspeed
    import deepspeed.ops

    # Training never uses the shared-memory comm op; probing it compiles C++ (~36 s).
    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # pragma: no cover - older deepspeed without the probe table
        pass
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    # Gloo connects its mesh pair by pair, so a fast rank can leave init_process_group while a slow one is
    # still connecting; if the fast one then stops on bad input (exit 2, one line), the slow one would die in
    # its own init with "Connection closed by peer" and a traceback. Return only once every rank is up.
    barrier()
    info = DistInfo(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                    local_rank=node_local_rank,
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))))
    _limit_cpu_threads(info.local_world_size)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Every rank waits for all; under NCCL on this rank's own device (bound by ``_bind_device``)."""
    if world_size() == 1:
        return
    if torch.cuda.is_available():
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def all_reduce_sum(value: torch.Tensor | float) -> torch.Tensor:
    """Sum over ranks; returns a new fp32/fp64 tensor (the input is untouched)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device()).clone()
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_tensors_(tensors: Iterable[torch.Tensor]) -> None:
    """In-place SUM over ranks (e.g. prompt gradients already divided by the global token count)."""
    if world_size() == 1:
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def all_true(flag: bool) -> bool:
    """True iff ``flag`` is true on every rank (one tiny all-reduce)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return int(t.item()) == 0


def any_true(flag: bool) -> bool:
    return not all_true(not flag)


def all_gather_object(obj: Any) -> list[Any]:
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def shutdown(code: int) -> None:
    """barrier -> destroy -> os._exit: gloo processes otherwise sometimes abort at exit."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    if is_initialized():
        try:
            if code == 0:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        except Exception:  # a dead peer must not turn a clean exit code into a hang
            pass
    os._exit(code)
