"""Defaults < YAML file < dotted ``key=value`` overrides, strict parsing, help and YAML output.

Unknown keys, wrong types and bad values raise ``ConfigError`` naming the dotted key;
a key that moved in an earlier version says where it is now (``MOVED``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from typing import Any, Optional

import yaml

from promptkd.config.fields import ConfigError, validate
from promptkd.config.methods import MOVED
from promptkd.config.schema import Config


def unknown_key(key: str, known: Optional[list[str]] = None) -> ConfigError:
    """The error for a key the tree lacks: where it moved to, else (when given) the known siblings."""
    if key in MOVED:
        return ConfigError(f"{key}: unknown config key; it is now {MOVED[key]}")
    return ConfigError(f"{key}: unknown config key" + (f" (known: {', '.join(known)})" if known else ""))


# ----------------------------------------------------------------------------- parsing

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``typ``; return the converted value."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(typ, value, key + ".")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ is list or origin is list:
        if isinstance(value, list):
            return list(value)
    elif typ is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - every field above uses one of these types
        return value
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise unknown_key(prefix + unknown[0], sorted(types_))
    base = cls()
    kwargs = {}
    for name, typ in types_.items():
        if name in data:
            if dataclasses.is_dataclass(typ) and isinstance(data[name], dict):
                # merge a partial mapping over the field's own default
                merged = _merge(asdict(getattr(base, name)), data[name])
                kwargs[name] = _coerce(merged, typ, prefix + name)
            else:
                kwargs[name] = _coerce(data[name], typ, prefix + name)
    return dataclasses.replace(base, **kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def asdict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are bools, so `reg_schedule: off` stays the word "off"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _load_yaml(stream: Any) -> Any:
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"{text}: overrides must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{text}: empty key")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: dict, path: list[str], value: Any, cls: type) -> None:
    node, typ = tree, cls
    for i, part in enumerate(path):
        known = _field_types(typ) if dataclasses.is_dataclass(typ) else {}
        if typ is dict:  # a free-form mapping field (data.template_kwargs): any key below it
            known = {part: Any}
        if part not in known:
            raise unknown_key(".".join(path[:i + 1]))
        typ = known[part]
        if i == len(path) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(path[:i + 1])}: is not a section")


def _read_yaml_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path}")
    try:
        with open(path) as fh:
            loaded = _load_yaml(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded or {}


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Defaults < YAML file < dotted overrides, then strict validation."""
    tree: dict = _read_yaml_file(path) if path else {}
    for item in overrides:
        keys, value = parse_override(item)
        _set_path(tree, keys, value, Config)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with dotted keys replaced (used to derive sub-runs)."""
    tree = asdict(cfg)
    for dotted, value in values.items():
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node:
            raise unknown_key(dotted)
        node[parts[-1]] = value
    out = _build(Config, tree)
    validate(out)
    return out


# ----------------------------------------------------------------------------- output / help

def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False)


def help_lines(default: Any = None, prefix: str = "") -> list[str]:
    """One line per leaf key: name, default, meaning (for ``--help``)."""
    default = Config() if default is None else default
    lines = []
    for f in dataclasses.fields(default):
        value = getattr(default, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            lines.extend(help_lines(value, key + "."))
            continue
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "")
        shown = json.dumps(value) if not isinstance(value, str) else (value or '""')
        if choices and "|" not in text:
            text += f" [{'|'.join(map(str, choices))}]"
        lines.append(f"  {key:<42} {shown:<22} {text}")
    return lines
