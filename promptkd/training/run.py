"""The one place that builds a run: tokenizer, data, teacher, student engine, method, trainer.

``build_run`` is called by the ``train`` stage, by the step benchmarks in ``bench/`` and
by the multi-rank test scenarios, so all of them train exactly what a user's launch trains.
Inputs are checked before anything is written: a start that fails on bad input leaves no
``config.yaml`` behind (the corrected rerun would look like "another run" otherwise).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch

from promptkd import distributed as dist
from promptkd.config import REGISTRY, Config, ConfigError, EvalConfig, to_yaml, uses_fused_head, zero_stage
from promptkd.data import Template, eos_for
from promptkd.data.chat import check_teacher_tokenizer
from promptkd.evaluation import Decoder, evaluate, load_sets, resolve_sets
from promptkd.methods import METHODS, Method, StepContext, build_method, step_context
from promptkd.models import PromptedTeacher, TeacherSpec, load_teacher
from promptkd.models.forward import check_fused_heads
from promptkd.rollout import hf_step_fn
from promptkd.rollout.core import gathered
from promptkd.seeding import derive_seed
from promptkd.training.builders import (Splits, build_student_engine, build_tokenizer,
                                        example_texts, load_raw_splits, steps_for, tokenize_splits, vocab_size)
from promptkd.training.trainer import DevEval, Trainer

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A built run: everything a training launch holds. It owns what it started: ``close`` shuts it down."""

    cfg: Config
    tokenizer: Any
    splits: Splits
    eval_sets: dict[str, list]           # eval.sets, tokenized (checked before training starts)
    eval_info: dict[str, dict]
    total_steps: int
    engine: Any                          # the student's DeepSpeed engine
    ds_config: dict
    teacher: Optional[PromptedTeacher]
    vocab_size: int
    rollouts: Any = None                 # rollout.engine=vllm: the rank's VLLMRollouts (ctx.vllm of the method)
    method: Optional[Method] = None      # set by build_run, once the context it steps with exists
    trainer: Optional[Trainer] = None    # only when built with train=True
    closed: bool = dataclasses.field(default=False, init=False, repr=False)

    def student_decoder(self) -> Decoder:
        return student_decoder(self.engine, self.tokenizer, self.vocab_size, self.method.ctx.eos_id)

    def close(self) -> None:
        """Shut down what holds resources beyond this run, once: the method's own vLLM engine, then the rollouts'
        (which is closed even when the method's closing fails)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.method is not None:
                self.method.close()
        finally:
            if self.rollouts is not None:
                self.rollouts.close()


def build_run(cfg: Config, *, train: bool = True, total_steps: Optional[int] = None,
              rollout_seed: Optional[int] = None) -> Run:
    """Build the run ``cfg`` describes.

    train=True also writes ``config.yaml`` into ``output.dir`` (refusing another run's dir)
    and builds the trainer, at step 0 (``Trainer.restore`` continues a checkpoint). total_steps replaces the
    step count the data and ``train.*`` give (benchmarks, tests); rollout_seed the base seed
    of the per-rank rollout generators (default: ``derive_seed``'s rule for ``rollout``).
    """
    run_dir = cfg.output.dir
    if train:
        check_output_dir(cfg, run_dir)
    raw = load_raw_splits(cfg)
    tokenizer = build_tokenizer(cfg, run_dir, example_texts(raw[0]))
    splits = tokenize_splits(cfg, tokenizer, raw)
    check_teacher_tokenizer(cfg.model.teacher.path, cfg.data, tokenizer, raw[0])
    sets, info = eval_sets(cfg, tokenizer) if cfg.eval.sets else ({}, {})
    if cfg.train.early_stop_patience and not splits.dev:
        raise ConfigError("train.early_stop_patience: needs a dev split (data.dev_file or data.dev_size)")
    total = total_steps or steps_for(cfg, len(splits.train), cfg.train.micro_batch_size, cfg.train.grad_accum)
    spec, method_cls = REGISTRY[cfg.method.name], METHODS[cfg.method.name]
    teacher = (load_teacher(TeacherSpec.for_training(cfg, method_cls.teacher_prompt_length(cfg)), tokenizer)
               if spec.uses_teacher else None)
    engine, ds_config = build_student_engine(cfg, tokenizer, total)
    if uses_fused_head(cfg):  # an unsupported head fails here, not at the first step
        check_fused_heads(engine.module, *([teacher.base] if teacher is not None else []))
    vocab = vocab_size(tokenizer, teacher, engine.module)
    # the vLLM engine exists before the context that steps with it; from here on the run owns it, and a
    # failure while the rest is built closes it
    uses_vllm = cfg.rollout.engine == "vllm" and spec.samples_student
    rollouts = vllm_rollouts(cfg, engine, tokenizer, vocab) if uses_vllm else None
    run = Run(cfg, tokenizer, splits, sets, info, total, engine, ds_config, teacher, vocab, rollouts=rollouts)
    try:
        run.method = build_method(cfg, run_context(cfg, run, spec.section, rollout_seed))
        if train:
            write_config(cfg, run_dir)
            dev = (dev_eval_fn(cfg.eval, engine, tokenizer, vocab, splits.dev, cfg.seed, eos=run.method.ctx.eos_id)
                   if splits.dev else None)
            run.trainer = Trainer(cfg, run_dir, run.method, splits.train, total, dev_eval=dev, tokenizer=tokenizer)
    except BaseException:
        run.close()
        raise
    return run


def run_context(cfg: Config, run: Run, section: Optional[str], rollout_seed: Optional[int]) -> StepContext:
    """The step context of ``run``'s method (immutable: everything in it is built before it)."""
    engine, tokenizer = run.engine, run.tokenizer
    return step_context(cfg, section, engine, pad_id=tokenizer.pad_token_id,
                        eos_id=eos_for(tokenizer, cfg.data, engine.module), vocab_size=run.vocab_size,
                        total_steps=run.total_steps, teacher=run.teacher, tokenizer=tokenizer,
                        generator=torch.Generator(device=dist.device()).manual_seed(
                            derive_seed(cfg.seed, "rollout", rank=dist.rank(), base=rollout_seed)),
                        sync_rollout=zero_stage(run.ds_config) == 3, vllm=run.rollouts)


def vllm_rollouts(cfg: Config, engine: Any, tokenizer: Any, vocab: int) -> Any:
    """The rank's colocated vLLM engine for the student's rollouts (rollout.engine=vllm)."""
    from promptkd.rollout.vllm import VLLMRollouts

    log.info("rollout.engine=vllm: starting a colocated vLLM engine on rank %d", dist.rank())
    work_dir = tempfile.mkdtemp(prefix="promptkd_vllm_")  # the student's config + tokenizer, for vLLM to start from
    return VLLMRollouts(engine.module, tokenizer, vocab, cfg.rollout.vllm, cfg.data.max_length,
                        seed=cfg.seed, work_dir=work_dir)


# ----------------------------------------------------------------------------- output dir

def check_output_dir(cfg: Config, run_dir: str) -> None:
    """Refuse to start fresh over another run's outputs."""
    existing = os.path.join(run_dir, "config.yaml")
    if os.path.exists(existing) and not cfg.output.resume and not cfg.output.overwrite:
        raise ConfigError(f"output.dir: {run_dir} already holds a run (config.yaml); pass output.resume=auto "
                          "to continue it, output.overwrite=true to start over, or pick another output.dir")


def write_config(cfg: Config, run_dir: str) -> None:
    """Write the resolved config; refuse to start fresh over another run's outputs."""
    check_output_dir(cfg, run_dir)
    dist.barrier()  # every rank has checked before rank 0 writes
    if dist.is_main():
        os.makedirs(run_dir, exist_ok=True)
        tmp = os.path.join(run_dir, "config.yaml.tmp")
        with open(tmp, "w") as fh:
            fh.write(to_yaml(cfg))
        os.replace(tmp, os.path.join(run_dir, "config.yaml"))
    dist.barrier()


# ----------------------------------------------------------------------------- evaluation pieces

def eval_sets(cfg: Config, tokenizer: Any) -> tuple[dict[str, list], dict[str, dict]]:
    """``eval.sets`` (else eval.file / data.test_file as the set "test"), tokenized: ({set: examples}, {set: info})."""
    try:
        paths = resolve_sets(cfg.eval.sets, cfg.eval.file or cfg.data.test_file)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return load_sets(paths, cfg.data.format, tokenizer, cfg.data.max_prompt_length, cfg.data.max_length,
                     Template.of(cfg.data))


def student_decoder(engine: Any, tokenizer: Any, vocab: int, eos: Any = None) -> Decoder:
    """eos: the run's stop ids (``StepContext.eos_id``); None = the tokenizer's EOS."""
    zero3 = engine.zero_optimization_stage() == 3
    return Decoder(hf_step_fn(engine.module), tokenizer.pad_token_id, tokenizer.eos_token_id if eos is None else eos,
                   vocab, sync=zero3)


def greedy_eval(ev: EvalConfig) -> EvalConfig:
    """The same evaluation decoded greedily, once."""
    return dataclasses.replace(ev, do_sample=False, seeds=ev.seeds[:1])


def dev_eval_config(ev: EvalConfig, seed: int) -> EvalConfig:
    """How the dev split is decoded during training.

    eval.dev_do_sample=false: greedy, one deterministic score per check. true: the eval
    sampling settings with one seed, the run's (the official code samples its dev set with
    the settings of the paper, from the RNG its run seed started). eval.dev_max_examples
    overrides eval.max_examples for the dev split.
    """
    dev = greedy_eval(ev) if not ev.dev_do_sample else dataclasses.replace(ev, do_sample=True, seeds=[seed])
    if ev.dev_max_examples:
        dev = dataclasses.replace(dev, max_examples=ev.dev_max_examples)
    return dev


def dev_eval_fn(ev: EvalConfig, engine: Any, tokenizer: Any, vocab: int, dev: list, seed: int = 0,
                eos: Any = None) -> DevEval:
    """Dev ROUGE-L of the student, decoded as ``dev_eval_config`` says (every check with the same seed)."""
    dev_ev = dev_eval_config(ev, seed)

    def run(step: int) -> dict[str, float]:
        engine.module.eval()
        with gathered(engine.module, what="student dev evaluation", engine=engine):  # ZeRO-3: once, not per token
            res = evaluate(student_decoder(engine, tokenizer, vocab, eos), tokenizer, dev, dev_ev)
        return {"rougeL": res["rougeL"], "exact_match": res["exact_match"]}

    return run
