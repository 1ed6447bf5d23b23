"""The cell dependency DAG."""

from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, Set, Tuple

import networkx as nx
import torch.fx as fx

from diagpass.ir.cells import CellId

Vector = Tuple[int, int]  # (delta segment, delta layer)


@dataclasses.dataclass(frozen=True)
class CellGraph:
    """``dag`` has one node per cell id; an edge (a, b) means b reads a value
    computed by a (directly, or through glue). ``vectors`` are the distinct
    dependence vectors b - a. ``glue_sources``: for every glue node, the cells
    it reads (transitively, through glue); the batch pass places glue by it."""

    dag: nx.DiGraph
    vectors: FrozenSet[Vector]
    num_segments: int
    num_layers: int
    glue_sources: Dict[fx.Node, Set[CellId]] = dataclasses.field(default_factory=dict, compare=False)
