"""The evaluation side.

core: generation and ROUGE-L / exact match on test sets, results files; exposure: ExAccErr;
report: markdown tables; compare: runs side by side.
"""
from __future__ import annotations

from promptkd.evaluation.core import (
    Decoder, evaluate, evaluate_sets, exact_match, generate_answers, load_sets, PAPER_SETS, per_category,
    resolve_sets, rouge_l, sampling_params, scalars, score, shard_indices, slug, summarize, TEST_FILE,
    write_results,
)

__all__ = ["Decoder", "evaluate", "evaluate_sets", "exact_match", "generate_answers", "load_sets", "PAPER_SETS",
           "per_category", "resolve_sets", "rouge_l", "sampling_params", "scalars", "score",
           "shard_indices", "slug", "summarize", "TEST_FILE", "write_results"]
