"""The tiers stay honest: every unit test that launches a subprocess is in the slow tier, and the slow list names
tests that exist."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO, SLOW_UNIT, is_slow_unit

UNIT = REPO / "tests" / "unit"
LAUNCH = {"run", "Popen", "call", "check_call", "check_output"}


def _launches(fn: ast.AST, helpers: set[str]) -> bool:
    """Whether ``fn`` calls subprocess.<launch> or a module-level helper that does."""
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "subprocess" \
                and f.attr in LAUNCH:
            return True
        if isinstance(f, ast.Name) and f.id in helpers:
            return True
    return False


def _tests_that_launch(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    helpers: set[str] = set()
    for _ in range(3):  # helpers of helpers
        helpers |= {f.name for f in functions if not f.name.startswith("test_") and _launches(f, helpers)}
    return {f.name for f in functions if f.name.startswith("test_") and _launches(f, helpers)}


def test_unit_tests_that_launch_a_subprocess_are_slow():
    missing = [f"{p.relative_to(REPO).as_posix()}::{name}" for p in sorted(UNIT.glob("test_*.py"))
               for name in sorted(_tests_that_launch(p)) if not is_slow_unit((p.relative_to(REPO).as_posix(), name))]
    assert not missing, "add these to SLOW_UNIT in tests/conftest.py:\n" + "\n".join(missing)


def test_the_launch_scan_can_fail(tmp_path):
    src = tmp_path / "test_x.py"
    src.write_text("import subprocess\n\ndef _go():\n    return subprocess.run(['true'])\n\n"
                   "def test_a():\n    _go()\n\ndef test_b():\n    subprocess.Popen(['true'])\n\ndef test_c():\n    pass\n")
    assert _tests_that_launch(src) == {"test_a", "test_b"}


def test_every_slow_entry_names_an_existing_test():
    for entry in SLOW_UNIT:
        path, _, name = entry.partition("::")
        file = REPO / path
        assert file.is_file(), entry
        if name:
            names = {n.name for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.FunctionDef)}
            assert name in names, entry


# ---------------------------------------------------------------- xdist work units (tests/conftest.py)

class _Config:
    def __init__(self, dist: str):
        self.dist = dist

    def getvalue(self, name: str):
        return {"dist": self.dist, "tx": ["2*popen"]}[name]


def test_files_sharing_a_session_fixture_are_one_work_unit():
    from tests.conftest import group_of

    assert group_of("tests/distributed/test_gather.py::test_x[a::b]") == "scenario_results"
    assert group_of("tests/distributed/test_multirank.py::test_y") == "scenario_results"
    assert group_of("tests/integration/test_slurm_quality.py::test_z") == "cluster"
    assert group_of("tests/unit/test_losses.py::test_rkl[bf16]") == "tests/unit/test_losses.py"


def test_a_shared_fixture_used_from_an_unlisted_file_fails_collection():
    from types import SimpleNamespace

    from tests.conftest import check_shared_fixtures

    check_shared_fixtures(SimpleNamespace(nodeid="tests/distributed/test_gather.py::t",
                                          fixturenames=["scenario_results", "tmp_path"]))
    check_shared_fixtures(SimpleNamespace(nodeid="tests/unit/test_x.py::t", fixturenames=["tmp_path"]))
    with pytest.raises(pytest.UsageError, match=r"SHARED_FIXTURES\['cluster'\]"):
        check_shared_fixtures(SimpleNamespace(nodeid="tests/integration/test_new.py::t", fixturenames=["cluster"]))


def test_the_loadscope_scheduler_splits_by_work_unit():
    pytest.importorskip("xdist")
    from tests.conftest import pytest_xdist_make_scheduler

    assert pytest_xdist_make_scheduler(_Config("load"), None) is None  # other modes stay xdist's own
    sched = pytest_xdist_make_scheduler(_Config("loadscope"), None)
    assert sched._split_scope("tests/distributed/test_lora_ranks.py::test_a") == "scenario_results"
    assert sched._split_scope("tests/unit/test_config.py::test_b[1]") == "tests/unit/test_config.py"


def test_long_units_are_real_units_and_go_first():
    from tests.conftest import LONG_UNITS, SHARED_FIXTURES, TIER_ORDER, order_of

    for unit in LONG_UNITS:
        assert unit in SHARED_FIXTURES or (REPO / unit).is_file(), f"LONG_UNITS names no unit: {unit}"
    ranks = [order_of(unit, "unit") for unit in LONG_UNITS]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    # every other unit after every long one, in tier order
    others = [order_of("tests/x/test_y.py", tier) for tier in TIER_ORDER]
    assert min(others) > max(ranks) and others == sorted(others)
