"""Turn a Config into objects: tokenizer, data splits, teacher, student engine, optimizers.

Placement is explicit (DESIGN.md §4): the teacher is built while no
``HfDeepSpeedConfig`` is alive, so it is never partitioned by accident; the
student is built under one only when its ZeRO stage is 3.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch._dynamo  # noqa: F401  (must be imported before any zero.Init block)

from promptkd import distributed as dist
from promptkd.config import Config, ConfigError, TinyInit, build_ds_config, zero_stage
from promptkd.config.deepspeed import offloads_optimizer
from promptkd.config.versions import check_installed
from promptkd.data import (DataError, Example, Template, TokenizedExample, load_examples, load_tokenizer,
                           split_train_dev, tokenize_examples, train_tokenizer)
from promptkd.models import DTYPES, PromptedTeacher, build_tiny, check_vocab, load_pretrained, missing_local_dir
from promptkd.models.lora import apply_lora
from promptkd.optim import adamw, cpu_adam_loadable, lr_factor, offload_optimizer_choice
from promptkd.seeding import derive_seed

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- tokenizer + data

def build_tokenizer(cfg: Config, run_dir: str, texts: Optional[list[str]] = None) -> Any:
    """Load the configured tokenizer, or train one on ``texts`` (rank 0 trains, all load)."""
    path = cfg.tokenizer.path or cfg.model.student.path
    if path and not cfg.tokenizer.train:
        key = "tokenizer.path" if cfg.tokenizer.path else "model.student.path"
        if missing_local_dir(path):
            raise ConfigError(f"{key}: cannot load tokenizer from '{path}': no such directory")
        try:
            return load_tokenizer(path)
        except OSError as exc:
            raise ConfigError(f"{key}: {exc}") from exc
    if not cfg.tokenizer.train:
        raise ConfigError("tokenizer.path: set a tokenizer (or model.student.path), or tokenizer.train=true")
    out_dir = os.path.join(run_dir, "tokenizer")
    if dist.is_main() and not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        train_tokenizer(texts or [], cfg.tokenizer.vocab_size, out_dir, chat=cfg.tokenizer.chat)
    dist.barrier()
    return load_tokenizer(out_dir)


def example_texts(examples: list[Example]) -> list[str]:
    return [e.prompt + " " + e.references[0] for e in examples]


@dataclass
class Splits:
    train: list[TokenizedExample]
    dev: list[TokenizedExample]
    test: list[TokenizedExample]


def load_raw_splits(cfg: Config) -> tuple[list[Example], list[Example], list[Example]]:
    d = cfg.data
    if not d.train_file:
        raise ConfigError("data.train_file: no training data configured")
    kw = {"template": d.template, "name": d.hub_config}
    train = load_examples(d.train_file, d.format, split=d.train_split, **kw)
    if d.dev_file:
        dev = load_examples(d.dev_file, d.format, split=d.dev_split, **kw)
    elif d.dev_size > 0:
        if d.dev_size >= len(train):
            raise ConfigError(f"data.dev_size: {d.dev_size} must be smaller than the {len(train)} training examples")
        train, dev = split_train_dev(train, d.dev_size, cfg.seed)
    else:
        dev = []
    test = load_examples(d.test_file, d.format, split=d.test_split, **kw) if d.test_file else []
    return train, dev, test


def tokenize_splits(cfg: Config, tokenizer: Any, raw: tuple[list[Example], ...]) -> Splits:
    d = cfg.data
    out = []
    for name, examples in zip(("train", "dev", "test"), raw):
        if not examples:
            out.append([])
            continue
        try:
            toks, dropped = tokenize_examples(examples, tokenizer, d.max_prompt_length, d.max_length,
                                              Template.of(d))
        except DataError as exc:  # every prompt too long: name the key and the file
            source = {"train": d.train_file, "dev": d.dev_file or d.train_file, "test": d.test_file}[name]
            raise DataError(f"data.max_prompt_length: {exc} (in {source})") from exc
        if dropped:
            log.info("%s: dropped %d/%d examples whose prompt exceeds max_prompt_length=%d",
                     name, dropped, len(examples), d.max_prompt_length)
        out.append(toks)
    splits = Splits(*out)
    if len(splits.train) < dist.world_size():
        raise ConfigError(f"data.train_file: {len(splits.train)} usable examples for world_size {dist.world_size()}")
    return splits


# ----------------------------------------------------------------------------- models

def _tiny(init: TinyInit, tokenizer: Any, seed: int, attn: str = "") -> torch.nn.Module:
    # Same weights on every rank whatever the RNG state: a replicated teacher is never broadcast.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_tiny(init, tokenizer, attn)


def _build_tiny(init: TinyInit, tokenizer: Any, attn: str = "") -> torch.nn.Module:
    return build_tiny(init.arch, init.layers, init.hidden, init.heads, vocab_size=len(tokenizer),
                      max_positions=init.max_positions, intermediate=init.intermediate,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, kv_heads=init.kv_heads,
                      vocab_multiple=init.vocab_multiple, attn_implementation=attn)


def build_teacher(cfg: Config, tokenizer: Any, prompt_length: int) -> PromptedTeacher:
    """The frozen teacher wrapped with its soft prompt (fp32, the same on every rank).

    placement=replicated: a full copy per rank. placement=zero3: the weights are
    partitioned at construction and gathered layer by layer in forward and
    backward, so gradients still reach the prompt.
    """
    t = cfg.model.teacher
    dtype = DTYPES[t.dtype]
    zero3 = t.placement == "zero3"
    if t.prompt_position == "after_bos" and tokenizer.bos_token_id is None:
        raise ConfigError("model.teacher.prompt_position: after_bos needs a tokenizer with a BOS token "
                          f"({getattr(tokenizer, 'name_or_path', '')!r} has none); use start")
    base = _zero3_teacher(cfg, tokenizer) if zero3 else _plain_teacher(cfg, tokenizer)
    teacher = PromptedTeacher(base, prompt_length=prompt_length, init=t.prompt_init, init_text=t.prompt_init_text,
                              tokenizer=tokenizer, dtype=dtype, seed=cfg.seed,
                              init_special_tokens=t.prompt_init_special_tokens, position=t.prompt_position)
    if t.gradient_checkpointing:
        checkpoint_frozen_layers(teacher.base)
    return teacher if zero3 else teacher.to(dist.device())


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing (transformers 5 name first, the 4.x one otherwise)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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


def _plain_teacher(cfg: Config, tokenizer: Any) -> torch.nn.Module:
    t = cfg.model.teacher
    if not t.path:
        return _tiny(t.init, tokenizer, cfg.seed, t.attn_implementation)
    # in its dtype on this rank's device (a ZeRO-3 teacher: DeepSpeed places the partitions)
    base = load_pretrained(t.path, DTYPES[t.dtype], key="model.teacher.path", device=dist.device(),
                           attn_implementation=t.attn_implementation)
    _check_covers_tokenizer(base, tokenizer, "model.teacher.path")  # before the prompt's text init indexes it
    return base


def _zero3_teacher(cfg: Config, tokenizer: Any) -> torch.nn.Module:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from promptkd.config import build_teacher_ds_config

    ds = build_teacher_ds_config(cfg)
    keep_alive = HfDeepSpeedConfig(ds)  # construction under it partitions the weights
    try:
        base = _plain_teacher(cfg, tokenizer)
    finally:
        del keep_alive
        _unset_hf_ds_config()
    if not cfg.model.teacher.path:
        _copy_into_partitions(base, _tiny(cfg.model.teacher.init, tokenizer, cfg.seed,
                                          cfg.model.teacher.attn_implementation))
    base.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=base, config=ds)  # installs the gather/release hooks
    engine.module.eval()
    return engine.module


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


def build_student_module(cfg: Config, tokenizer: Any, ds_config: dict) -> torch.nn.Module:
    """The student, partitioned at construction time when its ZeRO stage is 3."""
    from transformers.integrations import HfDeepSpeedConfig

    s = cfg.model.student
    keep_alive = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    try:
        model = (load_pretrained(s.path, student_dtype(cfg), key="model.student.path", device=dist.device(),
                                 attn_implementation=s.attn_implementation)
                 if s.path else _tiny(s.init, tokenizer, derive_seed(cfg.seed, "model_init", index=1),
                                      s.attn_implementation))
    finally:
        del keep_alive  # a live HfDeepSpeedConfig would also partition later models
        _unset_hf_ds_config()
    if s.path:
        _check_covers_tokenizer(model, tokenizer, "model.student.path")
    if s.gradient_checkpointing:
        enable_checkpointing(model)
    # LoRA: freeze the base, add the adapters (before the optimizer sees the parameters)
    return apply_lora(model, s.lora, derive_seed(cfg.seed, "model_init", index=2))


def student_dtype(cfg: Config) -> torch.dtype:
    """The dtype the student trains in (train.precision). Loading a checkpoint in it loses nothing: under
    bf16/fp16 DeepSpeed casts the module to it and builds the fp32 master weights from those 16-bit values."""
    return DTYPES[cfg.train.precision]


def _check_covers_tokenizer(model: torch.nn.Module, tokenizer: Any, key: str) -> None:
    n_model, n_tok = _config_vocab(model), len(tokenizer)
    if n_model < n_tok:
        raise ConfigError(f"{key}: model vocab size {n_model} is smaller than the tokenizer's {n_tok} tokens; "
                          "teacher, student and tokenizer must share one vocabulary")


def _unset_hf_ds_config() -> None:
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:  # pragma: no cover - older transformers
        pass


def build_student_engine(cfg: Config, tokenizer: Any, total_steps: int) -> tuple[Any, dict]:
    import deepspeed

    check_installed()
    ds_config = build_ds_config(cfg, dist.world_size())
    model = build_student_module(cfg, tokenizer, ds_config)
    optimizer = student_optimizer(cfg, model, ds_config)
    factor = lr_factor(cfg.optim.student, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    return engine, ds_config


def student_optimizer(cfg: Config, model: torch.nn.Module, ds_config: dict) -> torch.optim.Optimizer:
    """The student's AdamW; DeepSpeed's CPU Adam when the config offloads the optimizer and the op is there.

    Otherwise an offloading config gets torch AdamW and ``zero_force_ds_cpu_optimizer: false`` (DeepSpeed
    refuses a client optimizer under ZeRO-Offload without it), and the log says why.
    """
    cpu_adam = False
    if offloads_optimizer(ds_config):
        cpu_adam, why = offload_optimizer_choice(torch.cuda.is_available(), cpu_adam_loadable)
        if cpu_adam:
            log.info("optimizer offload: DeepSpeed's CPU Adam (%s)", why)
        else:
            ds_config["zero_force_ds_cpu_optimizer"] = False
            if dist.is_main():
                log.warning("optimizer offload: torch AdamW on the CPU, not DeepSpeed's CPU Adam: %s "
                            "(slower optimizer step; see README, Scale-out)", why)
    # ZeRO optimizers skip non-finite steps themselves; stage 0 needs the guard.
    return adamw(list(model.parameters()), cfg.optim.student, list(model.named_parameters()),
                 guarded=zero_stage(ds_config) == 0, cpu_adam=cpu_adam)


def vocab_size(tokenizer: Any, teacher: Optional[PromptedTeacher], student: torch.nn.Module) -> int:
    """Number of logits that are real tokens; a clear error on a vocabulary mismatch."""
    s_vocab = _config_vocab(student)
    t_vocab = _config_vocab(teacher.base) if teacher is not None else s_vocab
    return check_vocab(len(tokenizer), t_vocab, s_vocab)


def _config_vocab(model: torch.nn.Module) -> int:
    model = getattr(model, "module", model)
    return int(model.config.vocab_size)


def steps_for(cfg: Config, n_train: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps of the run: train.max_steps, or epochs over the sharded data."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_rank = math.ceil(n_train / dist.world_size())
    micro = math.ceil(per_rank / micro_batch_size)
    return cfg.train.epochs * max(1, math.ceil(micro / grad_accum))


__all__ = ["DataError", "Splits", "build_student_engine", "build_teacher",
           "build_tokenizer", "load_raw_splits", "steps_for", "tokenize_splits", "vocab_size"]
