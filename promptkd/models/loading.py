"""Model construction: HF checkpoints, tiny models from config, vocab checks."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from promptkd.config import ConfigError

logger = logging.getLogger(__name__)

TINY_ARCHS = ("llama", "gpt2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # config names -> torch


def _llama_config(
    layers: int,
    hidden: int,
    heads: int,
    vocab_size: int,
    max_positions: int,
    intermediate: int,
    special: dict[str, int | None],
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        # Llama's own ratio is ~8/3 with SwiGLU; 4x keeps tiny models from being
        # MLP-starved and the exact value does not matter for tests.
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        **special,
    )


def _gpt2_config(
    layers: int,
    hidden: int,
    heads: int,
    vocab_size: int,
    max_positions: int,
    intermediate: int,
    special: dict[str, int | None],
) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max_positions,
        n_inner=intermediate or None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        **special,
    )


def tiny_config(
    arch: str,
    layers: int,
    hidden: int,
    heads: int,
    vocab_size: int,
    max_positions: int = 512,
    intermediate: int = 0,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> GPT2Config | LlamaConfig:
    """The config of a tiny model (``build_tiny`` builds it; the memory planner reads its shapes).

    arch: "llama" or "gpt2". intermediate=0 picks the architecture default (4 * hidden).
    """
    builders = {"llama": _llama_config, "gpt2": _gpt2_config}
    if arch not in builders:
        raise ValueError(f"unknown tiny model arch {arch!r}; expected one of {TINY_ARCHS}")
    special = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    return builders[arch](layers, hidden, heads, vocab_size, max_positions, intermediate, special)


def build_tiny(*args: Any, **kwargs: Any) -> PreTrainedModel:
    """Randomly initialised causal LM from ``tiny_config(*args, **kwargs)`` (no hub access), dropout 0.

    arch: "llama" or "gpt2". intermediate=0 picks the architecture default
    (4 * hidden). Special token ids are written to the config so generation
    and padding logic see the tokenizer's ids, not the hub defaults (GPT-2's
    50256 would be outside a tiny vocab).
    """
    config = tiny_config(*args, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    logger.info(
        "built tiny %s: %d layers, hidden %d, vocab %d, %.2fM params", config.model_type, config.num_hidden_layers,
        config.hidden_size, config.vocab_size, sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model


def _looks_local(path_or_id: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a directory,
    # and a missing directory should fail here rather than as a hub lookup.
    return (
        path_or_id.startswith(("/", ".", "~"))
        or path_or_id.count("/") > 1
        or os.path.exists(os.path.expanduser(path_or_id))
    )


def missing_local_dir(path_or_id: str) -> bool:
    """True for a path meant as a local directory (not a hub id) that does not exist."""
    return _looks_local(path_or_id) and not os.path.isdir(os.path.expanduser(path_or_id))


def load_pretrained(path_or_id: str, dtype: torch.dtype, key: str = "model.path",
                    device: torch.device | str | None = None) -> PreTrainedModel:
    """Load a causal LM from a local directory or hub id in ``dtype``, straight onto ``device``.

    The weights are read in ``dtype`` onto ``device`` (transformers 5 builds the model on the meta
    device and fills it there): no rank holds a full fp32 copy in host RAM on the way. Under a live
    ZeRO-3 ``HfDeepSpeedConfig`` the device is left to DeepSpeed (zero.Init partitions at construction).
    Raises ConfigError("<key>: cannot load ...") naming the config key and the path when the model
    cannot be read, so a config typo reads as a config error (exit 2, one line); running out of
    device memory is not a config error and propagates.
    """
    expanded = os.path.expanduser(path_or_id)
    if missing_local_dir(path_or_id):
        raise ConfigError(f"{key}: cannot load '{path_or_id}': no such directory")
    kwargs: dict[str, Any] = {"dtype": dtype}  # transformers 5 takes dtype=; torch_dtype= is deprecated there
    if device is not None and not _zero3_live():
        kwargs["device_map"] = torch.device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(expanded, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"{key}: cannot load '{path_or_id}': {exc}") from exc
    logger.info("loaded %s (%s) in %s on %s", path_or_id, type(model).__name__, dtype,
                kwargs.get("device_map", "zero3 partitions" if device is not None else "cpu"))
    return model


def _zero3_live() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers without the DeepSpeed integration
        return False
    return bool(is_deepspeed_zero3_enabled())


def check_vocab(tokenizer_len: int, teacher_vocab: int, student_vocab: int) -> int:
    """Check both models cover the tokenizer; return the usable vocab size.

    Models may pad their embedding matrix beyond the tokenizer (e.g. to a
    multiple of 64); callers slice logits ``[..., :n]`` with the returned n so
    teacher and student distributions live on the same support.
    """
    if tokenizer_len <= 0:
        raise ValueError(f"tokenizer length must be positive, got {tokenizer_len}")
    short = {
        name: size
        for name, size in (("teacher", teacher_vocab), ("student", student_vocab))
        if size < tokenizer_len
    }
    if short:
        raise ValueError(
            f"vocab mismatch: tokenizer has {tokenizer_len} tokens but teacher vocab is "
            f"{teacher_vocab} and student vocab is {student_vocab} "
            f"({', '.join(short)} too small); teacher and student must share the tokenizer"
        )
    if teacher_vocab != student_vocab:
        logger.info(
            "teacher vocab %d != student vocab %d; logits are sliced to the tokenizer's %d",
            teacher_vocab, student_vocab, tokenizer_len,
        )
    return tokenizer_len
