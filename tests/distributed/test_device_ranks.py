"""2 gloo ranks, ZeRO-3: the export gathers one module at a time and equals the consolidated checkpoint."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ranks(scenario_results):
    return scenario_results("export_gathers")  # the session's one 2-rank launch (tests/distributed/conftest.py)


def test_zero3_export_equals_the_consolidated_weights(ranks):
    r0 = ranks[0]
    assert r0["partitioned"], "the student was not ZeRO-3 partitioned: the test would prove nothing"
    assert r0["keys_equal"] and not r0["missing"], r0
    assert r0["n_tensors"] > 10 and r0["max_err"] == 0.0, r0


def test_zero3_export_gathers_one_module_at_a_time(ranks):
    for r in ranks:
        assert r["gathers"] > 1
        # never more than the largest single module's parameters at once, far below the whole model
        assert 0 < r["peak"] <= r["largest_module"] < r["total"], r
