"""The first-party import graph: no cycles, and imports at module level except optional heavy dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder of each top-level package (pyproject's [tool.setuptools.package-dir]).
FOLDERS = {"unidg": "unidg", "unidg.runtime": "runtime", "unidg.train": "train", "unidg.export": "export"}
FOLDERS["unidg.calib"] = "calib"


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *parts]).removesuffix(".__init__")
            if package == "unidg" and len(parts) > 1 and parts[0] in ("runtime", "train", "export", "calib"):
                continue
            found[name] = path
    return found


def first_party_imports(path: Path) -> list[str]:
    """Every absolute ``unidg`` import of a file, at module level or inside functions."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("unidg"):
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]  # ``from pkg import module``
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.startswith("unidg")]
    return names


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imported in first_party_imports(path):
            while imported not in mods and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in mods and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_first_party_modules() -> None:
    """Counting imports inside functions too: a cycle there is still two modules that cannot be read apart."""
    assert cycles(import_graph()) == []
