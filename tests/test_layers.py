"""Imports only go down the README's architecture table: every ``bilevel_dist`` import, lazy ones
included, lands in the same layer or a lower one, and the import graph has no cycle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "bilevel_dist"
# the README's layers, bottom first; each top-level module or package of bilevel_dist in one
LAYERS = [
    {"tree", "_checks", "_autograd", "metrics", "problem", "linalg", "label_noise"},
    {"shared_memory", "distributed"},
    {"oracles"},
    {"solvers"},
    {"hypergrad", "compiled", "api", "__init__"},
    {"algorithms", "problems"},
    {"lightning", "lightning_cli", "figures"},
    {"tune", "cli", "health"},
    {"recipes"},
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part(module: str) -> str:
    """The top-level module or package of ``bilevel_dist`` that ``module`` belongs to."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "bilevel_dist":  # from bilevel_dist import tree
                targets |= {f"bilevel_dist.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bilevel_dist."):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("bilevel_dist")}
        graph[module_name(path)] = targets
    return graph


def test_every_module_has_a_layer():
    assert {part(m) for m in imports()} <= set(LAYER), sorted({part(m) for m in imports()} - set(LAYER))


def test_no_import_runs_upward():
    upward = [
        (source, target)
        for source, targets in imports().items()
        for target in targets
        if LAYER[part(target)] > LAYER[part(source)]
    ]
    assert not upward, upward


@pytest.mark.parametrize("start", ["bilevel_dist.tune.sweep", "bilevel_dist.cli", "bilevel_dist.lightning.module"])
def test_no_import_cycle_between_parts(start):
    """Between top-level parts (a package may import its own modules in any order)."""
    graph: dict[str, set[str]] = {}
    for source, targets in imports().items():
        graph.setdefault(part(source), set()).update(part(t) for t in targets if part(t) != part(source))

    def reaches(node: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(node, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    first = part(start)
    assert not reaches(first, first, {first}), first
