"""Compare evaluation runs side by side: one table per metric, rows = run: model, columns = datasets.

    python -m promptkd.compare runs/a/eval/results.json runs/b/eval/results.json [--labels A B]
                               [--metric rougeL|exact_match|all]

A row is labelled with its run (the results.json path without ``/eval/results.json``,
or ``--labels``) and model name. Datasets a run lacks show ``–``; the ``average``
column is each run's own mean over the datasets it evaluated. Results written before
the multi-dataset layout (``{model: {rougeL, ...}}``) read as one dataset "test".
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from promptkd.evaluation.report import METRICS, load_summary, score_table


def run_label(path: str) -> str:
    head, tail = os.path.split(os.path.normpath(path))
    if tail == "results.json" and os.path.basename(head) == "eval":
        head = os.path.dirname(head)
    return head if tail == "results.json" else os.path.normpath(path)


def rows_for(paths: list[str], labels: Optional[list[str]] = None) -> list[tuple[str, dict[str, Any]]]:
    labels = labels or [run_label(p) for p in paths]
    rows = []
    for label, path in zip(labels, paths):
        for model, stats in load_summary(path)["models"].items():
            rows.append((f"{label}: {model}", stats))
    return rows


def compare(paths: list[str], metrics: list[str], labels: Optional[list[str]] = None) -> str:
    rows = rows_for(paths, labels)
    return "\n".join(f"{METRICS[m]}\n{score_table(rows, m)}" for m in metrics)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m promptkd.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files written by stage=eval / train / pipeline")
    p.add_argument("--labels", nargs="+", default=None, help="one label per results file")
    p.add_argument("--metric", choices=[*METRICS, "all"], default="all")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.labels and len(args.labels) != len(args.results):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.results)} results files")
    metrics = list(METRICS) if args.metric == "all" else [args.metric]
    try:
        print(compare(args.results, metrics, args.labels), end="")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
