"""The engine's layering, checked over its import graph (every import, also those inside
functions): iet_core never imports the app, a module imports only modules of lower layers, and
there is no import loop."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "iet_core"
# Lowest first. A module may import only modules of a lower layer.
LAYERS = [
    {"config", "optim", "telemetry"},
    {"metrics", "data", "shards", "agc", "distributed", "neighbours", "models", "trackers"},
    {"runs"},
    {"sample", "fid"},
    {"quality", "train", "history", "owners"},
    {"reference", "evaluate"},
    {"jobs"},
    {"cli"},
    {"experiments"},
    {"__init__", "__main__"},
]
UI = ("gradio", "app", "pages", "plotly")


def imports(path: Path) -> set[str]:
    """Top-level names this module imports, as `iet_core.<module>` for the package's own."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .x import y
                base = node.module.split(".")[0] if node.module else None
                found |= {f"iet_core.{base}"} if base else {f"iet_core.{alias.name}" for alias in node.names}
            elif node.module:
                found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {path.stem: {name.split(".")[1] for name in imports(path) if name.startswith("iet_core.")}
            for path in PACKAGE.glob("*.py")}


def layer(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if module in members:
            return index
    raise AssertionError(f"iet_core/{module}.py has no layer: add it to LAYERS in tests/test_layers.py")


def find_loop(edges: dict[str, set[str]]) -> list[str] | None:
    """One import loop as a path of modules, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target] if target in path else [node, target]
            if target not in state and (loop := visit(target, path + [target])):
                return loop
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (loop := visit(start, [start])):
            return loop
    return None


def test_the_engine_never_imports_the_app():
    for path in PACKAGE.glob("*.py"):
        ui = sorted(name for name in imports(path) if name.split(".")[0] in UI)
        assert not ui, f"iet_core/{path.name} imports {ui}: the engine must not know the UI"


def test_modules_import_only_lower_layers():
    wrong = [f"{module} -> {target}" for module, targets in graph().items() for target in targets
             if layer(target) >= layer(module)]
    assert not wrong, f"imports that go up or sideways: {wrong}"


def test_there_is_no_import_loop():
    assert find_loop(graph()) is None


@pytest.mark.parametrize("edges, loop", [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
                                         ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False)])
def test_the_loop_finder_finds_loops(edges, loop):
    assert (find_loop(edges) is not None) == loop
