"""Turn a Config into objects: tokenizer, data splits, student engine, optimizers (the teacher:
``promptkd.models.teacher.load_teacher``).

Placement is explicit (DESIGN.md §4): the student is built under an ``HfDeepSpeedConfig`` only when its ZeRO
stage is 3, and the config is dropped right after, so no later model is partitioned by accident.
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
from promptkd.config import Config, ConfigError, build_ds_config, zero_stage
from promptkd.config.deepspeed import offloads_optimizer
from promptkd.config.versions import check_installed
from promptkd.data import (DataError, Example, Template, TokenizedExample, load_examples, load_tokenizer,
                           split_train_dev, tokenize_examples, train_tokenizer)
from promptkd.models import DTYPES, PromptedTeacher, check_vocab, load_pretrained, missing_local_dir
from promptkd.models.loading import (check_covers_tokenizer, config_vocab, enable_checkpointing, tiny_from_init,
                                     unset_hf_ds_config)
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

def build_student_module(cfg: Config, tokenizer: Any, ds_config: dict) -> torch.nn.Module:
    """The student, partitioned at construction time when its ZeRO stage is 3."""
    from transformers.integrations import HfDeepSpeedConfig

    s = cfg.model.student
    keep_alive = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    try:
        model = (load_pretrained(s.path, student_dtype(cfg), key="model.student.path", device=dist.device(),
                                 attn_implementation=s.attn_implementation)
                 if s.path else tiny_from_init(s.init, tokenizer, derive_seed(cfg.seed, "model_init", index=1),
                                               s.attn_implementation))
    finally:
        del keep_alive  # a live HfDeepSpeedConfig would also partition later models
        unset_hf_ds_config()
    if s.path:
        check_covers_tokenizer(model, tokenizer, "model.student.path")
    if s.gradient_checkpointing:
        enable_checkpointing(model)
    # LoRA: freeze the base, add the adapters (before the optimizer sees the parameters)
    return apply_lora(model, s.lora, derive_seed(cfg.seed, "model_init", index=2))


def student_dtype(cfg: Config) -> torch.dtype:
    """The dtype the student trains in (train.precision). Loading a checkpoint in it loses nothing: under
    bf16/fp16 DeepSpeed casts the module to it and builds the fp32 master weights from those 16-bit values."""
    return DTYPES[cfg.train.precision]


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
    s_vocab = config_vocab(student)
    t_vocab = config_vocab(teacher.base) if teacher is not None else s_vocab
    return check_vocab(len(tokenizer), t_vocab, s_vocab)


def steps_for(cfg: Config, n_train: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps of the run: train.max_steps, or epochs over the sharded data."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_rank = math.ceil(n_train / dist.world_size())
    micro = math.ceil(per_rank / micro_batch_size)
    return cfg.train.epochs * max(1, math.ceil(micro / grad_accum))


__all__ = ["DataError", "Splits", "build_student_engine",
           "build_tokenizer", "load_raw_splits", "steps_for", "tokenize_splits", "vocab_size"]
