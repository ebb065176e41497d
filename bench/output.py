"""Where every bench's result goes: ``bench/results/<name>.json`` (``BENCH_RESULTS``, ``BENCH_OUT``), one JSON line
on stdout, and the machine it was measured on.

Standard library only at import: bench/quality.py's driver and its SLURM stages (data, stamps, report) read
and write files and start jobs; torch loads only when a result is emitted (its version, threads and GPU).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from dataclasses import asdict
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
# BENCH_RESULTS redirects the JSON files (the smoke test writes to a temp dir, not over real results).
RESULTS = os.environ.get("BENCH_RESULTS") or os.path.join(REPO, "bench", "results")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a missing package is reported as None
        return None


def machine_info() -> dict[str, Any]:
    """Where and under which load the numbers were taken."""
    import torch

    load = os.getloadavg()
    with open("/proc/uptime") as fh:
        up = float(fh.read().split()[0])
    return {
        "cpu_model": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_name(),
        "torch": torch.__version__, "deepspeed": _version("deepspeed"), "transformers": _version("transformers"),
        "trl": _version("trl"), "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(x, 2) for x in load], "uptime_s": round(up),
    }


def emit(name: str, result: dict[str, Any], load_before: Optional[list[float]] = None,
         write: bool = True) -> dict[str, Any]:
    """Attach machine info, write ``bench/results/<name>.json``, print one JSON line."""
    info = machine_info()
    if load_before is not None:
        info["load_avg_at_start"] = [round(x, 2) for x in load_before]
    out = {"bench": name, **result, "machine": info}
    line = json.dumps(out, default=_jsonable)
    if write:
        dirs = [RESULTS] + ([os.environ["BENCH_OUT"]] if os.environ.get("BENCH_OUT") else [])
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{name}.json"), "w") as fh:
                fh.write(json.dumps(out, indent=2, default=_jsonable) + "\n")
    print(line, flush=True)
    return out


def _jsonable(obj: Any) -> Any:
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)
