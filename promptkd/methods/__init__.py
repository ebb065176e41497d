"""Training methods, one small module each, chosen with ``method.name``."""
from __future__ import annotations

from promptkd.methods.base import Method, StepContext
from promptkd.methods.distillm import DistiLLM
from promptkd.methods.gkd import GKD
from promptkd.methods.imitkd import ImitKD
from promptkd.methods.kd import KD
from promptkd.methods.minillm import MiniLLM
from promptkd.methods.promptkd import RKL, PromptKD
from promptkd.methods.seqkd import SeqKD
from promptkd.methods.sft import SFT

METHODS: dict[str, type[Method]] = {"sft": SFT, "kd": KD, "promptkd": PromptKD, "rkl": RKL, "seqkd": SeqKD,
                                    "imitkd": ImitKD, "gkd": GKD, "distillm": DistiLLM, "minillm": MiniLLM}


def build_method(name: str, ctx: StepContext) -> Method:
    return METHODS[name](ctx)


__all__ = ["METHODS", "Method", "StepContext", "build_method"]
