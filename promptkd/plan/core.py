"""The memory plan of a run config: per-rank lines, phases, verdict, the largest micro-batch that fits.

A step's peak is what stays resident (model states, the teacher, the prompt, an optional vLLM
engine) plus the largest of its phases (rollout, prompt step, student step), plus a stated
allowance. Each phase holds the activations, logits and loss buffers alive at its peak.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from promptkd.config import REGISTRY, Config, load_ds_json, max_new_tokens, uses_fused_head
from promptkd.plan import memory as M
from promptkd.plan.arch import Arch, resolve

GiB = 2 ** 30
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
MAX_SEARCH = 1 << 14


@dataclass
class Line:
    term: str
    bytes: float
    keys: str                 # the config keys that move this line
    check: str = ""           # the measured quantity it is compared with (bench/plan_check.py)


@dataclass
class Models:
    student: Arch
    teacher: Optional[Arch]
    notes: list[str]


@dataclass
class Plan:
    world_size: int
    gpu_bytes: int
    micro_batch: int
    resident: list[Line]
    phases: dict[str, list[Line]]
    overhead: Line
    cpu: list[Line]
    alternatives: list[str]
    notes: list[str]
    max_micro_batch: int = 0
    extra: dict = field(default_factory=dict)

    def phase_total(self, name: str) -> float:
        return sum(line.bytes for line in self.phases[name])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total) if self.phases else ""

    @property
    def total(self) -> float:
        peak = self.phase_total(self.peak_phase) if self.phases else 0.0
        return sum(line.bytes for line in self.resident) + peak + self.overhead.bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes

    def first_over(self) -> Optional[Line]:
        """The first line, in table order (resident, the peak phase, overhead), at which the sum passes the GPU."""
        running = 0.0
        for line in self.resident + (self.phases.get(self.peak_phase, [])) + [self.overhead]:
            running += line.bytes
            if running > self.gpu_bytes:
                return line
        return None

    def terms_for_check(self) -> dict[str, float]:
        """Planned bytes under the names bench/plan_check.py measures."""
        out: dict[str, float] = {}
        for line in self.resident + [x for lines in self.phases.values() for x in lines]:
            if line.check:
                out[line.check] = out.get(line.check, 0.0) + line.bytes
        for name, lines in self.phases.items():
            out[name] = sum(x.bytes for x in lines if x.check != "carried")
        return out


def world_size_of(cfg: Config) -> int:
    return cfg.plan.world_size or int(os.environ.get("WORLD_SIZE", "1"))


def tokenizer_vocab(cfg: Config) -> int:
    """Tokens of the run's tokenizer: a local dir is read (no weights); a tokenizer to be trained has its size."""
    path = cfg.tokenizer.path
    if path and os.path.isdir(os.path.expanduser(path)):
        from promptkd.data import load_tokenizer

        return len(load_tokenizer(path, key="tokenizer.path"))
    return cfg.tokenizer.vocab_size


def resolve_models(cfg: Config) -> Models:
    from promptkd.models import tiny_config

    notes: list[str] = []

    def one(role: str) -> Arch:
        m = getattr(cfg.model, role)
        init = m.init
        tiny = None if m.path else tiny_config(init.arch, init.layers, init.hidden, init.heads, tokenizer_vocab(cfg),
                                               init.max_positions, init.intermediate)
        arch, how = resolve(m.path, getattr(cfg.plan, f"{role}_arch"), f"model.{role}.path", f"plan.{role}_arch",
                            tiny)
        notes.append(f"{role}: {how}" if how not in ("init", "config.json") else f"{role}: {arch.name}")
        return arch

    student = one("student")
    teacher = one("teacher") if REGISTRY[cfg.method.name].uses_teacher else None
    return Models(student, teacher, notes)


def plan_config(cfg: Config, world_size: Optional[int] = None, micro_batch: Optional[int] = None,
                models: Optional[Models] = None, lengths: Optional[tuple[int, int]] = None,
                device: str = "cuda") -> Plan:
    """The plan of ``cfg`` at ``micro_batch`` (default train.micro_batch_size), with the largest that fits.

    ``lengths``: (sequence, logit positions) to plan at instead of the config's longest (the check
    plans a measured step at the lengths its rollouts reached). ``device``: whose loss-chunk rule applies
    (a GPU of plan.gpu_memory; "cpu" where bench/plan_check.py measures a CPU step).
    """
    world = world_size or world_size_of(cfg)
    models = models or resolve_models(cfg)
    plan = _plan_at(cfg, world, micro_batch or cfg.train.micro_batch_size, models, lengths, device)
    plan.max_micro_batch = largest_fitting(cfg, world, models, lengths, device)
    return plan


def largest_fitting(cfg: Config, world: int, models: Models, lengths: Optional[tuple[int, int]],
                    device: str = "cuda") -> int:
    """The largest micro-batch whose plan fits (0: not even 1); every phase grows with it."""
    def fits(b: int) -> bool:
        return _plan_at(cfg, world, b, models, lengths, device).fits

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_SEARCH and fits(hi):
        lo, hi = hi, hi * 2
    if hi > MAX_SEARCH:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fused_head_on(cfg: Config) -> bool:
    """Whether the run's losses take hidden states and head weights (promptkd.losses.fused_head), no logits: the
    methods' own rule (``uses_fused_head``: method.fused_head, a method that can, KD without CE)."""
    return uses_fused_head(cfg)


def loss_chunk_rule(cfg: Config, device: str, head: bool = False) -> tuple[int, int]:
    """(elements of an automatic loss chunk, row sub-block elements) on the planned device: the GPU rule of
    promptkd.losses.fused.chunk_elements for plan.gpu_memory; the CPU sizes on "cpu" (bench/plan_check.py's
    measured CPU steps), where the fused head also sub-blocks its divergence."""
    if device == "cpu":
        from promptkd.losses import fused_head

        return (fused_head.CPU_CHUNK_ELEMENTS, fused_head.SUB_BLOCK_ELEMENTS) if head else (M.FUSED_CHUNK_ELEMENTS, 0)
    return M.device_chunk_elements(cfg.plan.gpu_bytes()), 0


def _plan_at(cfg: Config, world: int, batch: int, models: Models, lengths: Optional[tuple[int, int]],
             device: str = "cuda") -> Plan:
    from promptkd.methods import METHODS
    from promptkd.methods.base import KEPT_STUDENT

    z = M.Zero.from_json(load_ds_json(cfg.deepspeed), bf16=cfg.train.precision == "bf16")
    e_s = PRECISION_BYTES[cfg.train.precision]
    method, spec = METHODS[cfg.method.name], REGISTRY[cfg.method.name]
    s, t = models.student, models.teacher
    held, trained = _lora_counts(cfg, s)
    seq, keep = lengths or (cfg.data.max_length, max_new_tokens(cfg) + 1)
    if not spec.samples_student and lengths is None:
        keep = seq  # off-policy methods score every position of the ground truth
    shape = M.Shape(batch, seq, keep)
    resident = _resident(cfg, z, s, t, e_s, world, held, trained)
    phases: dict[str, list[Line]] = {}
    if spec.samples_student or spec.samples_mixture:
        phases["rollout"] = _rollout(cfg, s, t if spec.samples_mixture else None, shape, e_s)
    prompt_len = method.teacher_prompt_length(cfg) if t is not None else 0
    kept: list[Line] = []
    if prompt_len > 0:
        keeps_student = KEPT_STUDENT in method.kept_forwards(cfg, student_dropout=s.dropout > 0)
        phases["prompt_step"], kept = _prompt_step(cfg, s, t, shape, e_s, prompt_len, keeps_student,
                                                   device)
    phases["student_step"] = _student_step(cfg, z, s, t, shape, e_s, kept, device)
    phases["optimizer_step"] = [Line("optimizer step: fp32 gradients + AdamW's temporaries", M.optimizer_step(
        trained, z, e_s, world), f"deepspeed ({cfg.deepspeed}), train.precision")]
    _add_gathers(cfg, z, s, t, e_s, phases, bool(kept))
    plan = Plan(world, cfg.plan.gpu_bytes(), batch, resident, phases, Line("framework overhead (stated allowance)", cfg.plan.overhead_bytes(),
                                                          "plan.overhead"),
                _cpu_lines(cfg, z, s, t, e_s, world, held, trained), _alternatives(cfg, s, t, shape, e_s, prompt_len),
                list(models.notes))
    return plan


def _add_gathers(cfg: Config, z: M.Zero, s: Arch, t: Optional[Arch], e_s: int, phases: dict[str, list[Line]],
                 student_in_prompt_step: bool) -> None:
    """ZeRO-3 models gather parameters for every forward (and backward) of a phase that runs them."""
    if z.stage == 3:
        for name in ("rollout", "student_step") + (("prompt_step",) if student_in_prompt_step else ()):
            if name in phases:
                phases[name].append(Line("student ZeRO-3 gathered parameters + a layer's gradients",
                                         M.zero3_live(s, z, e_s), "stage3_max_live_parameters in the DeepSpeed JSON"))
    tc = cfg.model.teacher
    if t is not None and tc.placement == "zero3":
        tz = M.Zero.from_json(load_ds_json(tc.deepspeed))
        for name in ("prompt_step", "student_step"):
            if name in phases:
                phases[name].append(Line("teacher ZeRO-3 gathered parameters", M.zero3_gathered(
                    t, tz, PRECISION_BYTES[tc.dtype]), f"model.teacher.deepspeed ({tc.deepspeed})"))


def _lora_counts(cfg: Config, s: Arch) -> tuple[Arch, Arch]:
    """(what the student holds, what trains): both the student, or with LoRA the frozen base + the adapters and
    the adapters alone (gradients and optimizer states exist for those only)."""
    lora = cfg.model.student.lora
    if lora.r <= 0:
        return s, s
    n = M.lora_params(s, lora.r, lora.target_modules)
    return M.with_params(s, s.n_params + n), M.with_params(s, n)


def _resident(cfg: Config, z: M.Zero, s: Arch, t: Optional[Arch], e_s: int, world: int,
              held: Optional[Arch] = None, trained: Optional[Arch] = None) -> list[Line]:
    from promptkd.methods import METHODS

    held, trained = held or s, trained or s
    stage = f"deepspeed ({cfg.deepspeed}: ZeRO-{z.stage}{', optimizer offload' if z.offload_optimizer else ''})"
    lora = (f", frozen + {trained.n_params / 1e6:.3g}M LoRA (r={cfg.model.student.lora.r})"
            if trained is not held else "")
    keys = f"{stage}, train.precision" + (", model.student.lora" if lora else "")
    lines = [
        Line(f"student parameters ({s.n_params / 1e9:.3g}B{lora}, {cfg.train.precision})",
             M.student_params(held, z, e_s, world), keys, "params"),
        Line("student gradients", M.student_grads(trained, z, e_s, world), keys, "grads"),
        Line("student optimizer states (AdamW moments + fp32 master)", M.student_optimizer(trained, z, e_s, world),
             keys, "optimizer"),
    ]
    if t is not None:
        tc = cfg.model.teacher
        e_t = PRECISION_BYTES[tc.dtype]
        tz = M.Zero.from_json(load_ds_json(tc.deepspeed)) if tc.placement == "zero3" else M.Zero()
        lines.append(Line(f"teacher weights ({t.n_params / 1e9:.3g}B, {tc.dtype}, {tc.placement})",
                          M.teacher_weights(t, tc.placement, e_t, world, bool(tc.offload_params), tz),
                          "model.teacher.placement, model.teacher.dtype, model.teacher.offload_params",
                          "teacher_weights"))
        p = METHODS[cfg.method.name].teacher_prompt_length(cfg)
        if p:
            lines.append(Line(f"soft prompt + AdamW ({p} x {t.hidden}, fp32)", M.prompt_states(p, t.hidden),
                              "model.teacher.prompt_length"))
    if cfg.rollout.engine == "vllm" and not cfg.rollout.vllm.sleep:
        lines.append(Line("vLLM engine (its weights + KV cache)",
                          cfg.rollout.vllm.gpu_memory_utilization * cfg.plan.gpu_bytes(),
                          "rollout.vllm.gpu_memory_utilization, rollout.vllm.sleep"))
    return lines


def _rollout(cfg: Config, s: Arch, t: Optional[Arch], shape: M.Shape, e_s: int) -> list[Line]:
    """The student's KV cache and prefill; a mixture sampler (``t`` given) decodes with the teacher too."""
    if cfg.rollout.engine == "vllm":
        if cfg.rollout.vllm.sleep:
            return [Line("vLLM engine, awake for the rollout",
                         cfg.rollout.vllm.gpu_memory_utilization * cfg.plan.gpu_bytes(),
                         "rollout.vllm.gpu_memory_utilization")]
        return [Line("rollout (in vLLM's share)", 0.0, "rollout.engine")]
    prompt = M.Shape(shape.batch, cfg.data.max_prompt_length, 1)
    lines = [
        Line(f"student KV cache ({shape.batch} x {shape.seq} tokens)", M.kv_cache(s, shape.batch, shape.seq, e_s),
             "train.micro_batch_size, data.max_length, rollout.engine"),
        Line("prefill working set", M.nograd_forward(s, prompt, e_s), "data.max_prompt_length"),
    ]
    if t is not None:
        e_t = PRECISION_BYTES[cfg.model.teacher.dtype]
        lines.append(Line(f"teacher KV cache (mixture sampling, {shape.batch} x {shape.seq} tokens)",
                          M.kv_cache(t, shape.batch, shape.seq, e_t), "train.micro_batch_size, data.max_length"))
    return lines


def _prompt_step(cfg: Config, s: Arch, t: Arch, shape: M.Shape, e_s: int, prompt_len: int,
                 keeps_student: bool, device: str = "cuda") -> tuple[list[Line], list[Line]]:
    """The prompt update: the kept student graph, p_T, the prompted teacher's graph through all its layers."""
    opts, tc = cfg.method.promptkd, cfg.model.teacher
    e_t = PRECISION_BYTES[tc.dtype]
    head = fused_head_on(cfg)
    # with the fused head every model hands the loss its last hidden states [B, K, h], never [B, K, V] logits
    def out(a: Arch, e: int) -> float:
        return M.head_input(shape, a.hidden, e) if head else M.logits(shape, a.vocab, e)

    what = "head input (fused head)" if head else "logits"
    s_logits = Line(f"student {what}", out(s, e_s), "train.micro_batch_size, rollout.max_new_tokens, method.fused_head")
    kept: list[Line] = []
    if keeps_student:  # the student step's forward, run here (Method.kept_forwards)
        kept = [Line("student activations (kept for the student step)",
                     M.activations(s, shape, e_s, False, False, cfg.model.student.gradient_checkpointing),
                     "model.student.gradient_checkpointing, method.promptkd.reuse_student_forward"), s_logits]
    t_shape = M.Shape(shape.batch, shape.seq + prompt_len, shape.keep)
    dropout = opts.prompt_step_teacher_train
    lines = list(kept) if kept else [Line(f"student {what} (no grad)", out(s, e_s),
                                          "train.micro_batch_size, method.fused_head")]
    if opts.reg_schedule != "off":
        lines.append(Line(f"teacher {what} p_T (no grad)", out(t, e_t), "method.promptkd.reg_schedule, method.fused_head"))
    t_act = (t, t_shape, e_t, True, dropout, tc.gradient_checkpointing)
    lines.append(Line(f"teacher activations, prompted forward ({t_shape.seq} tokens, saved for the prompt's backward)",
                      M.activations(*t_act), "model.teacher.gradient_checkpointing, train.micro_batch_size, "
                                             "data.max_length"))
    if head:
        elements, sub = loss_chunk_rule(cfg, device, head=True)
        lines += [Line("prompt loss (fused head): hidden-state gradient [B, K, h]", M.head_input(shape, t.hidden, e_t),
                       "train.micro_batch_size, method.fused_head"),
                  _transient(M.fused_head_chunk(shape, t.vocab, cfg.method.loss_chunk_size, elements,
                                                f"prompt_{opts.guidance}", sub),
                             M.backward_working(*t_act), 0.0, "the teacher's", head=True)]
        return lines, kept
    lines += [
        Line("prompted teacher logits", M.logits(shape, t.vocab, e_t),
             "train.micro_batch_size, rollout.max_new_tokens, method.fused_head"),
        Line("prompt loss: gradient buffer", M.logits(shape, t.vocab, e_t), "train.micro_batch_size"),
        _transient(M.loss_chunk(shape, t.vocab, cfg.method.loss_chunk_size, elements=loss_chunk_rule(cfg, device)[0]),
                   M.backward_working(*t_act), 0.0, "the teacher's"),
    ]
    return lines, kept


def _transient(chunk: float, working: float, bucket: float, whose: str, fused: bool = True, head: bool = False) -> Line:
    """The loss's fp32 temporaries are gone before backward's working set (and a ZeRO bucket) exists: the larger
    counts."""
    if chunk >= working + bucket:
        what = ("fused head: fp32 chunk buffers" if head else "fp32 chunk") if fused else \
            "fp32 [N, V] copies (autograd, not fused)"
        return Line(f"loss: {what} (larger than the backward's working set)", chunk,
                    "method.loss_chunk_size" + (", method.fused_head" if head else ""))
    name = f"backward: {whose} working set (one layer)" + (" + ZeRO reduce bucket" if bucket else "")
    keys = "model.*.gradient_checkpointing" + (", reduce_bucket_size in the DeepSpeed JSON" if bucket else "")
    return Line(name, working + bucket, keys)


def _student_step(cfg: Config, z: M.Zero, s: Arch, t: Optional[Arch], shape: M.Shape, e_s: int,
                  kept: list[Line], device: str = "cuda") -> list[Line]:
    from promptkd.methods import METHODS

    fused = METHODS[cfg.method.name].fused_loss(cfg)
    head = fused_head_on(cfg) and t is not None   # teacher-free losses (SFT) keep the model's head
    lines = [Line(x.term.replace(" (kept for the student step)", "") + " (kept from the prompt step)", x.bytes, x.keys,
                  "carried") for x in kept]
    if t is not None:
        e_t = PRECISION_BYTES[cfg.model.teacher.dtype]
        lines.append(Line("teacher head input (fused head, no grad)", M.head_input(shape, t.hidden, e_t),
                          "train.micro_batch_size, rollout.max_new_tokens, method.fused_head") if head else
                     Line("teacher logits (no grad)", M.logits(shape, t.vocab, e_t),
                          "train.micro_batch_size, rollout.max_new_tokens, method.fused_head"))
    act = (s, shape, e_s, False, s.dropout > 0, cfg.model.student.gradient_checkpointing)
    after = [Line("student activations, forward (saved for backward)", M.activations(*act),
                  "model.student.gradient_checkpointing, train.micro_batch_size, data.max_length")] if not kept else []
    if head:   # the head's input is in the activations; the loss makes the head's gradients in its forward
        elements, sub = loss_chunk_rule(cfg, device, head=True)
        after += [Line("loss (fused head): head-weight gradient, fp32 [V, h] (+ its cast)",
                       M.head_weight_grad(s.vocab, s.hidden, e_s), "method.fused_head"),
                  Line("loss (fused head): hidden-state gradient [B, K, h]", M.head_input(shape, s.hidden, e_s),
                       "train.micro_batch_size, method.fused_head"),
                  _transient(M.fused_head_chunk(shape, s.vocab, cfg.method.loss_chunk_size, elements, "student", sub),
                             M.backward_working(*act), M.reduce_bucket(s, z, e_s), "the student's", head=True)]
    else:
        after += ([] if kept else [Line("student logits", M.logits(shape, s.vocab, e_s),
                                        "train.micro_batch_size, rollout.max_new_tokens, method.fused_head")])
        after += [Line("loss: gradient buffer", M.logits(shape, s.vocab, e_s), "train.micro_batch_size"),
                  _transient(M.loss_chunk(shape, s.vocab, cfg.method.loss_chunk_size, fused,
                                          loss_chunk_rule(cfg, device)[0]), M.backward_working(*act),
                             M.reduce_bucket(s, z, e_s), "the student's", fused)]
    # the teacher's no-grad forward runs (and frees its intermediates) before the student's forward starts
    before = M.nograd_forward(t, shape, PRECISION_BYTES[cfg.model.teacher.dtype]) if t is not None else 0.0
    if before > sum(x.bytes for x in after):
        return lines + [Line("teacher no-grad forward working set (larger than the student's forward, loss and "
                             "backward that follow)", before, "train.micro_batch_size, data.max_length")]
    return lines + after


def _cpu_lines(cfg: Config, z: M.Zero, s: Arch, t: Optional[Arch], e_s: int, world: int,
               held: Optional[Arch] = None, trained: Optional[Arch] = None) -> list[Line]:
    lines = []
    held, trained = held or s, trained or s
    if z.offload_optimizer:
        lines.append(Line("student optimizer states (offloaded)", M.student_optimizer_cpu(trained, z, e_s, world)
                          + M.FP32 * -(-trained.n_params // world), "offload_optimizer in the DeepSpeed JSON"))
    if z.offload_param:
        lines.append(Line("student parameters (offloaded)", -(-held.n_params // world) * e_s,
                          "offload_param in the DeepSpeed JSON"))
    if t is not None and cfg.model.teacher.offload_params:
        e_t = PRECISION_BYTES[cfg.model.teacher.dtype]
        lines.append(Line("teacher weights (offloaded)", -(-t.n_params // world) * e_t, "model.teacher.offload_params"))
    return lines


def _alternatives(cfg: Config, s: Arch, t: Optional[Arch], shape: M.Shape, e_s: int, prompt_len: int) -> list[str]:
    """The activation lines with checkpointing flipped, for the table's footer."""
    out = []
    sc = cfg.model.student.gradient_checkpointing
    alt = M.activations(s, shape, e_s, False, s.dropout > 0, not sc)
    out.append(f"student activations with model.student.gradient_checkpointing={str(not sc).lower()}: "
               f"{alt / GiB:.2f} GiB")
    if t is not None and prompt_len:
        tc = cfg.model.teacher
        t_shape = M.Shape(shape.batch, shape.seq + prompt_len, shape.keep)
        alt = M.activations(t, t_shape, PRECISION_BYTES[tc.dtype], True, cfg.method.promptkd.prompt_step_teacher_train,
                            not tc.gradient_checkpointing)
        out.append(f"teacher activations with model.teacher.gradient_checkpointing="
                   f"{str(not tc.gradient_checkpointing).lower()}: {alt / GiB:.2f} GiB")
    return out
