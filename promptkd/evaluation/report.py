"""Markdown tables from evaluation summaries (``eval/results.json``); pure Python, no torch.

A summary is ``{"decoding": {...}, "sets": {name: {...}}, "models": {model: {"datasets":
{name: stats}, "average": stats}}}`` where stats hold ``rougeL``, ``rougeL_std``,
``exact_match``, ``exact_match_std``, ``n``, ``by_category`` and ``by_seed``.
"""
from __future__ import annotations

import json
from typing import Any, Optional

METRICS = {"rougeL": "ROUGE-L", "exact_match": "Exact match"}
AVERAGE = "average"
MAX_CATEGORY_COLUMNS = 20   # wider per-category tables (S-NI tasks, SelfInst apps) stay in results.json only


def cell(stats: Optional[dict[str, Any]], metric: str) -> str:
    """``mean ± std`` (std only when there were several seeds), ``–`` when missing."""
    if not stats or metric not in stats:
        return "–"
    text = f"{stats[metric]:.2f}"
    if len(stats.get("by_seed", [])) > 1:
        text += f" ± {stats.get(metric + '_std', 0.0):.2f}"
    return text


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def dataset_names(models: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for m in models:
        names += [d for d in m.get("datasets", {}) if d not in names]
    return names


def score_table(rows: list[tuple[str, dict[str, Any]]], metric: str = "rougeL") -> str:
    """Models (rows) × datasets (columns), plus the average over datasets when there are several."""
    names = dataset_names([m for _, m in rows])
    cols = names + ([AVERAGE] if len(names) > 1 else [])
    lines = [_row(["model"] + cols), "|" + "---|" * (1 + len(cols))]
    for label, m in rows:
        ds = m.get("datasets", {})
        lines.append(_row([label] + [cell(ds.get(n), metric) for n in names]
                          + ([cell(m.get(AVERAGE), metric)] if len(names) > 1 else [])))
    return "\n".join(lines) + "\n"


def seed_table(models: dict[str, Any], metric: str = "rougeL") -> str:
    seeds = sorted({s["seed"] for m in models.values() for d in m["datasets"].values() for s in d.get("by_seed", [])})
    lines = [_row(["model", "dataset"] + [f"seed {s}" for s in seeds]), "|" + "---|" * (2 + len(seeds))]
    for name, m in models.items():
        for ds_name, d in m["datasets"].items():
            by = {s["seed"]: s[metric] for s in d.get("by_seed", [])}
            lines.append(_row([name, ds_name] + [f"{by[s]:.2f}" if s in by else "–" for s in seeds]))
    return "\n".join(lines) + "\n"


def category_tables(models: dict[str, Any]) -> str:
    out = []
    for ds_name in dataset_names(list(models.values())):
        cats = sorted({c for m in models.values() for c in m["datasets"].get(ds_name, {}).get("by_category", {})})
        if len(cats) < 2 or len(cats) > MAX_CATEGORY_COLUMNS:
            continue
        lines = [f"### {ds_name}\n", _row(["model"] + cats), "|" + "---|" * (1 + len(cats))]
        for name, m in models.items():
            by = m["datasets"].get(ds_name, {}).get("by_category", {})
            lines.append(_row([name] + [f"{by[c]:.1f}" if c in by else "–" for c in cats]))
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def describe_decoding(dec: dict[str, Any]) -> str:
    if not dec:
        return ""
    if dec.get("do_sample", True):
        how = (f"sampling (top_p={dec.get('top_p')}, top_k={dec.get('top_k')}, temperature={dec.get('temperature')}, "
               f"no_repeat_ngram_size={dec.get('no_repeat_ngram_size')}, max_new_tokens={dec.get('max_new_tokens')})")
    else:
        how = (f"greedy (no_repeat_ngram_size={dec.get('no_repeat_ngram_size')}, "
               f"max_new_tokens={dec.get('max_new_tokens')})")
    seeds = ", ".join(str(s) for s in dec.get("seeds", []))
    return f"Decoding: {how}; seeds {seeds}. Cells are mean ± std (population) over seeds.\n"


def results_markdown(summary: dict[str, Any]) -> str:
    """The whole ``results.md``: main tables first, then per seed and per category."""
    models = summary["models"]
    rows = list(models.items())
    sets = summary.get("sets", {})
    parts = ["# Evaluation\n", describe_decoding(summary.get("decoding", {}))]
    if sets:
        parts.append("Examples: " + ", ".join(f"{n} {s.get('n', '?')}" for n, s in sets.items()) + "\n")
    for metric, title in METRICS.items():
        parts += [f"## {title}\n", score_table(rows, metric)]
    parts += ["## ROUGE-L per seed\n", seed_table(models)]
    cats = category_tables(models)
    if cats:
        parts += ["## ROUGE-L per category\n", cats]
    return "\n".join(p for p in parts if p)


def load_summary(path: str) -> dict[str, Any]:
    """A results.json; the older flat layout ``{model: {rougeL, ...}}`` reads as one dataset "test"."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a results.json (top level must be an object)")
    if "models" in data:
        return data
    models = {}
    for name, r in data.items():
        if not isinstance(r, dict) or "rougeL" not in r:
            raise ValueError(f"{path}: not a results.json (entry {name!r} has no rougeL)")
        models[name] = {"datasets": {"test": r}}
    return {"models": models, "sets": {}, "decoding": {}}


def main_tables(summary: dict[str, Any]) -> str:
    """ROUGE-L and exact-match tables, as printed at the end of an eval."""
    rows = list(summary["models"].items())
    return "\n".join(f"{title}\n{score_table(rows, metric)}" for metric, title in METRICS.items())


def protocol_table(sampled: dict[str, Any], greedy: dict[str, Any]) -> str:
    """The paper's sampled scores (mean ± std over seeds) beside the greedy ones, per model and set."""
    rows = list(sampled["models"].items())
    names = dataset_names([m for _, m in rows])
    n_seeds = len(sampled.get("decoding", {}).get("seeds", [])) or "?"
    head = ["model"]
    for metric, title in METRICS.items():
        for n in names:
            where = f" ({n})" if len(names) > 1 else ""
            head += [f"{title}{where}, sampled ({n_seeds} seeds)", f"{title}{where}, greedy"]
    lines = ["Sampled (the paper's protocol) beside greedy", _row(head), "|" + "---|" * len(head)]
    for label, m in rows:
        g = greedy["models"].get(label, {}).get("datasets", {})
        cells = [label]
        for metric in METRICS:
            for n in names:
                cells += [cell(m["datasets"].get(n), metric), cell(g.get(n), metric)]
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"
