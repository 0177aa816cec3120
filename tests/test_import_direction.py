"""Arrows point down: the core imports nothing from bench/, viz/, integrations/ or a command-line front end, the
front ends sit on top (only the ``tokenprune`` command imports its sub-commands), and no two modules import each
other, directly or around a loop. Read from the source (every ``import``, also inside functions; ``TYPE_CHECKING``
blocks excluded), so a lazy import cannot hide an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"tokenprune": ROOT / "tokenprune", "tokenprune.patches": ROOT / "patches"}  # pyproject package-dir
OUTER_ROOMS = ("tokenprune.bench", "tokenprune.viz", "tokenprune.integrations")
FRONT_ENDS = {"tokenprune.cli", "tokenprune.__main__", "tokenprune.demo", "tokenprune.bench.cli",
              "tokenprune.viz.command"}
TOP = {"tokenprune.cli", "tokenprune.__main__"}  # the `tokenprune` command: may register the other front ends


def package_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the installed package layout."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = package_modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    return skipped


def _owner(name: str) -> str | None:
    """The package module that ``name`` (a module, or an attribute of one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The package modules ``module`` imports (``from pkg import submodule`` counts as the submodule)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    targets = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return {owner for owner in map(_owner, targets) if owner is not None and owner != module}


GRAPH = {module: imports_of(module) for module in sorted(MODULES)}


def _room(module: str) -> str:
    if module in FRONT_ENDS or module == "tokenprune.cli_types":
        return "front end"
    return next((room for room in OUTER_ROOMS if module == room or module.startswith(room + ".")), "core")


def test_the_graph_sees_the_layout():
    assert {"tokenprune.api", "tokenprune.patches.base", "tokenprune.methods", "tokenprune.bench.cli"} <= set(GRAPH)
    assert "tokenprune.patches.decoder_loop" in GRAPH["tokenprune.patches.base"]  # an import read through package-dir
    assert "tokenprune.bench.synthetic.scenes" in GRAPH["tokenprune.demo"]  # a lazy or top-level import alike


def test_core_imports_nothing_from_outer_rooms_or_front_ends():
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items() if _room(module) == "core"
        for target in targets if _room(target) != "core"
    )
    assert wrong == [], "the core (api, config, budget, methods, functional, patches, ...) must not import these"


def test_front_ends_are_imported_by_nothing_but_the_command():
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items() if module not in TOP
        for target in targets if target in FRONT_ENDS
    )
    assert wrong == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder(graph, expected):
    assert cycles(graph) == expected


def test_no_import_cycles():
    assert cycles(GRAPH) == []
