"""Training methods, one small module each, chosen with ``method.name``."""
from __future__ import annotations

from promptkd.config import Config
from promptkd.methods.base import Method, StepContext, StepResult, step_context
from promptkd.methods.distillm import DistiLLM
from promptkd.methods.gkd import GKD
from promptkd.methods.imitkd import ImitKD
from promptkd.methods.kd import KD
from promptkd.methods.minillm import MiniLLM
from promptkd.methods.promptkd import RKL, PromptKD
from promptkd.methods.seqkd import SeqKD
from promptkd.methods.sft import SFT

# method.name -> its class; each class names itself through its registry entry (promptkd.config.registry)
METHODS: dict[str, type[Method]] = {cls.spec.name: cls for cls in (PromptKD, RKL, SFT, KD, SeqKD, ImitKD, GKD,
                                                                   DistiLLM, MiniLLM)}


def build_method(cfg: Config, ctx: StepContext) -> Method:
    return METHODS[cfg.method.name].from_config(cfg, ctx)


__all__ = ["METHODS", "Method", "StepContext", "StepResult", "build_method", "step_context"]
