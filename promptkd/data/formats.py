"""Loading instruction data into `Example`s.

Every input problem becomes a `DataError` whose one-line message starts with
`<file>:<line>:` so a user can jump straight to the bad record. Line 0 means
the problem concerns the whole file (missing, empty, unreadable).
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, TypeVar

from promptkd.data.template import RESPONSE_MARKER, build_prompt

logger = logging.getLogger(__name__)

FORMATS = ("dolly", "prompt_output")
T = TypeVar("T")


class DataError(ValueError):
    """Bad or missing input data; the message names the file and line."""


@dataclass
class Example:
    """One instruction example. `prompt` is fully templated; references[0] is the target."""

    id: str
    prompt: str
    references: list[str] = field(default_factory=list)
    category: str = ""


def _fail(where: str, message: str) -> DataError:
    # Keep messages on one line: logs and test output stay greppable.
    return DataError(f"{where}: {' '.join(message.split())}")


def _required_str(row: dict[str, Any], key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise _fail(where, f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise _fail(where, f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _optional_str(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(where, f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _row_id(row: dict[str, Any], default: str, where: str) -> str:
    value = row.get("id")
    if value is None:
        return default
    # bool is an int subclass, but an id of `true` is certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _fail(where, f"field 'id' must be a string or integer, got {type(value).__name__}")
    return str(value)


def _parse_dolly(row: dict[str, Any], default_id: str, where: str) -> Example:
    instruction = _required_str(row, "instruction", where)
    context = _optional_str(row, "context", where)
    response = _required_str(row, "response", where)
    return Example(
        id=_row_id(row, default_id, where),
        prompt=build_prompt(instruction, context),
        references=[response],
        category=_optional_str(row, "category", where),
    )


def _parse_outputs(row: dict[str, Any], where: str) -> list[str]:
    if "output" not in row or row["output"] is None:
        raise _fail(where, "missing field 'output'")
    output = row["output"]
    if isinstance(output, str):
        return [output]
    if isinstance(output, list) and output and all(isinstance(o, str) for o in output):
        return list(output)
    raise _fail(where, "field 'output' must be a string or a non-empty list of strings")


def _parse_prompt_output(row: dict[str, Any], default_id: str, where: str) -> Example:
    prompt = _required_str(row, "prompt", where)
    # Pre-templated prompts (e.g. exported by another pipeline) must not be wrapped twice.
    if RESPONSE_MARKER.strip() not in prompt:
        prompt = build_prompt(prompt)
    return Example(
        id=_row_id(row, default_id, where),
        prompt=prompt,
        references=_parse_outputs(row, where),
        category=_optional_str(row, "category", where),
    )


_PARSERS: dict[str, Callable[[dict[str, Any], str, str], Example]] = {
    "dolly": _parse_dolly,
    "prompt_output": _parse_prompt_output,
}


def _iter_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_no, object) for each non-blank line; line numbers are 1-based."""
    # Binary read + per-line decode, so an encoding error still reports its line.
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _fail(where, f"not valid UTF-8 ({err.reason})") from err
            if not text.strip():
                continue
            try:
                # Without its line terminator: json would otherwise report a truncated
                # line's error at "line 2, column 1" and the column would be wrong.
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise _fail(where, f"malformed JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(obj, dict):
                raise _fail(where, f"expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def _load_local(path: str, fmt: str) -> list[Example]:
    if not os.path.exists(path):
        raise _fail(f"{path}:0", "file not found")
    if not os.path.isfile(path):
        raise _fail(f"{path}:0", "not a regular file (expected a .jsonl file)")
    parse = _PARSERS[fmt]
    base = os.path.basename(path)
    examples = [
        parse(obj, f"{base}:{line_no}", f"{path}:{line_no}")
        for line_no, obj in _iter_jsonl(path)
    ]
    if not examples:
        raise _fail(f"{path}:0", "no examples (file is empty or has only blank lines)")
    return examples


def _looks_like_hub_id(source: str) -> bool:
    # "owner/name" only: relative paths such as "./x/y" or "data/sub/x" are local typos.
    if os.path.exists(source) or source.endswith((".jsonl", ".json")):
        return False
    if source.startswith(("/", ".", "~")):
        return False
    return source.count("/") == 1 and all(source.split("/"))


def _load_hub(source: str, fmt: str, split: str) -> list[Example]:
    label = f"{source}[{split}]"
    try:
        import datasets  # deferred: importing `datasets` is slow and rarely needed

        rows = datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one readable DataError
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise _fail(f"{label}:0", f"cannot load dataset: {type(err).__name__}: {detail}") from err
    parse = _PARSERS[fmt]
    examples = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise _fail(f"{label}:{index}", f"expected a mapping row, got {type(row).__name__}")
        examples.append(parse(row, f"{source}/{split}:{index}", f"{label}:{index}"))
    if not examples:
        raise _fail(f"{label}:0", "no examples in this split")
    return examples


def sniff_format(source: str, default: str = "dolly") -> str:
    """The format of a local JSONL file from its first record: ``prompt`` -> prompt_output,
    ``instruction`` + ``response`` -> dolly; ``default`` for hub ids and anything else."""
    if _looks_like_hub_id(source) or not os.path.isfile(source):
        return default
    for _, obj in _iter_jsonl(source):
        if "prompt" in obj:
            return "prompt_output"
        if "instruction" in obj and "response" in obj:
            return "dolly"
        break
    return default


def load_examples(source: str, fmt: str = "dolly", split: str = "train") -> list[Example]:
    """Load examples from a local JSONL file or, for an `owner/name` id, the HF hub.

    `split` only matters for the hub. Raises DataError naming file and line.
    """
    if fmt not in _PARSERS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if _looks_like_hub_id(source):
        examples = _load_hub(source, fmt, split)
    else:
        examples = _load_local(source, fmt)
    logger.info("loaded %d %s examples from %s", len(examples), fmt, source)
    return examples


def split_train_dev(examples: Sequence[T], dev_size: int, seed: int) -> tuple[list[T], list[T]]:
    """Pick `dev_size` items at random (seeded) as dev; both splits keep input order."""
    if dev_size < 0 or dev_size >= len(examples):
        raise ValueError(
            f"dev_size={dev_size} must be >= 0 and smaller than the number of examples "
            f"({len(examples)})"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    dev_idx = set(order[:dev_size])
    train = [ex for i, ex in enumerate(examples) if i not in dev_idx]
    dev = [ex for i, ex in enumerate(examples) if i in dev_idx]
    return train, dev
