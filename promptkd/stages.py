"""What the launcher runs: ``train``, ``eval`` and the quickstart ``pipeline``."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import torch

from promptkd import checkpoint
from promptkd import distributed as dist
from promptkd.builders import (DTYPES, build_prompt_optimizer, build_student_engine, build_teacher, build_tokenizer,
                               example_texts, load_raw_splits, steps_for, tokenize_splits, vocab_size)
from promptkd.config import Config, ConfigError, EvalConfig, to_yaml, with_overrides, zero_stage
from promptkd.data import load_tokenizer, make_synthetic_splits
from promptkd.evaluation import (Generator, evaluate, evaluate_sets, load_sets, resolve_sets, scalars,
                                 write_results)
from promptkd.exposure import run_exposure
from promptkd.methods import METHODS, StepContext, build_method
from promptkd.metrics import MetricsLogger
from promptkd.models import PromptedTeacher, load_pretrained, load_prompted_teacher, missing_local_dir
from promptkd.report import main_tables, protocol_table
from promptkd.rollout import hf_step_fn, teacher_step_fn
from promptkd.trainer import Trainer

log = logging.getLogger(__name__)


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


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def student_generator(engine: Any, tokenizer: Any, vocab: int) -> Generator:
    zero3 = engine.zero_optimization_stage() == 3
    return Generator(hf_step_fn(engine.module), tokenizer.pad_token_id, tokenizer.eos_token_id, vocab, sync=zero3)


def greedy_eval(ev: EvalConfig) -> EvalConfig:
    """The same evaluation decoded greedily, once."""
    return dataclasses.replace(ev, do_sample=False, seeds=ev.seeds[:1])


def _dev_eval_fn(cfg: Config, engine: Any, tokenizer: Any, vocab: int, dev: list):
    # Dev selection uses greedy decoding: one deterministic number per check.
    ev = greedy_eval(cfg.eval)

    def run(step: int) -> dict[str, float]:
        module = engine.module
        module.eval()
        try:
            res = evaluate(student_generator(engine, tokenizer, vocab), tokenizer, dev, ev)
        finally:
            module.train()
        return {"rougeL": res["rougeL"], "exact_match": res["exact_match"]}

    return run


def run_train(cfg: Config) -> dict[str, Any]:
    """Train the student with ``cfg.method``; checkpoint, export, evaluate on the test split."""
    _seed_everything(cfg.seed)
    run_dir = cfg.output.dir
    check_output_dir(cfg, run_dir)
    resume_from = _resume_path(cfg)
    raw = load_raw_splits(cfg)
    tokenizer = build_tokenizer(cfg, run_dir, example_texts(raw[0]))
    splits = tokenize_splits(cfg, tokenizer, raw)
    extra_sets, extra_info = _eval_sets(cfg, tokenizer) if cfg.eval.sets else ({}, {})  # checked before training
    if cfg.train.early_stop_patience and not splits.dev:
        raise ConfigError("train.early_stop_patience: needs a dev split (data.dev_file or data.dev_size)")
    total = steps_for(cfg, len(splits.train), cfg.train.micro_batch_size, cfg.train.grad_accum)
    method_cls = METHODS[cfg.method.name]
    teacher = build_teacher(cfg, tokenizer, use_prompt=method_cls.trains_prompt) if method_cls.uses_teacher else None
    engine, ds_config = build_student_engine(cfg, tokenizer, total)
    vocab = vocab_size(tokenizer, teacher, engine.module)
    prompt_opt = prompt_sched = None
    if teacher is not None and method_cls.trains_prompt and teacher.prompt_length > 0:
        prompt_opt, prompt_sched = build_prompt_optimizer(cfg, teacher, total)
    # Only once every input has been checked: a start that fails on bad input leaves no
    # config.yaml behind, which would make the corrected rerun look like "another run".
    write_config(cfg, run_dir)
    ctx = StepContext(cfg=cfg, engine=engine, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                      vocab_size=vocab, total_steps=total, teacher=teacher, prompt_optimizer=prompt_opt,
                      prompt_scheduler=prompt_sched,
                      generator=torch.Generator().manual_seed(cfg.seed * 7919 + dist.rank()),
                      sync_rollout=zero_stage(ds_config) == 3)
    trainer = Trainer(cfg, run_dir, build_method(cfg.method.name, ctx), splits.train, total, None,
                      dev_eval=_dev_eval_fn(cfg, engine, tokenizer, vocab, splits.dev) if splits.dev else None,
                      tokenizer=tokenizer)
    if resume_from:
        trainer.restore(resume_from)
    logger = trainer.logger = MetricsLogger(run_dir, cfg.logging.tensorboard,
                                            purge_step=trainer.state.step + 1 if resume_from else None)
    trainer.stop.install()
    log.info("%s: %d train / %d dev / %d test examples, %d optimizer steps, world size %d, ZeRO-%d",
             cfg.method.name, len(splits.train), len(splits.dev), len(splits.test), total, dist.world_size(),
             zero_stage(ds_config))
    trainer.run()
    trainer.save()
    summary: dict[str, Any] = {"steps": trainer.state.step}
    if splits.dev:
        last = trainer.state.history[-1] if trainer.state.history else None
        done = last is not None and last["step"] == trainer.state.step  # the loop just scored this step
        summary["dev_rougeL"] = last["rougeL"] if done else trainer.run_dev_eval()
    if cfg.output.export:
        _export(cfg, run_dir, engine, tokenizer, teacher if prompt_opt is not None else None)
    if splits.test or extra_sets:
        sets = ({"test": splits.test} if splits.test else {}) | extra_sets
        res = evaluate_sets(student_generator(engine, tokenizer, vocab), tokenizer, sets, cfg.eval)
        info = ({"test": {"path": cfg.data.test_file, "n": len(splits.test)}} if splits.test else {}) | extra_info
        report = write_results(os.path.join(run_dir, "eval"), {"student": res}, sets, cfg.eval, info)
        logger.scalars(trainer.state.step, scalars(report))
        summary["test_rougeL"] = {name: r["rougeL"] for name, r in res.items()}
    logger.close()
    return summary


def _resume_path(cfg: Config) -> Optional[str]:
    if not cfg.output.resume:
        return None
    path = checkpoint.latest(cfg.output.dir) if cfg.output.resume == "auto" else cfg.output.resume
    if path is None:
        log.info("resume=auto: no complete checkpoint in %s, starting fresh", cfg.output.dir)
        return None
    if not os.path.isdir(path):
        raise ConfigError(f"output.resume: no checkpoint at {path}")
    return path


def _export(cfg: Config, run_dir: str, engine: Any, tokenizer: Any, teacher: Optional[PromptedTeacher]) -> None:
    out = os.path.join(run_dir, "export")
    checkpoint.export_student(engine, tokenizer, out)
    if teacher is not None and dist.is_main():
        teacher.save_prompt(out, cfg.model.teacher.path or "tiny-from-config")
    dist.barrier()
    log.info("exported student%s to %s", " and teacher prompt" if teacher is not None else "", out)


# ----------------------------------------------------------------------------- eval stage

def _eval_sets(cfg: Config, tokenizer: Any) -> tuple[dict[str, list], dict[str, dict]]:
    """``eval.sets`` (else eval.file / data.test_file as the set "test"), tokenized: ({set: examples}, {set: info})."""
    try:
        paths = resolve_sets(cfg.eval.sets, cfg.eval.file or cfg.data.test_file)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return load_sets(paths, cfg.data.format, tokenizer, cfg.data.max_prompt_length, cfg.data.max_length)


def model_generator(path: str, tokenizer: Any, dtype: torch.dtype, prompt_dir: str = "") -> Generator:
    """A replicated HF model (optionally with a learned teacher prompt) ready to decode."""
    vocab = len(tokenizer)
    if prompt_dir:
        teacher = load_prompted_teacher(path, dtype, prompt_dir).to(dist.device()).eval()
        return Generator(teacher_step_fn(teacher, True), tokenizer.pad_token_id, tokenizer.eos_token_id, vocab)
    base = load_pretrained(path, dtype).to(dist.device()).eval()
    return Generator(hf_step_fn(base), tokenizer.pad_token_id, tokenizer.eos_token_id, vocab)


def evaluate_models(cfg: Config, models: dict[str, tuple[str, str, torch.dtype]], tokenizer: Any,
                    out_dir: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Evaluate ``{name: (model_dir, prompt_dir, dtype)}`` on every eval set; write results + TensorBoard.

    Returns (report, greedy report or None). With ``eval.greedy_too`` (and sampling on) each model
    loaded once is also decoded greedily, into ``out_dir/greedy`` and the ``eval_greedy/`` scalars.
    """
    sets, info = _eval_sets(cfg, tokenizer)
    views = {"": cfg.eval}
    if cfg.eval.greedy_too and cfg.eval.do_sample:
        views["greedy"] = greedy_eval(cfg.eval)
    results: dict[str, dict] = {view: {} for view in views}
    for name, (path, prompt_dir, dtype) in models.items():
        log.info("eval %s on %s", name, ", ".join(sets))
        gen = model_generator(path, tokenizer, dtype, prompt_dir)
        for view, ev in views.items():
            with torch.no_grad():
                results[view][name] = evaluate_sets(gen, tokenizer, sets, ev)
    logger = MetricsLogger(cfg.output.dir, cfg.logging.tensorboard)
    reports = {}
    for view, ev in views.items():
        reports[view] = write_results(os.path.join(out_dir, view), results[view], sets, ev, info)
        prefix = f"eval_{view}/" if view else "eval/"
        logger.scalars(0, {prefix + k[len("eval/"):]: v for k, v in scalars(reports[view]).items()})
    logger.close()
    return reports[""], reports.get("greedy")


def print_tables(report: dict[str, Any], greedy: Optional[dict[str, Any]]) -> None:
    if dist.is_main():
        text = main_tables(report)
        if greedy is not None:
            text += "\n" + protocol_table(report, greedy)
        print("\n" + text, flush=True)


def _models_to_eval(cfg: Config) -> dict[str, str]:
    """{name: HF dir} from ``eval.models``, else ``eval.model_path``, else the run's export."""
    if cfg.eval.models:
        models = dict(str(spec).partition("=")[::2] for spec in cfg.eval.models)
        key = "eval.models"
    else:
        path = cfg.eval.model_path or os.path.join(cfg.output.dir, "export")
        if not os.path.isdir(path) and not cfg.eval.model_path:
            raise ConfigError(f"eval.model_path: no model given and no export at {path}")
        models = {"prompted_teacher" if cfg.eval.prompt_path else "model": path}
        key = "eval.model_path"
    for path in models.values():
        if missing_local_dir(path):
            raise ConfigError(f"{key}: no such directory: {path}")
    return models


def run_eval(cfg: Config) -> dict[str, Any]:
    _seed_everything(cfg.seed)
    models = _models_to_eval(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer.path or next(iter(models.values())))
    dtype = DTYPES[cfg.model.teacher.dtype] if cfg.eval.prompt_path else torch.float32
    report, greedy = evaluate_models(cfg, {name: (path, cfg.eval.prompt_path, dtype) for name, path in models.items()},
                                     tokenizer, os.path.join(cfg.output.dir, "eval"))
    print_tables(report, greedy)
    return _rouge_by_model(report)


def _rouge_by_model(report: dict[str, Any]) -> dict[str, Any]:
    return {m: {d: s["rougeL"] for d, s in r["datasets"].items()} for m, r in report["models"].items()}


# ----------------------------------------------------------------------------- quickstart pipeline

def _prepare_synthetic(cfg: Config, root: str) -> dict[str, str]:
    s = cfg.data.synthetic
    data_dir = os.path.join(root, "data")
    if dist.is_main():
        make_synthetic_splits(data_dir, s.n_train, s.n_dev, s.n_test, s.seed, s.level)
    dist.barrier()
    return {name: os.path.join(data_dir, f"{name}.jsonl") for name in ("train", "dev", "test")}


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """Synthetic data -> tokenizer -> SFT teacher -> SFT student -> distill -> evaluate all."""
    root = cfg.output.dir
    write_config(cfg, root)
    files = {"train": cfg.data.train_file, "dev": cfg.data.dev_file, "test": cfg.data.test_file}
    if cfg.data.synthetic.enabled:
        files = _prepare_synthetic(cfg, root)
    base = with_overrides(cfg, {"stage": "train", "data.train_file": files["train"], "data.dev_file": files["dev"],
                                "data.test_file": "", "data.synthetic.enabled": False})
    tokenizer = build_tokenizer(base, root, example_texts(load_raw_splits(base)[0]))
    if base.tokenizer.train:
        base = with_overrides(base, {"tokenizer.path": os.path.join(root, "tokenizer"), "tokenizer.train": False})
    p = cfg.pipeline
    sft = {"method.name": "sft", "optim.student.lr": p.sft_lr, "optim.student.warmup_steps": p.sft_warmup_steps,
           "eval.dev_interval": 0}
    teacher_dir, student_dir, distill_dir = (os.path.join(root, d) for d in ("teacher_sft", "student_sft", "distill"))
    log.info("pipeline 1/4: SFT of the teacher")
    run_train(with_overrides(base, {**sft, "model.student.init": dataclasses.asdict(cfg.model.teacher.init),
                                    "train.max_steps": p.teacher_sft_steps, "output.dir": teacher_dir}))
    log.info("pipeline 2/4: SFT of the student (its initialization)")
    run_train(with_overrides(base, {**sft, "train.max_steps": p.student_sft_steps, "output.dir": student_dir,
                                    "eval.dev_interval": p.student_sft_dev_interval,
                                    "train.early_stop_patience": p.student_sft_patience}))
    log.info("pipeline 3/4: %s distillation", cfg.method.name)
    run_train(with_overrides(base, {"model.teacher.path": os.path.join(teacher_dir, "export"),
                                    "model.student.path": selected_student(student_dir),
                                    "output.dir": distill_dir}))
    log.info("pipeline 4/4: evaluation")
    return _pipeline_eval(cfg, base, tokenizer, files["test"], teacher_dir, student_dir, distill_dir)


def selected_student(run_dir: str) -> str:
    """The run's best-dev export (best/, the official code's choice) when it kept one, else its last export."""
    best = os.path.join(run_dir, "best")
    return best if os.path.isfile(os.path.join(best, "best.json")) else os.path.join(run_dir, "export")


def _selected_label(path: str) -> str:
    meta = os.path.join(path, "best.json")
    if not os.path.isfile(meta):
        return "last step"
    with open(meta) as fh:
        return f"best dev, step {json.load(fh)['step']}"


def _pipeline_eval(cfg: Config, base: Config, tokenizer: Any, test_file: str, teacher_dir: str, student_dir: str,
                   distill_dir: str) -> dict[str, Any]:
    t_dtype = DTYPES[cfg.model.teacher.dtype]
    init, distilled = selected_student(student_dir), selected_student(distill_dir)
    models = {"teacher (SFT)": (os.path.join(teacher_dir, "export"), "", t_dtype),
              f"student (SFT, {_selected_label(init)})": (init, "", torch.float32),
              f"student ({cfg.method.name}, {_selected_label(distilled)})": (distilled, "", torch.float32)}
    if METHODS[cfg.method.name].trains_prompt and cfg.model.teacher.prompt_length > 0:
        models["teacher + learned prompt"] = (os.path.join(teacher_dir, "export"), distilled, t_dtype)
    ev_cfg = with_overrides(base, {"eval.file": test_file})
    report, greedy = evaluate_models(ev_cfg, models, tokenizer, os.path.join(cfg.output.dir, "eval"))
    print_tables(report, greedy)
    return _rouge_by_model(report)


STAGES = {"train": run_train, "eval": run_eval, "pipeline": run_pipeline, "exposure": run_exposure}
