"""One dataclass tree for every run: YAML file + dotted ``key=value`` overrides.

Defaults are the paper's (DESIGN.md §1). The embedded CPU quickstart (tiny
models, bundled synthetic data) is ``configs/quickstart.yaml``, which the
launcher loads when no ``--config`` is given.
Validation is strict: unknown keys, wrong types and bad values raise
``ConfigError`` naming the dotted key.

Modules (imports run one way, top to bottom; stdlib + yaml only):
- ``fields``: ``ConfigError``, the ``_f`` field helper with its constraints, ``validate``;
- ``registry``: the methods, by name, and what each needs (``REGISTRY``, ``MethodSpec``);
- ``methods``: the ``method:`` section, one sub-section per method, ``MOVED`` (old keys);
- ``schema``: the rest of the tree and ``Config``;
- ``loading``: YAML + overrides, ``with_overrides``, ``help_lines``, ``to_yaml``;
- ``deepspeed``: the DeepSpeed JSON merge.
"""
from promptkd.config.deepspeed import (RUN_CONFIG_KEYS, build_ds_config, build_teacher_ds_config, load_ds_json,
                                       resolve_path, zero_stage)
from promptkd.config.fields import ConfigError, get, validate
from promptkd.config.loading import asdict, help_lines, load_config, parse_override, to_yaml, with_overrides
from promptkd.config.registry import METHOD_NAMES, REGISTRY, MethodSpec, method_spec, uses_fused_head
from promptkd.config.divergences import DIVERGENCE_NAMES, DIVERGENCES, DivergenceSpec
from promptkd.config.methods import (MOVED, DistiLLMConfig, DivergenceConfig, GKDConfig,
                                     ImitKDConfig, KDConfig, MethodConfig, MiniLLMConfig, PromptKDConfig,
                                     SeqKDConfig)
from promptkd.config.schema import (Config, DataConfig, EvalConfig, ExposureConfig, LoggingConfig, ModelConfig,
                                    OptimConfig, OptimizersConfig, OutputConfig, PipelineConfig, PlanConfig,
                                    RolloutConfig,
                                    StudentConfig, SyntheticConfig, TeacherConfig, TinyInit, TokenizerConfig,
                                    TrainConfig, VLLM_INSTALL, VLLMConfig, max_new_tokens, parse_bytes)

__all__ = [
    "ConfigError", "validate", "get",
    "Config", "TinyInit", "TeacherConfig", "StudentConfig", "ModelConfig", "TokenizerConfig", "SyntheticConfig",
    "DataConfig", "OptimConfig", "OptimizersConfig", "TrainConfig", "RolloutConfig", "EvalConfig",
    "ExposureConfig", "OutputConfig", "LoggingConfig", "PipelineConfig", "max_new_tokens", "VLLMConfig",
    "VLLM_INSTALL", "PlanConfig", "parse_bytes",
    "MethodConfig", "PromptKDConfig", "KDConfig", "DivergenceConfig", "ImitKDConfig", "GKDConfig",
    "DistiLLMConfig", "SeqKDConfig", "MiniLLMConfig", "METHOD_NAMES", "REGISTRY", "MethodSpec", "method_spec",
    "uses_fused_head", "DIVERGENCES",
    "DIVERGENCE_NAMES", "DivergenceSpec",
    "MOVED",
    "load_config", "with_overrides", "parse_override", "asdict", "to_yaml", "help_lines",
    "RUN_CONFIG_KEYS", "resolve_path", "load_ds_json", "build_ds_config", "build_teacher_ds_config", "zero_stage",
]
