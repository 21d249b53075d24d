"""The package's layers: its import graph has no circle, and the math imports no workflow.

The graph is read from the source with ``ast`` (nothing is imported): an edge a -> b for every
``import recyclegpt.b`` / ``from recyclegpt.b import x`` / ``from recyclegpt import b`` in a, at module level
or inside a function (a lazy import still ties the two modules together). Importing ``recyclegpt.b`` also runs
the packages above it (``recyclegpt/__init__.py``); those implicit edges are left out, since every submodule
would otherwise form a circle with its package.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "recyclegpt"

# math: tensors in, tensors out; no module here may reach a workflow or the top.
MATH = ("model", "cache", "recycle", "sampling", "copy_gate", "strategies", "drafters", "quant", "config", "loss",
        "hardware")
# workflows that run an engine, then the CLI, the server and the demo on top.
UPPER = ("workflows", "evaluate", "bench", "train", "lm_eval_adapter", "cli", "options", "server", "demo")
# text and token files: below the model code and everything that runs it.
DATA_MUST_NOT_REACH = ("recycle", "generate", "evaluate")


def module_name(path: Path, root: Path) -> str:
    """``recyclegpt/bases/hf.py`` -> ``recyclegpt.bases.hf``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its source), for every ``.py`` under ``root``."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}

    def known(name: str) -> str | None:  # the module a dotted name lands in (``a.b.C`` -> ``a.b``)
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package (and up) this file is in
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                for a in node.names:  # ``from pkg import sub`` imports the submodule
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else known(base))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of ``graph`` that hold a circle (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    parts: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in graph.get(v, ()):
                parts.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return parts


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest circle through each tangle of ``graph``, e.g. [a, b, a]."""
    return [_shortest_circle(graph, part) for part in tangles(graph)]


def _shortest_circle(graph: dict[str, set[str]], part: list[str]) -> list[str]:
    """The shortest path from ``part[0]`` back to itself inside ``part`` (breadth first)."""
    start, inside = part[0], set(part)
    came: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came[path[-1]])
                return [start, *reversed(path[:-1]), start] if v != start else [start, start]
            if w in inside and w not in came:
                came[w] = v
                queue.append(w)
    raise AssertionError(f"no circle through {start} in {part}")


def path_to(graph: dict[str, set[str]], start: str, goals: set[str]) -> list[str] | None:
    """A shortest import chain from ``start`` to any of ``goals`` (``start`` itself excluded), or None."""
    came = {start: start}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if w in came:
                continue
            came[w] = v
            if w in goals:
                path = [w]
                while path[-1] != start:
                    path.append(came[path[-1]])
                return path[::-1]
            queue.append(w)
    return None


def _qualified(names: tuple[str, ...]) -> set[str]:
    return {f"recyclegpt.{n}" for n in names}


def test_the_graph_is_read():
    """The reader sees module-level, function-level, ``from recyclegpt import x`` and submodule imports."""
    graph = import_graph()
    assert "recyclegpt.copy_gate" in graph["recyclegpt.recycle"]  # module level
    assert "recyclegpt.workflows" in graph["recyclegpt.cli"]  # inside a function, ``from recyclegpt import ...``
    assert "recyclegpt.bases.hf" in graph["recyclegpt.bench"]  # a subpackage's module
    assert set(MATH) | set(UPPER) <= {n.removeprefix("recyclegpt.") for n in graph}


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert sorted(tangles(graph)) == [["a", "b", "c"], ["e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert path_to(graph, "a", {"d"}) == ["a", "b", "d"]


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    found = [f"  {' -> '.join(_shortest_circle(graph, part))}   (modules tied together: {', '.join(part)})"
             for part in tangles(graph)]
    assert not found, "import circles:\n" + "\n".join(found)


def test_math_imports_no_workflow_and_data_no_model_code():
    graph = import_graph()
    upper = _qualified(UPPER)
    bad = [" -> ".join(p) for m in _qualified(MATH) if (p := path_to(graph, m, upper))]
    bad += [" -> ".join(p) for p in [path_to(graph, "recyclegpt.data", _qualified(DATA_MUST_NOT_REACH) | upper)] if p]
    assert not bad, "imports against the layers (math -> workflow/top, or data -> model/engine code):\n" + "\n".join(
        "  " + b for b in bad)


def test_no_module_shadows_the_standard_library():
    shadowing = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                       if p.stem in sys.stdlib_module_names)
    assert not shadowing, f"modules named like the standard library's: {shadowing}"
