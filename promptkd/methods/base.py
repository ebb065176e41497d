"""What every method shares: the step context and the global-token normalisation.

A method computes one optimizer step from ``grad_accum`` micro-batches. Every
loss is ``sum over tokens / N``, where N is the number of loss tokens of the
whole optimizer step on *all* ranks; the trainer never averages per micro-batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from promptkd import distributed as dist
from promptkd.config import Config, MethodSpec
from promptkd.data import TokenizedExample, collate_full, collate_prompts
from promptkd.metrics import PhaseTimer
from promptkd.models.forward import keep_kwargs
from promptkd.rollout import Rollout, SamplingParams, generate, hf_step_fn, position_ids
from promptkd.rollout.core import gathered

MicroBatch = list[TokenizedExample]

KEPT_STUDENT = "student"        # Method.kept_forwards: the student's forward with grad, run early and reused
KEPT_TARGET = "target"          # the student step's target logits, computed in an earlier phase


@dataclass(frozen=True)
class StepContext:
    """What a method's step needs, and nothing more (not the run config): see ``step_context``.

    Frozen: everything in it is built before it (the vLLM engine too), and its owner (``Run``) closes what it
    started. What changes during a run lives inside the objects it holds (the timer's spans, the generator's
    state, the engines' weights), never in which objects they are. A variant of a context is
    ``dataclasses.replace(ctx, ...)``.
    """

    engine: Any                      # DeepSpeed engine of the student
    pad_id: int
    eos_id: Any                  # int, or a chat model's stop ids (tuple, end-of-turn first): promptkd/rollout/stops.py
    vocab_size: int                  # tokenizer size: logits beyond it are padding
    total_steps: int
    sampling: SamplingParams         # the student's rollout decoding (rollout.*)
    opts: Any = None                 # the method's own config section (cfg.method.<section>), if it has one
    teacher: Optional[torch.nn.Module] = None       # PromptedTeacher
    tokenizer: Any = None
    generator: Optional[torch.Generator] = None      # rollout sampling (one stream per rank)
    seed: int = 0                    # the run's seed: streams that must be equal on every rank
    chunk: Optional[int] = None      # method.loss_chunk_size (None: automatic)
    sync_rollout: bool = False       # ZeRO-3 student: decode steps must match across ranks
    teacher_sharded: bool = False    # ZeRO-3 teacher: its forwards are collectives too
    vllm: Any = None                 # rollout.engine=vllm: the rank's VLLMRollouts (None: our decode loop)
    gather_student: str = "auto"     # ZeRO-3 student: gather it once per rollout (auto: when it fits)
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    fused_head: bool = True          # method.fused_head: divergences through the fused LM head (promptkd.methods.fused)


def step_context(cfg: Config, section: Optional[str], engine: Any, *, pad_id: int, eos_id: int, vocab_size: int,
                 total_steps: int, teacher: Optional[torch.nn.Module] = None, tokenizer: Any = None,
                 generator: Optional[torch.Generator] = None, sync_rollout: bool = False,
                 vllm: Any = None) -> StepContext:
    """The context of ``cfg``'s method: its section of ``method.*`` and what every step reads.

    vllm: the rank's started ``VLLMRollouts`` (rollout.engine=vllm); whoever started it closes it (``Run.close``).
    """
    return StepContext(engine=engine, pad_id=pad_id, eos_id=eos_id, vocab_size=vocab_size, total_steps=total_steps,
                       sampling=rollout_params(cfg), opts=getattr(cfg.method, section) if section else None,
                       teacher=teacher, tokenizer=tokenizer, generator=generator, seed=cfg.seed,
                       chunk=cfg.method.loss_chunk_size or None, sync_rollout=sync_rollout,
                       teacher_sharded=cfg.model.teacher.placement == "zero3", vllm=vllm,
                       fused_head=cfg.method.fused_head)


TOKENS = "tokens"


class Tally:
    """A step's metrics, kept on the device until a logging step asks for them.

    ``sums`` are this rank's sums (0-d fp64 device tensors: adding them never syncs with the host);
    ``reported`` names what is logged: key -> (sum, the sum it is divided by, or None for the global
    sum itself); ``values`` are numbers that are already global (weights, rates, norms).
    ``reduce`` sums every tensor over the ranks in ONE collective and one host transfer. It is a
    collective: every rank calls it, at the same step.
    """

    def __init__(self, values: Optional[dict[str, float]] = None) -> None:
        self.values: dict[str, float] = dict(values or {})
        self.sums: dict[str, torch.Tensor] = {}
        self.reported: dict[str, tuple[str, Optional[str]]] = {}
        self._global: Optional[dict[str, float]] = None
        self.counts_tokens = False       # count_tokens was called

    def add(self, key: str, value: torch.Tensor | float) -> None:
        """sums[key] += value, in fp64 on the device (the same additions as Python floats: exact)."""
        t = torch.as_tensor(value).detach().to(device=dist.device(), dtype=torch.float64).reshape(())
        self.sums[key] = self.sums[key] + t if key in self.sums else torch.zeros_like(t) + t
        self._global = None

    def count_tokens(self, local: torch.Tensor | float) -> None:
        """The step's loss tokens on this rank: the ``tokens`` metric, the divisor of every ``mean`` with the
        default ``per``, and what ``StepResult.tokens`` (throughput) reports."""
        self.add(TOKENS, local)
        self.mean(TOKENS, TOKENS, per=None)
        self.counts_tokens = True

    def mean(self, name: str, key: str, per: Optional[str] = "tokens") -> None:
        """Log ``name`` = global sums[key] / max(global sums[per], 1) (per=None: the global sum)."""
        self.reported[name] = (key, per)

    def reduce(self) -> dict[str, float]:
        if self._global is None:
            keys = list(self.sums)
            totals = dist.all_reduce_sum(torch.stack([self.sums[k] for k in keys])).tolist() if keys else []
            g = dict(zip(keys, totals))
            self._global = {name: g.get(key, 0.0) if per is None else g.get(key, 0.0) / max(g.get(per, 0.0), 1.0)
                            for name, (key, per) in self.reported.items()}
        return {**self.values, **self._global}


@dataclass
class StepResult:
    """What one optimizer step gives the trainer.

    ``tally`` holds the step's metrics (a plain dict is taken as already-global values). Nothing is
    reduced over ranks until ``reduce()`` (or ``metrics``, the same) is called, on every rank: the
    trainer does it on logging steps only.
    """

    tally: Any = None                                        # Tally, or a dict of global values
    rollouts: list[Rollout] = field(default_factory=list)    # the step's student samples (logged as text)
    skipped: bool = False                                    # nothing was updated (see ``Method.step``)
    tokens: Any = None          # this rank's loss tokens (device tensor); None: the method counts none
                                # (default: what ``tally.count_tokens`` counted)

    def __post_init__(self) -> None:
        if not isinstance(self.tally, Tally):
            self.tally = Tally(self.tally)
        if self.tokens is not None and not self.tally.counts_tokens:
            self.tally.count_tokens(self.tokens)
        elif self.tokens is None and self.tally.counts_tokens:
            self.tokens = self.tally.sums[TOKENS]

    def global_tokens(self) -> Optional[float]:
        """The step's loss tokens over all ranks (None: not counted); a collective like ``reduce``."""
        return None if self.tokens is None else self.reduce()[TOKENS]

    def reduce(self) -> dict[str, float]:
        """The logged scalars, global over ranks (a collective: every rank calls it)."""
        return self.tally.reduce()

    @property
    def metrics(self) -> dict[str, float]:
        return self.reduce()


class Method:
    """Base class: subclasses implement ``train_step``; the trainer calls ``step``."""

    # What the method is and needs (promptkd.config.registry): a subclass sets ``spec = REGISTRY[name]``, and
    # its fields become class attributes (``uses_teacher``, ``samples_student``, ``samples_mixture``,
    # ``trains_prompt``, ``section``: cfg.method.<section> arrives as ctx.opts), so these facts live once.
    spec: MethodSpec = MethodSpec("")
    uses_teacher = samples_student = samples_teacher = samples_mixture = trains_prompt = fused = False
    section: Optional[str] = None
    progress_keys: tuple[str, ...] = ()   # the metrics the progress bar shows (``shown_keys``)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for f in dataclasses.fields(cls.spec):
            if f.name != "name":
                setattr(cls, f.name, getattr(cls.spec, f.name))

    def __init__(self, ctx: StepContext):
        self.ctx = ctx

    @classmethod
    def from_config(cls, cfg: Config, ctx: StepContext) -> "Method":
        """Build the method; a subclass that needs more of the config than ``ctx.opts`` takes it here."""
        return cls(ctx)

    @classmethod
    def fused_loss(cls, cfg: Config) -> bool:
        """Whether the student's loss makes its gradient chunk by chunk in the forward (``promptkd.losses.fused``:
        forward and reverse KL); the other losses run autograd over whole fp32 [N, V] tensors unless
        method.loss_chunk_size is set. The memory planner counts them so. A method whose settings can turn
        its loss into something else narrows ``spec.fused`` here."""
        return cls.fused

    @classmethod
    def kept_forwards(cls, cfg: Config, student_dropout: bool) -> frozenset[str]:
        """Forwards one phase of a step runs and a later phase reuses instead of running again
        (``KEPT_STUDENT``: the student's forward with grad; ``KEPT_TARGET``: the student's target logits).
        The memory planner counts a kept forward as carried; the step itself asks the same question."""
        return frozenset()

    @classmethod
    def teacher_prompt_length(cls, cfg: Config) -> int:
        """Soft-prompt positions the teacher is built with (only a method that trains a prompt has any)."""
        return cfg.model.teacher.prompt_length if cls.trains_prompt else 0

    def step(self, micro_batches: list[MicroBatch], step: int) -> StepResult:
        """One optimizer step under the one rule for skipped steps.

        A step is skipped, on every rank, when any of its gradients is not finite: the
        student's (the engine drops its update and counts it) or the method's own (its
        ``train_step`` says so). Then nothing of the step stays: ``undo`` puts back what
        ``snapshot`` took before it (e.g. the prompt and its optimizer state).
        """
        engine = self.ctx.engine
        skipped_before = engine.skipped_steps
        snapshot = self.snapshot()
        result = self.train_step(micro_batches, step)
        result.skipped = result.skipped or engine.skipped_steps != skipped_before
        if result.skipped and snapshot is not None:
            self.undo(snapshot)
        return result

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> StepResult:
        raise NotImplementedError

    def shown_keys(self) -> list[str]:
        """The metrics the progress bar shows, by name (a method whose loss name follows its settings overrides)."""
        return list(self.progress_keys)

    def snapshot(self) -> Optional[dict]:
        """State outside the student engine that a skipped step must not change (None: nothing)."""
        return None

    def undo(self, snapshot: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def export(self, out_dir: str) -> None:
        """Files the method adds to an export of the student (rank 0 writes)."""

    def close(self) -> None:
        """Release what the method started beyond the run's engines (e.g. a vLLM engine of its own)."""


# ----------------------------------------------------------------------------- helpers

def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dev = dist.device()
    return {k: v.to(dev) for k, v in batch.items()}


def full_batches(ctx: StepContext, micro_batches: list[MicroBatch]) -> list[dict[str, torch.Tensor]]:
    """Right-padded prompt+response tensors with their response-token masks."""
    return [to_device(collate_full(mb, ctx.pad_id)) for mb in micro_batches]


def local_tokens(masks: list[torch.Tensor]) -> torch.Tensor:
    """This rank's loss tokens (shifted masks), an fp64 device tensor: no host sync."""
    return torch.stack([m[:, 1:].sum().to(torch.float64) for m in masks]).sum() if masks else \
        torch.zeros((), dtype=torch.float64, device=dist.device())


def global_tokens(masks: list[torch.Tensor]) -> torch.Tensor:
    """Loss tokens of the whole optimizer step over all ranks (shifted masks): one all-reduce, kept on the
    device (it scales the loss before backward; nothing waits for it on the host)."""
    return dist.all_reduce_sum(local_tokens(masks))


def token_scale(n_global: torch.Tensor | float) -> torch.Tensor | float:
    """The divisor max(n_global, 1) of a loss sum; a device tensor stays one, in fp32 like the loss, so the
    division is what dividing by the Python float did."""
    if isinstance(n_global, torch.Tensor):
        return n_global.clamp(min=1.0).to(torch.float32)
    return max(n_global, 1.0)


def response_start(r: Rollout) -> int:
    """First shifted position any loss on ``r`` reads: the one that predicts the first response token.

    Logits of earlier (prompt) positions are never used, so ``lm_logits``/``teacher_logits``
    skip the LM head there (``logits_to_keep``): same values, less work, smaller tensors.
    Pair it with ``shifted_mask(r)``.
    """
    return max(r.prompt_len - 1, 0)


def shifted_mask(r: Rollout) -> torch.Tensor:
    """The loss mask [B, T-1-start] aligned with ``lm_logits(..., start=response_start(r))``."""
    return r.loss_mask[:, response_start(r) + 1:]


def lm_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int,
              start: int = 0) -> torch.Tensor:
    """Next-token logits [B, T-1-start, V'] of an HF model for positions start..T-2 (V' = tokenizer size)."""
    seq_len = input_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                use_cache=False, **keep_kwargs(model, seq_len - start, seq_len))
    return out.logits[:, -(seq_len - start):][:, :-1, :vocab_size]


def teacher_logits(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   vocab_size: int, use_prompt: bool, start: int = 0) -> torch.Tensor:
    """Like ``lm_logits`` for a PromptedTeacher: [B, T-1-start, V']."""
    seq_len = input_ids.shape[1]
    logits, _ = teacher(input_ids, attention_mask, use_prompt=use_prompt, logits_to_keep=seq_len - start)
    return logits[:, -(seq_len - start):][:, :-1, :vocab_size]


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a forward in train mode is random (any dropout module or config rate above 0)."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    rates = config.to_dict().items() if config is not None and hasattr(config, "to_dict") else []
    return any(("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for k, v in rates)


def loss_scale(n_global: torch.Tensor | float) -> torch.Tensor | float:
    """world size / global token count: a rank's loss sum times this, averaged over ranks by DeepSpeed, is the
    global mean. A device tensor stays one (computed in fp64, applied in fp32, as the Python float was)."""
    if isinstance(n_global, torch.Tensor):
        return (dist.world_size() / n_global.clamp(min=1.0)).to(torch.float32)
    return dist.world_size() / max(n_global, 1.0)


def student_backward(ctx: StepContext, loss_sum: torch.Tensor, n_global: torch.Tensor | float) -> None:
    """Backward + (boundary-aware) step through DeepSpeed with global normalisation.

    DeepSpeed averages gradients over data-parallel ranks, so each rank's loss
    is scaled by the world size; gradient-accumulation scaling is turned off.
    ``n_global`` may stay a device tensor: the scale is computed in fp64 and applied in fp32,
    which is what multiplying by the Python float did.
    """
    ctx.engine.backward(loss_sum * loss_scale(n_global), scale_wrt_gas=False)
    ctx.timer.lap("student/bwd")
    ctx.engine.step()
    ctx.timer.lap("student/optimizer")


def rollout_params(cfg: Config) -> SamplingParams:
    from promptkd.config import max_new_tokens

    r = cfg.rollout
    return SamplingParams(max_new_tokens=max_new_tokens(cfg), do_sample=True, temperature=r.temperature,
                          top_p=r.top_p, top_k=r.top_k)


def set_modes(ctx: StepContext, student_train: bool, teacher_train: bool = False) -> None:
    """Put the student (and the teacher) in train or eval mode: dropout on or off.

    Every phase of a step sets the modes it needs, as the official code does: a model from
    ``from_pretrained`` starts in eval mode and ``deepspeed.initialize`` keeps it so, and a
    dev evaluation in the middle of training leaves whatever mode it sets.
    """
    ctx.engine.module.train(student_train)
    if ctx.teacher is not None:
        ctx.teacher.train(teacher_train)


@contextlib.contextmanager
def student_update_phase(ctx: StepContext) -> Iterator[None]:
    """The student learns in train mode, for every method; the teacher is a constant in eval mode."""
    set_modes(ctx, student_train=True)
    with ctx.timer.phase("student_step"):
        yield


def student_rollout(ctx: StepContext, micro_batch: MicroBatch) -> Rollout:
    """Student samples y ~ p_S(.|x) in eval mode, no grad, with the KV cache."""
    set_modes(ctx, student_train=False)
    prompts = to_device(collate_prompts(micro_batch, ctx.pad_id))
    # under ZeRO-3 the whole student is gathered once for the loop, not layer by layer per token; the stop
    # flag stays synced across ranks (cheap: one scalar per token), so every rank steps alike either way
    with gathered(ctx.engine.module, ctx.gather_student, "student rollouts", engine=ctx.engine):
        return generate(hf_step_fn(ctx.engine.module), prompts["input_ids"], prompts["attention_mask"],
                        ctx.sampling, ctx.eos_id, ctx.pad_id, ctx.vocab_size,
                        generator=ctx.generator, sync=ctx.sync_rollout)


def student_rollouts(ctx: StepContext, micro_batches: list[MicroBatch]) -> list[Rollout]:
    """One Rollout per micro-batch: our decode loop per micro-batch, or one vLLM call for the whole step.

    vLLM first takes the student's weights when an optimizer step changed them since its last sync.
    """
    if ctx.vllm is None:
        return [student_rollout(ctx, mb) for mb in micro_batches]
    version = int(ctx.engine.global_steps)
    ctx.vllm.sync(ctx.engine.module, version)
    merged = to_device(collate_prompts([ex for mb in micro_batches for ex in mb], ctx.pad_id))
    whole = ctx.vllm.generate(merged["input_ids"], merged["attention_mask"], ctx.sampling, ctx.eos_id, ctx.pad_id,
                              step=version)
    out, start = [], 0
    for mb in micro_batches:
        out.append(rows_of(whole, start, len(mb), ctx.pad_id))
        start += len(mb)
    return out


def rows_of(r: Rollout, start: int, n: int, pad_id: int) -> Rollout:
    """Rows start..start+n of ``r`` with the padding columns only they need removed (as if decoded alone)."""
    ids, att, loss = (t[start:start + n] for t in (r.input_ids, r.attention_mask, r.loss_mask))
    prompt_att, resp_att = att[:, :r.prompt_len], att[:, r.prompt_len:]
    left = int((prompt_att.sum(0) == 0).long().cumprod(0).sum())       # all-padding prompt columns on the left
    width = int(resp_att.sum(-1).max()) if resp_att.numel() else 0     # the longest response of these rows
    keep = list(range(left, r.prompt_len)) + list(range(r.prompt_len, r.prompt_len + width))
    return Rollout(ids[:, keep], att[:, keep], loss[:, keep], r.prompt_len - left)
