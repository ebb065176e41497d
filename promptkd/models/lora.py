"""LoRA students through PEFT: a frozen base with trainable low-rank adapters (``model.student.lora``).

The adapters are injected in place (``peft.inject_adapter_in_model``): the student stays its Hugging Face
class, so everything that reads its ``config``, ``forward`` signature or ``generate`` works unchanged, and
only the wrapped linear layers' parameter names change (``<layer>.base_layer.weight`` beside
``<layer>.lora_A.default.weight`` / ``lora_B``). Only the adapters have ``requires_grad``, so the optimizer's
param groups (``promptkd.optim.param_groups``) hold them alone and DeepSpeed keeps no state for the base.

Merged weights (``W + scale · B·A``, per wrapped layer) are computed on copies, never in the training
weights: vLLM's engine gets them under the plain HF names (``merged_parameters``) and ``export/`` holds the
merged HF model with the adapter beside it (``export_state``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator, Optional

import torch

from promptkd.config import ConfigError

log = logging.getLogger(__name__)

ADAPTER = "default"        # PEFT's adapter name; one adapter per student
ADAPTER_DIR = "adapter"    # export/adapter: the adapter alone, loadable with peft.PeftModel.from_pretrained
_HAS_LORA = "_promptkd_has_lora"  # has_lora's answer, cached on the module


def enabled(lora: Any) -> bool:
    """Whether ``model.student.lora`` asks for adapters (r > 0)."""
    return lora is not None and int(lora.r) > 0


def peft_config(lora: Any) -> Any:
    """PEFT's LoraConfig for ``model.student.lora`` (no bias training: the base stays bitwise frozen)."""
    from peft import LoraConfig

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return LoraConfig(r=int(lora.r), lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
                      target_modules=targets, bias="none")


def apply_lora(model: torch.nn.Module, lora: Any, seed: int) -> torch.nn.Module:
    """Freeze ``model`` and inject the adapters in place; returns it (unchanged when LoRA is off).

    Called after the student is built (a ZeRO-3 student is partitioned already: the new adapter
    parameters are plain tensors that ``deepspeed.initialize`` partitions) and before its optimizer
    exists. ``seed`` seeds A's init, so every rank starts from the same adapters (B starts at 0, so the
    adapted student equals the base at step 0).
    """
    if not enabled(lora):
        return model
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(peft_config(lora), model, adapter_name=ADAPTER)
        except ValueError as exc:  # no module matches target_modules
            raise ConfigError(f"model.student.lora.target_modules: {exc}") from None
    layers = lora_layers(model)
    setattr(model, _HAS_LORA, bool(layers))
    unsupported = sorted({type(m).__name__ for _, m in layers if not _is_linear(m)})
    if unsupported:
        raise ConfigError(f"model.student.lora.target_modules: only linear layers can take adapters here "
                          f"(got {', '.join(unsupported)})")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or any(".lora_" not in n for n in trainable):
        raise RuntimeError(f"LoRA: expected only adapter parameters to train, got {trainable[:4]}")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %d layers: %d trainable parameters (%s)", lora.r, lora.alpha, len(layers),
             n_train, "frozen base")
    return model


def _is_linear(module: torch.nn.Module) -> bool:
    from peft.tuners.lora.layer import Linear

    return isinstance(module, Linear)


def lora_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every PEFT LoRA layer in ``module``."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def has_lora(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds PEFT LoRA layers. Called per rollout and per weight sync, so it is cheap
    when LoRA is off: adapters exist only if ``apply_lora`` ran, which imported peft; without peft in
    ``sys.modules`` there can be none (and peft need not be installed). Otherwise the answer is
    cached on the module (adapters are injected once, before training)."""
    if "peft" not in sys.modules or not isinstance(module, torch.nn.Module):
        return False
    cached = getattr(module, _HAS_LORA, None)
    if cached is None:
        cached = bool(lora_layers(module))
        setattr(module, _HAS_LORA, cached)
    return cached


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                  fan_in_fan_out: bool) -> torch.Tensor:
    """``W + scaling · B·A`` as a new tensor in W's dtype (fp32 inside: bf16 matmuls round twice).

    W: [out, in] ([in, out] for GPT-2's Conv1D, ``fan_in_fan_out``); A: [r, in]; B: [out, r].
    """
    delta = b.float() @ a.float() * scaling
    if fan_in_fan_out:
        delta = delta.T
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def _layer_info(module: torch.nn.Module) -> dict[str, tuple[float, bool]]:
    """{layer name: (scaling, fan_in_fan_out)} of every adapted layer."""
    return {n: (float(m.scaling[ADAPTER]), bool(m.fan_in_fan_out)) for n, m in lora_layers(module)}


def _split(name: str) -> tuple[str, str]:
    """``a.b.base_layer.weight`` -> (``a.b``, ``weight``); ``a.b.lora_A.default.weight`` -> (``a.b``, ``lora_A``)."""
    for marker in (".base_layer.", ".lora_A.", ".lora_B."):
        if marker in name:
            layer, rest = name.split(marker, 1)
            return layer, rest if marker == ".base_layer." else marker.strip(".")
    return "", name


def merge_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the adapted ``module`` as the plain HF model's: adapters merged into their layers'
    weights, every key under its original name. ``state`` is not changed."""
    info = _layer_info(module)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        layer, what = _split(key)
        if layer not in info:
            out[key] = value
        elif what == "weight":
            scaling, fifo = info[layer]
            out[f"{layer}.weight"] = merged_weight(value, state[f"{layer}.lora_A.{ADAPTER}.weight"],
                                                   state[f"{layer}.lora_B.{ADAPTER}.weight"], scaling, fifo)
        elif what not in ("lora_A", "lora_B"):  # the base layer's bias
            out[f"{layer}.{what}"] = value
    return out


def merged_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, merged copy) of every parameter of an adapted module, for vLLM's ``reload_weights``.

    Under ZeRO-3 each layer's base weight and adapters are gathered together, merged into a new tensor and
    released; nothing is merged into the training weights. All ranks call (the gathers are collective).
    """
    info = _layer_info(module)
    params = dict(module.named_parameters())
    for name, param in params.items():
        layer, what = _split(name)
        if layer in info and what in ("lora_A", "lora_B"):
            continue
        if layer in info and what == "weight":
            a, b = params[f"{layer}.lora_A.{ADAPTER}.weight"], params[f"{layer}.lora_B.{ADAPTER}.weight"]
            with _gathered([param, a, b]):
                yield f"{layer}.weight", merged_weight(param.detach(), a.detach(), b.detach(), *info[layer])
            continue
        with _gathered([param]):
            yield (f"{layer}.{what}" if layer in info else name), param.detach().clone()


def _gathered(params: list[torch.nn.Parameter]) -> Any:
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def adapter_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the keys ``PeftModel.save_pretrained`` writes (``base_model.model.`` +
    the layer + ``.lora_A.weight``), so ``PeftModel.from_pretrained(base, dir)`` loads them."""
    out = {}
    for key, value in state.items():
        layer, what = _split(key)
        if what in ("lora_A", "lora_B"):
            out[f"base_model.model.{layer}.{what}.weight"] = value.detach().contiguous()
    return out


def save_adapter(module: torch.nn.Module, state: dict[str, torch.Tensor], out_dir: str,
                 base_path: str = "") -> None:
    """``out_dir/adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's adapter format)."""
    from safetensors.torch import save_file

    cfg = module.peft_config[ADAPTER]
    os.makedirs(out_dir, exist_ok=True)
    cfg.base_model_name_or_path = base_path or None
    cfg.save_pretrained(out_dir)
    save_file(adapter_state_dict(state), os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})


def save_adapter_config(module: torch.nn.Module, out_dir: str) -> None:
    """A checkpoint's ``adapter_config.json`` (nothing without adapters): what ``python -m promptkd.consolidate``
    needs to rebuild the adapted layers offline and merge them."""
    if has_lora(module):
        module.peft_config[ADAPTER].save_pretrained(out_dir)


def inject_saved_adapter(model: torch.nn.Module, adapter_dir: str) -> torch.nn.Module:
    """Adapters as ``save_adapter_config`` wrote them, injected into ``model`` in place (weights to be loaded)."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig.from_pretrained(adapter_dir), model, adapter_name=ADAPTER)
    setattr(model, _HAS_LORA, bool(lora_layers(model)))
    return model


def export_state(module: torch.nn.Module, state: Optional[dict[str, torch.Tensor]], out_dir: str
                 ) -> Optional[dict[str, torch.Tensor]]:
    """For ``export_student`` (rank 0, ``state`` a CPU state dict of ``module``): the state dict to save as
    the HF model, merged when the student has adapters, which then also go to ``out_dir/adapter``.
    Without adapters (or ``state`` None) ``state`` comes back as it is."""
    if state is None or not has_lora(module):
        return state
    save_adapter(module, state, os.path.join(out_dir, ADAPTER_DIR))
    return merge_state_dict(module, state)


def trainable_summary(module: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: {"trainable": ..., "frozen": ...} (ds_numel under ZeRO-3)."""
    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    out = {"trainable": 0, "frozen": 0}
    for p in module.parameters():
        out["trainable" if p.requires_grad else "frozen"] += numel(p)
    return out


__all__ = ["ADAPTER_DIR", "apply_lora", "enabled", "export_state", "has_lora", "inject_saved_adapter", "lora_layers",
           "merge_state_dict", "merged_parameters", "merged_weight", "save_adapter", "save_adapter_config",
           "trainable_summary"]
