"""The house's rules, read from the source: which layer may import which, no cycles, small modules.

Every import counts, including those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "kvpfs"
MAX_LINES = 600

# layer -> the layers it must never import
FORBIDDEN = {
    "kvpfs.wire": ("kvpfs.storage", "kvpfs.host", "kvpfs.fuse", "kvpfs.cli.main", "kvpfs.mount",
                   "kvpfs.control"),
    "kvpfs.storage": ("kvpfs.host", "kvpfs.fuse", "kvpfs.cli.main", "kvpfs.mount", "kvpfs.control"),
    "kvpfs.host": ("kvpfs.fuse", "kvpfs.cli.main", "kvpfs.mount"),
    "kvpfs.fuse": ("kvpfs.cli.main", "kvpfs.mount"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The kvpfs modules `name` imports anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from kvpfs.wire import limits` imports the module kvpfs.wire.limits.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t == "kvpfs" or t.startswith("kvpfs."))
    found.discard(name)
    return {t for t in found if t in MODULES}


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_codec_imports_nothing_else_of_kvpfs():
    assert GRAPH["kvpfs.wire.protocol"] == set()


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_above_it(layer):
    broken = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items() if name == layer or name.startswith(layer + ".")
        for target in targets
        if any(target == f or target.startswith(f + ".") for f in FORBIDDEN[layer])
    )
    assert broken == []


def test_only_the_command_line_starts_a_mount():
    """`mount` is the one composition root: nothing inside the layers reaches back to it."""
    users = sorted(name for name, targets in GRAPH.items() if "kvpfs.mount" in targets)
    assert all(name.startswith("kvpfs.cli.") for name in users), users


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_lazy_imports_included():
    assert find_cycle(GRAPH) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_600_lines():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
