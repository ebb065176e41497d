"""Generation + ROUGE-L / exact match over named test sets, distributed over ranks and gathered in order.

Each rank takes the examples ``rank, rank + W, ...`` padded to the same count,
so every rank runs the same number of batches (ZeRO-3 forwards are
collectives); the gather drops the padding and restores dataset order, so
greedy answers and scores do not depend on the world size.

Results: ``{model: {set: evaluate(...)}}`` -> ``summarize`` -> results.json,
results.md (promptkd.evaluation.report), answers/<model>/<set>.jsonl and TensorBoard scalars.
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
from promptkd.data import (Template, TokenizedExample, collate_prompts, load_examples, sniff_format, strip_thinking,
                           tokenize_examples)
from promptkd.evaluation.report import AVERAGE, METRICS, results_markdown
from promptkd.rollout import SamplingParams, StepFn, generate
from promptkd.rollout.stops import StopIds, first_stop
from promptkd.rollout.vllm import vllm_answers
from promptkd.seeding import derive_seed

log = logging.getLogger(__name__)


@dataclass
class Decoder:
    """What evaluation needs to decode with one model."""

    step_fn: StepFn
    pad_id: int
    eos_id: StopIds      # one EOS id or a chat model's stop ids (end-of-turn first)
    vocab_size: int
    sync: bool = False   # True when the model is ZeRO-3 partitioned
    vllm: Any = None     # eval.engine=vllm: a vllm.LLM on the model dir (step_fn unused)


def sampling_params(ev: EvalConfig) -> SamplingParams:
    return SamplingParams(max_new_tokens=ev.max_new_tokens, do_sample=ev.do_sample, temperature=ev.temperature,
                          top_p=ev.top_p, top_k=ev.top_k, no_repeat_ngram_size=ev.no_repeat_ngram_size)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Strided shard padded (with -1) so every rank has ceil(n / world) slots."""
    per = math.ceil(n / world) if n else 0
    mine = list(range(rank, n, world))
    return mine + [-1] * (per - len(mine))


def _decode(tokenizer: Any, ids: list[int], eos_id: StopIds) -> str:
    """The answer's text: up to the first stop id, special tokens dropped, thinking blocks stripped."""
    cut = first_stop(ids, eos_id)
    if cut >= 0:
        ids = ids[:cut]
    # Qwen3's <think>/</think> are added tokens that are not "special": decoding keeps them, the score must not
    return strip_thinking(tokenizer.decode(ids, skip_special_tokens=True))


def generate_answers(gen: Decoder, tokenizer: Any, examples: list[TokenizedExample], params: SamplingParams,
                     batch_size: int, seed: int) -> list[str]:
    """One answer per example, in dataset order, identical on every rank."""
    slots = shard_indices(len(examples), dist.rank(), dist.world_size())
    # padding slots reuse example 0 so their batches have the same shape logic
    local = [(i, examples[i if i >= 0 else 0]) for i in slots]
    local.sort(key=lambda item: len(item[1].prompt_ids))  # batch by prompt length
    # on the device of the probabilities it samples from: multinomial on CUDA rejects a CPU generator
    g = torch.Generator(device=dist.device()).manual_seed(derive_seed(seed, "eval", rank=dist.rank()))
    results: list[tuple[int, str]] = []
    if gen.vllm is not None:
        local = [(i, ex) for i, ex in local if i >= 0]
        # each request's seed follows (eval seed, example index): answers do not depend on ranks or batching
        seeds = [derive_seed(seed, "request", index=i) for i, _ in local]
        rows = vllm_answers(gen.vllm, [ex.prompt_ids for _, ex in local], seeds, params, gen.eos_id, gen.vocab_size)
        results = [(i, _decode(tokenizer, row, gen.eos_id)) for (i, _), row in zip(local, rows)]
    for start in range(0, len(local) if gen.vllm is None else 0, batch_size):
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


def evaluate(gen: Decoder, tokenizer: Any, examples: list[TokenizedExample], ev: EvalConfig,
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
    cats = runs[0]["by_category"]
    by_cat = {c: statistics.fmean(r["by_category"][c] for r in runs) for c in cats}
    return {"n": len(examples), **_mean_std(runs), "by_category": by_cat, "seeds": runs}


def _mean_std(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and population std over seeds of each metric."""
    out = {}
    for metric in METRICS:
        values = [r[metric] for r in runs]
        out[metric], out[metric + "_std"] = statistics.fmean(values), statistics.pstdev(values)
    return out


def evaluate_sets(gen: Decoder, tokenizer: Any, sets: dict[str, list[TokenizedExample]],
                  ev: EvalConfig) -> dict[str, dict[str, Any]]:
    """``evaluate`` on every named set with the same model; {set: result}."""
    out = {}
    for name, examples in sets.items():
        out[name] = evaluate(gen, tokenizer, examples, ev)
        log.info("eval %s: ROUGE-L %.2f ± %.2f, EM %.2f (n=%d)", name, out[name]["rougeL"], out[name]["rougeL_std"],
                 out[name]["exact_match"], out[name]["n"])
    return out


# ----------------------------------------------------------------------------- eval sets

PAPER_SETS = ("dolly", "selfinst", "vicuna", "sni", "unni")
TEST_FILE = "test.jsonl"


def _set_dir(path: str) -> dict[str, str]:
    """A dir written by ``promptkd.data.prepare``: one set, or one set per subdir holding test.jsonl."""
    if os.path.isfile(os.path.join(path, TEST_FILE)):
        return {os.path.basename(os.path.normpath(path)): os.path.join(path, TEST_FILE)}
    subs = [d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, TEST_FILE))]
    subs.sort(key=lambda d: (PAPER_SETS.index(d) if d in PAPER_SETS else len(PAPER_SETS), d))
    if not subs:
        raise ValueError(f"eval.sets: {path} has no {TEST_FILE} and no subdirectory with one")
    return {d: os.path.join(path, d, TEST_FILE) for d in subs}


def resolve_sets(specs: list[str], fallback: str = "") -> dict[str, str]:
    """``eval.sets`` entries (``name=path`` or a prepared dir) -> ordered {name: file or hub id}.

    With no entries, ``fallback`` (eval.file / data.test_file) is the one set "test".
    """
    if not specs:
        if not fallback:
            raise ValueError("eval.sets: nothing to evaluate (set eval.sets, eval.file or data.test_file)")
        return {"test": fallback}
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and os.path.isdir(path):
            found = _set_dir(path)
            if len(found) != 1:
                raise ValueError(f"eval.sets: {spec}: {path} holds several sets ({', '.join(found)}); name the dir")
            found = {name: next(iter(found.values()))}
        elif sep:
            found = {name: path}
        elif os.path.isdir(spec):
            found = _set_dir(spec)
        else:
            raise ValueError(f"eval.sets: {spec!r} is neither name=path nor a directory")
        for key, value in found.items():
            if not key or key in out:
                raise ValueError(f"eval.sets: {'empty' if not key else 'duplicate'} set name {key!r} in {spec!r}")
            out[key] = value
    return out


def load_sets(paths: dict[str, str], default_fmt: str, tokenizer: Any, max_prompt_length: int,
              max_length: int, template: Optional[Template] = None,
              ) -> tuple[dict[str, list[TokenizedExample]], dict[str, dict[str, Any]]]:
    """Load and tokenize every set (format sniffed per file); returns ({set: examples}, {set: info}).

    template: the data template (a chat model's test sets go through its chat template)."""
    examples, info = {}, {}
    template = template or Template()
    for name, path in paths.items():
        fmt = sniff_format(path, default_fmt)
        examples[name], dropped = tokenize_examples(load_examples(path, fmt, split="test", template=template.name),
                                                    tokenizer, max_prompt_length, max_length, template)
        info[name] = {"path": path, "format": fmt, "n": len(examples[name]), "dropped_long_prompts": dropped}
    return examples, info


# ----------------------------------------------------------------------------- reports

def slug(name: str) -> str:
    """A file-name-safe form of a model name ("teacher + learned prompt" -> teacher_learned_prompt)."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.-]+", "_", name)).strip("_") or "model"


def _stats(r: dict[str, Any]) -> dict[str, Any]:
    runs = [{k: v for k, v in s.items() if k != "answers"} for s in r["seeds"]]
    return {k: v for k, v in r.items() if k != "seeds"} | {"by_seed": runs}


def _average(per_set: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean over datasets, per seed, then mean ± std over seeds (so the std is that of the average)."""
    per_seed = []
    for i, run in enumerate(next(iter(per_set.values()))["seeds"]):
        per_seed.append({"seed": run["seed"], **{m: statistics.fmean(r["seeds"][i][m] for r in per_set.values())
                                                 for m in METRICS}})
    return {"n": sum(r["n"] for r in per_set.values()), **_mean_std(per_seed), "by_seed": per_seed}


def summarize(results: dict[str, dict[str, dict[str, Any]]], ev: Optional[EvalConfig] = None,
              sets: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """``{model: {set: evaluate(...)}}`` -> the JSON-able summary (see promptkd.evaluation.report)."""
    models = {}
    for name, per_set in results.items():
        models[name] = {"datasets": {d: _stats(r) for d, r in per_set.items()}}
        if len(per_set) > 1:
            models[name][AVERAGE] = _average(per_set)
    decoding = {}
    if ev is not None:
        keys = ("do_sample", "temperature", "top_p", "top_k", "no_repeat_ngram_size", "max_new_tokens", "seeds")
        decoding = {k: getattr(ev, k) for k in keys}
        decoding["seeds"] = list(ev.seeds if ev.do_sample else ev.seeds[:1])
    return {"decoding": decoding, "sets": sets or {}, "models": models}


def write_results(out_dir: str, results: dict[str, dict[str, dict[str, Any]]],
                  examples: dict[str, list[TokenizedExample]], ev: Optional[EvalConfig] = None,
                  sets: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """results.json + results.md + answers/<model>/<set>.jsonl (rank 0 writes); returns the summary."""
    summary = summarize(results, ev, sets)
    if not dist.is_main():
        return summary
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, "results.json"), json.dumps(summary, indent=2))
    _atomic_write(os.path.join(out_dir, "results.md"), results_markdown(summary))
    for name, per_set in results.items():
        model_dir = os.path.join(out_dir, "answers", slug(name))
        os.makedirs(model_dir, exist_ok=True)
        for set_name, r in per_set.items():
            lines = [json.dumps({"id": ex.id, "seed": s["seed"], "category": ex.category, "answer": ans,
                                 "references": ex.references})
                     for s in r["seeds"] for ex, ans in zip(examples[set_name], s["answers"])]
            _atomic_write(os.path.join(model_dir, f"{set_name}.jsonl"), "\n".join(lines) + "\n")
    return summary


def scalars(summary: dict[str, Any]) -> dict[str, float]:
    """TensorBoard scalars: ``eval/<set>/<metric>`` (``eval/<model>/<set>/...`` when several models)."""
    out = {}
    several = len(summary["models"]) > 1
    for name, m in summary["models"].items():
        prefix = f"eval/{slug(name)}/" if several else "eval/"
        entries = dict(m["datasets"]) | ({AVERAGE: m[AVERAGE]} if AVERAGE in m else {})
        for set_name, stats in entries.items():
            for metric in METRICS:
                out[f"{prefix}{set_name}/{metric}"] = stats[metric]
                out[f"{prefix}{set_name}/{metric}_std"] = stats[metric + "_std"]
    return out


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
