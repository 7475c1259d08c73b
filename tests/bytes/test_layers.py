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


# Whole packages, bottom to top: each imports nothing of the ones after it. `mount` (the
# composition root) and its services sit between the filesystem and the command line.
LADDER = ("kvpfs.wire", "kvpfs.storage", "kvpfs.host", "kvpfs.fuse", "kvpfs.mount", "kvpfs.cli")
# Modules of the mount's own services: they import only the foundation below.
# (`mountguard`, issue 18's watch on other users' mounts inside ours, lands separately.)
SERVICES = ("kvpfs.control", "kvpfs.watchdog", "kvpfs.recovery", "kvpfs.mountguard")
# The foundation every layer may use; it imports nothing of kvpfs but itself.
FOUNDATION = ("kvpfs", "kvpfs.compat", "kvpfs.quietlog", "kvpfs.mountinfo")


def in_package(name: str, package: str) -> bool:
    """`name` is `package` or one of its modules (`kvpfs` alone means the top module)."""
    return name == package or (package != "kvpfs" and name.startswith(package + "."))


def package_of(name: str) -> str | None:
    for package in (*LADDER, *SERVICES, *FOUNDATION):
        if in_package(name, package):
            return package
    return None


def test_every_module_has_a_place_in_the_layers():
    homeless = sorted(n for n in MODULES if package_of(n) is None and n != "kvpfs.__main__")
    assert homeless == []


def upward_imports(graph: dict[str, set[str]], package: str) -> list[str]:
    """Imports from `package` into a package above it on the ladder."""
    above = LADDER[LADDER.index(package) + 1:]
    return sorted(f"{name} imports {target}"
                  for name, targets in graph.items() if in_package(name, package)
                  for target in targets if any(in_package(target, a) for a in above))


def command_line_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of anything in kvpfs.cli from outside it (`python -m kvpfs` aside)."""
    return sorted(f"{name} imports {target}"
                  for name, targets in graph.items()
                  if not in_package(name, "kvpfs.cli") and name != "kvpfs.__main__"
                  for target in targets if in_package(target, "kvpfs.cli"))


def outside_the_foundation(graph: dict[str, set[str]]) -> list[str]:
    """Imports by the services or the foundation of anything but the foundation."""
    own = (*SERVICES, *FOUNDATION)
    return sorted(f"{name} imports {target}"
                  for name, targets in graph.items() if package_of(name) in own
                  for target in targets if package_of(target) not in FOUNDATION)


@pytest.mark.parametrize("package", LADDER)
def test_a_package_imports_nothing_of_the_packages_above_it(package):
    assert upward_imports(GRAPH, package) == []


def test_nothing_below_the_command_line_imports_any_of_it():
    assert command_line_imports(GRAPH) == []


def test_the_services_and_the_foundation_import_only_the_foundation():
    assert outside_the_foundation(GRAPH) == []


def test_the_layer_checks_catch_a_breach():
    """The rules above on a made-up graph with one breach of each kind."""
    graph = {"kvpfs.storage.store": {"kvpfs.cli.results", "kvpfs.wire.pools"},
             "kvpfs.host.server": {"kvpfs.fuse.nodes"}, "kvpfs.cli.results": set(),
             "kvpfs.compat": {"kvpfs.storage.store"}, "kvpfs.watchdog": {"kvpfs.mountinfo"}}
    assert upward_imports(graph, "kvpfs.storage") == [
        "kvpfs.storage.store imports kvpfs.cli.results"]
    assert upward_imports(graph, "kvpfs.host") == ["kvpfs.host.server imports kvpfs.fuse.nodes"]
    assert command_line_imports(graph) == ["kvpfs.storage.store imports kvpfs.cli.results"]
    assert outside_the_foundation(graph) == ["kvpfs.compat imports kvpfs.storage.store"]


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
