"""No import circle in the project: no module imports one that (directly or through others) imports it back.

Read statically (the AST of every file in mimae_scale/, kernels/ and data_tools/), function-level
imports included: a circle closed inside a function still ties the two modules together and breaks
as soon as one of them is imported at the other's top. A submodule importing its own parent package
is not counted: Python has imported the parent before any submodule anyway.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# folder -> the package name it is installed as (pyproject's package-dir)
PACKAGES = {"mimae_scale": "mimae_scale", "kernels": "mimae_scale.kernels", "data_tools": "mimae_scale.data_tools"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file (``from a import b``: a.b if that
    is a module, else a)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != module and not module.startswith(m + ".")}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_imports_inside_functions_and_relative_ones() -> None:
    graph = import_graph()
    assert "mimae_scale.gpubench.data" in graph["mimae_scale.gpubench"]  # imported inside _sections()
    assert "mimae_scale.kernels._alloc" in graph["mimae_scale.kernels.info_nce"]  # `from . import _alloc`
    assert "mimae_scale.bench_inputs" in graph["mimae_scale.gpubench.data"]


def test_circles_finds_a_circle_of_two_and_of_three() -> None:
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(circles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert circles(import_graph()) == []
