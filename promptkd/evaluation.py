"""Generation + ROUGE-L / exact match, distributed over ranks and gathered in order.

Each rank takes the examples ``rank, rank + W, ...`` padded to the same count,
so every rank runs the same number of batches (ZeRO-3 forwards are
collectives); the gather drops the padding and restores dataset order.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import string
from dataclasses import dataclass
from typing import Any, Optional

import torch

from promptkd import distributed as dist
from promptkd.config import EvalConfig
from promptkd.data import TokenizedExample, collate_prompts
from promptkd.rollout import SamplingParams, StepFn, generate

log = logging.getLogger(__name__)


@dataclass
class Generator:
    """What evaluation needs to decode with one model."""

    step_fn: StepFn
    pad_id: int
    eos_id: int
    vocab_size: int
    sync: bool = False   # True when the model is ZeRO-3 partitioned


def sampling_params(ev: EvalConfig) -> SamplingParams:
    return SamplingParams(max_new_tokens=ev.max_new_tokens, do_sample=ev.do_sample, temperature=ev.temperature,
                          top_p=ev.top_p, top_k=ev.top_k, no_repeat_ngram_size=ev.no_repeat_ngram_size)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Strided shard padded (with -1) so every rank has ceil(n / world) slots."""
    per = math.ceil(n / world) if n else 0
    mine = list(range(rank, n, world))
    return mine + [-1] * (per - len(mine))


def _decode(tokenizer: Any, ids: list[int], eos_id: int) -> str:
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_answers(gen: Generator, tokenizer: Any, examples: list[TokenizedExample], params: SamplingParams,
                     batch_size: int, seed: int) -> list[str]:
    """One answer per example, in dataset order, identical on every rank."""
    slots = shard_indices(len(examples), dist.rank(), dist.world_size())
    # padding slots reuse example 0 so their batches have the same shape logic
    local = [(i, examples[i if i >= 0 else 0]) for i in slots]
    local.sort(key=lambda item: len(item[1].prompt_ids))  # batch by prompt length
    g = torch.Generator().manual_seed(seed * 1000 + dist.rank())
    results: list[tuple[int, str]] = []
    for start in range(0, len(local), batch_size):
        chunk = local[start:start + batch_size]
        batch = collate_prompts([ex for _, ex in chunk], gen.pad_id)
        batch = {k: v.to(dist.device()) for k, v in batch.items()}
        out = generate(gen.step_fn, batch["input_ids"], batch["attention_mask"], params, gen.eos_id, gen.pad_id,
                       gen.vocab_size, generator=g, sync=gen.sync, force_eos=False)
        for (idx, _), row in zip(chunk, out.response_ids.tolist()):
            if idx >= 0:
                results.append((idx, _decode(tokenizer, row, gen.eos_id)))
    merged = dict(pair for part in dist.all_gather_object(results) for pair in part)
    return [merged[i] for i in range(len(examples))]


# ----------------------------------------------------------------------------- metrics

_SCORER = None


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F (rouge-score, stemmed), max over references, in [0, 100]."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def _normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, references: list[str]) -> float:
    return 100.0 * float(any(_normalize(prediction) == _normalize(r) for r in references))


def score(predictions: list[str], examples: list[TokenizedExample]) -> dict[str, float]:
    n = max(1, len(predictions))
    return {"rougeL": sum(rouge_l(p, e.references) for p, e in zip(predictions, examples)) / n,
            "exact_match": sum(exact_match(p, e.references) for p, e in zip(predictions, examples)) / n}


def per_category(predictions: list[str], examples: list[TokenizedExample]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for p, e in zip(predictions, examples):
        groups.setdefault(e.category or "all", []).append(rouge_l(p, e.references))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def evaluate(gen: Generator, tokenizer: Any, examples: list[TokenizedExample], ev: EvalConfig,
             seeds: Optional[list[int]] = None) -> dict[str, Any]:
    """Scores over seeds: mean and std of ROUGE-L / EM, per-category ROUGE-L, and the answers."""
    if ev.max_examples:
        examples = examples[:ev.max_examples]
    seeds = seeds or (ev.seeds if ev.do_sample else ev.seeds[:1])
    params = sampling_params(ev)
    runs = []
    for seed in seeds:
        answers = generate_answers(gen, tokenizer, examples, params, ev.batch_size, seed)
        runs.append({"seed": seed, **score(answers, examples), "by_category": per_category(answers, examples),
                     "answers": answers})
    rl = [r["rougeL"] for r in runs]
    em = [r["exact_match"] for r in runs]
    cats = runs[0]["by_category"]
    by_cat = {c: statistics.fmean(r["by_category"][c] for r in runs) for c in cats}
    return {"n": len(examples), "rougeL": statistics.fmean(rl), "rougeL_std": statistics.pstdev(rl),
            "exact_match": statistics.fmean(em), "by_category": by_cat, "seeds": runs}


# ----------------------------------------------------------------------------- reports

def write_results(out_dir: str, results: dict[str, dict[str, Any]], examples: list[TokenizedExample]) -> None:
    """results.json (scores), results.md (table) and answers_<model>.jsonl; rank 0 only."""
    if not dist.is_main():
        return
    os.makedirs(out_dir, exist_ok=True)
    slim = {name: {k: v for k, v in r.items() if k != "seeds"} | {
        "by_seed": [{k: v for k, v in s.items() if k != "answers"} for s in r["seeds"]]} for name, r in results.items()}
    _atomic_write(os.path.join(out_dir, "results.json"), json.dumps(slim, indent=2))
    _atomic_write(os.path.join(out_dir, "results.md"), results_table(results))
    for name, r in results.items():
        lines = []
        for s in r["seeds"]:
            for ex, ans in zip(examples, s["answers"]):
                lines.append(json.dumps({"id": ex.id, "seed": s["seed"], "category": ex.category,
                                         "answer": ans, "references": ex.references}))
        _atomic_write(os.path.join(out_dir, f"answers_{name}.jsonl"), "\n".join(lines) + "\n")


def results_table(results: dict[str, dict[str, Any]]) -> str:
    cats = sorted({c for r in results.values() for c in r["by_category"]})
    head = "| model | ROUGE-L | EM | " + " | ".join(cats) + " |"
    rows = [head, "|" + "---|" * (3 + len(cats))]
    for name, r in results.items():
        by_cat = r["by_category"]
        spread = f" ± {r['rougeL_std']:.2f}" if len(r["seeds"]) > 1 else ""
        rows.append(f"| {name} | {r['rougeL']:.2f}{spread} | {r['exact_match']:.1f} | "
                    + " | ".join(f"{by_cat.get(c, float('nan')):.1f}" for c in cats) + " |")
    return "\n".join(rows) + "\n"


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
