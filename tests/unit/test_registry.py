"""The method registry is the one place that names the methods and says what each needs.

It imports without torch: test_config.py::test_config_package_imports_only_stdlib_and_yaml covers it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from promptkd.config import METHOD_NAMES, REGISTRY, Config, MethodConfig, with_overrides
from promptkd.methods import METHODS
from tests.fixtures.scan import literal_names, scan_library

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "promptkd"
REGISTRY_FILE = PKG / "config" / "registry.py"


def _name_collections(tree: ast.AST) -> list[tuple[int, list[str]]]:
    """(line, names) of every literal collection holding two or more method names."""
    return literal_names(tree, REGISTRY)


def test_no_list_of_method_names_outside_the_registry():
    found = scan_library(lambda path, tree: _name_collections(tree), exclude=[REGISTRY_FILE])
    assert not found, "method names listed outside promptkd/config/registry.py:\n" + "\n".join(found)


def test_the_scan_sees_a_list_of_method_names():
    # the scan above must be able to fail: the old schema check, and the old METHODS dict
    assert _name_collections(ast.parse('if name in ("promptkd", "rkl", "gkd"): pass'))
    assert _name_collections(ast.parse('M = {"sft": SFT, "kd": KD}'))
    assert not _name_collections(ast.parse('D = ("fkl", "rkl", "jsd")'))  # a divergence list names one method


def test_every_registry_entry_has_a_method_class_and_back():
    assert set(METHODS) == set(REGISTRY) == set(METHOD_NAMES)
    for name, cls in METHODS.items():
        spec = REGISTRY[name]
        assert cls.spec is spec and spec.name == name
        assert (cls.uses_teacher, cls.samples_student, cls.samples_mixture, cls.trains_prompt, cls.section) == \
               (spec.uses_teacher, spec.samples_student, spec.samples_mixture, spec.trains_prompt, spec.section)
        assert spec.section is None or hasattr(MethodConfig(), spec.section), (name, spec.section)


def test_method_name_choices_come_from_the_registry():
    assert MethodConfig.__dataclass_fields__["name"].metadata["choices"] == tuple(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_cfg_dependent_facts_start_from_the_static_ones(name):
    base = with_overrides(Config(), {"method.name": name, "model.teacher.prompt_length": 5,
                                     "data.synthetic.enabled": True})
    cls, spec = METHODS[name], REGISTRY[name]
    assert cls.teacher_prompt_length(base) == (5 if spec.trains_prompt else 0)
    variants = [base] + [with_overrides(base, {f"method.{spec.section}.divergence": d}) for d in ("fkl", "rkl")
                         if spec.section and hasattr(getattr(base.method, spec.section), "divergence")]
    fused = {cls.fused_loss(c) for c in variants}
    # a fused method is fused in some configuration of its section; an unfused one in none
    assert (True in fused) if spec.fused else fused == {False}

