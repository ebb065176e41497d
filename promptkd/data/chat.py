"""Chat templates: prompts rendered by the tokenizer, the end-of-turn token, stop ids, teacher/student checks.

With ``data.template=chat`` a prompt is ``tokenizer.apply_chat_template(messages, add_generation_prompt=True,
**data.template_kwargs)`` as text, tokenized without added special tokens (the template writes its own BOS).
A response then ends with the template's end-of-turn token (Qwen's ``<|im_end|>``, Llama-3's ``<|eot_id|>``),
which need not be the tokenizer's EOS: it is read off the template by rendering a probe conversation.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from promptkd.config import ConfigError
from promptkd.data.formats import DataError, Message

log = logging.getLogger(__name__)

_PROBE_ANSWER = "PROBE-ANSWER-7f3a"
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


@dataclass
class Template:
    """``data.template`` and ``data.template_kwargs`` (e.g. ``{"enable_thinking": false}`` for Qwen3)."""

    name: str = "alpaca"
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, data_cfg: Any) -> "Template":
        """From a DataConfig (or anything with ``template`` / ``template_kwargs``)."""
        return cls(getattr(data_cfg, "template", "alpaca"), dict(getattr(data_cfg, "template_kwargs", None) or {}))


def _require_template(tokenizer: Any, what: str = "tokenizer") -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise DataError(f"data.template=chat: {what} {name!r} has no chat template; use data.template=alpaca "
                        "or a tokenizer that ships one")


def render_prompt(tokenizer: Any, messages: Sequence[Message], kwargs: Optional[dict[str, Any]] = None) -> str:
    """The chat template's text for ``messages`` followed by the assistant header (the generation prompt)."""
    _require_template(tokenizer)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                         **(kwargs or {}))


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


def end_of_turn_id(tokenizer: Any, template: Template) -> int:
    """The token that ends a response: the first special token the chat template writes after an assistant
    answer (``template.name == "chat"``), else the tokenizer's EOS."""
    eos = tokenizer.eos_token_id
    if template.name != "chat":
        if eos is None:
            raise DataError("tokenizer has no EOS token; responses must end with one")
        return int(eos)
    _require_template(tokenizer)
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    text = tokenizer.apply_chat_template(probe, tokenize=False, **template.kwargs)
    tail = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):] if _PROBE_ANSWER in text else ""
    special = _special_ids(tokenizer)
    for tok in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if tok in special:
            return int(tok)
    if eos is None:
        raise DataError("data.template=chat: the chat template writes no special token after an answer and the "
                        "tokenizer has no EOS token; nothing would end a response")
    log.warning("chat template writes no special token after an answer; responses end with EOS %r",
                tokenizer.eos_token)
    return int(eos)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_ids(tokenizer: Any, template: Template, generation_eos: Any = None) -> tuple[int, ...]:
    """Every token that ends a response, the end-of-turn token first (it is the one a forced EOS writes).

    generation_eos: the model's ``generation_config.eos_token_id`` (an int or a list: Llama-3-Instruct lists
    three). The tokenizer's EOS stops too. Order-preserving, no duplicates.
    """
    out: list[int] = []
    for tok in [end_of_turn_id(tokenizer, template), *_as_list(generation_eos), *_as_list(tokenizer.eos_token_id)]:
        if tok not in out:
            out.append(tok)
    return tuple(out)


def generation_eos(model: Any) -> Any:
    """``generation_config.eos_token_id`` of a model (a DeepSpeed engine's module too) or of a model dir, or None."""
    if isinstance(model, str):
        try:
            from transformers import GenerationConfig

            return GenerationConfig.from_pretrained(model).eos_token_id
        except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS alone
            return None
    module = getattr(model, "module", model)
    config = getattr(module, "generation_config", None)
    return getattr(config, "eos_token_id", None) if config is not None else None


def eos_for(tokenizer: Any, data_cfg: Any = None, model: Any = None) -> int | tuple[int, ...]:
    """What the decode loops take as ``eos_id``: the stop ids of ``model`` under the configured template, a plain
    int when there is one (single-EOS runs see exactly what they always saw)."""
    stops = stop_ids(tokenizer, Template.of(data_cfg), generation_eos(model) if model is not None else None)
    return stops[0] if len(stops) == 1 else stops


def strip_thinking(text: str) -> str:
    """The answer without ``<think>...</think>`` blocks (and without an unclosed one's text up to the end)."""
    text = _THINK.sub("", text)
    if "<think>" in text:
        text = text[:text.index("<think>")]
    return text.strip()


def check_teacher_template(student_tok: Any, teacher_tok: Any, conversations: Sequence[Sequence[Message]],
                           template: Template) -> Optional[int]:
    """The index of the first conversation the teacher's tokenizer renders to other token ids than the student's
    (None when all agree, or when the template is not chat)."""
    if template.name != "chat":
        return None
    _require_template(teacher_tok, "teacher tokenizer")
    for i, messages in enumerate(conversations):
        s_ids = student_tok(render_prompt(student_tok, messages, template.kwargs), add_special_tokens=False)
        t_ids = teacher_tok(render_prompt(teacher_tok, messages, template.kwargs), add_special_tokens=False)
        if s_ids["input_ids"] != t_ids["input_ids"]:
            return i
    return None


# the files one of which a model dir holds when it carries its tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_teacher_tokenizer(teacher_path: str, data_cfg: Any, tokenizer: Any, examples: Sequence[Any],
                            n_probe: int = 8) -> None:
    """Before training: the teacher's own tokenizer (when its dir has one) must be the student's.

    The vocabularies are compared as tokenizers (token -> id), never by embedding rows: a teacher padded to
    more rows than a student of its family is fine. With data.template=chat and data.teacher_template=check,
    the teacher's chat template must also render the first ``n_probe`` prompts to the same ids: the teacher
    reads the student's token ids, and a teacher trained on another template would be distilled from prompts
    in a format it never saw, silently. data.teacher_template=student accepts that (logged).
    """
    if not teacher_path:
        return
    if os.path.isdir(teacher_path) and not any(os.path.isfile(os.path.join(teacher_path, f)) for f in TOKENIZER_FILES):
        # transformers 5 builds an empty tokenizer from a bare model dir instead of failing: nothing to compare
        log.info("model.teacher.path %s has no tokenizer; the teacher reads the student's tokens", teacher_path)
        return
    try:
        from transformers import AutoTokenizer

        teacher_tok = AutoTokenizer.from_pretrained(teacher_path)
    except (OSError, ValueError):  # a model dir without tokenizer files: nothing to compare
        log.info("model.teacher.path %s has no tokenizer; the teacher reads the student's tokens", teacher_path)
        return
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"model.teacher.path: the tokenizer in {teacher_path!r} differs from the student's "
                          f"({len(teacher_tok)} vs {len(tokenizer)} tokens, or other ids); teacher and student "
                          "must share one tokenizer")
    template = Template.of(data_cfg)
    if template.name != "chat":
        return
    bad = check_teacher_template(tokenizer, teacher_tok, [ex.messages for ex in examples[:n_probe]], template)
    if bad is None:
        return
    message = (f"data.teacher_template: the teacher's chat template ({teacher_path}) renders training example "
               f"{bad} to other tokens than the student's; the teacher would read prompts in a format it was "
               "not trained on")
    if getattr(data_cfg, "teacher_template", "check") == "student":
        log.warning("%s (accepted: data.teacher_template=student)", message)
        return
    raise ConfigError(message + "; set data.teacher_template=student to accept the student's rendering")
