"""Tokenization of `Example`s and the two batch layouts the methods need.

- `collate_prompts`: left-padded prompts, so generation appends to aligned ends.
- `collate_full`: right-padded prompt + response with a response-token mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from promptkd.data.chat import Template, end_of_turn_id, render_prompt
from promptkd.data.formats import DataError, Example

logger = logging.getLogger(__name__)


@dataclass
class TokenizedExample:
    """An example as token ids; response_ids end with EOS unless truncated."""

    id: str
    prompt_ids: list[int]
    response_ids: list[int]
    references: list[str]
    category: str


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # Special tokens are added by hand (EOS) so prompt + response concatenate exactly.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    max_length: int,
    template: Optional[Template] = None,
) -> tuple[list[TokenizedExample], int]:
    """Tokenize examples; return (kept, n_dropped).

    Prompts longer than `max_prompt_length` are dropped rather than cut, since a
    truncated instruction asks a different question. Responses are truncated so
    that prompt + response fits in `max_length` (EOS may be cut). With a chat
    template the prompt is the tokenizer's rendering of `Example.messages` and the
    response ends with the template's end-of-turn token instead of EOS.
    """
    template = template or Template()
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}"
        )
    if tokenizer.eos_token_id is None and template.name != "chat":
        raise ValueError("tokenizer has no EOS token; responses must end with one")
    if not examples:
        raise DataError("no examples to tokenize")
    eos_id = end_of_turn_id(tokenizer, template)
    if template.name == "chat":
        texts = [render_prompt(tokenizer, ex.messages, template.kwargs) for ex in examples]
    else:
        texts = [ex.prompt for ex in examples]
    prompts = _encode(tokenizer, texts)
    responses = _encode(tokenizer, [ex.references[0] if ex.references else "" for ex in examples])
    kept: list[TokenizedExample] = []
    for ex, prompt_ids, response_ids in zip(examples, prompts, responses):
        if len(prompt_ids) > max_prompt_length:
            continue
        budget = max_length - len(prompt_ids)
        kept.append(
            TokenizedExample(
                id=ex.id,
                prompt_ids=list(prompt_ids),
                response_ids=(list(response_ids) + [eos_id])[:budget],
                references=list(ex.references),
                category=ex.category,
            )
        )
    dropped = len(examples) - len(kept)
    if not kept:
        raise DataError(
            f"all {len(examples)} examples dropped: every prompt is longer than "
            f"max_prompt_length={max_prompt_length}"
        )
    logger.info(
        "tokenized %d examples; dropped %d with prompts longer than %d tokens",
        len(kept), dropped, max_prompt_length,
    )
    return kept, dropped


def _check_batch(batch: Sequence[TokenizedExample]) -> None:
    if not batch:
        raise ValueError("cannot collate an empty batch")


def collate_prompts(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, Tensor]:
    """Left-padded prompts: input_ids and attention_mask, both long [B, Tp]."""
    _check_batch(batch)
    width = max(len(ex.prompt_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.prompt_ids)
        if n:
            input_ids[row, width - n:] = torch.tensor(ex.prompt_ids, dtype=torch.long)
            attention_mask[row, width - n:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_full(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, Tensor]:
    """Right-padded prompt + response, all long [B, T].

    loss_mask[b, t] = 1 iff token t is a response token (EOS included); losses
    pair logits[:, :-1] with loss_mask[:, 1:] because position t-1 predicts t.
    """
    _check_batch(batch)
    width = max(len(ex.prompt_ids) + len(ex.response_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n_prompt, n_total = len(ex.prompt_ids), len(ex.prompt_ids) + len(ex.response_ids)
        if n_total:
            input_ids[row, :n_total] = torch.tensor(ex.prompt_ids + ex.response_ids, dtype=torch.long)
        attention_mask[row, :n_total] = 1
        loss_mask[row, n_prompt:n_total] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


class ListDataset(torch.utils.data.Dataset):
    """A map-style dataset over a list, so DistributedSampler can shard it."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]
