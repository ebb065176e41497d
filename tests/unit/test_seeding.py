"""One seeding rule: promptkd.seeding.derive_seed gives every derived seed; it reproduces the schemes it replaced."""
from __future__ import annotations

import ast
import hashlib
import itertools
import re
from pathlib import Path

import pytest

from promptkd.seeding import COORDINATES, PURPOSES, derive_seed
from tests.fixtures.scan import scan_library

PKG = Path(__file__).resolve().parents[2] / "promptkd"
SEEDING_FILE = PKG / "seeding.py"


def _old_request_seed(seed: int, step: int, rank: int, index: int) -> int:
    """rollout/vllm.py's request_seed before the rule (written out: its values must not move)."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@pytest.mark.parametrize("seed", [0, 1, 42, 1234])
def test_todays_seeds_are_reproduced(seed):
    for rank in range(4):
        assert derive_seed(seed, "rollout", rank=rank) == 7919 * seed + rank        # training/run.py
        assert derive_seed(seed, "eval", rank=rank) == seed * 1000 + rank           # evaluation/core.py, exposure
        for step, i in itertools.product((0, 3), (0, 5)):
            assert derive_seed(seed, "rollout_request", step=step, rank=rank, index=i) == \
                _old_request_seed(7919 * seed, step, rank, i)                        # VLLMRollouts
    assert derive_seed(seed, "shared") == seed + 104_729                             # methods/token_kd.py
    assert derive_seed(seed, "request", index=17) == _old_request_seed(seed, 0, 0, 17)  # vLLM eval, SeqKD
    assert derive_seed(seed, "lm_corpus", index=3) == seed * 1_000_003 + 3           # data/corpus.py
    assert derive_seed(seed, "model_init", index=1) == seed + 1                       # the tiny student
    assert derive_seed(seed, "rollout", rank=1, base=100) == 101                      # build_run(rollout_seed=100)


def _all_seeds(seed: int, ranks: int = 8, steps: int = 3, indices: int = 4) -> dict[tuple, int]:
    """(purpose, coordinates) -> seed, over every coordinate a purpose reads, for one run seed."""
    ranges = {"rank": range(ranks), "step": range(steps), "micro_batch": range(2), "index": range(indices)}
    out = {}
    for name, purpose in PURPOSES.items():
        for values in itertools.product(*(ranges[c] for c in purpose.uses)):
            coords = dict(zip(purpose.uses, values))
            out[(name, tuple(sorted(coords.items())))] = derive_seed(seed, name, **coords)
    return out


@pytest.mark.parametrize("seed", [1, 7, 20])
def test_distinct_purposes_and_coordinates_give_distinct_seeds(seed):
    seeds = _all_seeds(seed)
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds.values())


def test_the_rollout_and_eval_streams_of_any_two_seeds_differ():
    """Dev eval samples with the run seed, test eval with eval.seeds: no eval stream is a rollout stream."""
    rollout = {derive_seed(s, "rollout", rank=r) for s in range(1, 51) for r in range(8)}
    evals = {derive_seed(s, "eval", rank=r) for s in range(1, 51) for r in range(8)}
    shared = {derive_seed(s, "shared") for s in range(1, 51)}
    assert not rollout & evals and not rollout & shared and not evals & shared


def test_a_coordinate_a_purpose_does_not_read_is_refused():
    with pytest.raises(ValueError, match="'shared' reads"):
        derive_seed(1, "shared", rank=1)  # the shared draws must be the same on every rank
    with pytest.raises(ValueError, match="'rollout' reads"):
        derive_seed(1, "rollout", step=3)  # the rollout stream continues; its state is checkpointed
    with pytest.raises(ValueError, match="unknown seed purpose"):
        derive_seed(1, "dropout")
    assert set(c for p in PURPOSES.values() for c in p.uses) <= set(COORDINATES)


# ----------------------------------------------------------------------------- the rule holds in the library

def _seed_arithmetic(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of every seed computed outside the rule: manual_seed on an expression that is not a
    name or derive_seed(...), arithmetic on a name with "seed" in it, and a function named ``*_seed``."""

    def named_seed(node: ast.AST) -> bool:
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        return "seed" in name.lower()

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "manual_seed":
            arg = node.args[0] if node.args else None
            direct = isinstance(arg, (ast.Name, ast.Attribute))
            ruled = isinstance(arg, ast.Call) and getattr(arg.func, "id", getattr(arg.func, "attr", "")) == "derive_seed"
            if not (direct or ruled):
                out.append((node.lineno, "manual_seed(" + ast.unparse(arg or node) + ")"))
        elif isinstance(node, ast.BinOp) and (named_seed(node.left) or named_seed(node.right)):
            out.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.FunctionDef) and re.search(r"(^|_)seed$", node.name):
            out.append((node.lineno, f"def {node.name}"))
    return out


def test_every_seed_in_the_library_comes_from_the_rule():
    found = scan_library(lambda path, tree: _seed_arithmetic(tree), exclude=[SEEDING_FILE])
    assert not found, "seeds derived outside promptkd/seeding.py:\n" + "\n".join(found)


def test_the_seed_scan_can_fail():
    for old in ("g.manual_seed(seed * 1000 + dist.rank())",               # the old eval generator
                "torch.Generator().manual_seed(seed + SHARED_SEED_OFFSET)",  # the old shared draws
                "s = ROLLOUT_SEED_FACTOR * cfg.seed",                       # the old rollout base
                "kw = {'seed': seed + rank}",                               # the old vLLM engine seed
                "def request_seed(seed, step, rank, index): pass"):
        assert _seed_arithmetic(ast.parse(old)), old
    assert not _seed_arithmetic(ast.parse("g.manual_seed(derive_seed(seed, 'eval', rank=r)); torch.manual_seed(seed)"))


def test_the_rule_imports_only_the_standard_library():
    """Config-level code (data, the planner) can derive seeds without torch."""
    import sys

    tree = ast.parse(SEEDING_FILE.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names and names <= set(sys.stdlib_module_names) | {"__future__"}, names
