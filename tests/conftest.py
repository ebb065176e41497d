"""Make the repo root importable without installing the package, and sort every test into its tier.

Tiers (markers), applied here by directory:
- ``unit``: tests/unit, in-process (the whole tier runs in under 2 minutes on 2 cores): ``pytest -m unit``;
- ``slow``: the unit tests that launch a subprocess or take over 5 s (``SLOW_UNIT``): ``pytest -m slow``;
- ``distributed``: tests/distributed, 2-rank gloo launches: ``pytest -m distributed``;
- ``integration``: tests/integration and tests/engine_vllm, the real CLI: ``pytest -m integration``.
``pytest tests`` runs them all. tests/unit/test_tiers.py checks ``SLOW_UNIT`` against the tests that launch.
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
    "tests/unit/test_config.py::test_config_package_imports_only_stdlib_and_yaml",
    "tests/unit/test_eval_stage.py::test_compare_cli_entry_point",
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
            item.add_marker(pytest.mark.slow)
        else:
            item.add_marker(getattr(pytest.mark, tier))
