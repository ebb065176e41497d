"""Model construction: HF checkpoints, tiny models from config, vocab checks."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedModel

from promptkd.config import ConfigError

logger = logging.getLogger(__name__)

TINY_ARCHS = ("llama", "gpt2", "qwen2", "qwen3", "llama3")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
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


def _kv(heads: int, kv_heads: int) -> int:
    # the chat families use GQA: two query heads per key/value head unless told otherwise
    return kv_heads or max(1, heads // 2)


def _qwen_config(arch: str, layers: int, hidden: int, heads: int, vocab_size: int, max_positions: int,
                 intermediate: int, special: dict[str, Any], kv_heads: int) -> PretrainedConfig:
    from transformers import Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=_kv(heads, kv_heads),
                  max_position_embeddings=max_positions, attention_dropout=0.0, **special)
    if arch == "qwen3":
        # Qwen3: q/k RMSNorm per head, tied embeddings (the 0.6B-4B checkpoints tie them), no qkv bias
        return Qwen3Config(**common, head_dim=hidden // heads, tie_word_embeddings=True)
    # Qwen2(.5): a bias on q/k/v, untied at 7B (the 0.5B ties; the untied case is the one that differs from Qwen3)
    return Qwen2Config(**common, tie_word_embeddings=False)


def _llama3_config(layers: int, hidden: int, heads: int, vocab_size: int, max_positions: int, intermediate: int,
                   special: dict[str, Any], kv_heads: int) -> LlamaConfig:
    # Llama-3.1/3.2: GQA and "llama3" rope scaling (factor 8 over an original context; scaled to this size)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": max(16, max_positions // 4)}
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=_kv(heads, kv_heads),
                       max_position_embeddings=max_positions, attention_dropout=0.0, tie_word_embeddings=False,
                       rope_parameters=rope, **special)


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
    eos_token_id: int | list[int] | None = None,
    kv_heads: int = 0,
    vocab_multiple: int = 0,
) -> PretrainedConfig:
    """The config of a tiny model (``build_tiny`` builds it; the memory planner reads its shapes).

    arch: one of TINY_ARCHS. intermediate=0 picks the architecture default (4 * hidden). kv_heads: GQA
    (0 = heads for llama/gpt2, heads/2 for the chat families). vocab_multiple: pad the embedding rows up to
    a multiple (real checkpoints do: Qwen2.5-7B has 152,064 rows for a 151,665-token tokenizer).
    eos_token_id may be a list (generation_config of chat models lists several).
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny model arch {arch!r}; expected one of {TINY_ARCHS}")
    if vocab_multiple:
        vocab_size = -(-vocab_size // vocab_multiple) * vocab_multiple
    special = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if arch in ("qwen2", "qwen3"):
        return _qwen_config(arch, layers, hidden, heads, vocab_size, max_positions, intermediate, special, kv_heads)
    if arch == "llama3":
        return _llama3_config(layers, hidden, heads, vocab_size, max_positions, intermediate, special, kv_heads)
    builders = {"llama": _llama_config, "gpt2": _gpt2_config}
    config = builders[arch](layers, hidden, heads, vocab_size, max_positions, intermediate, special)
    if kv_heads and arch == "llama":
        config.num_key_value_heads = kv_heads
    return config


def build_tiny(*args: Any, attn_implementation: str = "", **kwargs: Any) -> PreTrainedModel:
    """Randomly initialised causal LM from ``tiny_config(*args, **kwargs)`` (no hub access), dropout 0.

    arch: "llama" or "gpt2". intermediate=0 picks the architecture default
    (4 * hidden). Special token ids are written to the config so generation
    and padding logic see the tokenizer's ids, not the hub defaults (GPT-2's
    50256 would be outside a tiny vocab).
    """
    config = tiny_config(*args, **kwargs)
    model = AutoModelForCausalLM.from_config(config, **attn_kwargs(attn_implementation))
    logger.info(
        "built tiny %s: %d layers, hidden %d, vocab %d, %.2fM params", config.model_type, config.num_hidden_layers,
        config.hidden_size, config.vocab_size, sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model


def attn_kwargs(attn_implementation: str, key: str = "model.attn_implementation") -> dict[str, str]:
    """``attn_implementation=`` for transformers ('' = its default). flash_attention_2 needs the flash-attn
    package: a clear ConfigError here rather than transformers' ImportError deep in loading."""
    if not attn_implementation:
        return {}
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"{key}: must be one of {', '.join(ATTN_IMPLEMENTATIONS)} (got {attn_implementation!r})")
    if attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(f"{key}: flash_attention_2 needs the flash-attn package (pip install flash-attn); "
                              "use sdpa")
    return {"attn_implementation": attn_implementation}


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
                    device: torch.device | str | None = None, attn_implementation: str = "") -> PreTrainedModel:
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
    kwargs.update(attn_kwargs(attn_implementation, key.rsplit(".", 1)[0] + ".attn_implementation"))
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


# ----------------------------------------------------------------------------- shared by the teacher and the student

def tiny_from_init(init: Any, tokenizer: Any, seed: int, attn: str = "") -> PreTrainedModel:
    """A tiny model from its ``TinyInit`` section, the tokenizer's vocab and special ids, seeded.

    Same weights on every rank whatever the RNG state: a replicated teacher is never broadcast.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_tiny(init.arch, init.layers, init.hidden, init.heads, vocab_size=len(tokenizer),
                          max_positions=init.max_positions, intermediate=init.intermediate,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, kv_heads=init.kv_heads,
                          vocab_multiple=init.vocab_multiple, attn_implementation=attn)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing (transformers 5 name first, the 4.x one otherwise)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def unset_hf_ds_config() -> None:
    """Drop transformers' global ZeRO-3 flag: a live ``HfDeepSpeedConfig`` would partition later models too."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:  # pragma: no cover - older transformers
        pass


def config_vocab(model: torch.nn.Module) -> int:
    """The vocab size a model's config says (a DeepSpeed engine: its module's)."""
    model = getattr(model, "module", model)
    return int(model.config.vocab_size)


def check_covers_tokenizer(model: torch.nn.Module, tokenizer: Any, key: str) -> None:
    n_model, n_tok = config_vocab(model), len(tokenizer)
    if n_model < n_tok:
        raise ConfigError(f"{key}: model vocab size {n_model} is smaller than the tokenizer's {n_tok} tokens; "
                          "teacher, student and tokenizer must share one vocabulary")
