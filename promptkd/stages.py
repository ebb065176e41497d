"""What the launcher runs: every stage (``train``, ``eval``, ``pipeline``, ``exposure``, ``plan``), dispatched
from ``STAGES`` alone."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable, Optional

import torch

from promptkd import distributed as dist
from promptkd.config import Config, ConfigError, with_overrides
from promptkd.data import Template, eos_for, load_tokenizer, make_synthetic_splits
from promptkd.evaluation.core import load_sets
from promptkd.evaluation import Decoder, evaluate_sets, scalars, write_results
from promptkd.evaluation import exposure
from promptkd.evaluation.report import main_tables, protocol_table
from promptkd.metrics import MetricsLogger
from promptkd.models import (DTYPES, PROMPT_DIR, PROMPT_WEIGHTS, TeacherSpec, load_pretrained, load_teacher,
                             missing_local_dir)
from promptkd.models.prompted_teacher import prompt_files_dir
from promptkd.rollout import hf_step_fn, teacher_step_fn
from promptkd.training.builders import build_tokenizer, example_texts, load_raw_splits
from promptkd.training.job import seed_everything, train
from promptkd.training.run import eval_sets, greedy_eval, write_config

log = logging.getLogger(__name__)


def run_train(cfg: Config) -> dict[str, Any]:
    """Train the student with ``cfg.method``; checkpoint, export, evaluate on the test split (``TrainJob``)."""
    return train(cfg)


# ----------------------------------------------------------------------------- eval stage

def student_eval_dtype(cfg: Config) -> torch.dtype:
    """``eval.dtype``: auto is bf16 on a GPU that has it (decoding is memory-bound; the paper's models train in
    bf16/fp16), fp32 elsewhere (bf16 matmuls are slow on CPUs)."""
    choice = cfg.eval.dtype
    if choice == "auto":
        choice = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return DTYPES[choice]


def allow_tf32() -> None:
    """TF32 matmuls for evaluation on CUDA (no effect elsewhere): fp32 weights then run on tensor cores too."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def model_decoder(path: str, tokenizer: Any, dtype: torch.dtype, prompt_dir: str = "",
                  cfg: Optional[Config] = None) -> Decoder:
    """A replicated HF model (optionally with a learned teacher prompt) ready to decode.

    With ``eval.engine=vllm`` a plain HF dir is decoded by vLLM; a prompted teacher stays on our loop: its soft
    prompt is a sequence of embeddings, not tokens, and this engine takes token-id requests only.
    """
    vocab = len(tokenizer)
    data = cfg.data if cfg is not None else None  # the template decides the end-of-turn stop
    if cfg is not None and cfg.eval.engine == "vllm":
        if prompt_dir:
            log.info("eval.engine=vllm: %s carries a learned soft prompt, decoded with the hf engine", path)
        else:
            from promptkd.rollout.vllm import eval_llm

            v = cfg.rollout.vllm
            llm = eval_llm(path, str(dtype).removeprefix("torch."), v.max_model_len or cfg.data.max_length,
                           v.gpu_memory_utilization)
            return Decoder(None, tokenizer.pad_token_id, eos_for(tokenizer, data, path), vocab, vllm=llm)
    if prompt_dir:
        teacher = load_teacher(TeacherSpec.learned(path, dtype, prompt_dir))
        return Decoder(teacher_step_fn(teacher, True), tokenizer.pad_token_id, eos_for(tokenizer, data, path), vocab)
    base = load_pretrained(path, dtype, device=dist.device()).eval()
    return Decoder(hf_step_fn(base), tokenizer.pad_token_id, eos_for(tokenizer, data, base), vocab)


def evaluate_models(cfg: Config, models: dict[str, tuple[str, str, torch.dtype]], tokenizer: Any,
                    out_dir: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Evaluate ``{name: (model_dir, prompt_dir, dtype)}`` on every eval set; write results + TensorBoard.

    Returns (report, greedy report or None). With ``eval.greedy_too`` (and sampling on) each model
    loaded once is also decoded greedily, into ``out_dir/greedy`` and the ``eval_greedy/`` scalars.
    """
    sets, info = eval_sets(cfg, tokenizer)
    allow_tf32()
    views = {"": cfg.eval}
    if cfg.eval.greedy_too and cfg.eval.do_sample:
        views["greedy"] = greedy_eval(cfg.eval)
    results: dict[str, dict] = {view: {} for view in views}
    for name, (path, prompt_dir, dtype) in models.items():
        log.info("eval %s on %s", name, ", ".join(sets))
        gen = model_decoder(path, tokenizer, dtype, prompt_dir, cfg)
        try:
            for view, ev in views.items():
                with torch.no_grad():
                    results[view][name] = evaluate_sets(gen, tokenizer, sets, ev)
        finally:  # before the next model's engine starts, and on a failure (the launcher's exit skips finalizers)
            if gen.vllm is not None:
                from promptkd.rollout.vllm import release

                release(gen.vllm)
    logger = MetricsLogger(cfg.output.dir, cfg.logging.tensorboard)
    reports = {}
    try:
        for view, ev in views.items():
            reports[view] = write_results(os.path.join(out_dir, view), results[view], sets, ev, info)
            prefix = f"eval_{view}/" if view else "eval/"
            logger.scalars(0, {prefix + k[len("eval/"):]: v for k, v in scalars(reports[view]).items()})
    finally:
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
    if cfg.eval.prompt_path:
        check_prompt_dir("eval.prompt_path", cfg.eval.prompt_path)
    return models


def check_prompt_dir(key: str, path: str) -> None:
    """A learned prompt to load: a run's export (or best/) or a dir holding the prompt's weights."""
    if not os.path.isfile(os.path.join(prompt_files_dir(path), PROMPT_WEIGHTS)):
        raise ConfigError(f"{key}: no {PROMPT_WEIGHTS} in {path} (nor in its {PROMPT_DIR}/)")


def run_eval(cfg: Config) -> dict[str, Any]:
    seed_everything(cfg.seed)
    models = _models_to_eval(cfg)
    key = "tokenizer.path" if cfg.tokenizer.path else ("eval.models" if cfg.eval.models else "eval.model_path")
    tokenizer = load_tokenizer(cfg.tokenizer.path or next(iter(models.values())), key=key)
    dtype = DTYPES[cfg.model.teacher.dtype] if cfg.eval.prompt_path else student_eval_dtype(cfg)
    report, greedy = evaluate_models(cfg, {name: (path, cfg.eval.prompt_path, dtype) for name, path in models.items()},
                                     tokenizer, os.path.join(cfg.output.dir, "eval"))
    print_tables(report, greedy)
    return _rouge_by_model(report)


def _rouge_by_model(report: dict[str, Any]) -> dict[str, Any]:
    return {m: {d: s["rougeL"] for d, s in r["datasets"].items()} for m, r in report["models"].items()}


# ----------------------------------------------------------------------------- quickstart pipeline

def _pipeline_files(cfg: Config, root: str) -> dict[str, str]:
    """The data files the pipeline trains and tests on: the configured ones, or the synthetic splits it writes."""
    if not cfg.data.synthetic.enabled:
        return {"train": cfg.data.train_file, "dev": cfg.data.dev_file, "test": cfg.data.test_file}
    return {name: os.path.join(root, "data", f"{name}.jsonl") for name in ("train", "dev", "test")}


def _prepare_synthetic(cfg: Config, root: str) -> None:
    s = cfg.data.synthetic
    if dist.is_main():
        make_synthetic_splits(os.path.join(root, "data"), s.n_train, s.n_dev, s.n_test, s.seed, s.level)
    dist.barrier()


def _pipeline_runs(cfg: Config, base: Config, root: str) -> dict[str, Config]:
    """The three training runs' configs, derived (and so validated) before the pipeline writes anything."""
    p = cfg.pipeline
    sft = {"method.name": "sft", "optim.student.lr": p.sft_lr, "optim.student.warmup_steps": p.sft_warmup_steps,
           "eval.dev_interval": 0}
    return {
        "teacher": with_overrides(base, {**sft, "model.student.init": dataclasses.asdict(cfg.model.teacher.init),
                                         "train.max_steps": p.teacher_sft_steps,
                                         "output.dir": os.path.join(root, "teacher_sft")}),
        "student": with_overrides(base, {**sft, "train.max_steps": p.student_sft_steps,
                                         "output.dir": os.path.join(root, "student_sft"),
                                         "eval.dev_interval": p.student_sft_dev_interval,
                                         "train.early_stop_patience": p.student_sft_patience}),
        # model.student.path is the student SFT's selected export, known once it ran (selected_student)
        "distill": with_overrides(base, {"model.teacher.path": os.path.join(root, "teacher_sft", "export"),
                                         "model.student.path": os.path.join(root, "student_sft", "export"),
                                         "output.dir": os.path.join(root, "distill")}),
    }


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """Synthetic data -> tokenizer -> SFT teacher -> SFT student -> distill -> evaluate all."""
    root = cfg.output.dir
    files = _pipeline_files(cfg, root)
    base = with_overrides(cfg, {"stage": "train", "data.train_file": files["train"], "data.dev_file": files["dev"],
                                "data.test_file": "", "data.synthetic.enabled": False})
    trained = (with_overrides(base, {"tokenizer.path": os.path.join(root, "tokenizer"), "tokenizer.train": False})
               if base.tokenizer.train else base)
    runs = _pipeline_runs(cfg, trained, root)  # a bad sub-run config fails here, before config.yaml
    write_config(cfg, root)
    if cfg.data.synthetic.enabled:
        _prepare_synthetic(cfg, root)
    tokenizer = build_tokenizer(base, root, example_texts(load_raw_splits(base)[0]))
    log.info("pipeline 1/4: SFT of the teacher")
    run_train(runs["teacher"])
    log.info("pipeline 2/4: SFT of the student (its initialization)")
    run_train(runs["student"])
    log.info("pipeline 3/4: %s distillation", cfg.method.name)
    student_dir = runs["student"].output.dir
    run_train(with_overrides(runs["distill"], {"model.student.path": selected_student(student_dir)}))
    log.info("pipeline 4/4: evaluation")
    return _pipeline_eval(cfg, trained, tokenizer, files["test"], runs["teacher"].output.dir, student_dir,
                          runs["distill"].output.dir)


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
              f"student (SFT, {_selected_label(init)})": (init, "", student_eval_dtype(cfg)),
              f"student ({cfg.method.name}, {_selected_label(distilled)})": (distilled, "", student_eval_dtype(cfg))}
    if os.path.isdir(os.path.join(distilled, PROMPT_DIR)):  # the distillation exported a learned prompt
        models["teacher + learned prompt"] = (os.path.join(teacher_dir, "export"), distilled, t_dtype)
    ev_cfg = with_overrides(base, {"eval.file": test_file})
    report, greedy = evaluate_models(ev_cfg, models, tokenizer, os.path.join(cfg.output.dir, "eval"))
    print_tables(report, greedy)
    return _rouge_by_model(report)


# ----------------------------------------------------------------------------- exposure

def run_exposure(cfg: Config) -> dict[str, Any]:
    """ExAccErr of each student in ``exposure.students`` against the teacher; writes <output.dir>/exposure/."""
    ex = cfg.exposure
    students, teacher_path = exposure.check_inputs(cfg)
    source = cfg.eval.file or cfg.data.test_file  # set: the config's validation checks it (ExposureConfig.check)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer.path or students[0],
                               key="tokenizer.path" if cfg.tokenizer.path else "exposure.students")
    sets, _ = load_sets({"prompts": source}, cfg.data.format, tokenizer, cfg.data.max_prompt_length,
                        cfg.data.max_length, Template.of(cfg.data))
    examples = sets["prompts"][:cfg.eval.max_examples or None]
    n_pos = ex.max_tokens or cfg.data.max_length - cfg.data.max_prompt_length
    teacher = load_teacher(TeacherSpec.learned(teacher_path, DTYPES[cfg.model.teacher.dtype], ex.prompt_path,
                                               key="exposure.teacher_path" if ex.teacher_path else "model.teacher.path"))
    loaders = [(path, functools.partial(_exposure_student, path)) for path in students]
    rows = exposure.measure(loaders, teacher, examples, n_pos, ex.samples, len(tokenizer), eos_for(tokenizer, cfg.data),
                            tokenizer.pad_token_id, cfg.eval.batch_size, cfg.seed)
    result = {"teacher": teacher_path, "prompt": ex.prompt_path, "prompts": source, "samples": ex.samples,
              "positions": n_pos, "se": "delta method over prompts", "students": rows}
    exposure.write_report(os.path.join(cfg.output.dir, "exposure"), result, len(examples), ex.samples)
    return result


def _exposure_student(path: str) -> torch.nn.Module:
    return load_pretrained(path, torch.float32, key="exposure.students").to(dist.device()).eval()


# ----------------------------------------------------------------------------- dispatch

def run_plan(cfg: Config, config_path: str = "") -> Any:
    """Memory plan of ``cfg`` (before launch, on any machine: no process group, no weights)."""
    from promptkd.plan import run_plan as plan

    return plan(cfg, os.path.relpath(config_path) if config_path else "")


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage the launcher runs: ``fn(cfg)`` (``plan`` also takes the config file's path, its table's title)."""

    fn: Callable[..., Any]
    distributed: bool = True       # needs the process group (every stage but plan)
    takes_path: bool = False

    def __call__(self, cfg: Config, config_path: str = "") -> Any:
        return self.fn(cfg, config_path) if self.takes_path else self.fn(cfg)


STAGES: dict[str, Stage] = {
    "train": Stage(run_train),
    "eval": Stage(run_eval),
    "pipeline": Stage(run_pipeline),
    "exposure": Stage(run_exposure),
    "plan": Stage(run_plan, distributed=False, takes_path=True),
}
