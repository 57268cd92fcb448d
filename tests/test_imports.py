"""lowbit's import graph has no cycle, and ``python -m lowbit`` starts.

The graph is read statically: every ``lowbit/**/*.py`` is parsed and each ``import`` run when the module is
imported (module level, class bodies, ``if``/``try``/``with`` blocks; not function bodies, not
``if TYPE_CHECKING:``) becomes an edge ``importer -> imported`` between lowbit modules, relative imports
resolved. ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg`` (whose
``__init__`` must have run far enough to define ``name``). A cycle there is a module that can be entered a
second time while it is still half-initialized: it works only by import order, and breaks when some other
entry point imports the modules the other way round.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

import lowbit

ROOT = Path(lowbit.__file__).resolve().parent.parent  # the folder that holds the package
MAX_LISTED = 50  # cycles listed in a failure message


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute(node: ast.ImportFrom, package: str) -> str:
    """The module ``from <node.module> import …`` reads from, inside ``package`` (level 1 = ``package``)."""
    if not node.level:
        return node.module
    base = package.split(".")[:len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_imports(tree: ast.Module):
    """The ``Import``/``ImportFrom`` nodes executed when the module is imported."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt | ast.excepthandler))


def import_graph(root: Path = ROOT) -> nx.DiGraph:
    """``importer -> imported`` between lowbit's modules; each edge's ``where`` is ``file:line`` of the import."""
    files = {module_name(p, root): p for p in sorted((root / "lowbit").rglob("*.py"))}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in import_time_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = absolute(node, package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                if target in files and target != name:
                    graph.add_edge(name, target, where=f"{path.relative_to(root)}:{node.lineno}")
    return graph


def describe(graph: nx.DiGraph, cycle: list[str]) -> str:
    steps = zip(cycle, cycle[1:] + cycle[:1])
    return " -> ".join(cycle + cycle[:1]) + "\n      " + \
        "; ".join(f"{graph.edges[a, b]['where']} imports {b}" for a, b in steps)


def test_the_graph_sees_the_package():
    """The walk finds the modules and the edges that are certainly there (so an empty graph cannot pass)."""
    graph = import_graph()
    assert {"lowbit", "lowbit.cli", "lowbit.__main__", "lowbit.errors"} <= set(graph)
    assert graph.has_edge("lowbit.__main__", "lowbit.cli")   # from .cli import main
    assert graph.has_edge("lowbit.cli", "lowbit.errors")     # from .errors import LowbitError
    assert graph.has_edge("lowbit", "lowbit._version")       # from ._version import __version__


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    """The walker on a small fake package: a relative-import cycle is found, function-level and
    ``TYPE_CHECKING`` imports are not edges."""
    pkg = tmp_path / "lowbit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .sub import b\ndef f():\n    from . import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from .. import c\n"
                                      "try:\n    from ..a import f\nexcept ImportError:\n    pass\n")
    (pkg / "c.py").write_text("from lowbit.sub import b\n")
    graph = import_graph(tmp_path)
    assert set(graph.edges) == {("lowbit", "lowbit.a"), ("lowbit.a", "lowbit.sub.b"), ("lowbit.sub.b", "lowbit.a"),
                                ("lowbit.c", "lowbit.sub.b")}
    assert sorted(map(sorted, nx.simple_cycles(graph))) == [["lowbit.a", "lowbit.sub.b"]]


def test_no_import_cycle():
    graph = import_graph()
    cycles = sorted(nx.simple_cycles(graph), key=lambda c: (len(c), c))
    if cycles:
        listed = "\n".join(f"  {describe(graph, c)}" for c in cycles[:MAX_LISTED])
        more = f"\n  … and {len(cycles) - MAX_LISTED} more" if len(cycles) > MAX_LISTED else ""
        sccs = [sorted(s) for s in nx.strongly_connected_components(graph) if len(s) > 1]
        pytest.fail(f"{len(cycles)} import cycle(s) among lowbit's modules "
                    f"(strongly connected groups: {sccs}):\n{listed}{more}", pytrace=False)


@pytest.mark.e2e
def test_python_m_lowbit_help_runs():
    r = subprocess.run([sys.executable, "-m", "lowbit", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: lowbit") and "quantize" in r.stdout
    assert r.stderr == ""
