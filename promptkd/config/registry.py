"""The methods and what each needs: the one place that names them (no torch, so config and planner read it too).

Config validation (``method.name`` choices, what ``rollout.engine=vllm`` applies to), ``build_run`` (teacher or
not, config section, rollout engine) and the planner (which models and phases to count) read these facts here;
each ``Method`` class takes its own as ``spec`` (``promptkd.methods``). What depends on the config besides the
name (``Method.fused_loss(cfg)``, ``Method.teacher_prompt_length(cfg)``) stays in the class and starts from the
static part below. ``tests/unit/test_registry.py`` fails when a list of method names appears anywhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class MethodSpec:
    name: str                        # method.name
    section: Optional[str] = None    # its config section: cfg.method.<section> (None: it has no settings)
    uses_teacher: bool = False       # a teacher is built and loaded
    samples_student: bool = False    # draws student rollouts: rollout.engine applies
    samples_teacher: bool = False    # generates the teacher's responses: rollout.engine applies (SeqKD)
    samples_mixture: bool = False    # samples a teacher-student mixture token by token (both models decode)
    trains_prompt: bool = False      # the teacher carries a soft prompt of model.teacher.prompt_length, trained
    fused: bool = False              # its student loss is a fused KL (grad made in the forward) when its
                                     # settings make it a plain forward/reverse KL (Method.fused_loss(cfg))
    fused_head: bool = False         # its teacher-student divergences can run on hidden states through the fused
                                     # LM head (method.fused_head; uses_fused_head below)


_SPECS = (
    # rkl is PromptKD without a prompt (the ablation): it reads method.promptkd
    MethodSpec("promptkd", "promptkd", uses_teacher=True, samples_student=True, trains_prompt=True, fused=True,
               fused_head=True),
    MethodSpec("rkl", "promptkd", uses_teacher=True, samples_student=True, fused=True, fused_head=True),
    MethodSpec("sft"),
    MethodSpec("kd", "kd", uses_teacher=True, fused=True, fused_head=True),
    MethodSpec("seqkd", "seqkd", uses_teacher=True, samples_teacher=True),
    MethodSpec("imitkd", "imitkd", uses_teacher=True, samples_student=True, fused=True, fused_head=True),
    MethodSpec("gkd", "gkd", uses_teacher=True, samples_student=True, fused=True, fused_head=True),
    MethodSpec("distillm", "distillm", uses_teacher=True, samples_student=True, fused_head=True),
    MethodSpec("minillm", "minillm", uses_teacher=True, samples_mixture=True),
)

REGISTRY: dict[str, MethodSpec] = {s.name: s for s in _SPECS}
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)


def method_spec(name: str) -> MethodSpec:
    return REGISTRY[name]


def uses_fused_head(cfg: Any) -> bool:
    """Whether ``cfg``'s training step runs its divergences through the fused LM head (``method.fused_head`` on, a
    method that can, and KD without its CE term, which needs logits): the methods and the memory planner ask here."""
    if not cfg.method.fused_head or not REGISTRY[cfg.method.name].fused_head:
        return False
    return cfg.method.name != "kd" or cfg.method.kd.ce_weight == 0
