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
    {"config", "optim", "telemetry", "families"},
    {"hub"},  # Hub ids to local snapshots, for every loader above it
    {"metrics", "data", "shards", "agc", "distributed", "neighbours", "models", "trackers"},
    {"runs", "features", "text2image.model", "text2image.tiny"},
    {"sample", "fid", "text2image.export", "text2image.cache"},
    {"quality", "train", "history", "owners"},
    {"reference", "evaluate"},
    {"jobs", "text2image.evaluate"},
    {"cli", "text2image.train"},
    {"experiments", "text2image"},  # the package registers its family with the engine (iet_core.families)
    {"__init__", "__main__"},
]
UI = ("gradio", "app", "pages", "plotly")


def module_name(path: Path) -> str:
    """"data" for iet_core/data.py, "text2image.model" for iet_core/text2image/model.py,
    "text2image" for its __init__.py (the package's own __init__ stays "__init__")."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Absolute names this module imports (the package's own as `iet_core.<module>`)."""
    package = ["iet_core", *path.relative_to(PACKAGE).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..x import y
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                found |= {base} if node.module else {f"{base}.{alias.name}" for alias in node.names}
            elif node.module:
                found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (a submodule where one is named, else the package)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports(path):
            if imported.startswith("iet_core."):
                parts = imported.split(".")[1:]
                while parts and ".".join(parts) not in modules:
                    parts.pop()  # an attribute of a module: the module
                targets |= {".".join(parts)} if parts else set()
        edges[name] = targets - {name}
    return edges


def layer(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if module in members:
            return index
    raise AssertionError(f"iet_core module {module!r} has no layer: add it to LAYERS in tests/test_layers.py")


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
    for path in PACKAGE.rglob("*.py"):
        ui = sorted(name for name in imports(path) if name.split(".")[0] in UI)
        assert not ui, f"{path.relative_to(PACKAGE.parent)} imports {ui}: the engine must not know the UI"


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
