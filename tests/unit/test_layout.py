"""The library's parts import downward only: a layer imports its own part or lower layers, never higher."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "promptkd"

# lowest first; a part is a top-level module or package of promptkd/
LAYERS = [
    {"distributed", "config", "seeding"},
    {"data", "metrics"},
    {"models"},                                  # below rollout: the decode loop asks models.forward what a forward takes
    {"losses", "rollout", "optim"},
    {"methods", "evaluation"},
    {"training"},
    {"compare", "consolidate", "plan"},
    {"stages"},                      # the one dispatch of every stage, plan included
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> set[str]:
    """Parts named by every import in the file (function-level ones too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "promptkd"
                                     else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            bits = name.split(".")
            if bits[0] == "promptkd" and len(bits) > 1:
                out.add(bits[1])
    return out


def test_every_part_has_a_layer():
    parts = {_part(p) for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT}
    assert parts == set(LAYER), parts ^ set(LAYER)


def test_imports_go_downward():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.parent == ROOT and path.name == "__init__.py":
            continue
        me = _part(path)
        for other in _imported_parts(path) - {me}:
            if LAYER[other] >= LAYER[me]:
                wrong.append(f"{path.relative_to(ROOT)} ({me}, layer {LAYER[me]}) imports {other} (layer {LAYER[other]})")
    assert not wrong, "\n".join(wrong)
