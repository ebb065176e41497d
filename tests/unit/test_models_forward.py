"""promptkd.models.forward: what a forward accepts is read once per class, and every caller asks there."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from promptkd.models import forward as fwd

PKG = Path(__file__).resolve().parents[2] / "promptkd"


class WithKeep(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, cache: Any = None, logits_to_keep: int = 0) -> torch.Tensor:
        return input_ids


class WithoutKeep(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None) -> torch.Tensor:
        return input_ids


class Engine:
    """Stands in for a DeepSpeed engine: its own forward takes anything, its module is the HF model."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def test_a_module_with_and_without_logits_to_keep():
    assert fwd.takes_logits_to_keep(WithKeep()) and not fwd.takes_logits_to_keep(WithoutKeep())
    assert fwd.takes_logits_to_keep(Engine(WithKeep()))  # the engine's module decides, not its *args forward
    assert fwd.keep_kwargs(WithKeep(), 3) == {"logits_to_keep": 3}
    assert fwd.keep_kwargs(WithKeep(), 3, n_positions=10) == {"logits_to_keep": 3}
    assert fwd.keep_kwargs(WithKeep(), 10, n_positions=10) == {}   # every position: nothing saved
    assert fwd.keep_kwargs(WithKeep(), 0) == {}
    assert fwd.keep_kwargs(WithoutKeep(), 3) == {}
    assert fwd.cache_kwarg(WithKeep()) == "cache" and fwd.cache_kwarg(WithoutKeep()) == "past_key_values"


def test_the_signature_is_read_once_per_class(monkeypatch):
    calls = []
    real = inspect.signature
    monkeypatch.setattr(fwd.inspect, "signature", lambda f, *a, **k: calls.append(f) or real(f, *a, **k))

    class Fresh(WithKeep):  # a class the cache has not seen
        pass

    for _ in range(5):
        assert fwd.keep_kwargs(Fresh(), 1) == {"logits_to_keep": 1}
        assert fwd.cache_kwarg(Fresh()) == "cache"
    assert calls == [Fresh.forward]


def test_output_cache_prefers_the_new_field():
    assert fwd.output_cache(SimpleNamespace(cache="new", past_key_values="old")) == "new"
    assert fwd.output_cache(SimpleNamespace(cache=None, past_key_values="old")) is None  # field exists: no warning
    assert fwd.output_cache(SimpleNamespace(past_key_values="old")) == "old"
    assert fwd.output_cache(SimpleNamespace()) is None


def test_no_other_module_sniffs_a_forward():
    """logits_to_keep / the cache keyword are looked up in promptkd/models/forward.py only."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "models" / "forward.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "signature" and \
                    isinstance(node.value, ast.Name) and node.value.id == "inspect":
                found.append(f"{path.relative_to(PKG)}:{node.lineno}")
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in ("output_cache", "cache_kwarg"):
                found.append(f"{path.relative_to(PKG)}:{node.lineno} def {node.name}")
    assert not found, found
