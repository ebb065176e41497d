"""Make the repo root importable without installing the package, and sort every test into its tier.

Tiers (markers), applied here by directory:
- ``unit``: tests/unit, in-process (the whole tier runs in under 2 minutes on 2 cores): ``pytest -m unit``;
- ``slow``: the unit tests that launch a subprocess or take over 5 s (``SLOW_UNIT``): ``pytest -m slow``;
- ``distributed``: tests/distributed, 2-rank gloo launches: ``pytest -m distributed``;
- ``integration``: tests/integration and tests/engine_vllm, the real CLI: ``pytest -m integration``.
``pytest tests`` runs them all. tests/unit/test_tiers.py checks ``SLOW_UNIT`` against the tests that launch.

The suite runs on two pytest-xdist workers (``-n 2 --dist loadscope`` in pyproject.toml): the unit tests and
many launches are one thread, and the SLURM tests wait on the scheduler, so one process leaves a core idle. The
work units are ``group_of``: a test file (its module fixtures run once), except that the files sharing an
expensive session fixture (``SHARED_FIXTURES``) are one unit, so that fixture runs once. ``pytest_xdist_make_scheduler``
hands the units out in collection order: the longest units first (``LONG_UNITS``), then the launch-heavy tiers
(``TIER_ORDER``), so that the short in-process tests fill the end. (xdist's own ``loadgroup`` marks do not group
under pytest 9.2: pytest-dev/pytest-xdist#1386.) ``-n 0`` runs everything in one process.
"""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TIERS = {
    "unit": "in-process unit tests (tests/unit, fast)",
    "slow": "unit tests that launch a subprocess or take over 5 s",
    "distributed": "multi-rank gloo launches (tests/distributed)",
    "integration": "the real launcher and CLI (tests/integration, tests/engine_vllm)",
}
DIR_TIER = {"unit": "unit", "distributed": "distributed", "integration": "integration", "engine_vllm": "integration"}

# tests/unit tests in the slow tier: "file" (all its tests) or "file::test" (all its parameters)
SLOW_UNIT = (
    # these two share one fixture that runs gpu.sh's dry run (~42 s of CPU) and the toy child (~12 s) side by side
    "tests/unit/test_bench_smoke.py::test_gpu_sh_dry_run_runs_every_section_in_order_with_full_logs",
    "tests/unit/test_bench_smoke.py::test_bench_core_functions_run_at_toy_sizes",
    "tests/unit/test_bench_smoke.py::test_quality_bench_smoke_on_a_dolly_dir_runs_every_method",  # ~9 min
    "tests/unit/test_bench_smoke.py::test_quality_lr_search_picks_on_dev_and_writes_the_config",  # ~2 min
    "tests/unit/test_multi_answer.py::test_quality_multi_config_smoke",  # bench/quality.py --smoke, ~70 s here
    "tests/unit/test_light_imports.py::test_light_entry_points_import_no_torch",
    "tests/unit/test_eval_stage.py::test_compare_cli_entry_point",
    # two threads race on one count, 12 rounds (~9 s)
    "tests/unit/test_plan_measure.py::test_frees_from_other_threads_are_counted_exactly_while_this_one_counts",
)


# session-scoped fixtures used by several test files -> those files: one xdist work unit each (collection fails
# when a test uses one of these from a file not listed)
SHARED_FIXTURES = {
    "scenario_results": ("tests/distributed/test_multirank.py", "tests/distributed/test_gather.py",
                         "tests/distributed/test_device_ranks.py", "tests/distributed/test_lora_ranks.py",
                         "tests/distributed/test_fused_ranks.py", "tests/distributed/test_eval_ranks.py",
                         "tests/distributed/test_chat_families.py"),
    "cluster": ("tests/integration/test_slurm.py", "tests/integration/test_slurm_quality.py"),
}
FILE_GROUP = {file: fixture for fixture, files in SHARED_FIXTURES.items() for file in files}
# the order groups are handed to the workers: the tiers made of long launches first
TIER_ORDER = ("distributed", "integration", "slow", "unit")
# ...except that the longest units go before all others, longest first (seconds on one of the two workers,
# 2026-12-04): handed out late, one of them ran alone for its last two minutes while the other worker was done
LONG_UNITS = (
    "scenario_results",                          # ~270 s: the 2- and 3-rank scenario launches and what reads them
    "tests/integration/test_shipped_configs.py",  # ~215 s: every configs/*.yaml
    "tests/integration/test_reliability.py",     # ~180 s: the SIGKILL resumes
    "cluster",                                   # ~170 s: the SLURM tests
    "tests/unit/test_bench_smoke.py",            # ~130 s: the bench and quality smoke runs
    "tests/integration/test_plan_cli.py",        # ~105 s
    "tests/integration/test_chat_pipeline.py",   # ~80 s
)


def item_key(item: pytest.Item) -> tuple[str, str]:
    """(file relative to the repo, test function name without parameters)."""
    path = Path(str(item.fspath)).resolve()
    return path.relative_to(REPO).as_posix(), getattr(item, "originalname", item.name)


def is_slow_unit(key: tuple[str, str]) -> bool:
    path, name = key
    return path in SLOW_UNIT or f"{path}::{name}" in SLOW_UNIT


def pytest_configure(config: pytest.Config) -> None:
    for name, text in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def group_of(nodeid: str) -> str:
    """The xdist work unit of a test: its file, or the shared session fixture its file uses."""
    file = nodeid.split("::", 1)[0]
    return FILE_GROUP.get(file, file)


UNRANKED = len(LONG_UNITS) + len(TIER_ORDER)


def order_of(unit: str, tier: str) -> int:
    """Where a unit with a test of ``tier`` is handed out: a long unit by its place in LONG_UNITS, else by tier."""
    if unit in LONG_UNITS:
        return LONG_UNITS.index(unit)
    return len(LONG_UNITS) + TIER_ORDER.index(tier)


def check_shared_fixtures(item: pytest.Item) -> None:
    """A test using a shared session fixture must sit in that fixture's unit (else the fixture runs twice)."""
    for fixture in SHARED_FIXTURES:
        if fixture in getattr(item, "fixturenames", ()) and group_of(item.nodeid) != fixture:
            raise pytest.UsageError(f"{item.nodeid} uses the session fixture {fixture!r}: add its file to "
                                    f"SHARED_FIXTURES[{fixture!r}] in tests/conftest.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unit_rank: dict[str, int] = {}  # work unit -> its place: LONG_UNITS, then the first tier among its tests
    for item in items:
        try:
            key = item_key(item)
        except ValueError:  # a test outside this repo
            continue
        parts = key[0].split("/")
        tier = DIR_TIER.get(parts[1]) if len(parts) > 2 and parts[0] == "tests" else None
        if tier is None:
            continue
        if tier == "unit" and (item.get_closest_marker("slow") is not None or is_slow_unit(key)):
            tier = "slow"
        item.add_marker(getattr(pytest.mark, tier))
        check_shared_fixtures(item)
        unit = group_of(item.nodeid)
        unit_rank[unit] = min(unit_rank.get(unit, UNRANKED), order_of(unit, tier))
    # a unit's tests stay together (one module fixture setup, also at -n 0)
    items.sort(key=lambda item: unit_rank.get(group_of(item.nodeid), UNRANKED))  # stable


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadscope`` with ``group_of`` as the unit, in collection order."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)
