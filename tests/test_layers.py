"""The service's import graph points down only (docs/architecture.md):

    app, __main__  ->  orders | events  ->  streams  ->  rpc  ->  ops  ->  db  ->  settings, errors

A module may import its own subpackage and anything below it; orders and
events are siblings and never import each other; there are no cycles. Read
from the source with `ast`, so nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"

# Rank of each layer: a module may import ranks no higher than its own,
# and a rank shared by two subpackages (orders, events) only from its own.
LAYERS = {
    "service.__main__": 7,
    "service.app": 6,
    "service.orders": 5,
    "service.events": 5,
    "service.streams": 4,
    "service.rpc": 3,
    "service.ops": 2,
    "service.db": 1,
    "service.settings": 0,
    "service.errors": 0,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    if module == "service":  # the package's own __init__, which imports nothing
        return "service.__main__"
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def _imports(path: Path) -> set[str]:
    """The service modules `path` imports (`from service.x import y` counts
    as service.x.y when that is a module, else service.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("service"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("service"):
            base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (SERVICE.parent / (candidate.replace(".", "/") + ".py")).exists()
                found.add(candidate if is_module else base)
    return found


GRAPH = {
    _module_name(path): _imports(path) - {_module_name(path)} for path in SERVICE.rglob("*.py")
}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str) -> None:
    own = _layer(module)
    for target in GRAPH[module]:
        if target == "service":
            continue
        theirs = _layer(target)
        assert LAYERS[theirs] < LAYERS[own] or theirs == own, (
            f"{module} ({own}) imports {target} ({theirs}), which is not below it"
        )


def test_no_cycles() -> None:
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in GRAPH.get(module, ()):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target] if target in path else [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
