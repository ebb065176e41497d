"""The README's test command is what CI runs, and it installs what the tests need (issue 20)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _readme_test_command() -> str:
    quickstart = (REPO / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    lines = quickstart.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("# 2. ") and "test suite" in line)
    return lines[at + 1].strip()


def _ci_command() -> str:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")][-1]


def _module_constants(path: Path, names: tuple[str, ...]) -> dict:
    """Top-level literal assignments of a module, read without importing it (that one imports torch)."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and getattr(node.targets[0], "id", "") in names:
            out[node.targets[0].id] = ast.literal_eval(node.value)
    assert set(out) == set(names), f"{path}: {sorted(set(names) - set(out))} not found"
    return out


def test_ci_runs_the_readme_test_command():
    command = _readme_test_command()
    assert command == _ci_command()
    # every tier (no -m filter), and the install step that brings SLURM for tests/integration/test_slurm.py
    assert command.startswith("bash scripts/install.sh --tests && .venv/bin/python -m pytest tests &&"), command
    assert " -m " not in command.replace("python -m pytest", "")


def test_install_checks_the_slurm_binaries_the_slurm_tests_need():
    names = _module_constants(REPO / "tests" / "integration" / "test_slurm.py", ("CLIENTS", "DAEMONS"))
    script = (REPO / "scripts" / "install.sh").read_text()
    listed = re.search(r"^SLURM_BINARIES=\(([^)]*)\)", script, re.M)
    assert listed, "scripts/install.sh has no SLURM_BINARIES=(...) line"
    assert set(listed[1].split()) == set(names["CLIENTS"] + names["DAEMONS"])
    packages = re.search(r"^SLURM_PACKAGES=\(([^)]*)\)", script, re.M)
    assert packages and set(packages[1].split()) == {"slurmctld", "slurmd", "slurm-client", "munge"}
