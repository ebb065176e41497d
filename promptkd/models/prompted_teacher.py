"""The frozen teacher with a trainable soft prompt prepended to its input embeddings.

``PromptedTeacher`` wraps any HF causal LM (Llama, GPT-2, OPT, ...) that accepts
``inputs_embeds`` and ``position_ids``. The base weights are frozen and start in
eval mode; the prompt ``theta [P, d]`` is the only trainable parameter and is
held in fp32 (master weights), cast to the base dtype on every forward so its
gradient still lands on the fp32 tensor.

Incremental decoding with a KV cache
------------------------------------
The caller always reasons about *real* tokens only: ``attention_mask`` covers the
tokens seen so far, including the new ones, and never the prompt. The prompt
enters the cache on the first call (``past_key_values=None``, ``use_prompt=True``,
``use_cache=True``). On every later call the caller passes the returned cache,
only the new ``input_ids``, the grown ``attention_mask`` and the *same*
``use_prompt`` as on the first call; the wrapper prepends the P prompt columns
to the mask itself. The cache length is checked against that arithmetic
(``cache_len + n_new == P_or_0 + mask_len``), so a mismatched ``use_prompt`` or a
mask that forgot a column raises instead of silently shifting positions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from promptkd.config import ConfigError
from promptkd.models.forward import cache_kwarg, captured_head_inputs, keep_kwargs, output_cache

logger = logging.getLogger(__name__)

PROMPT_WEIGHTS = "teacher_prompt.safetensors"
PROMPT_META = "teacher_prompt.json"
# In an export (export/, best/) the prompt files sit in this subdir: the top level holds the HF student only, and
# loaders that read every *.safetensors of a model dir (vLLM) would otherwise take the prompt for a weight.
PROMPT_DIR = "teacher_prompt"
INIT_CHOICES = ("text", "random")
# start: the prompt before every input token (the paper's prompt tuning; before BOS and a chat system header);
# after_bos: after each row's first real token (BOS), which then opens the teacher's context as in pre-training
POSITIONS = ("start", "after_bos")


@contextlib.contextmanager
def _gathered(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """Full view of a possibly ZeRO-3 partitioned weight (read-only use)."""
    if hasattr(weight, "ds_id"):
        import deepspeed  # only needed when the teacher is partitioned

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            yield weight
    else:
        yield weight


def _cast_params(module: nn.Module, dtype: torch.dtype) -> None:
    # Parameters only: buffers such as RoPE inv_freq stay fp32, as they do when
    # HF loads a checkpoint with dtype=, so positions keep full precision.
    # ZeRO-3 partitioned weights (ds_id) hold only a shard in .data; their dtype
    # is fixed when the model is built under HfDeepSpeedConfig, so leave them be.
    for param in module.parameters():
        if hasattr(param, "ds_id"):
            continue
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def text_init_ids(tokenizer: Any, text: str, length: int, special_tokens: bool = True) -> list[int]:
    """The P token ids whose embeddings initialise the prompt.

    The official code (``utils.get_teacher_model``, teacher_peft=prompt_init) calls
    ``tokenizer(text)``, so the tokenizer's special tokens stay: OPT's and LLaMA's
    tokenizers put BOS first, GPT-2's adds none. The ids, BOS included, are then
    repeated until P exist and cut to P (each repetition starts with BOS again).
    """
    if tokenizer is None:
        raise ValueError("prompt init 'text' needs a tokenizer (or use init='random')")
    ids = list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
    if not ids:
        raise ValueError(f"prompt init text {text!r} tokenizes to no tokens")
    return (ids * (length // len(ids) + 1))[:length]


def _text_init(embedding: nn.Embedding, tokenizer: Any, text: str, length: int,
               special_tokens: bool = True) -> torch.Tensor:
    ids = text_init_ids(tokenizer, text, length, special_tokens)
    with _gathered(embedding.weight) as weight:
        index = torch.tensor(ids, dtype=torch.long, device=weight.device)
        return weight.detach()[index].to(torch.float32).clone()


def _random_init(embedding: nn.Embedding, length: int, seed: int) -> torch.Tensor:
    # drawn on the CPU, then moved: the same rows on every rank and device type
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with _gathered(embedding.weight) as weight:
        std = weight.detach().to(torch.float32).std().item()
        device = weight.device
    rows = torch.randn(length, embedding.embedding_dim, generator=generator, device="cpu") * std
    return rows.to(device)


def _first_real(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's first real (mask 1) column, on the device (left padding: after the pads)."""
    return ((mask.cumsum(-1) == 1) & (mask == 1)).to(torch.int8).argmax(-1)


def _first_real_embeds(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, d] the embedding of each row's first real token."""
    index = _first_real(mask.to(torch.long))[:, None, None].expand(-1, 1, embeds.shape[-1])
    return embeds.gather(1, index)


def checkpointable_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that checkpoint when their own ``training`` flag is set (HF layers, or the 4.x base model)."""
    # the class attribute, not getattr on the module: nn.Module's __getattr__ is slow for names it lacks
    return [m for m in model.modules()
            if getattr(type(m), "gradient_checkpointing", None) is not None or "gradient_checkpointing" in m.__dict__]


@contextlib.contextmanager
def checkpoint_flags_off(modules: list[nn.Module]) -> Iterator[None]:
    """While decoding: the ``training`` flag off on the modules set up for activation checkpointing.

    Checkpointed frozen layers carry ``training=True`` in an eval-mode model (teacher.checkpoint_frozen_layers,
    ``PromptedTeacher.train``). transformers 5.17 drops a layer's KV cache whenever that flag is set, even under
    no_grad, so a decode would fail at its second token. The flags come back afterwards, whatever happens.
    """
    flagged = [m for m in modules if m.training and getattr(m, "gradient_checkpointing", False)]
    for m in flagged:
        m.training = False
    try:
        yield
    finally:
        for m in flagged:
            m.training = True


class PromptedTeacher(nn.Module):
    """Frozen teacher ``p_T`` plus soft prompt ``theta``: computes ``p_T^theta``.

    Args:
        base: HF causal LM; cast to ``dtype``, frozen and put in eval mode in place
            (``train()`` switches its dropout on, for the prompt step).
        prompt_length: P (0 allowed: the forward then equals the base model).
        init: "text" (rows of the base input embedding for ``init_text``'s tokens,
            repeated or cut to P) or "random" (normal with the embedding's std,
            seeded by ``seed``, identical on every rank).
        tokenizer: callable HF tokenizer; required for init="text".
        init_special_tokens: init="text" tokenizes with the tokenizer's special tokens
            (the official code; OPT/LLaMA: row 0 is the BOS embedding); False: the text only.
    """

    def __init__(
        self,
        base: PreTrainedModel,
        prompt_length: int = 7,
        init: str = "text",
        init_text: str = "Suppose you are a student.",
        tokenizer: Any = None,
        dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
        init_special_tokens: bool = True,
        position: str = "start",
    ) -> None:
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"unknown prompt position {position!r}; expected one of {POSITIONS}")
        self.position = position
        if prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        if init not in INIT_CHOICES:
            raise ValueError(f"unknown prompt init {init!r}; expected one of {INIT_CHOICES}")
        _cast_params(base, dtype)
        base.requires_grad_(False)
        base.eval()
        self.base = base
        self.prompt_length = prompt_length
        self.init = init
        self.init_text = init_text
        embedding = base.get_input_embeddings()
        if prompt_length > 0 and init == "text":
            rows = _text_init(embedding, tokenizer, init_text, prompt_length, init_special_tokens)
        else:
            rows = _random_init(embedding, prompt_length, seed)
        self.prompt = nn.Parameter(rows)
        self._checkpointable = checkpointable_modules(base)  # fixed with the architecture: found once
        self._cache_kwarg = cache_kwarg(base)

    zero3_engine: Any = None  # the DeepSpeed engine that partitions ``base`` (a ZeRO-3 teacher), or None

    def keep_engine(self, engine: Any) -> None:
        """Hold the DeepSpeed engine that partitions ``base``: ``gathered`` takes its per-layer hooks off while the
        weights are held gathered for decoding. Kept out of the module tree (an engine is a module wrapping
        ``base``, which ``parameters()``, ``state_dict()`` and ``to()`` must see once)."""
        self.__dict__["zero3_engine"] = engine

    @property
    def hidden_size(self) -> int:
        return int(self.prompt.shape[1])

    def train(self, mode: bool = True) -> "PromptedTeacher":
        """Dropout follows ``mode``; the weights stay frozen either way.

        The official PromptKD prompt step runs the prompted teacher in train mode. Layers set
        up for activation checkpointing keep their own ``training`` flag: HF checkpoints only
        flagged layers, and that flag does not switch dropout (their submodules' flags do).
        """
        super().train(mode)
        for module in self.base.modules():
            if getattr(module, "gradient_checkpointing", False):
                module.training = True
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        use_prompt: bool = True,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Logits of the (optionally prompted) teacher for the given tokens.

        input_ids: [B, n] new tokens (all tokens when there is no cache).
        attention_mask: [B, seen] over real tokens seen so far *including* the
            n new ones, excluding the prompt (left padding allowed).
        logits_to_keep: > 0 computes the LM head for the last that many positions only
            (the rest are never read); 0 = every new position.
        return_hidden: the final hidden states that enter the LM head ([B, n, H] or [B, logits_to_keep, H])
            instead of logits; the head computes nothing (the fused head + loss applies it chunk by chunk).
        Returns (logits [B, n, V] for the new tokens only, or [B, logits_to_keep, V]; cache or None).
        See the module docstring for the cache protocol.
        """
        prefix = self.prompt_length if use_prompt else 0
        lead = int(prefix > 0 and self.position == "after_bos")   # the BOS column moved in front of the prompt
        n_new = input_ids.shape[1]
        embeds = self.base.get_input_embeddings()(input_ids)
        if past_key_values is None and prefix > 0:
            # .to() keeps the graph to the fp32 master prompt.
            prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
            front = [_first_real_embeds(embeds, attention_mask)] if lead else []
            embeds = torch.cat([*front, prompt, embeds], dim=1)
        full_mask = self._full_mask(attention_mask, prefix, lead)
        self._check_cache(past_key_values, embeds.shape[1], full_mask.shape[1], prefix + lead)
        # Positions count real (and prompt) tokens only, so left padding does not
        # shift them: the first real token sits at P in every row.
        positions = (full_mask.cumsum(dim=-1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
        # a cache is being built or read: checkpointing flags must not make the layers drop it
        flags_off = checkpoint_flags_off(self._checkpointable) if use_cache else contextlib.nullcontext()
        capture = captured_head_inputs(self.base) if return_hidden else contextlib.nullcontext()
        with flags_off, capture as hidden:
            output = self.base(
                inputs_embeds=embeds,
                attention_mask=full_mask,
                position_ids=positions,
                use_cache=use_cache,
                **{self._cache_kwarg: past_key_values},
                **keep_kwargs(self.base, logits_to_keep, n_new),
            )
        if return_hidden:
            if len(hidden) != 1:
                raise RuntimeError(f"the teacher's LM head ran {len(hidden)} times in one forward; "
                                   "set method.fused_head=false")
            return hidden[0][:, -n_new:], output_cache(output)
        return output.logits[:, -n_new:], output_cache(output)

    @staticmethod
    def _full_mask(attention_mask: torch.Tensor, prefix: int, lead: int = 0) -> torch.Tensor:
        """[1]*(lead+prefix) + the mask; with lead, each row's first real column is masked out: its token (BOS)
        sits in front of the prompt, so the row reads [BOS, prompt, rest] (a masked column takes no position)."""
        mask = attention_mask.to(torch.long)
        if prefix == 0:
            return mask
        if lead:
            mask = mask * (1 - torch.nn.functional.one_hot(_first_real(mask), mask.shape[1]).to(mask.dtype))
        ones = torch.ones(mask.shape[0], prefix + lead, dtype=mask.dtype, device=mask.device)
        return torch.cat([ones, mask], dim=1)

    @staticmethod
    def _check_cache(cache: Any, n_inputs: int, mask_len: int, prefix: int) -> None:
        cached = 0 if cache is None else int(cache.get_seq_length())
        if cached + n_inputs != mask_len:
            raise ValueError(
                f"PromptedTeacher: cache holds {cached} positions and {n_inputs} new ones arrive, "
                f"but the attention mask plus {prefix} prompt positions covers {mask_len}. "
                "Pass the mask of all real tokens so far (new ones included, prompt excluded) "
                "and the same use_prompt as when the cache was started."
            )

    def prompt_state(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.prompt.detach().clone()}

    def load_prompt_state(self, state: dict[str, torch.Tensor]) -> None:
        prompt = state["prompt"]
        if prompt.shape != self.prompt.shape:  # a prompt or checkpoint of another teacher / prompt_length
            raise ConfigError(
                f"prompt shape {tuple(prompt.shape)} does not match this teacher's "
                f"{tuple(self.prompt.shape)} (prompt_length, hidden size)"
            )
        with torch.no_grad():
            self.prompt.copy_(prompt.to(device=self.prompt.device, dtype=self.prompt.dtype))

    def save_prompt(self, path_dir: str, teacher_id: str) -> None:
        """Write teacher_prompt.safetensors (key "prompt", fp32) and teacher_prompt.json."""
        os.makedirs(path_dir, exist_ok=True)
        meta = {
            "prompt_length": self.prompt_length,
            "init": self.init,
            "init_text": self.init_text,
            "teacher": teacher_id,
            "hidden_size": self.hidden_size,
        }
        if self.position != "start":   # a start prompt's meta stays what it always was
            meta["position"] = self.position
        weights = os.path.join(path_dir, PROMPT_WEIGHTS)
        # Write then rename so an interrupted save never leaves a torn file.
        save_file({"prompt": self.prompt.detach().float().cpu().contiguous()}, weights + ".tmp")
        os.replace(weights + ".tmp", weights)
        meta_path = os.path.join(path_dir, PROMPT_META)
        with open(meta_path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)
        os.replace(meta_path + ".tmp", meta_path)


def prompt_files_dir(path_dir: str) -> str:
    """Where the prompt files of ``path_dir`` are: its ``teacher_prompt/`` subdir (an export), else the dir itself."""
    sub = os.path.join(path_dir, PROMPT_DIR)
    return sub if os.path.isfile(os.path.join(sub, PROMPT_WEIGHTS)) else path_dir


def load_prompt(path_dir: str) -> torch.Tensor:
    """Read the fp32 prompt [P, d] written by ``PromptedTeacher.save_prompt`` (an export dir or the prompt dir)."""
    path_dir = prompt_files_dir(path_dir)
    weights = os.path.join(path_dir, PROMPT_WEIGHTS)
    if not os.path.isfile(weights):
        raise ConfigError(f"no {PROMPT_WEIGHTS} in '{path_dir}'")
    prompt = load_file(weights)["prompt"]
    meta_path = os.path.join(path_dir, PROMPT_META)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
        expected = (meta.get("prompt_length"), meta.get("hidden_size"))
        if tuple(prompt.shape) != expected:
            raise ConfigError(
                f"{path_dir}: {PROMPT_WEIGHTS} has shape {tuple(prompt.shape)} "
                f"but {PROMPT_META} says {expected}"
            )
    return prompt


def prompt_position(path_dir: str) -> str:
    """Where the saved prompt was trained to sit (teacher_prompt.json; prompts saved before the option: start)."""
    meta_path = os.path.join(prompt_files_dir(path_dir), PROMPT_META)
    if not os.path.isfile(meta_path):
        return "start"
    with open(meta_path, encoding="utf-8") as handle:
        return json.load(handle).get("position", "start")
