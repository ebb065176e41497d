"""Data layer: formats, prompt template, synthetic data, tokenizer, tokenize and collate."""

from promptkd.data.dataset import (
    ListDataset,
    TokenizedExample,
    collate_full,
    collate_prompts,
    tokenize_examples,
)
from promptkd.data.chat import Template, end_of_turn_id, eos_for, stop_ids, strip_thinking
from promptkd.data.formats import DataError, Example, load_examples, sniff_format, split_train_dev
from promptkd.data.synthetic import FAMILIES, generate_synthetic, make_synthetic_splits, write_jsonl
from promptkd.data.template import build_prompt
from promptkd.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "DataError",
    "Example",
    "FAMILIES",
    "Template",
    "end_of_turn_id",
    "eos_for",
    "stop_ids",
    "strip_thinking",
    "ListDataset",
    "TokenizedExample",
    "build_prompt",
    "collate_full",
    "collate_prompts",
    "generate_synthetic",
    "load_examples",
    "load_tokenizer",
    "make_synthetic_splits",
    "sniff_format",
    "split_train_dev",
    "tokenize_examples",
    "train_tokenizer",
    "write_jsonl",
]
