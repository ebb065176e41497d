"""Data layer: formats, prompt template, synthetic data, tokenizer, tokenize and collate.

The formats, templates, chat rendering and synthetic data need only the standard library, so tools that
read, convert or write data (``python -m promptkd.data.prepare``, bench/quality.py's driver and its SLURM
stages) start without torch or transformers. The tokenizer and the tokenize/collate functions, which do
import them, load on first use of their names here (PEP 562).
"""

from importlib import import_module

from promptkd.data.chat import Template, end_of_turn_id, eos_for, stop_ids, strip_thinking
from promptkd.data.formats import DataError, Example, load_examples, sniff_format, split_train_dev
from promptkd.data.synthetic import FAMILIES, generate_synthetic, make_synthetic_splits, write_jsonl
from promptkd.data.template import build_prompt

# name -> the submodule that defines it, imported on first access (it imports torch or transformers)
_HEAVY = {
    "ListDataset": "dataset",
    "TokenizedExample": "dataset",
    "collate_full": "dataset",
    "collate_prompts": "dataset",
    "tokenize_examples": "dataset",
    "load_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}


def __getattr__(name: str):
    if name not in _HEAVY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HEAVY[name]}"), name)
    globals()[name] = value
    return value


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
