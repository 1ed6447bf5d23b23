"""The cell dependency DAG."""

from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, Set, Tuple

import networkx as nx

from diagpass.ir.cells import CellId

Vector = Tuple[int, int]  # (delta segment, delta layer)


@dataclasses.dataclass
class CellGraph:
    """``dag`` has one node per cell id; an edge (a, b) means b reads a value
    computed by a (directly, or through glue). ``vectors`` are the distinct
    dependence vectors b - a."""

    dag: nx.DiGraph
    vectors: FrozenSet[Vector]
    num_segments: int
    num_layers: int

    def edges_with(self, vector: Vector) -> Set[Tuple[CellId, CellId]]:
        return {
            (a, b)
            for a, b in self.dag.edges
            if (b[0] - a[0], b[1] - a[1]) == vector
        }

    def cross_segment_vectors(self) -> Dict[Vector, int]:
        out: Dict[Vector, int] = {}
        for a, b in self.dag.edges:
            v = (b[0] - a[0], b[1] - a[1])
            if v[0] != 0:
                out[v] = out.get(v, 0) + 1
        return out
