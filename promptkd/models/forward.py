"""What a Hugging Face model's ``forward`` accepts and where its output keeps the KV cache: found once per class.

The rollout loop, ``lm_logits``/``teacher_logits`` and the prompted teacher all ask here, so
``logits_to_keep`` and the cache keyword are sniffed in one place. The fused LM head + loss
(``promptkd.losses.fused_head``) takes its inputs here too: ``head_inputs`` (the states that enter the LM
head, without the head computing any logits) and ``head_params`` (its weight and bias, gathered once under
ZeRO-3). The signature is read from the
*class* (once, cached): a per-call ``inspect.signature`` costs more than a small decode step's matmuls,
and an instance's ``forward`` may be a hook wrapper (accelerate) that hides the real parameters.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator, Optional

import torch

from promptkd.config import ConfigError


def _unwrap(model: Any) -> Any:
    # a DeepSpeed engine forwards keyword arguments to the HF module it wraps
    return getattr(model, "module", model)


@functools.lru_cache(maxsize=None)
def forward_parameters(cls: type) -> frozenset[str]:
    """Names of ``cls.forward``'s parameters (cached per class)."""
    return frozenset(inspect.signature(cls.forward).parameters)


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can compute the LM head for the last positions only."""
    return "logits_to_keep" in forward_parameters(type(_unwrap(model)))


def keep_kwargs(model: Any, n_keep: int, n_positions: Optional[int] = None) -> dict[str, int]:
    """``{"logits_to_keep": n_keep}`` where it saves work and the model accepts it, else ``{}``.

    n_keep <= 0 means every position; with ``n_positions`` (the positions of the forward) given,
    n_keep >= n_positions also means every position, and nothing is passed.
    """
    if n_keep <= 0 or (n_positions is not None and n_keep >= n_positions) or not takes_logits_to_keep(model):
        return {}
    return {"logits_to_keep": n_keep}


def cache_kwarg(model: Any) -> str:
    """The forward's KV-cache keyword: transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    return "cache" if "cache" in forward_parameters(type(_unwrap(model))) else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, or None.

    transformers 5 names the output field ``cache``; 4.x calls it ``past_key_values``. Reading the old
    name on 5.x logs a deprecation warning, so the new one is tested first.
    """
    if hasattr(output, "cache"):
        return output.cache
    return getattr(output, "past_key_values", None)


# Config fields of architectures whose logits are not the plain head's output (softcapping, scaling): the fused
# head computes ``hidden @ W.T + b`` only, so these must run unfused.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model: Any) -> torch.nn.Module:
    """The LM head module (``get_output_embeddings``): its weight may be tied to the input embedding."""
    head = _unwrap(model).get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ConfigError(f"method.fused_head: {type(_unwrap(model)).__name__} has no linear LM head; "
                          "set method.fused_head=false")
    if hasattr(head, "base_layer"):  # a PEFT adapter on the head: its output is more than weight @ hidden
        raise ConfigError("method.fused_head: the LM head carries an adapter (model.student.lora.target_modules); "
                          "the fused head applies the plain weight only: set method.fused_head=false or leave the "
                          "head out")
    return head


def check_plain_head(model: Any) -> None:
    """Raise when the model's logits are more than its head's output (the fused head would compute other numbers)."""
    config = getattr(_unwrap(model), "config", None)
    for key in LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 0, 0.0, 1, 1.0, False):
            raise ConfigError(f"method.fused_head: {type(_unwrap(model)).__name__}'s config.{key}={value} transforms "
                              "the LM head's output, which the fused head does not; set method.fused_head=false")


def check_fused_heads(*models: Any) -> None:
    """Before a run starts: each model's head is one the fused head can apply (ConfigError otherwise)."""
    for model in models:
        check_plain_head(model)
        output_head(model)


@contextlib.contextmanager
def captured_head_inputs(model: Any) -> Iterator[list[torch.Tensor]]:
    """While open, every forward of the model's LM head records its input and computes no logits at all.

    A forward pre-hook (run before any other, DeepSpeed's included) takes the head's input and hands the head
    an empty slice of it (``[..., 0, H]``): the model's own code (final norm, projection, ``logits_to_keep``
    slicing) decides what enters the head, and no ``[B, T, V]`` tensor is made. Hooks that act on the head's
    *output* see empty logits: they do not apply to the states recorded here.
    """
    check_plain_head(model)
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, args: tuple) -> tuple:
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = output_head(model).register_forward_pre_hook(hook, prepend=True)
    try:
        yield captured
    finally:
        handle.remove()


def head_inputs(model: Any, n_keep: int, **inputs: Any) -> torch.Tensor:
    """``model(**inputs)``'s final hidden states (what enters its LM head) for its last ``n_keep`` positions.

    [B, n_keep, H] (n_keep <= 0: every position), where the plain call gives logits ``[B, n_keep, V]``:
    the model (a DeepSpeed engine, or an HF model) runs as usual, without its head.
    """
    n_positions = inputs["input_ids"].shape[1] if "input_ids" in inputs else inputs["inputs_embeds"].shape[1]
    with captured_head_inputs(model) as got:
        model(**inputs, **keep_kwargs(model, n_keep, n_positions))
    if len(got) != 1:
        raise RuntimeError(f"the LM head ran {len(got)} times in one forward; set method.fused_head=false")
    hidden = got[0]
    return hidden if n_keep <= 0 else hidden[:, -n_keep:]


@contextlib.contextmanager
def head_params(model: Any) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The LM head's (weight [V_pad, H], bias [V_pad] or None), whole for as long as the context is open.

    Under ZeRO-3 the head is partitioned: it is gathered here, once (a fused loss opens this once around its
    whole chunk loop, never per chunk), and partitioned again on exit. A head that trains must stay gathered
    through the backward of the loss too: autograd accumulates the full-shaped gradient into the parameter
    in the parameter's own layout, and DeepSpeed's gradient hook then reduce-scatters it. While open, the
    weights are marked in use (as ``promptkd.rollout.core.gathered`` does), so a module's backward hook (a
    tied input embedding's) cannot partition them under the loss. Every rank must enter it together (the
    gather is a collective).
    """
    head = output_head(model)
    weight, bias = head.weight, getattr(head, "bias", None)
    params = [p for p in (weight, bias) if p is not None and hasattr(p, "ds_id")]
    if not params:
        yield weight, bias
        return
    import deepspeed  # only when a head is partitioned

    sentinel = -1 - id(head)  # a submodule id no DeepSpeed module has
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for p in params:
            p.ds_active_sub_modules.add(sentinel)
        try:
            yield weight, bias
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(sentinel)
