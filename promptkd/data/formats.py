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

FORMATS = ("dolly", "prompt_output", "messages", "prompt_completion")
# alpaca: the paper's template (DESIGN.md §1); chat: the tokenizer's own chat template, rendered at
# tokenization (promptkd/data/chat.py); none: the instruction text as it is
TEMPLATES = ("alpaca", "chat", "none")
ROLES = ("system", "developer", "user", "assistant", "tool")
T = TypeVar("T")
Message = dict[str, str]


class DataError(ValueError):
    """Bad or missing input data; the message names the file and line."""


@dataclass
class Example:
    """One instruction example. `prompt` is fully templated; references[0] is the target."""

    id: str
    prompt: str
    references: list[str] = field(default_factory=list)
    category: str = ""
    # The conversation before the response ({"role", "content"} dicts; not part of ==). With template=chat, `prompt`
    # holds only its plain text (for tokenizer training and logs) and the tokenizer renders these.
    messages: list[Message] = field(default_factory=list, compare=False)


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


def _user_text(instruction: str, context: str) -> str:
    """Instruction and context as one user turn (templates chat / none): the context after a blank line."""
    return instruction + ("\n\n" + context if context.strip() else "")


def _single_turn(instruction: str, context: str, template: str) -> tuple[str, list[Message]]:
    """(prompt text, messages) of a single-turn instruction under ``template``."""
    text = _user_text(instruction, context)
    prompt = build_prompt(instruction, context) if template == "alpaca" else text
    return prompt, [{"role": "user", "content": text}]


def _dolly_references(row: dict[str, Any], response: str, where: str) -> list[str]:
    """[response] plus the optional ``references`` list (every valid answer, for sets with several; scored as the
    max over them). ``response`` stays first: it is the training target (references[0])."""
    extra = row.get("references")
    if extra is None:
        return [response]
    if not isinstance(extra, list) or not extra or not all(isinstance(r, str) for r in extra):
        raise _fail(where, "field 'references' must be a non-empty list of strings")
    return [response] + [r for r in dict.fromkeys(extra) if r != response]


def _parse_dolly(row: dict[str, Any], default_id: str, where: str, template: str) -> Example:
    instruction = _required_str(row, "instruction", where)
    context = _optional_str(row, "context", where)
    response = _required_str(row, "response", where)
    prompt, messages = _single_turn(instruction, context, template)
    return Example(
        id=_row_id(row, default_id, where),
        prompt=prompt,
        references=_dolly_references(row, response, where),
        category=_optional_str(row, "category", where),
        messages=messages,
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


def _parse_prompt_output(row: dict[str, Any], default_id: str, where: str, template: str) -> Example:
    prompt = _required_str(row, "prompt", where)
    instruction = _optional_str(row, "instruction", where)
    if template != "alpaca" and instruction:
        # promptkd.data.prepare keeps the raw instruction/input beside its Alpaca-templated prompt:
        # chat models get the question itself, not the Alpaca wrapping inside their own template.
        prompt, messages = _single_turn(instruction, _optional_str(row, "input", where), template)
    elif template != "alpaca" and RESPONSE_MARKER.strip() in prompt:
        raise _fail(where, f"prompt is Alpaca-templated but data.template={template}; give the raw "
                    "'instruction' (and 'input') fields, or use data.template=alpaca")
    else:
        messages = [{"role": "user", "content": prompt}]
        # Pre-templated prompts (e.g. exported by another pipeline) must not be wrapped twice.
        if template == "alpaca" and RESPONSE_MARKER.strip() not in prompt:
            prompt = build_prompt(prompt)
    return Example(
        id=_row_id(row, default_id, where),
        prompt=prompt,
        references=_parse_outputs(row, where),
        category=_optional_str(row, "category", where),
        messages=messages,
    )


def _message_list(value: Any, key: str, where: str) -> list[Message]:
    """A list of {"role", "content"} messages, checked one by one (errors name the index)."""
    if not isinstance(value, list):
        raise _fail(where, f"field '{key}' must be a list of messages, got {type(value).__name__}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _fail(where, f"{key}[{i}] must be an object with 'role' and 'content', got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise _fail(where, f"{key}[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise _fail(where, f"{key}[{i}]: content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _conversation(prompt: list[Message], response: str, row: dict[str, Any], default_id: str, where: str,
                  template: str) -> Example:
    if not any(m["role"] == "user" for m in prompt):
        raise _fail(where, "no user turn before the response")
    if template == "chat":
        text = "\n\n".join(m["content"] for m in prompt)
    elif len(prompt) == 1:
        text = build_prompt(prompt[0]["content"]) if template == "alpaca" else prompt[0]["content"]
    else:
        raise _fail(where, f"data.template={template} takes one user turn per record, this one has {len(prompt)} "
                    "messages before the response; use data.template=chat")
    return Example(id=_row_id(row, default_id, where), prompt=text, references=[response],
                   category=_optional_str(row, "category", where), messages=prompt)


def _parse_messages(row: dict[str, Any], default_id: str, where: str, template: str) -> Example:
    """TRL's conversational format: the last assistant turn is the response, the turns before it the prompt."""
    if "messages" not in row or row["messages"] is None:
        raise _fail(where, "missing field 'messages'")
    messages = _message_list(row["messages"], "messages", where)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise _fail(where, "no assistant turn in 'messages' (the last one is the response)")
    if last != len(messages) - 1:
        raise _fail(where, f"messages[{last + 1}] ({messages[last + 1]['role']}) comes after the last assistant "
                    "turn; the conversation must end with the response")
    return _conversation(messages[:last], messages[last]["content"], row, default_id, where, template)


def _parse_prompt_completion(row: dict[str, Any], default_id: str, where: str, template: str) -> Example:
    """TRL's conversational prompt/completion: the completion's last message (an assistant turn) is the response."""
    for key in ("prompt", "completion"):
        if key not in row or row[key] is None:
            raise _fail(where, f"missing field '{key}'")
    prompt = _message_list(row["prompt"], "prompt", where)
    completion = _message_list(row["completion"], "completion", where)
    if not completion or completion[-1]["role"] != "assistant":
        raise _fail(where, "no assistant turn at the end of 'completion' (it is the response)")
    return _conversation(prompt + completion[:-1], completion[-1]["content"], row, default_id, where, template)


_PARSERS: dict[str, Callable[[dict[str, Any], str, str, str], Example]] = {
    "dolly": _parse_dolly,
    "prompt_output": _parse_prompt_output,
    "messages": _parse_messages,
    "prompt_completion": _parse_prompt_completion,
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


def _load_local(path: str, fmt: str, template: str) -> list[Example]:
    if not os.path.exists(path):
        raise _fail(f"{path}:0", "file not found")
    if not os.path.isfile(path):
        raise _fail(f"{path}:0", "not a regular file (expected a .jsonl file)")
    parse = _PARSERS[fmt]
    base = os.path.basename(path)
    examples = [
        parse(obj, f"{base}:{line_no}", f"{path}:{line_no}", template)
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


def _uses_datasets(source: str) -> bool:
    """A hub id, or a local dataset directory (data files / a README with `configs:`): read by `datasets`."""
    return _looks_like_hub_id(source) or os.path.isdir(source)


def _load_hub(source: str, fmt: str, split: str, template: str, name: str = "") -> list[Example]:
    label = f"{source}{'/' + name if name else ''}[{split}]"
    try:
        import datasets  # deferred: importing `datasets` is slow and rarely needed

        rows = datasets.load_dataset(source, *([name] if name else []), split=split)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one readable DataError
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise _fail(f"{label}:0", f"cannot load dataset: {type(err).__name__}: {detail}") from err
    parse = _PARSERS[fmt]
    examples = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise _fail(f"{label}:{index}", f"expected a mapping row, got {type(row).__name__}")
        examples.append(parse(row, f"{source}/{split}:{index}", f"{label}:{index}", template))
    if not examples:
        raise _fail(f"{label}:0", "no examples in this split")
    return examples


def format_of(obj: dict[str, Any], default: str) -> str:
    """The format a record is in, from its keys (``default`` when they say nothing)."""
    if "messages" in obj:
        return "messages"
    if isinstance(obj.get("prompt"), list) and "completion" in obj:
        return "prompt_completion"
    if "prompt" in obj:
        return "prompt_output"
    if "instruction" in obj and "response" in obj:
        return "dolly"
    return default


def sniff_format(source: str, default: str = "dolly") -> str:
    """The format of a local JSONL file from its first record: ``messages`` -> messages, a ``prompt`` list with
    a ``completion`` -> prompt_completion, ``prompt`` -> prompt_output, ``instruction`` + ``response`` -> dolly;
    ``default`` for hub ids and anything else."""
    if _looks_like_hub_id(source) or not os.path.isfile(source):
        return default
    for _, obj in _iter_jsonl(source):
        return format_of(obj, default)
    return default


def load_examples(source: str, fmt: str = "dolly", split: str = "train", template: str = "alpaca",
                  name: str = "") -> list[Example]:
    """Load examples from a local JSONL file or, for an `owner/name` id or a local dataset directory,
    through ``datasets.load_dataset(source, name, split=split)``.

    `template` decides `Example.prompt` (alpaca | none: the final text; chat: rendered later by the
    tokenizer from `Example.messages`). Raises DataError naming file and line.
    """
    if fmt not in _PARSERS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if template not in TEMPLATES:
        raise ValueError(f"unknown data template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if _uses_datasets(source):
        examples = _load_hub(source, fmt, split, template, name)
    else:
        examples = _load_local(source, fmt, template)
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
