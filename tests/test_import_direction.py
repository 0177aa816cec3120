"""Arrows point down: the core imports nothing from bench/, viz/, integrations/ or a command-line front end, the
front ends sit on top (only the ``tokenprune`` command imports its sub-commands), and no two modules import each
other, directly or around a loop. Read from the source (every ``import``, also inside functions; ``TYPE_CHECKING``
blocks excluded), so a lazy import cannot hide an arrow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenprune.import_graph import ROOMS, drawn_arrows, module_graph, package_dirs, room_graph, room_of

ROOT = Path(__file__).resolve().parents[1]
OUTER_ROOMS = ("tokenprune.bench", "tokenprune.viz", "tokenprune.integrations")
FRONT_ENDS = {"tokenprune.cli", "tokenprune.__main__", "tokenprune.demo", "tokenprune.bench.cli",
              "tokenprune.viz.command"}
TOP = {"tokenprune.cli", "tokenprune.__main__"}  # the `tokenprune` command: may register the other front ends

GRAPH = module_graph()


def _room(module: str) -> str:
    if module in FRONT_ENDS or module == "tokenprune.cli_types":
        return "front end"
    return next((room for room in OUTER_ROOMS if module == room or module.startswith(room + ".")), "core")


def test_the_graph_sees_the_layout():
    assert package_dirs() == {"tokenprune": ROOT / "tokenprune", "tokenprune.patches": ROOT / "patches"}
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


def test_every_module_has_a_room_and_room_arrows_point_down():
    """The rooms of the architecture page (``tokenprune.import_graph.ROOMS``, drawn top to bottom): every module is
    placed in one, and every arrow between rooms goes from a room to one drawn below it."""
    unplaced = sorted(m for m in GRAPH if room_of(m) not in ROOMS)
    assert unplaced == [], "place these modules in a room of tokenprune/import_graph.py ROOMS"
    order = list(ROOMS)
    upward = sorted(f"{room} -> {target}" for room, targets in room_graph(GRAPH).items() for target in targets
                    if order.index(target) <= order.index(room))
    assert upward == []
    assert room_of("tokenprune.methods.base") == "methods" and room_of("tokenprune.bench.cli") == "front ends"
    assert room_of("tokenprune.tiny_anything") == "tiny models" and room_of("tokenprune") == "api"


def test_the_diagram_leaves_out_only_arrows_a_longer_path_implies():
    rooms = {"a": {"b", "c", "d"}, "b": {"c"}, "c": set(), "d": set()}
    assert drawn_arrows(rooms) == {"a": {"b", "d"}, "b": {"c"}, "c": set(), "d": set()}
