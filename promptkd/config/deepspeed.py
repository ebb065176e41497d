"""The DeepSpeed JSON merge: ZeRO/offload settings from the JSON, everything else from the run config."""
from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Optional

from promptkd.config.fields import ConfigError

if TYPE_CHECKING:
    from promptkd.config.schema import Config

log = logging.getLogger(__name__)

# These live in the run config; a DeepSpeed JSON that sets them is rejected
# rather than silently overridden, so there is one source of truth.
RUN_CONFIG_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "fp16", "bf16", "optimizer", "scheduler",
)
# promptkd/config/deepspeed.py -> the repository root, three levels up
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_path(path: str) -> str:
    """Relative config paths resolve against the cwd, then against the repo root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(REPO_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def load_ds_json(path: str) -> dict:
    real = resolve_path(path)
    if not os.path.isfile(real):
        raise ConfigError(f"deepspeed: file not found: {path}")
    try:
        with open(real) as fh:
            ds = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: top level must be an object")
    for key in RUN_CONFIG_KEYS:
        if key in ds:
            raise ConfigError(f"{path}: '{key}' belongs in the run config (train.*), not the DeepSpeed JSON")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
    return ds


def build_ds_config(cfg: Config, world_size: int, micro_batch_size: Optional[int] = None,
                    grad_accum: Optional[int] = None) -> dict:
    """The student's DeepSpeed config: the JSON's ZeRO settings + the run config."""
    ds = load_ds_json(cfg.deepspeed)
    mbs = micro_batch_size or cfg.train.micro_batch_size
    ga = grad_accum or cfg.train.grad_accum
    ds["train_micro_batch_size_per_gpu"] = mbs
    ds["gradient_accumulation_steps"] = ga
    ds["train_batch_size"] = mbs * ga * world_size
    ds["gradient_clipping"] = cfg.train.grad_clip
    # check_grad_overflow: a bf16 ZeRO step with non-finite gradients is skipped, not applied
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": True}
    ds["fp16"] = {"enabled": cfg.train.precision == "fp16"}
    if cfg.train.precision == "bf16":
        set_fp32_grad_accum(ds)
    ds.setdefault("steps_per_print", 10 ** 9)  # we log ourselves
    return ds


def set_fp32_grad_accum(ds: dict) -> None:
    """bf16 training accumulates gradients in fp32 (DESIGN.md §3), where DeepSpeed can.

    What DeepSpeed 0.19.8 does with ``data_types.grad_accum_dtype=fp32`` under bf16 (read in its
    engine.py ``_do_optimizer_sanity_check`` and checked by tests/unit/test_optim.py on real engines):
    - ZeRO-1 without offload: the engine switches to its BF16_Optimizer, which keeps fp32 flat
      gradient buffers (``fp32_groups_gradients_flat``);
    - ZeRO-1 with optimizer offload: DeepSpeedZeroOptimizer accumulates in fp32 ``param.grad_accum``;
    - ZeRO-2 (offload or not): DeepSpeedZeroOptimizer accumulates into fp32 gradient partitions;
    - ZeRO-3: the fp32 flat gradient partition buffer (``grad_partitions_flat_buffer``);
    - ZeRO-0: unsupported ("unsupported mix of model_dtype=bf16 and grad_accum_dtype=fp32",
      NotImplementedError), so the key is left out and gradients accumulate in bf16; the log says so
      when that matters (accumulation > 1).
    """
    if zero_stage(ds) == 0:
        if ds.get("gradient_accumulation_steps", 1) > 1:
            log.warning("bf16 at ZeRO stage 0: DeepSpeed cannot accumulate gradients in fp32 there, so the %d "
                        "micro-batches accumulate in bf16; use ZeRO stage 1 (same memory on one GPU) for fp32",
                        ds["gradient_accumulation_steps"])
        return
    ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")  # a JSON's explicit choice stands


def offloads_optimizer(ds_config: dict) -> bool:
    """The config puts the optimizer on the CPU or NVMe (ZeRO-Offload): DeepSpeed then expects its CPU Adam."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() not in ("none", "")


def build_teacher_ds_config(cfg: Config) -> dict:
    """The frozen teacher's DeepSpeed config (placement=zero3): ZeRO-3, no optimizer."""
    t = cfg.model.teacher
    ds = load_ds_json(t.deepspeed)
    if zero_stage(ds) != 3:
        raise ConfigError(f"{t.deepspeed}: model.teacher.placement=zero3 needs zero_optimization.stage 3")
    if t.offload_params:
        ds["zero_optimization"]["offload_param"] = {"device": t.offload_params, "pin_memory": True}
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size  # required by DeepSpeed, unused
    ds["gradient_accumulation_steps"] = 1
    ds["bf16"] = {"enabled": t.dtype == "bf16"}
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
