"""``method:``: the method's name, the shared loss chunking, and one section per method.

Each method reads only its own section (``cfg.method.gkd.lmbda``); ``rkl`` is PromptKD
without a prompt and reads ``method.promptkd``. ``MOVED`` maps the flat keys of earlier
versions to where they live now, for the unknown-key error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from promptkd.config.divergences import DIVERGENCE_NAMES, SKEW_DIVERGENCES, divergence_help
from promptkd.config.fields import ConfigError, _f
from promptkd.config.registry import METHOD_NAMES

# read by promptkd.losses (prompt_loss, regularizer_weight) too: the choices are written once, here
GUIDANCE_CHOICES = ("teacher_student", "student_teacher")
SCHEDULE_CHOICES = ("linear", "constant", "off")
SKEW_HELP = "skew α; sfkl = KL(p_T‖α·p_T + (1-α)·p_S), srkl = KL(p_S‖α·p_S + (1-α)·p_T)"


def _divergence(default: str) -> Any:
    return _f(default, "token divergence: " + divergence_help(), choices=DIVERGENCE_NAMES)


@dataclass
class PromptKDConfig:
    guidance: str = _f("teacher_student", "prompt guidance term: teacher_student = KL(p_T^θ‖p_S) | "
                                          "student_teacher = KL(p_S‖p_T^θ)",
                       choices=GUIDANCE_CHOICES)
    reg_schedule: str = _f("linear", "regularizer weight w(t): linear = 1 - t/T | constant | off",
                           choices=SCHEDULE_CHOICES)
    reg_weight: float = _f(1.0, "regularizer scale: w(t) = reg_weight · (1 - t/T) for linear, reg_weight for "
                                "constant", min=0)
    reuse_student_forward: bool = _f(True, "without dropout, the prompt step's student forward runs with grad and "
                                           "serves the student step too (bitwise the same; one student forward "
                                           "less, but its activations stay alive through the prompt step)")
    stale_student_target: bool = _f(False, "the student step reuses the prompted teacher's logits from the prompt "
                                           "step, i.e. from BEFORE the prompt update (one teacher forward less per "
                                           "step; changes the paper's math, off by default)")
    prompt_step_teacher_train: bool = _f(True, "the prompted teacher runs in train mode (its dropout on) while the "
                                               "prompt is tuned, as the official code; the plain teacher p_T stays "
                                               "in eval mode. false = eval mode")


@dataclass
class KDConfig:
    ce_weight: float = _f(0.0, "loss = (1-w)·FKL + w·CE on ground truth")


@dataclass
class DivergenceConfig:
    """The token divergence of an on-policy baseline and its parameters."""
    divergence: str = _divergence("fkl")
    beta: float = _f(0.5, "jsd: β in JSD(β) = β·KL(p_T‖M) + (1-β)·KL(p_S‖M), M = β·p_T + (1-β)·p_S; "
                          "β=0 is KL(p_T‖p_S), β=1 is KL(p_S‖p_T)", unit=True)
    # alpha = 1 makes the skew KL identically 0
    skew_alpha: float = _f(0.1, "sfkl/srkl: " + SKEW_HELP, unit=True, below_one=True)


@dataclass
class ImitKDConfig(DivergenceConfig):
    divergence: str = _divergence("fkl")


@dataclass
class GKDConfig(DivergenceConfig):
    divergence: str = _divergence("jsd")
    lmbda: float = _f(0.5, "on-policy fraction λ, the chance a step trains on student samples (else ground "
                           "truth); one draw per step, identical on every rank", unit=True)


@dataclass
class DistiLLMConfig:
    loss: str = _f("srkl", "the skew KL: " + " | ".join(SKEW_DIVERGENCES), choices=SKEW_DIVERGENCES)
    skew_alpha: float = _f(0.1, SKEW_HELP, unit=True, below_one=True)
    replay_capacity: int = _f(1000, "student samples kept per rank in the replay buffer (FIFO)", positive=True)
    replay_ratio: float = _f(0.5, "chance a student-sample step replays the buffer instead of generating", unit=True)
    init_prob: float = _f(0.0, "initial chance φ that a step uses student samples (else ground truth)", unit=True)
    prob_step: float = _f(0.1, "φ grows by this (capped at 1) when the loss stops improving", unit=True)
    window: int = _f(10, "steps per loss window; φ grows when a window's mean step loss (dev-loss proxy) is not "
                         "below the previous window's minus loss_eps", positive=True)
    loss_eps: float = _f(0.0, "improvement a window must make to keep φ unchanged", min=0)


@dataclass
class SeqKDConfig:
    cache_dir: str = _f("", "cache of teacher generations; empty = <output.dir>/seqkd_cache")


@dataclass
class MiniLLMConfig:
    # alpha = 1 samples from the teacher alone: the weight p_S/p_mix is meaningless
    teacher_mix: float = _f(0.2, "α in [0, 1) of the sampling mixture α·p_T + (1-α)·p_S (0 = pure student "
                                 "sampling)", unit=True, below_one=True)
    clip_weight: float = _f(3.0, "upper clip of the importance weight p_S/p_mix (it never exceeds 1/(1-α), so the "
                                 "clip binds only for α > 1 - 1/clip)", positive=True)
    single_step: bool = _f(True, "include the single-step term (full-vocabulary reverse KL per position); false = "
                                 "policy-gradient term only")
    length_norm: bool = _f(True, "the return R_t is the mean of the future rewards; false = their undiscounted sum")
    lm_coef: float = _f(0.0, "weight of a cross-entropy loss on lm_data (0 = off)", min=0)
    lm_data: str = _f("", "pretraining corpus for the LM loss: .jsonl with a 'text' field, or plain text, one "
                          "document per line")

    def check(self, prefix: str, cfg: Any) -> None:
        if self.lm_coef > 0 and not self.lm_data:
            raise ConfigError(f"{prefix}lm_data: required when {prefix}lm_coef > 0 (a .jsonl file with a "
                              "'text' field, or a text file with one document per line)")
        # checked here, before a run writes its config.yaml; other stages may validate a config on another machine
        if self.lm_coef > 0 and cfg.stage in ("train", "pipeline") and not os.path.isfile(self.lm_data):
            raise ConfigError(f"{prefix}lm_data: file not found: {self.lm_data}")


@dataclass
class MethodConfig:
    name: str = _f("promptkd", "training method: " + " | ".join(METHOD_NAMES), choices=METHOD_NAMES)
    loss_chunk_size: int = _f(0, "sequence positions per chunk of the fp32 loss math (0 = automatic: "
                                 "~16 MB pieces for the fused KL/prompt losses, unchunked for the others)", min=0)
    fused_head: bool = _f(True, "fused LM head + loss: the divergences (and PromptKD's prompt loss) take the models' "
                                "final hidden states and head weights and apply the head chunk by chunk, so no "
                                "[tokens, vocab] logits exist for all response positions (false = full logits, "
                                "the reference path)")
    promptkd: PromptKDConfig = _f(PromptKDConfig(), "promptkd and rkl (PromptKD without a prompt)")
    kd: KDConfig = _f(KDConfig(), "kd")
    imitkd: ImitKDConfig = _f(ImitKDConfig(), "imitkd")
    gkd: GKDConfig = _f(GKDConfig(), "gkd")
    distillm: DistiLLMConfig = _f(DistiLLMConfig(), "distillm")
    seqkd: SeqKDConfig = _f(SeqKDConfig(), "seqkd")
    minillm: MiniLLMConfig = _f(MiniLLMConfig(), "minillm")


# The flat method keys of earlier versions -> where they are now (for the unknown-key error only).
MOVED: dict[str, str] = {
    "method.guidance": "method.promptkd.guidance",
    "method.reg_schedule": "method.promptkd.reg_schedule",
    "method.reg_weight": "method.promptkd.reg_weight",
    "method.reuse_student_forward": "method.promptkd.reuse_student_forward",
    "method.stale_student_target": "method.promptkd.stale_student_target",
    "method.prompt_step_teacher_train": "method.promptkd.prompt_step_teacher_train",
    "method.kd_ce_weight": "method.kd.ce_weight",
    "method.divergence": "method.imitkd.divergence or method.gkd.divergence (without 'auto')",
    "method.gkd_lambda": "method.gkd.lmbda",
    "method.gkd_beta": "method.gkd.beta or method.imitkd.beta",
    "method.skew_alpha": "method.distillm.skew_alpha, method.gkd.skew_alpha or method.imitkd.skew_alpha",
    "method.distillm_loss": "method.distillm.loss",
    "method.replay_capacity": "method.distillm.replay_capacity",
    "method.replay_ratio": "method.distillm.replay_ratio",
    "method.distillm_init_prob": "method.distillm.init_prob",
    "method.distillm_prob_step": "method.distillm.prob_step",
    "method.distillm_window": "method.distillm.window",
    "method.distillm_loss_eps": "method.distillm.loss_eps",
    "method.seqkd_cache_dir": "method.seqkd.cache_dir",
    "method.minillm_teacher_mix": "method.minillm.teacher_mix",
    "method.minillm_clip_weight": "method.minillm.clip_weight",
    "method.minillm_single_step": "method.minillm.single_step",
    "method.minillm_length_norm": "method.minillm.length_norm",
    "method.minillm_lm_coef": "method.minillm.lm_coef",
    "method.minillm_lm_data": "method.minillm.lm_data",
}
