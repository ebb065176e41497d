"""One dataclass tree for every run: YAML file + dotted ``key=value`` overrides.

Defaults are the paper's (DESIGN.md §1). The embedded CPU quickstart (tiny
models, bundled synthetic data) is ``configs/quickstart.yaml``, which the
launcher loads when no ``--config`` is given.
Validation is strict: unknown keys, wrong types and bad values raise
``ConfigError`` naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A one-line, user-facing configuration error naming the key or file."""


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TinyInit:
    arch: str = _f("llama", "architecture built from config: llama | gpt2")
    layers: int = _f(2, "number of transformer layers")
    hidden: int = _f(64, "hidden size")
    heads: int = _f(4, "attention heads")
    intermediate: int = _f(0, "MLP size (0 = 4 x hidden)")
    max_positions: int = _f(512, "maximum sequence length")


@dataclass
class TeacherConfig:
    path: str = _f("", "HF dir or hub id of the (SFT'd) teacher; empty = build from `init`")
    init: TinyInit = _f(TinyInit(layers=4, hidden=256, heads=8), "tiny teacher built from config when path is empty")
    dtype: str = _f("bf16", "teacher weight dtype: bf16 | fp32 (frozen; the prompt is always fp32)")
    prompt_length: int = _f(7, "soft prompt length P (0 = no prompt, i.e. plain on-policy RKL)")
    prompt_init: str = _f("text", "prompt init: text | random")
    prompt_init_text: str = _f("Suppose you are a student.", "text whose token embeddings initialise the prompt")
    placement: str = _f("replicated", "replicated (a full copy per rank) | zero3 (weights partitioned across ranks)")
    deepspeed: str = _f("ds_configs/teacher_zero3.json", "placement=zero3: the teacher's DeepSpeed JSON (ZeRO-3 settings)")
    offload_params: str = _f("", "placement=zero3: '' | cpu (keep the teacher's partitions in CPU memory)")
    gradient_checkpointing: bool = _f(False, "activation checkpointing in the teacher (the prompt's backward "
                                             "runs through all of it); dropout stays off")


@dataclass
class StudentConfig:
    path: str = _f("", "HF dir or hub id of the (SFT'd) student; empty = build from `init`")
    init: TinyInit = _f(TinyInit(layers=2, hidden=64, heads=4), "tiny student built from config when path is empty")
    gradient_checkpointing: bool = _f(False, "activation checkpointing in the student")


@dataclass
class ModelConfig:
    teacher: TeacherConfig = _f(TeacherConfig(), "teacher")
    student: StudentConfig = _f(StudentConfig(), "student")


@dataclass
class TokenizerConfig:
    path: str = _f("", "tokenizer dir or hub id; empty = the student's path, or train one when `train` is set")
    train: bool = _f(False, "train a BPE tokenizer on the training text (quickstart / tests)")
    vocab_size: int = _f(800, "vocabulary size of a trained tokenizer")


@dataclass
class SyntheticConfig:
    enabled: bool = _f(False, "generate the bundled synthetic instruction suite into <output.dir>/data")
    n_train: int = _f(6000, "synthetic training examples")
    n_dev: int = _f(200, "synthetic dev examples")
    n_test: int = _f(300, "synthetic test examples")
    seed: int = _f(1234, "seed of the synthetic generator")
    level: int = _f(1, "difficulty: 1 = the quickstart's suite; 2 = longer lists and two-digit sums "
                       "(the quality benchmark)")


@dataclass
class DataConfig:
    train_file: str = _f("", "training data: JSONL path or `datasets` hub id")
    format: str = _f("dolly", "data format: dolly | prompt_output")
    dev_file: str = _f("", "dev data; empty = carve `dev_size` examples out of train")
    dev_size: int = _f(200, "dev examples carved from train when dev_file is empty")
    test_file: str = _f("", "test data evaluated at the end / by stage=eval")
    max_length: int = _f(512, "max prompt+response tokens (longer sequences are truncated)")
    max_prompt_length: int = _f(256, "prompts longer than this are dropped (and counted)")
    synthetic: SyntheticConfig = _f(SyntheticConfig(), "bundled synthetic data")


@dataclass
class MethodConfig:
    name: str = _f("promptkd", "training method: promptkd | rkl | sft | kd | seqkd | imitkd | gkd | distillm | "
                                   "minillm")
    guidance: str = _f("teacher_student", "prompt guidance term: teacher_student = KL(p_T^θ‖p_S) | student_teacher = KL(p_S‖p_T^θ)")
    reg_schedule: str = _f("linear", "regularizer weight w(t): linear = 1 - t/T | constant | off")
    reg_weight: float = _f(1.0, "regularizer scale: w(t) = reg_weight · (1 - t/T) for linear, reg_weight for constant")
    reuse_student_forward: bool = _f(True, "promptkd: without dropout, the prompt step's student forward runs with "
                                           "grad and serves the student step too (bitwise the same; one student "
                                           "forward less, but its activations stay alive through the prompt step)")
    stale_student_target: bool = _f(False, "promptkd: the student step reuses the prompted teacher's logits from "
                                           "the prompt step, i.e. from BEFORE the prompt update (one teacher forward "
                                           "less per step; changes the paper's math, off by default)")
    prompt_step_teacher_train: bool = _f(True, "promptkd: the prompted teacher runs in train mode (its dropout on) "
                                                "while the prompt is tuned, as the official code; the plain "
                                                "teacher p_T stays in eval mode. false = eval mode")
    kd_ce_weight: float = _f(0.0, "kd only: loss = (1-w)·FKL + w·CE on ground truth")
    loss_chunk_size: int = _f(0, "sequence positions per chunk of the fp32 loss math (0 = automatic: "
                                 "~16 MB pieces for the fused KL/prompt losses, unchunked for the others)")
    divergence: str = _f("auto", "imitkd/gkd token divergence: auto (imitkd: fkl, gkd: jsd) | fkl | rkl | jsd | tvd "
                                 "(0.5·Σ|p_T - p_S|) | sfkl | srkl")
    gkd_lambda: float = _f(0.5, "gkd: on-policy fraction λ, the chance a step trains on student samples (else ground "
                                "truth); one draw per step, identical on every rank")
    gkd_beta: float = _f(0.5, "jsd: β in JSD(β) = β·KL(p_T‖M) + (1-β)·KL(p_S‖M), M = β·p_T + (1-β)·p_S; "
                              "β=0 is KL(p_T‖p_S), β=1 is KL(p_S‖p_T)")
    skew_alpha: float = _f(0.1, "distillm (and sfkl/srkl): skew α; sfkl = KL(p_T‖α·p_T + (1-α)·p_S), "
                                "srkl = KL(p_S‖α·p_S + (1-α)·p_T)")
    distillm_loss: str = _f("srkl", "distillm: srkl (skew reverse KL) | sfkl (skew forward KL)")
    replay_capacity: int = _f(1000, "distillm: student samples kept per rank in the replay buffer (FIFO)")
    replay_ratio: float = _f(0.5, "distillm: chance a student-sample step replays the buffer instead of generating")
    distillm_init_prob: float = _f(0.0, "distillm: initial chance φ that a step uses student samples "
                                        "(else ground truth)")
    distillm_prob_step: float = _f(0.1, "distillm: φ grows by this (capped at 1) when the loss stops improving")
    distillm_window: int = _f(10, "distillm: steps per loss window; φ grows when a window's mean step loss "
                                  "(dev-loss proxy) is not below the previous window's minus distillm_loss_eps")
    distillm_loss_eps: float = _f(0.0, "distillm: improvement a window must make to keep φ unchanged")
    seqkd_cache_dir: str = _f("", "seqkd: cache of teacher generations; empty = <output.dir>/seqkd_cache")
    minillm_teacher_mix: float = _f(0.2, "minillm: α in [0, 1) of the sampling mixture α·p_T + (1-α)·p_S "
                                         "(0 = pure student sampling)")
    minillm_clip_weight: float = _f(3.0, "minillm: upper clip of the importance weight p_S/p_mix (it never "
                                         "exceeds 1/(1-α), so the clip binds only for α > 1 - 1/clip)")
    minillm_single_step: bool = _f(True, "minillm: include the single-step term (full-vocabulary reverse KL per "
                                         "position); false = policy-gradient term only")
    minillm_length_norm: bool = _f(True, "minillm: the return R_t is the mean of the future rewards; false = "
                                         "their undiscounted sum")
    minillm_lm_coef: float = _f(0.0, "minillm: weight of a cross-entropy loss on minillm_lm_data (0 = off)")
    minillm_lm_data: str = _f("", "minillm: pretraining corpus for the LM loss: .jsonl with a 'text' field, "
                                  "or plain text, one document per line")


@dataclass
class OptimConfig:
    lr: float = _f(5e-5, "peak learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    eps: float = _f(1e-8, "AdamW eps")
    warmup_steps: int = _f(100, "linear warm-up steps")
    schedule: str = _f("constant", "lr schedule after warm-up: constant | linear | cosine")


@dataclass
class OptimizersConfig:
    student: OptimConfig = _f(OptimConfig(), "student AdamW")
    prompt: OptimConfig = _f(OptimConfig(), "soft-prompt AdamW (the paper uses the student's lr)")


@dataclass
class TrainConfig:
    epochs: int = _f(1, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps (0 = run `epochs`)")
    micro_batch_size: int = _f(2, "sequences per rank per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    precision: str = _f("fp32", "student precision: fp32 | bf16 | fp16")
    grad_clip: float = _f(1.0, "gradient-norm clipping (student and prompt; 0 = off)")
    max_bad_steps: int = _f(10, "abort after this many consecutive steps skipped for NaN/inf (0 = never)")
    early_stop_patience: int = _f(0, "stop after this many dev evaluations (eval.dev_interval) without a new best "
                                     "dev ROUGE-L; best/ keeps the best student (0 = never)")


@dataclass
class RolloutConfig:
    top_p: float = _f(1.0, "nucleus sampling threshold")
    top_k: int = _f(0, "top-k sampling (0 = off)")
    temperature: float = _f(1.0, "sampling temperature")
    max_new_tokens: int = _f(0, "0 = max_length - max_prompt_length")


@dataclass
class EvalConfig:
    file: str = _f("", "data to evaluate; empty = data.test_file")
    model_path: str = _f("", "stage=eval: HF dir of the model to evaluate; empty = the run's export")
    prompt_path: str = _f("", "stage=eval: dir with teacher_prompt.safetensors to evaluate a prompted teacher")
    batch_size: int = _f(16, "prompts per generation batch")
    max_new_tokens: int = _f(256, "generated tokens per answer")
    do_sample: bool = _f(True, "sample (true) or greedy (false)")
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(1.0, "sampling top_p")
    top_k: int = _f(0, "sampling top_k")
    no_repeat_ngram_size: int = _f(6, "forbid repeating n-grams of this size (0 = off)")
    seeds: list = _f([10, 20, 30, 40, 50], "one generation per seed (scores are mean ± std over seeds)")
    max_examples: int = _f(0, "evaluate only the first N examples (0 = all)")
    dev_interval: int = _f(0, "dev ROUGE-L every N optimizer steps during training (0 = only at the end)")
    models: list = _f([], "stage=eval: several models in one launch, name=path entries (HF dirs; each "
                          "evaluated as eval.model_path would be); empty = eval.model_path")
    greedy_too: bool = _f(False, "also decode greedily (one pass) and write it to <eval dir>/greedy/ beside the "
                                 "sampled results: the paper's protocol samples, greedy is a second view")
    sets: list = _f([], "test sets: name=path entries and/or dirs written by promptkd.data.prepare; "
                        "empty = eval.file / data.test_file as the set 'test'")


@dataclass
class ExposureConfig:
    students: list = _f([], "stage=exposure: student HF dirs (e.g. exports of several checkpoints); "
                            "empty = eval.model_path or the run's export")
    teacher_path: str = _f("", "stage=exposure: teacher HF dir; empty = model.teacher.path")
    prompt_path: str = _f("", "stage=exposure: dir with a learned teacher_prompt.safetensors (empty = plain teacher)")
    samples: int = _f(1, "stage=exposure: samples per prompt from each of student and teacher (k)")
    max_tokens: int = _f(0, "stage=exposure: positions accumulated (N); 0 = data.max_length - data.max_prompt_length")


@dataclass
class OutputConfig:
    dir: str = _f("runs/default", "run directory")
    save_interval: int = _f(0, "checkpoint every N optimizer steps (0 = only at the end)")
    export: bool = _f(True, "export the student (HF format) and the prompt at the end")
    resume: str = _f("", "resume from: '' (start fresh) | auto (latest complete checkpoint in dir) | a checkpoint path")
    keep_last: int = _f(2, "checkpoints kept (the newest K; best/ is kept apart); 0 = keep all")
    overwrite: bool = _f(False, "allow starting fresh in a dir that already holds a run")


@dataclass
class LoggingConfig:
    interval: int = _f(10, "log scalars every N optimizer steps")
    tensorboard: bool = _f(True, "write TensorBoard events to <output.dir>/tb")
    sample_texts: int = _f(2, "sampled responses logged as text at each log step")
    progress_bar: bool = _f(True, "tqdm progress bar on rank 0")


@dataclass
class PipelineConfig:
    teacher_sft_steps: int = _f(700, "stage=pipeline: SFT steps of the tiny teacher")
    student_sft_steps: int = _f(250, "stage=pipeline: SFT steps of the tiny student (its init for distillation)")
    sft_lr: float = _f(1e-3, "stage=pipeline: SFT learning rate")
    sft_warmup_steps: int = _f(30, "stage=pipeline: SFT warm-up steps")
    student_sft_dev_interval: int = _f(0, "stage=pipeline: dev ROUGE-L every N steps of the student's SFT; > 0 makes "
                                          "its best-dev checkpoint (best/) the distillation init")
    student_sft_patience: int = _f(0, "stage=pipeline: early stopping of the student's SFT after N dev "
                                      "evaluations without a new best (0 = run every step)")


@dataclass
class Config:
    stage: str = _f("train", "what to run: pipeline (quickstart: SFT teacher, SFT student, distill, eval) | train | eval")
    seed: int = _f(42, "global seed")
    deepspeed: str = _f("ds_configs/zero0.json", "DeepSpeed JSON with ZeRO/offload settings only")
    dist_timeout_s: int = _f(1800, "timeout of every collective, seconds")
    model: ModelConfig = _f(ModelConfig(), "models")
    tokenizer: TokenizerConfig = _f(TokenizerConfig(), "tokenizer")
    data: DataConfig = _f(DataConfig(), "data")
    method: MethodConfig = _f(MethodConfig(), "method and its parameters")
    optim: OptimizersConfig = _f(OptimizersConfig(), "optimizers and schedules")
    train: TrainConfig = _f(TrainConfig(), "training loop")
    rollout: RolloutConfig = _f(RolloutConfig(), "student sampling")
    eval: EvalConfig = _f(EvalConfig(), "evaluation")
    exposure: ExposureConfig = _f(ExposureConfig(), "exposure-bias metric ExAccErr (stage=exposure)")
    output: OutputConfig = _f(OutputConfig(), "outputs")
    logging: LoggingConfig = _f(LoggingConfig(), "logging")
    pipeline: PipelineConfig = _f(PipelineConfig(), "quickstart pipeline")


CHOICES: dict[str, tuple[str, ...]] = {
    "stage": ("pipeline", "train", "eval", "exposure"),
    "model.teacher.init.arch": ("llama", "gpt2"),
    "model.student.init.arch": ("llama", "gpt2"),
    "model.teacher.dtype": ("bf16", "fp32"),
    "model.teacher.prompt_init": ("text", "random"),
    "model.teacher.placement": ("replicated", "zero3"),
    "model.teacher.offload_params": ("", "cpu"),
    "data.format": ("dolly", "prompt_output"),
    "method.name": ("promptkd", "rkl", "sft", "kd", "seqkd", "imitkd", "gkd", "distillm", "minillm"),
    "method.divergence": ("auto", "fkl", "rkl", "jsd", "tvd", "sfkl", "srkl"),
    "method.distillm_loss": ("srkl", "sfkl"),
    "method.guidance": ("teacher_student", "student_teacher"),
    "method.reg_schedule": ("linear", "constant", "off"),
    "optim.student.schedule": ("constant", "linear", "cosine"),
    "optim.prompt.schedule": ("constant", "linear", "cosine"),
    "train.precision": ("fp32", "bf16", "fp16"),
}

# Keys that must be > 0; keys that must be >= 0.
POSITIVE = (
    "model.teacher.init.layers", "model.teacher.init.hidden", "model.teacher.init.heads",
    "model.student.init.layers", "model.student.init.hidden", "model.student.init.heads",
    "model.teacher.init.max_positions", "model.student.init.max_positions",
    "tokenizer.vocab_size", "data.max_length", "data.max_prompt_length",
    "optim.student.lr", "optim.prompt.lr", "optim.student.eps", "optim.prompt.eps",
    "train.micro_batch_size", "train.grad_accum", "data.synthetic.level", "rollout.temperature", "rollout.top_p",
    "eval.batch_size", "eval.max_new_tokens", "eval.temperature", "eval.top_p", "exposure.samples",
    "logging.interval", "dist_timeout_s", "pipeline.sft_lr", "method.replay_capacity", "method.distillm_window",
    "method.minillm_clip_weight",
)
NON_NEGATIVE = (
    "model.teacher.prompt_length", "data.dev_size", "method.reg_weight", "method.loss_chunk_size",
    "method.distillm_loss_eps", "method.minillm_lm_coef",
    "optim.student.weight_decay", "optim.prompt.weight_decay", "optim.student.warmup_steps",
    "optim.prompt.warmup_steps", "train.epochs", "train.max_steps", "train.grad_clip", "train.max_bad_steps", "train.early_stop_patience",
    "rollout.top_k", "rollout.max_new_tokens", "eval.top_k", "eval.no_repeat_ngram_size",
    "eval.max_examples", "eval.dev_interval", "exposure.max_tokens", "output.save_interval", "output.keep_last", "logging.sample_texts",
    "pipeline.teacher_sft_steps", "pipeline.student_sft_steps", "pipeline.sft_warmup_steps", "pipeline.student_sft_dev_interval",
    "pipeline.student_sft_patience",
    "data.synthetic.n_train", "data.synthetic.n_dev", "data.synthetic.n_test",
)
# Probabilities and mixing weights: must lie in [0, 1].
UNIT_INTERVAL = (
    "method.gkd_lambda", "method.gkd_beta", "method.skew_alpha", "method.replay_ratio",
    "method.distillm_init_prob", "method.distillm_prob_step", "method.minillm_teacher_mix",
)


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
    else:  # pragma: no cover - every field above uses one of these types
        return value
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown config key (known: {', '.join(sorted(types_))})")
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
        if part not in known:
            raise ConfigError(f"{'.'.join(path[:i + 1])}: unknown config key")
        typ = known[part]
        if i == len(path) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(path[:i + 1])}: is not a section")


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Defaults < YAML file < dotted overrides, then strict validation."""
    tree: dict = {}
    if path:
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
        tree = loaded or {}
    for item in overrides:
        keys, value = parse_override(item)
        _set_path(tree, keys, value, Config)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation

def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)} (got {get(cfg, key)!r})")
    for key in POSITIVE:
        if not get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0 (got {get(cfg, key)!r})")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0 (got {get(cfg, key)!r})")
    for key in ("rollout.top_p", "eval.top_p"):
        if get(cfg, key) > 1.0:
            raise ConfigError(f"{key}: must be in (0, 1] (got {get(cfg, key)})")
    for key in UNIT_INTERVAL:
        if not 0.0 <= get(cfg, key) <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1] (got {get(cfg, key)!r})")
    if cfg.method.skew_alpha >= 1.0:  # alpha = 1 makes the skew KL identically 0
        raise ConfigError(f"method.skew_alpha: must be in [0, 1) (got {cfg.method.skew_alpha!r})")
    _validate_minillm(cfg)
    for key in ("optim.student.betas", "optim.prompt.betas"):
        betas = get(cfg, key)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"{key}: must be two numbers in [0, 1) (got {betas!r})")
    if cfg.data.synthetic.level not in (1, 2):
        raise ConfigError(f"data.synthetic.level: must be 1 or 2 (got {cfg.data.synthetic.level!r})")
    if cfg.train.early_stop_patience and not cfg.eval.dev_interval:
        raise ConfigError("train.early_stop_patience: needs eval.dev_interval > 0 (dev evaluations to count)")
    names = set()
    for spec in cfg.eval.models:
        name, sep, path = str(spec).partition("=")
        if not (sep and name and path):
            raise ConfigError(f"eval.models: {spec!r} is not name=path")
        if name in names:
            raise ConfigError(f"eval.models: the name {name!r} is given twice")
        names.add(name)
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(f"data.max_prompt_length: must be < data.max_length ({cfg.data.max_length})")
    if not cfg.eval.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in cfg.eval.seeds):
        raise ConfigError(f"eval.seeds: must be a non-empty list of integers (got {cfg.eval.seeds!r})")
    for key in ("eval.sets", "exposure.students"):
        if not all(isinstance(v, str) and v for v in get(cfg, key)):
            raise ConfigError(f"{key}: must be a list of non-empty strings (got {get(cfg, key)!r})")
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        raise ConfigError("train.max_steps: set max_steps > 0 or train.epochs > 0")
    if cfg.stage == "train" and not cfg.data.train_file and not cfg.data.synthetic.enabled:
        raise ConfigError("data.train_file: required for stage=train (or set data.synthetic.enabled=true)")
    for arch_key in ("model.teacher.init", "model.student.init"):
        init = get(cfg, arch_key)
        if init.hidden % init.heads:
            raise ConfigError(f"{arch_key}.hidden: must be divisible by {arch_key}.heads ({init.heads})")
    if not cfg.deepspeed:
        raise ConfigError("deepspeed: a ds_configs JSON path is required")


def _validate_minillm(cfg: Config) -> None:
    m = cfg.method
    if m.minillm_teacher_mix >= 1.0:  # alpha = 1 samples from the teacher alone: the weight p_S/p_mix is meaningless
        raise ConfigError(f"method.minillm_teacher_mix: must be in [0, 1) (got {m.minillm_teacher_mix!r})")
    if m.minillm_lm_coef > 0 and not m.minillm_lm_data:
        raise ConfigError("method.minillm_lm_data: required when method.minillm_lm_coef > 0 (a .jsonl file with a "
                          "'text' field, or a text file with one document per line)")
    # checked here, before a run writes its config.yaml; other stages may validate a config on another machine
    if m.minillm_lm_coef > 0 and cfg.stage in ("train", "pipeline") and not os.path.isfile(m.minillm_lm_data):
        raise ConfigError(f"method.minillm_lm_data: file not found: {m.minillm_lm_data}")


def max_new_tokens(cfg: Config) -> int:
    """Rollout length: the paper's max_length - max_prompt_length unless set."""
    return cfg.rollout.max_new_tokens or (cfg.data.max_length - cfg.data.max_prompt_length)


# ----------------------------------------------------------------------------- deepspeed merge

# These live in the run config; a DeepSpeed JSON that sets them is rejected
# rather than silently overridden, so there is one source of truth.
RUN_CONFIG_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "fp16", "bf16", "optimizer", "scheduler",
)


def resolve_path(path: str) -> str:
    """Relative config paths resolve against the cwd, then against the repo root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidate = os.path.join(repo, path)
    return candidate if os.path.exists(candidate) else path


def load_ds_json(path: str) -> dict:
    real = resolve_path(path)
    if not os.path.isfile(real):
        raise ConfigError(f"deepspeed: file not found: {path}")
    try:
        with open(real) as fh:
            ds = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: top level must be an object")
    for key in RUN_CONFIG_KEYS:
        if key in ds:
            raise ConfigError(f"{path}: '{key}' belongs in the run config (train.*), not the DeepSpeed JSON")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
    return ds


def build_ds_config(cfg: Config, world_size: int, micro_batch_size: Optional[int] = None,
                    grad_accum: Optional[int] = None) -> dict:
    """The student's DeepSpeed config: the JSON's ZeRO settings + the run config."""
    ds = load_ds_json(cfg.deepspeed)
    mbs = micro_batch_size or cfg.train.micro_batch_size
    ga = grad_accum or cfg.train.grad_accum
    ds["train_micro_batch_size_per_gpu"] = mbs
    ds["gradient_accumulation_steps"] = ga
    ds["train_batch_size"] = mbs * ga * world_size
    ds["gradient_clipping"] = cfg.train.grad_clip
    # check_grad_overflow: a bf16 ZeRO step with non-finite gradients is skipped, not applied
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": True}
    ds["fp16"] = {"enabled": cfg.train.precision == "fp16"}
    ds.setdefault("steps_per_print", 10 ** 9)  # we log ourselves
    return ds


def build_teacher_ds_config(cfg: Config) -> dict:
    """The frozen teacher's DeepSpeed config (placement=zero3): ZeRO-3, no optimizer."""
    t = cfg.model.teacher
    ds = load_ds_json(t.deepspeed)
    if zero_stage(ds) != 3:
        raise ConfigError(f"{t.deepspeed}: model.teacher.placement=zero3 needs zero_optimization.stage 3")
    if t.offload_params:
        ds["zero_optimization"]["offload_param"] = {"device": t.offload_params, "pin_memory": True}
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size  # required by DeepSpeed, unused
    ds["gradient_accumulation_steps"] = 1
    ds["bf16"] = {"enabled": t.dtype == "bf16"}
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


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
        choices = CHOICES.get(key)
        text = f.metadata.get("help", "")
        shown = json.dumps(value) if not isinstance(value, str) else (value or '""')
        lines.append(f"  {key:<36} {shown:<22} {text}" + (f" [{'|'.join(choices)}]" if choices and "|" not in text else ""))
    return lines


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with dotted keys replaced (used to derive sub-runs)."""
    tree = asdict(cfg)
    for dotted, value in values.items():
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"{dotted}: unknown config key")
        node[parts[-1]] = value
    out = _build(Config, tree)
    validate(out)
    return out
