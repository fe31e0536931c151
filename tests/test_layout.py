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
                # `from apple_video import weights` imports the submodule apple_video.weights
                found.append((f"{base}.{alias.name}" if _layer_of(f"{base}.{alias.name}") is not None
                              and (ROOT / Path(*f"{base}.{alias.name}".split("."))).with_suffix(".py").exists()
                              else base, id(node) in top))
    return found


def _project_files() -> list[Path]:
    files = sorted((ROOT / "apple_video").rglob("*.py")) + sorted((ROOT / "training").rglob("*.py"))
    return files + [ROOT / "cli.py"]


def _graph() -> dict[str, list[tuple[str, bool]]]:
    graph = {}
    for path in _project_files():
        module = _module_name(path)
        graph[module] = [(name, top) for name, top in _imports(path, module) if _layer_of(name) is not None]
    return graph


def test_no_upward_import():
    upward = []
    for module, imports in _graph().items():
        mine = _layer_of(module)
        assert mine is not None, f"{module} is in no layer: add its room to LAYERS"
        for name, _ in imports:
            if _layer_of(name) > mine:
                upward.append(f"{module} -> {name}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = {module: sorted({name for name, _ in imports if name in _all_modules()}) for module, imports in _graph().items()}
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
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _all_modules() -> set[str]:
    return {_module_name(path) for path in _project_files()}


def test_layer_test_sees_a_violation(tmp_path):
    """The checker itself: an upward import in a lower room is found."""
    assert _layer_of("apple_video.faces.detect") < _layer_of("apple_video.models.pipeline")
    assert _layer_of("apple_video.sampling.flow") < _layer_of("apple_video.models.transformer")
    fake = ROOT / "apple_video" / "faces" / "detect.py"
    names = [name for name, _ in _imports(fake, "apple_video.faces.detect")]
    assert "apple_video.faces.align" in names
