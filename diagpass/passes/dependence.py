"""dependence: the cell DAG and its dependence vectors.

Before: a ``CellGrid`` (cells and glue nodes of one FX graph).
After: a ``CellGraph``. For per-layer memory (ARMT)::

    (0,0) -> (0,1) -> (0,2)        vectors {(0, 1), (1, 0)}
      |        |        |
    (1,0) -> (1,1) -> (1,2)

An edge a -> b means b reads something a computed, directly or through glue
(so RMT's last-layer memory, re-embedded by glue, still shows as
(s, L-1) -> (s+1, 0), vector (1, 1-L)).

The quotient graph (every cell contracted to one vertex, glue nodes kept)
must be acyclic: otherwise a value leaves a cell and comes back into it and
the cell cannot run as one call. That is checked here, once.
"""

from __future__ import annotations

from typing import Dict, Set

import networkx as nx

from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.ir.cell_graph import CellGraph
from diagpass.ir.cells import CellGrid, CellId


def quotient_graph(grid: CellGrid) -> nx.DiGraph:
    """Cells contracted to ``('cell', id)``; glue nodes kept as ``('glue', node)``."""

    def vertex(node):
        cid = grid.cell_of.get(node)
        if cid is not None:
            return ("cell", cid)
        return ("glue", node)

    q = nx.DiGraph()
    for node in grid.gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        v = vertex(node)
        q.add_node(v)
        for a in node.all_input_nodes:
            if a.op in ("placeholder", "get_attr"):
                continue
            u = vertex(a)
            if u != v:
                q.add_edge(u, v)
    return q


def glue_cell_ancestors(grid: CellGrid, q: nx.DiGraph) -> Dict[object, Set[CellId]]:
    """For every glue node: the cells it (transitively, through glue) reads."""
    anc: Dict[object, Set[CellId]] = {}
    for v in nx.topological_sort(q):
        if v[0] != "glue":
            continue
        acc: Set[CellId] = set()
        for u in q.predecessors(v):
            acc |= {u[1]} if u[0] == "cell" else anc[u[1]]
        anc[v[1]] = acc
    return anc


def build_cell_graph(grid: CellGrid) -> CellGraph:
    q = quotient_graph(grid)
    if not nx.is_directed_acyclic_graph(q):
        cycle = nx.find_cycle(q)
        cells = sorted({v[1] for e in cycle for v in e if v[0] == "cell"})
        raise NotBatchable(
            f"cells {cells} are not self-contained: a value leaves a cell and flows back "
            "into it, so a cell cannot run as one call"
        )
    glue_anc = glue_cell_ancestors(grid, q)
    dag = nx.DiGraph()
    dag.add_nodes_from(grid.cells)
    for cid in grid.cells:
        for u in q.predecessors(("cell", cid)):
            sources = {u[1]} if u[0] == "cell" else glue_anc[u[1]]
            dag.add_edges_from((src, cid) for src in sources)
    vectors = frozenset((b[0] - a[0], b[1] - a[1]) for a, b in dag.edges)
    counters["dependence"]["edges"] += dag.number_of_edges()
    return CellGraph(dag, vectors, grid.num_segments, grid.num_layers, glue_anc)
