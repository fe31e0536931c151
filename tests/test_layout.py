"""The package's plan: imports flow only downward and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The layer order, bottom first. A module may import its own layer or any lower one, never a higher one.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("apple_video", "apple_video.errors"),
    ("apple_video.config", "apple_video.settings", "apple_video.weights", "apple_video.progress", "apple_video.media"),
    ("apple_video.faces",),
    ("apple_video.sampling",),
    ("apple_video.models",),
    ("apple_video.swappers",),
    ("apple_video.engine", "apple_video.evaluate"),
    ("training", "cli", "benchmarks"),
)


def _layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, rooms in enumerate(LAYERS):
        for room in rooms:
            if module == room or module.startswith(room + "."):
                if best is None or len(room) > best[0]:
                    best = (len(room), index)
    return None if best is None else best[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in a file, lazy ones included."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from apple_video import weights` (or `engine`) imports the submodule (or subpackage)
                name = f"{base}.{alias.name}"
                found.append((name if _layer_of(name) is not None and _is_module(name) else base, id(node) in top))
    return found


def _is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _project_files() -> list[Path]:
    files = sorted((ROOT / "apple_video").rglob("*.py")) + sorted((ROOT / "training").rglob("*.py"))
    return files + [ROOT / "cli.py"]


def _graph() -> dict[str, list[tuple[str, bool]]]:
    graph = {}
    for path in _project_files():
        module = _module_name(path)
        graph[module] = [(name, top) for name, top in _imports(path, module) if _layer_of(name) is not None]
    return graph


def _upward(graph: dict[str, list[tuple[str, bool]]]) -> list[str]:
    found = []
    for module, imports in graph.items():
        mine = _layer_of(module)
        assert mine is not None, f"{module} is in no layer: add its room to LAYERS"
        for name, _ in imports:
            if _layer_of(name) > mine:
                found.append(f"{module} -> {name}")
    return found


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_upward_import():
    upward = _upward(_graph())
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circle():
    modules = _all_modules()
    graph = {module: sorted({name for name, _ in imports if name in modules}) for module, imports in _graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _all_modules() -> set[str]:
    return {_module_name(path) for path in _project_files()}


def test_layer_test_sees_a_violation(tmp_path):
    """The checkers themselves, on modules that break the rules: an upward import (also a lazy one inside a
    function, and a `from package import module` form) and an import circle are reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from apple_video.media.images import read_image\n"
                   "from apple_video import engine\n\n"
                   "def later():\n    from apple_video.models.pipeline import ApplePipeline\n")
    imports = [(name, top) for name, top in _imports(bad, "apple_video.faces.bad") if _layer_of(name) is not None]
    assert ("apple_video.models.pipeline", False) in imports  # lazy imports are seen, and marked lazy
    upward = _upward({"apple_video.faces.bad": imports})
    assert sorted(upward) == ["apple_video.faces.bad -> apple_video.engine", "apple_video.faces.bad -> apple_video.models.pipeline"]
    assert _upward({"apple_video.engine.good": [("apple_video.faces.detect", True)]}) == []
    circle = _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]})
    assert circle == [["a", "b", "c", "a"]]
    assert _cycles({"a": ["b"], "b": ["c"], "d": ["a"]}) == []
