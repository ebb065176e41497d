"""Sampling with a KV cache, rank-synchronous stopping, EOS forcing and loss masks.

One decode loop serves student rollouts, teacher sampling, MiniLLM's
teacher-mixed sampling and evaluation. The model is reached through a *step
function* ``(ids, mask, past) -> (logits of the last position [B, V], past)``,
so plain HF models, the prompted teacher and mixtures of the two share the loop.

Under ZeRO-3 every forward is a collective: every rank must take the same
number of decode steps. ``sync=True`` keeps a rank stepping (on padding) until
an all-reduce says every rank is done; ranks still stop as soon as they all are.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from promptkd import distributed as dist
from promptkd.models.forward import cache_kwarg, keep_kwargs, output_cache
from promptkd.models.lora import has_lora
from promptkd.rollout.stops import StopIds, first_stop, forced_id, is_stop, stop_tensor

StepFn = Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]
log = logging.getLogger(__name__)

GATHER_CHOICES = ("auto", "always", "never")
# "auto" gathers a ZeRO-3 model for a decode loop when its full weights take at most this share of the
# accelerator's free memory (the KV cache and the activations of the loop need the rest)
GATHER_FREE_FRACTION = 0.5
_LOGGED: set[str] = set()


@dataclass
class SamplingParams:
    max_new_tokens: int
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 0


@dataclass
class Rollout:
    """Left-padded prompt followed by the right-padded response.

    input_ids / attention_mask / loss_mask: [B, Tp + Tr]. loss_mask is 1 on the
    response tokens up to and including the first EOS.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    prompt_len: int

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.loss_mask[:, self.prompt_len:].sum(-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: real tokens are numbered 0, 1, ..."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def ready_decode_mask(model: torch.nn.Module) -> bool:
    """Whether a one-token decode step may hand ``model`` its attention mask ready-made, [B, 1, 1, L] bool.

    transformers 5 passes a 4D mask through as it is (``masking_utils``), and for a one-token query over
    full attention the mask its builder makes for SDPA is exactly the padding mask as bool (True = attend).
    Building it here skips the builder's Python on every token and its host read (can the mask be dropped?).
    Only for SDPA over full attention in a model built on that builder; other cases keep the 2D mask.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "sliding_window", None):
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ())):
        return False
    return hasattr(sys.modules.get(type(model).__module__), "create_causal_mask")


def inference_safe(*modules: torch.nn.Module) -> bool:
    """Whether a decode loop over these modules may run under ``torch.inference_mode`` (cheaper than no_grad).

    Not with ZeRO-3 partitioned weights: their gathers inside the loop would leave inference tensors in the
    parameters, which a later training forward cannot save for backward.
    """
    return not any(_partitioned(m) for m in modules)


def hf_step_fn(model: torch.nn.Module) -> StepFn:
    """Step function for a Hugging Face causal LM (a DeepSpeed engine's module too)."""
    kwarg = cache_kwarg(model)
    # Only the last position's logits are used: on the prefill step this skips the LM head
    # for every other prompt position (and a [B, Tp, V] tensor), as HF generate does.
    # Same logits bit for bit; bench/rollout.py: 1.11x faster rollouts at vocab 32000 on CPU.
    keep = keep_kwargs(model, 1)
    ready_mask = ready_decode_mask(model)

    def step(ids: torch.Tensor, mask: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        if ids.shape[1] == 1 and past is not None:
            # one new token: its position is the count of real tokens before it (the last cumsum entry)
            pos = (mask.sum(-1, keepdim=True) - 1).clamp_(min=0)
            att = mask.bool()[:, None, None, :] if ready_mask else mask
        else:
            pos, att = position_ids(mask)[:, -ids.shape[1]:], mask
        out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True, **{kwarg: past}, **keep)
        return out.logits[:, -1], output_cache(out)

    step.inference_safe = inference_safe(model)  # type: ignore[attr-defined]
    return step


def teacher_step_fn(teacher: torch.nn.Module, use_prompt: bool) -> StepFn:
    """Step function for a PromptedTeacher (the prompt sits in the cache after the first step)."""

    def step(ids: torch.Tensor, mask: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        logits, cache = teacher(ids, mask, use_prompt=use_prompt, past_key_values=past, use_cache=True)
        return logits[:, -1], cache

    step.inference_safe = inference_safe(teacher)  # type: ignore[attr-defined]
    return step


def mixed_step_fn(student: StepFn, teacher: StepFn, alpha: float, vocab_size: int) -> StepFn:
    """Step function of p_mix = alpha·p_T + (1-alpha)·p_S (MiniLLM's teacher-mixed sampling).

    Both models decode the same tokens, each with its own cache (``past`` is the
    pair). The returned "logits" are log p_mix [B, vocab_size] in fp32, so the
    rollout's temperature / top-k / top-p act on the mixture, not on each model.
    alpha == 0 returns the student's own logits and skips the teacher: the same
    tokens as ``hf_step_fn`` alone for the same generator state.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    log_t, log_s = (math.log(alpha), math.log1p(-alpha)) if alpha > 0 else (0.0, 0.0)

    def step(ids: torch.Tensor, mask: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        s_past, t_past = past if past is not None else (None, None)
        s_logits, s_past = student(ids, mask, s_past)
        if alpha == 0.0:
            return s_logits[:, :vocab_size], (s_past, None)
        t_logits, t_past = teacher(ids, mask, t_past)
        s_logp = torch.log_softmax(s_logits[:, :vocab_size].float(), dim=-1)
        t_logp = torch.log_softmax(t_logits[:, :vocab_size].float(), dim=-1)
        return torch.logaddexp(t_logp + log_t, s_logp + log_s), (s_past, t_past)

    step.inference_safe = _inference_safe_fn(student) and _inference_safe_fn(teacher)  # type: ignore[attr-defined]
    return step


def _inference_safe_fn(step_fn: StepFn) -> bool:
    return bool(getattr(step_fn, "inference_safe", False))


def _partitioned(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The module's ZeRO-3 partitioned parameters (empty when it is not partitioned)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def gather_fits(params: list[torch.nn.Parameter]) -> bool:
    """Whether the full weights fit beside the decode loop, decided alike on every rank (one all-reduce)."""
    full = sum(p.ds_numel * p.element_size() for p in params)
    fits = True
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        fits = full <= GATHER_FREE_FRACTION * free
    return dist.all_true(fits)


@contextlib.contextmanager
def gathered(module: torch.nn.Module, policy: str = "auto", what: str = "model", engine: Any = None) -> Iterator[bool]:
    """Under ZeRO-3, hold every weight of ``module`` gathered for a loop of forwards (decoding, evaluation).

    Without it each decoded token all-gathers every layer again (the whole model per token). With it the
    loop all-gathers once. The weights are kept resident by marking them in use (a sentinel in DeepSpeed's
    ``ds_active_sub_modules``), so the per-layer release after each forward leaves them gathered; on exit
    the mark is removed and ``GatheredParameters`` partitions them again. Yields whether it gathered.
    policy: auto (when they fit: ``gather_fits``), always, never. A no-op for a module that is not
    partitioned. Every rank must enter it together (the gather is a collective).
    ``engine``: the DeepSpeed engine that owns ``module`` (or a module inside it: a ZeRO-3 teacher's base, inside
    its ``PromptedTeacher``); with it the loop also runs without ZeRO-3's per-submodule hooks
    (``_zero3_hooks_off``). A LoRA-adapted module needs it: see ``_reset_prefetch_trace`` (without it such a
    module is not gathered).
    """
    if policy not in GATHER_CHOICES:
        raise ValueError(f"gather policy must be one of {GATHER_CHOICES}, got {policy!r}")
    params = _partitioned(module)
    adapted = bool(params) and has_lora(module)
    if adapted and engine is None:
        policy = "never"
    use = bool(params) and policy != "never" and (policy == "always" or gather_fits(params))
    if params and what not in _LOGGED:
        _LOGGED.add(what)
        log.info("ZeRO-3 %s: %s for each decode loop (%.1f MB of weights, gather=%s)", what,
                 "gathered once" if use else "gathered layer by layer per token",
                 sum(p.ds_numel * p.element_size() for p in params) / 2 ** 20, policy)
    if not use:
        yield False
        return
    import deepspeed

    sentinel = -1 - id(module)  # a submodule id no DeepSpeed module has
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.add(sentinel)
        try:
            with _zero3_hooks_off(engine, module):
                yield True
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(sentinel)
    if adapted:
        _reset_prefetch_trace(engine)


@contextlib.contextmanager
def _zero3_hooks_off(engine: Any, module: torch.nn.Module) -> Iterator[bool]:
    """Take ZeRO-3's per-submodule forward/backward hooks off ``engine``'s module while its weights are held
    gathered; put them back on exit. Yields whether it did.

    Gathered, the hooks do nothing useful, but they still run around every submodule of every decoded token
    (four Python hooks per submodule, each walking the outputs): on a 2-layer CPU model they were over half of
    a ZeRO-3 decode step. Re-registering them (DeepSpeed's own ``_register_deepspeed_module``) also makes the
    coordinator re-record its prefetch trace at the next forward. Only when the engine's module is ``module`` or
    one of its submodules (a ZeRO-3 teacher's base inside its ``PromptedTeacher``).
    """
    offload = _offload_of(engine)
    if offload is None or not any(sub is offload.module for sub in module.modules()):
        yield False
        return
    for name in ("forward_hooks", "backward_hooks"):
        for handle in getattr(offload, name):
            handle.remove()
        setattr(offload, name, [])
    try:
        yield True
    finally:
        offload._register_deepspeed_module(offload.module)


def _offload_of(engine: Any) -> Any:
    """The ZeRO-3 parameter manager of a DeepSpeed engine (its hooks, its prefetch coordinator), or None.

    A training engine's ZeRO-3 optimizer holds it; an engine built without an optimizer (a ZeRO-3 teacher) has it
    as its optimizer."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", None)
    if offload is None and hasattr(optimizer, "_register_deepspeed_module"):
        offload = optimizer
    return offload


def _reset_prefetch_trace(engine: Any) -> None:
    """Make ZeRO-3 re-record its parameter prefetch order at the next forward.

    DeepSpeed records the order in which a forward fetches parameters and, once the trace is complete,
    checks each fetch against it. After a decode loop with a LoRA-adapted student held gathered, the
    next forward outside the loop fails that check inside the adapted layers ("tracing error ...
    expected ... lora_A ... but got ... base_layer.weight", DeepSpeed 0.19.8, 2 gloo ranks); resetting
    the trace costs one forward and backward without prefetching. Plain students keep their trace
    (their loops pass the check).
    """
    offload = _offload_of(engine)
    coordinator = offload.get_param_coordinator() if offload is not None else None
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering on fp32 logits [B, V]; removed entries become -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        remove_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def banned_ngram_mask(ids: torch.Tensor, start: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """[B, vocab_size] bool: the tokens that would repeat an n-gram already in each row, on the device.

    ids: [B, L] left-padded sequences (prompt + tokens so far); start: [B] index of each row's first real
    token. A window of n tokens that begins at or after ``start`` and whose first n-1 tokens equal the
    row's last n-1 bans its n-th token (transformers' NoRepeatNGramLogitsProcessor, without a host loop).
    """
    batch, length = ids.shape
    banned = torch.zeros(batch, vocab_size, dtype=torch.bool, device=ids.device)
    if n <= 0 or length < n:
        return banned
    windows = ids.unfold(1, n, 1)                                       # [B, L-n+1, n]
    suffix = ids[:, length - n + 1:]                                    # [B, n-1]
    hit = (windows[:, :, :n - 1] == suffix[:, None, :]).all(-1)         # [B, L-n+1]
    hit &= torch.arange(length - n + 1, device=ids.device)[None, :] >= start[:, None]
    last = windows[:, :, n - 1].clamp(0, vocab_size - 1)
    hit &= windows[:, :, n - 1] < vocab_size                            # ids beyond the logits cannot be banned
    counts = torch.zeros(batch, vocab_size, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, last, hit.to(torch.int32))
    return counts > 0


def banned_ngram_tokens(seqs: list[list[int]], n: int) -> list[set[int]]:
    """Tokens that would repeat an n-gram already present in each sequence (``banned_ngram_mask`` on lists)."""
    if not seqs:
        return []
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[0] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    start = torch.tensor([width - len(s) for s in seqs], dtype=torch.long)
    vocab = int(ids.max()) + 1 if ids.numel() else 1
    mask = banned_ngram_mask(ids, start, n, vocab)
    return [set(torch.nonzero(row).squeeze(-1).tolist()) for row in mask]


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator],
                  history: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Next token per row from fp32 logits [B, V]; history: (ids [B, L], start [B]) for n-gram bans."""
    if params.no_repeat_ngram_size > 0 and history is not None:
        ids, start = history
        logits = logits.masked_fill(banned_ngram_mask(ids, start, params.no_repeat_ngram_size, logits.shape[-1]),
                                    float("-inf"))
    if not params.do_sample:
        return logits.argmax(-1)
    if params.temperature != 1.0:  # x / 1.0 == x: skip the kernel
        logits = logits / params.temperature
    logits = filter_logits(logits, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(step_fn: StepFn, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             params: SamplingParams, eos_id: StopIds, pad_id: int, vocab_size: int,
             generator: Optional[torch.Generator] = None, sync: bool = False,
             force_eos: bool = True) -> Rollout:
    """Decode from left-padded prompts [B, Tp]; returns the prompts with their responses.

    vocab_size: sample only among the tokenizer's tokens (model vocabularies may be padded).
    The loop runs under ``torch.inference_mode`` when the step function says it may (``inference_safe``), else
    under ``no_grad``; the Rollout is assembled outside it, so its tensors are ordinary ones that training
    forwards can use.
    """
    grad_off = torch.inference_mode() if _inference_safe_fn(step_fn) else torch.no_grad()
    with grad_off:
        tokens, keep, finished = _decode(step_fn, input_ids, attention_mask, params, eos_id, pad_id, vocab_size,
                                         generator, sync)
    with torch.no_grad():
        return _assemble(input_ids, attention_mask, tokens, keep, finished, eos_id, input_ids.shape[1], force_eos)


def _decode(step_fn: StepFn, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
            eos_id: StopIds, pad_id: int, vocab_size: int, generator: Optional[torch.Generator],
            sync: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The decode loop: per step the new tokens [B] and their keep flags [B]; and which rows ended on EOS."""
    batch, prompt_len = input_ids.shape
    mask = attention_mask.long()
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    # n-gram bans read (ids so far, first real position): left padding comes first in every row
    history = (input_ids, prompt_len - mask.sum(-1)) if params.no_repeat_ngram_size else None
    tokens, keep = [], []
    stops = stop_tensor(eos_id, input_ids.device)
    cur, past = input_ids, None
    for _ in range(params.max_new_tokens):
        logits, past = step_fn(cur, mask, past)
        nxt = choose_tokens(logits[:, :vocab_size].float(), params, generator, history)
        nxt = nxt.masked_fill(finished, pad_id)
        keep.append((~finished).long())
        tokens.append(nxt)
        if history is not None:
            history = (torch.cat([history[0], nxt[:, None]], dim=1), history[1])
        finished = finished | is_stop(nxt, stops)
        mask = torch.cat([mask, keep[-1][:, None]], dim=1)
        cur = nxt[:, None]
        done = bool(finished.all())
        if dist.all_true(done) if sync else done:
            break
    return tokens, keep, finished


def rollout_from_responses(input_ids: torch.Tensor, attention_mask: torch.Tensor, responses: list[list[int]],
                           eos_id: StopIds, pad_id: int, max_new_tokens: int, force_eos: bool = True) -> Rollout:
    """The ``generate`` layout for responses decoded elsewhere (e.g. by vLLM), one token list per row.

    A response is cut after its first EOS; one shorter than ``max_new_tokens`` without an EOS stopped on it
    (an engine that leaves the stop token out), so the EOS is put back; a full-length one is unfinished.
    """
    rows, ended = [], []
    for resp in responses:
        resp = list(resp)
        cut = first_stop(resp, eos_id)
        if cut >= 0:
            resp = resp[:cut + 1]
        elif len(resp) < max_new_tokens:
            resp.append(forced_id(eos_id))
        rows.append(resp[:max_new_tokens])
        ended.append(bool(rows[-1]) and first_stop(rows[-1][-1:], eos_id) == 0)
    device = input_ids.device
    width = max((len(r) for r in rows), default=0)
    tokens = [torch.tensor([r[t] if t < len(r) else pad_id for r in rows], dtype=torch.long, device=device)
              for t in range(width)]
    keep = [torch.tensor([int(t < len(r)) for r in rows], dtype=torch.long, device=device) for t in range(width)]
    finished = torch.tensor(ended, dtype=torch.bool, device=device)
    return _assemble(input_ids, attention_mask, tokens, keep, finished, eos_id, input_ids.shape[1], force_eos)


def _assemble(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: list[torch.Tensor],
              keep: list[torch.Tensor], finished: torch.Tensor, eos_id: StopIds, prompt_len: int,
              force_eos: bool) -> Rollout:
    if not tokens:
        return Rollout(input_ids, attention_mask.long(), torch.zeros_like(attention_mask.long()), prompt_len)
    resp = torch.stack(tokens, dim=1)
    resp_mask = torch.stack(keep, dim=1)
    if force_eos:
        # An unfinished row ends on EOS: the last token it kept becomes EOS.
        last = resp_mask.sum(-1) - 1
        rows = torch.nonzero(~finished & (last >= 0)).squeeze(-1)
        resp[rows, last[rows]] = forced_id(eos_id)
    full_ids = torch.cat([input_ids, resp], dim=1)
    full_mask = torch.cat([attention_mask.long(), resp_mask], dim=1)
    loss_mask = torch.cat([torch.zeros_like(attention_mask.long()), resp_mask], dim=1)
    return Rollout(full_ids, full_mask, loss_mask, prompt_len)
