"""pyproject.toml's floors cover what the code needs (promptkd/config/versions.py), and the start-up check works."""
from __future__ import annotations

import re
import tomllib

import pytest

from promptkd.config import versions
from tests.fixtures.cli import REPO


def _floors() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", dep.split(";")[0].strip())
        if match:
            out[match.group(1).lower()] = match.group(2)
    return out


@pytest.mark.parametrize("name", sorted(versions.MINIMUM))
def test_pyproject_floor_is_at_least_what_the_code_needs(name):
    floors = _floors()
    assert name in floors, f"pyproject.toml has no '{name}>=' floor"
    assert versions.at_least(floors[name], versions.MINIMUM[name]), \
        f"pyproject.toml allows {name} {floors[name]}, the code needs {versions.MINIMUM[name]}"


def test_the_known_floors():
    # the reasons are in versions.py: SDPA NaN rows (torch), ZeRO-3 frozen-param recompute (deepspeed)
    assert versions.at_least(versions.MINIMUM["torch"], "2.5")
    assert versions.at_least(versions.MINIMUM["deepspeed"], "0.19.8")
    assert versions.at_least(versions.MINIMUM["transformers"], "5.0")


def test_version_parsing():
    assert versions.parse("2.13.0+cpu") == (2, 13, 0) and versions.parse("5.0.0rc1") == (5, 0, 0)
    assert versions.at_least("0.19.10", "0.19.8") and not versions.at_least("0.19.7", "0.19.8")
    assert versions.at_least("2.5", "2.5.0") and not versions.at_least("2.4.1", "2.5")
    with pytest.raises(ValueError):
        versions.parse("dev")


def test_too_old_names_each_library():
    problems = versions.too_old({"torch": "2.4.1+cu121", "deepspeed": "0.19.8", "transformers": "4.57.1"})
    assert problems == ["torch 2.4.1+cu121 is older than the 2.5 this code needs",
                        "transformers 4.57.1 is older than the 5.0 this code needs"]


def test_installed_libraries_pass_and_an_old_one_is_a_clear_error(monkeypatch):
    versions.check_installed()  # this environment meets the floors
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.14.0")
    with pytest.raises(RuntimeError, match=r"deepspeed 0\.14\.0 is older than the 0\.19\.8 this code needs"):
        versions.check_installed()
