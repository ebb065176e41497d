"""Losses have one argument order (the student first, the rest keyword-only), and divergences one table.

The divergence names are in promptkd/config/divergences.py (torch-free: config validation reads them);
promptkd/losses/core.py maps the same names to their functions. No other literal list of them exists.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
import torch

import promptkd.losses
from promptkd.config import Config, ConfigError, DistiLLMConfig, DivergenceConfig, with_overrides
from promptkd.config.divergences import DIVERGENCE_NAMES, DIVERGENCES, SKEW_DIVERGENCES
from promptkd.losses import forward_kl, reverse_kl
from promptkd.losses.core import DIVERGENCE_FNS
from tests.fixtures.scan import literal_names, scan_library

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "promptkd"
TABLE_FILE = PKG / "config" / "divergences.py"
FNS_FILE = PKG / "losses" / "core.py"

# KL(p || q) of any two distributions: the primitives the named losses are built from, with no student in them
ROLE_FREE = {"kl_divergence", "skew_kl"}
MODEL_ARGS = {"student", "teacher", "prompted"}


# ----------------------------------------------------------------------------- one argument order

def _is_loss(fn: Callable) -> bool:
    """A model's logits and a mask go in (helpers such as ``auto_chunk(logits)`` take no mask)."""
    names = set(inspect.signature(fn).parameters)
    return "mask" in names and (bool(names & MODEL_ARGS) or any(n.endswith("logits") for n in names))


def _loss_functions() -> Iterator[tuple[str, Callable]]:
    """Every public loss function of every promptkd.losses module."""
    for info in pkgutil.iter_modules(promptkd.losses.__path__):
        module = importlib.import_module(f"promptkd.losses.{info.name}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__ and not name.startswith("_") and (
                    name in ROLE_FREE or _is_loss(fn)):
                yield f"{info.name}.{name}", fn


def _order_problem(fn: Callable, n_positional: int = 1) -> Optional[str]:
    """Why ``fn``'s signature breaks the rule (its first positional is ``student``, the rest keyword-only)."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != n_positional or params[:n_positional] != positional:
        return f"{len(positional)} positional parameters, expected {n_positional}"
    if any(p.kind != p.KEYWORD_ONLY for p in params[n_positional:]):
        return "parameters after the positional ones must be keyword-only"
    if n_positional == 1 and positional[0].name != "student":
        return f"the first parameter is {positional[0].name!r}, not 'student'"
    return None


def test_every_loss_takes_the_student_first_and_the_rest_by_keyword():
    found = dict(_loss_functions())
    # the scan sees the losses (it could not fail if it saw none)
    assert {"core.forward_kl", "core.reverse_kl", "core.token_divergence", "core.prompt_loss",
            "core.generalized_jsd", "pg.minillm_terms", "pg.sampled_logprobs"} <= set(found)
    wrong = [f"{name}: {problem}" for name, fn in sorted(found.items())
             if (problem := _order_problem(fn, 2 if name.split(".")[1] in ROLE_FREE else 1))]
    assert not wrong, "\n".join(wrong)


def test_role_free_primitives_name_no_model():
    for name in ROLE_FREE:
        params = list(inspect.signature(getattr(promptkd.losses, name)).parameters)
        assert params[:2] == ["p", "q"] and not set(params) & MODEL_ARGS, (name, params)


def test_the_order_check_can_fail():
    def old_fkl(teacher_logits, student_logits, mask, chunk_size=None): ...

    def swapped(teacher, *, student, mask): ...

    def positional_teacher(student, teacher, *, mask): ...

    def good(student, *, teacher, mask, chunk_size=None): ...

    assert _is_loss(old_fkl) and _order_problem(old_fkl)
    assert _order_problem(swapped) and _order_problem(positional_teacher)
    assert _order_problem(good) is None


def test_keywords_reach_the_right_model():
    """forward_kl(s, teacher=t) is KL(p_T || p_S), reverse_kl(s, teacher=t) is KL(p_S || p_T) (written out)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.ones(2, 3)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    want_fkl = (lt.exp() * (lt - ls)).sum()
    want_rkl = (ls.exp() * (ls - lt)).sum()
    assert torch.allclose(forward_kl(s, teacher=t, mask=mask)[0], want_fkl, rtol=1e-5)
    assert torch.allclose(reverse_kl(student=s, teacher=t, mask=mask)[0], want_rkl, rtol=1e-5)
    assert not torch.allclose(want_fkl, want_rkl, rtol=1e-3)  # the two directions differ here
    with pytest.raises(TypeError):
        forward_kl(s, t, mask)  # type: ignore[misc]  # positional teacher: refused


# ----------------------------------------------------------------------------- one table of divergences

def test_the_loss_table_and_the_config_table_hold_the_same_names():
    assert set(DIVERGENCE_FNS) == set(DIVERGENCES) == set(DIVERGENCE_NAMES)
    assert all(spec.name == name for name, spec in DIVERGENCES.items())


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_each_divergence_reads_its_knob_only(name):
    params = inspect.signature(DIVERGENCE_FNS[name]).parameters
    knob = DIVERGENCES[name].knob
    assert {"beta", "alpha"} & set(params) == ({knob} if knob else set()), (name, list(params))
    if knob:
        assert params[knob].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_fused_flag_says_which_divergences_take_the_fused_kernel(name):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 9, generator=g).requires_grad_(True)
    t = torch.randn(2, 4, 9, generator=g)
    loss, _ = DIVERGENCE_FNS[name](s, teacher=t, mask=torch.ones(2, 4))
    assert ("FusedChunkedKL" in loss.grad_fn.name()) == DIVERGENCES[name].fused, (name, loss.grad_fn.name())


def test_config_choices_come_from_the_table():
    assert DivergenceConfig.__dataclass_fields__["divergence"].metadata["choices"] == DIVERGENCE_NAMES
    assert DistiLLMConfig.__dataclass_fields__["loss"].metadata["choices"] == SKEW_DIVERGENCES
    assert SKEW_DIVERGENCES and all(DIVERGENCES[n].knob == "alpha" for n in SKEW_DIVERGENCES)
    base = {"method.name": "gkd", "data.synthetic.enabled": True}
    assert with_overrides(Config(), {**base, "method.gkd.divergence": "tvd"}).method.gkd.divergence == "tvd"
    with pytest.raises(ConfigError, match="method.gkd.divergence"):
        with_overrides(Config(), {**base, "method.gkd.divergence": "hellinger"})


def _divergence_lists(tree: ast.AST, allowed: set[int] = frozenset()) -> list[tuple[int, list[str]]]:
    """(line, names) of every literal collection naming two or more divergences (but the ``allowed`` nodes)."""
    return literal_names(tree, DIVERGENCES, allowed)


def _the_function_map(tree: ast.AST) -> set[int]:
    """The DIVERGENCE_FNS dict literal of losses/core.py (its keys are checked against the table above)."""
    return {id(node.value) for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
            and any(isinstance(t, ast.Name) and t.id == "DIVERGENCE_FNS"
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))}


def test_no_other_list_of_divergence_names_in_the_library():
    def find(path: Path, tree: ast.AST) -> list[tuple[int, list[str]]]:
        allowed = _the_function_map(tree) if path == FNS_FILE else set()
        assert path != FNS_FILE or len(allowed) == 1
        return _divergence_lists(tree, allowed)

    found = scan_library(find, exclude=[TABLE_FILE])
    assert not found, "divergence names listed outside promptkd/config/divergences.py:\n" + "\n".join(found)


def test_the_divergence_scan_can_fail():
    assert _divergence_lists(ast.parse('if d in ("fkl", "rkl"): pass'))           # the old fused_loss check
    assert _divergence_lists(ast.parse('DIVERGENCES = ("fkl", "rkl", "jsd")'))    # the old second table
    assert not _divergence_lists(ast.parse('M = ("promptkd", "rkl")'))            # one name is not a list
