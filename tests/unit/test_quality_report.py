"""bench/quality_report.py: the paired interval against a written-out t formula, and the protocol table."""
from __future__ import annotations

import math
import statistics

import pytest

from bench.quality_report import T95, paired
from promptkd.evaluation.report import protocol_table


def test_paired_difference_is_the_t_interval_of_per_seed_differences():
    a = {1: 30.0, 2: 32.5, 3: 31.0}
    b = {1: 29.0, 2: 31.0, 3: 31.5, 4: 99.0}  # seed 4 has no partner: ignored
    d = [1.0, 1.5, -0.5]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.303 * sd / math.sqrt(3)
    p = paired(a, b)
    assert p["n"] == 3 and p["per_seed"] == d
    assert p["mean"] == pytest.approx(mean)
    assert (p["low"], p["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert T95[2] == pytest.approx(4.303) and paired({1: 1.0}, {1: 0.0}) is None


def test_paired_interval_excludes_zero_only_for_a_consistent_gain():
    steady = paired({s: 40.0 + s * 0.1 for s in (1, 2, 3)}, {s: 38.0 + s * 0.1 + 0.01 * s * s for s in (1, 2, 3)})
    noisy = paired({1: 40.0, 2: 35.0, 3: 45.0}, {1: 39.0, 2: 41.0, 3: 39.0})
    assert steady["low"] > 0
    assert noisy["low"] < 0 < noisy["high"]
    assert statistics.fmean(noisy["per_seed"]) == pytest.approx(noisy["mean"])


def _summary(seeds, scores):
    return {"decoding": {"seeds": seeds},
            "models": {m: {"datasets": {"test": {"rougeL": r, "rougeL_std": 0.5, "exact_match": r / 2,
                                                 "exact_match_std": 0.1, "by_seed": [{"seed": s} for s in seeds]}}}
                       for m, r in scores.items()}}


def test_protocol_table_puts_sampled_beside_greedy():
    text = protocol_table(_summary([10, 20, 30, 40, 50], {"teacher": 80.0, "student": 30.0}),
                          _summary([10], {"teacher": 85.0, "student": 40.0}))
    lines = text.strip().splitlines()
    assert "ROUGE-L, sampled (5 seeds)" in lines[1] and "ROUGE-L, greedy" in lines[1]
    assert lines[3] == "| teacher | 80.00 ± 0.50 | 85.00 | 40.00 ± 0.10 | 42.50 |"
    assert lines[4].startswith("| student | 30.00 ± 0.50 | 40.00 |")
