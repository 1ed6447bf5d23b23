"""The package's layering: no import cycles, passes below the runtime and the backend."""

import ast
import pathlib

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parents[1] / "diagpass"


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
    """Every diagpass module ``path`` imports, at any depth (function-level too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diagpass"):
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("diagpass"))


def import_graph() -> nx.DiGraph:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for name, path in modules.items():
        for target in _imports(path):
            if target in modules and target != name:
                g.add_edge(name, target)
    return g


def _non_package_edges(g: nx.DiGraph) -> nx.DiGraph:
    """Edges into a package ``__init__`` from inside it are how Python imports a
    submodule, not a dependence: left out."""
    h = nx.DiGraph()
    h.add_nodes_from(g)
    h.add_edges_from((a, b) for a, b in g.edges if not a.startswith(b + "."))
    return h


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(_non_package_edges(import_graph())))
    assert not cycles, cycles[:3]


def test_passes_depend_only_on_ir_and_fx_facts():
    allowed = ("diagpass.ir", "diagpass.fx_facts", "diagpass.counters", "diagpass.errors", "diagpass.passes")
    g = import_graph()
    bad = [(a, b) for a, b in g.edges if a.startswith("diagpass.passes") and not b.startswith(allowed)]
    assert not bad, bad


def test_runtime_is_below_the_passes_and_the_pipeline():
    g = import_graph()
    bad = [
        (a, b) for a, b in g.edges
        if a.startswith("diagpass.runtime") and b.startswith(("diagpass.passes", "diagpass.pipeline", "diagpass.backend"))
    ]
    assert not bad, bad


def test_backend_is_a_thin_entry():
    assert len((ROOT / "backend.py").read_text().splitlines()) <= 150
