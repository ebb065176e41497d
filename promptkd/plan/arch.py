"""Model shapes for the planner: from a local config.json, the hub, a tiny ``init``, or the shipped archs/.

No weights are read: the parameter count comes from building the model on the meta device
(shapes only, no memory), so it is exact for any architecture transformers knows.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlparse

from promptkd.config import ConfigError

log = logging.getLogger(__name__)

ARCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "archs")
# Qwen3 is Llama's layout plus q/k RMSNorm (weights only, no activation term the planner counts)
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gpt2": "gpt2", "opt": "opt"}


def shipped() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(ARCH_DIR) if f.endswith(".json"))


@dataclass(frozen=True)
class Arch:
    name: str                 # where the shape came from (for the table)
    family: str               # llama | gpt2 | opt: which activation formulas apply
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int                # the model's (possibly padded) vocabulary: logits are this wide
    n_params: int
    layer_params: int         # parameters of one decoder layer
    param_sizes: tuple        # numel of every parameter tensor (ZeRO-3 persistence)
    dropout: float            # the largest hidden-state dropout rate in the config
    explicit_head_dim: int = 0  # config.head_dim where it is not hidden / heads (Qwen3: 128 at hidden 1024, 16 heads)

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.heads


def from_hf_config(config: Any, name: str, key: str) -> Arch:
    """An ``Arch`` from a transformers config object (counts parameters on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError(f"{key}: the planner has no activation formulas for model_type {config.model_type!r} "
                          f"({name}); known: {', '.join(sorted(FAMILIES))}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sizes = tuple(p.numel() for p in model.parameters())
    layer = sum(p.numel() for n, p in model.named_parameters() if ".0." in n and ("layers.0." in n or "h.0." in n))
    c = config.to_dict()
    hidden = c.get("hidden_size") or c["n_embd"]
    heads = c.get("num_attention_heads") or c["n_head"]
    inter = c.get("intermediate_size") or c.get("ffn_dim") or c.get("n_inner") or 4 * hidden
    drop = max(float(c.get(k) or 0.0) for k in ("dropout", "resid_pdrop", "hidden_dropout"))
    return Arch(name=name, family=family, layers=c.get("num_hidden_layers") or c["n_layer"], hidden=hidden, heads=heads,
                kv_heads=c.get("num_key_value_heads") or heads, intermediate=inter, vocab=c["vocab_size"],
                n_params=sum(sizes), layer_params=layer, param_sizes=sizes, dropout=drop,
                explicit_head_dim=int(c.get("head_dim") or 0))


def load_shipped(name: str, key: str) -> Arch:
    from transformers import AutoConfig

    path = os.path.join(ARCH_DIR, f"{name}.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: unknown model size {name!r}; shipped: {', '.join(shipped())}")
    with open(path) as fh:
        spec = json.load(fh)
    return from_hf_config(AutoConfig.for_model(**spec), f"{name} (shipped)", key)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the model hub answers a TCP connect within ``timeout`` seconds (and offline mode is off)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _shipped_match(path: str) -> Optional[str]:
    """A shipped arch named by a component of ``path`` (``runs/sft/gpt2-xl/export``, ``huggyllama/llama-7b``)."""
    names = set(shipped())
    for part in reversed(os.path.normpath(path).split(os.sep)):
        # hub ids of chat models end in -Instruct (meta-llama/Llama-3.2-1B-Instruct): the shape is the base's
        for name in (part.lower(), part.lower().removesuffix("-instruct")):
            if name in names:
                return name
    return None


def resolve(path: str, override: str, key: str, override_key: str, tiny: Any = None) -> tuple[Arch, str]:
    """(shape, how it was found) for a model given as ``path`` (a dir, a hub id) or a tiny config.

    Order: ``override`` (a shipped name or a dir with config.json); a tiny config when path is empty;
    a local config.json; the hub when it answers; a shipped arch named in the path.
    """
    from transformers import AutoConfig

    if override:
        if os.path.isfile(os.path.join(override, "config.json")):
            return from_hf_config(AutoConfig.from_pretrained(override), override, override_key), f"{override_key}"
        return load_shipped(override, override_key), f"{override_key}={override}"
    if not path:
        return from_hf_config(tiny, "init (tiny, from config)", key), "init"
    expanded = os.path.expanduser(path)
    if os.path.isfile(os.path.join(expanded, "config.json")):
        return from_hf_config(AutoConfig.from_pretrained(expanded), path, key), "config.json"
    from promptkd.models import missing_local_dir

    if not missing_local_dir(path) and hub_reachable():
        try:
            return from_hf_config(AutoConfig.from_pretrained(path), path, key), "hub"
        except (OSError, ValueError) as exc:
            log.info("%s: %s: %s", key, path, exc)
    match = _shipped_match(path)
    if match is None:
        why = "no config.json there" if missing_local_dir(path) else "the hub cannot be reached"
        raise ConfigError(f"{key}: cannot find the architecture of {path!r} ({why}, and no shipped size is named "
                          f"in the path); set {override_key} to one of {', '.join(shipped())} or a dir with "
                          "config.json")
    why = "no config.json there yet" if missing_local_dir(path) else "the hub cannot be reached"
    return load_shipped(match, key), f"{path}: {why}; using the shipped {match} config"
