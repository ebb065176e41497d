"""The one way a teacher is loaded: ``load_teacher(spec, tokenizer)``.

Training (a new prompt to train, a placement, activation checkpointing), evaluation and exposure (frozen, with a
learned prompt or none) differ only in their ``TeacherSpec``; ``TeacherSpec.for_training`` and
``TeacherSpec.learned`` say what each one asks for. Nothing else in the library builds a ``PromptedTeacher`` or
reads a teacher's weights (tests/unit/test_teacher_loader.py scans for it).

Placement is explicit (DESIGN.md §4): a replicated teacher is built while no ``HfDeepSpeedConfig`` is alive, so it
is never partitioned by accident; a zero3 teacher is built under its own one, then wrapped by DeepSpeed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch._dynamo  # noqa: F401  (must be imported before any zero.Init block)

from promptkd import distributed as dist
from promptkd.config import Config, ConfigError, TinyInit, build_teacher_ds_config
from promptkd.models.loading import (DTYPES, check_covers_tokenizer, enable_checkpointing, load_pretrained,
                                     tiny_from_init, unset_hf_ds_config)
from promptkd.models.prompted_teacher import PromptedTeacher, load_prompt, prompt_position


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher is built from and with; see ``for_training`` and ``learned``."""

    path: str                                 # HF dir or hub id; "" = a tiny model from ``tiny``
    dtype: torch.dtype                        # the frozen weights' dtype (the prompt is always fp32)
    key: str = "model.path"                   # the config key named in a load error
    tiny: Optional[TinyInit] = None           # path "": the tiny architecture
    seed: int = 0                             # a tiny model's weights and a new prompt's random rows
    prompt_length: int = 0                    # a new prompt of this many rows (0: none)
    prompt_init: str = "random"               # text | random
    prompt_init_text: str = ""
    prompt_init_special_tokens: bool = True
    prompt_position: str = "start"            # start | after_bos
    prompt_dir: str = ""                      # a learned prompt (export, best/, teacher_prompt/): rows and place
    zero3: Optional[dict] = dataclasses.field(default=None, compare=False)  # DeepSpeed config: partitioned
    checkpointing: bool = False               # activation checkpointing in the frozen layers
    attn_implementation: str = ""

    @classmethod
    def for_training(cls, cfg: Config, prompt_length: int) -> "TeacherSpec":
        """``model.teacher.*`` as training uses it: a prompt of ``prompt_length`` rows to train, the placement."""
        t = cfg.model.teacher
        return cls(path=t.path, dtype=DTYPES[t.dtype], key="model.teacher.path", tiny=t.init, seed=cfg.seed,
                   prompt_length=prompt_length, prompt_init=t.prompt_init, prompt_init_text=t.prompt_init_text,
                   prompt_init_special_tokens=t.prompt_init_special_tokens, prompt_position=t.prompt_position,
                   zero3=build_teacher_ds_config(cfg) if t.placement == "zero3" else None,
                   checkpointing=t.gradient_checkpointing, attn_implementation=t.attn_implementation)

    @classmethod
    def learned(cls, path: str, dtype: torch.dtype, prompt_dir: str = "", key: str = "model.path") -> "TeacherSpec":
        """A trained teacher to evaluate with: replicated, with the learned prompt in ``prompt_dir`` (none: a
        zero-length prompt)."""
        return cls(path=path, dtype=dtype, key=key, prompt_dir=prompt_dir)


def load_teacher(spec: TeacherSpec, tokenizer: Any = None) -> PromptedTeacher:
    """The frozen teacher of ``spec`` wrapped with its soft prompt, on this rank's device, in eval mode.

    tokenizer: needed by a tiny model, a text-initialised prompt and the vocabulary check (skipped without it).
    A zero3 teacher's weights are partitioned at construction and gathered layer by layer in forward and
    backward, so gradients still reach the prompt.
    """
    if spec.prompt_position == "after_bos" and tokenizer is not None and tokenizer.bos_token_id is None:
        raise ConfigError("model.teacher.prompt_position: after_bos needs a tokenizer with a BOS token "
                          f"({getattr(tokenizer, 'name_or_path', '')!r} has none); use start")
    learned = load_prompt(spec.prompt_dir) if spec.prompt_dir else None
    engine = _partitioned(spec, tokenizer) if spec.zero3 is not None else None
    base = engine.module if engine is not None else _base(spec, tokenizer)
    if learned is None:
        teacher = PromptedTeacher(base, prompt_length=spec.prompt_length, init=spec.prompt_init,
                                  init_text=spec.prompt_init_text, tokenizer=tokenizer, dtype=spec.dtype,
                                  seed=spec.seed, init_special_tokens=spec.prompt_init_special_tokens,
                                  position=spec.prompt_position)
    else:  # the rows come from the file: the random init only gives the parameter its shape
        teacher = PromptedTeacher(base, prompt_length=learned.shape[0], init="random", dtype=spec.dtype,
                                  seed=spec.seed, position=prompt_position(spec.prompt_dir))
        try:
            teacher.load_prompt_state({"prompt": learned})
        except ConfigError as exc:  # a prompt learned for another teacher (another hidden size)
            raise ConfigError(f"{spec.prompt_dir}: the learned prompt does not fit the teacher '{spec.path}': "
                              f"{exc}") from None
    teacher.keep_engine(engine)
    if spec.checkpointing:
        checkpoint_frozen_layers(teacher.base)
    if spec.zero3 is None:
        teacher = teacher.to(dist.device())
    return teacher.eval()


def checkpoint_frozen_layers(model: torch.nn.Module) -> None:
    """Activation checkpointing for a model kept in eval mode.

    HF checkpoints a layer only when that layer's own ``training`` flag is set;
    flipping just that flag (not ``.train()``, which recurses) keeps dropout off.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable_checkpointing(model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(f"model.teacher.gradient_checkpointing: {type(model).__name__} has no checkpointable layers")
    for layer in layers:
        layer.training = True


def _base(spec: TeacherSpec, tokenizer: Any) -> torch.nn.Module:
    if not spec.path:
        return tiny_from_init(spec.tiny, tokenizer, spec.seed, spec.attn_implementation)
    # in its dtype on this rank's device (a ZeRO-3 teacher: DeepSpeed places the partitions)
    base = load_pretrained(spec.path, spec.dtype, key=spec.key, device=dist.device(),
                           attn_implementation=spec.attn_implementation)
    if tokenizer is not None:
        check_covers_tokenizer(base, tokenizer, spec.key)  # before the prompt's text init indexes it
    return base


def _partitioned(spec: TeacherSpec, tokenizer: Any) -> Any:
    """The DeepSpeed ZeRO-3 engine (no optimizer) over ``spec``'s model, its weights partitioned at construction."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(spec.zero3)  # construction under it partitions the weights
    try:
        base = _base(spec, tokenizer)
    finally:
        del keep_alive
        unset_hf_ds_config()
    if not spec.path:
        _copy_into_partitions(base, tiny_from_init(spec.tiny, tokenizer, spec.seed, spec.attn_implementation))
    base.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=base, config=spec.zero3)  # installs the gather/release hooks
    engine.module.eval()
    return engine


def _copy_into_partitions(partitioned: torch.nn.Module, full: torch.nn.Module) -> None:
    """Load a full model's weights into a ZeRO-3 partitioned copy of it.

    zero.Init draws a tiny model's random init differently from a plain build, so
    the seeded plain build (identical on every rank) is the reference.
    """
    import deepspeed

    source = dict(full.named_parameters())
    for name, param in partitioned.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.is_main():
                param.data.copy_(source[name].data.to(param.dtype))
