"""Cells: the (segment, layer) pieces of an unrolled recurrence.

A ``Cell`` is the set of FX nodes that compute one layer's work on one
segment (the layer body plus its memory read/write). Everything else in the
graph (embedding, segment split, logits, the final concat) is *glue*.
A ``CellGrid`` is the result of partitioning one graph.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch.fx as fx

CellId = Tuple[int, int]  # (segment, layer)


@dataclasses.dataclass
class Cell:
    segment: int
    layer: int
    nodes: List[fx.Node] = dataclasses.field(default_factory=list)
    # Filled by ``finalize``: values read from outside the cell (first-use order)
    # and values the rest of the graph reads from it (graph order).
    inputs: List[fx.Node] = dataclasses.field(default_factory=list)
    outputs: List[fx.Node] = dataclasses.field(default_factory=list)

    @property
    def id(self) -> CellId:
        return (self.segment, self.layer)

    def finalize(self) -> None:
        members = set(self.nodes)
        inputs: Dict[fx.Node, None] = {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a not in members:
                    inputs.setdefault(a, None)
        self.inputs = list(inputs)
        self.outputs = [n for n in self.nodes if any(u not in members for u in n.users)]

    def __repr__(self) -> str:
        return f"Cell(s={self.segment}, l={self.layer}, nodes={len(self.nodes)})"


@dataclasses.dataclass
class LayerStack:
    """The repeated layers: parameter placeholders by (layer index, role).

    ``role`` is the parameter's name relative to its layer (``q_proj.weight``),
    prefixed by the container (``layers``) so several parallel ModuleLists of
    the same length (layers + per-layer memory modules) share layer indices.
    """

    num_layers: int
    prefixes: List[str]
    param_layer: Dict[fx.Node, int]
    param_role: Dict[fx.Node, str]
    _rows: Dict[fx.Node, int] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def by_role(self, role: str) -> List[fx.Node]:
        nodes = [n for n, r in self.param_role.items() if r == role]
        return sorted(nodes, key=lambda n: self.param_layer[n])

    def role_position(self, node: fx.Node) -> int:
        """Index of ``node`` in ``by_role(its role)``: the row of the role's
        weight stack that holds it. Not the layer index: a layer whose
        shapes differ from the others has roles of its own, so the stack of
        a role can skip layers."""
        if not self._rows:
            for role in set(self.param_role.values()):
                self._rows.update((n, k) for k, n in enumerate(self.by_role(role)))
        return self._rows[node]


@dataclasses.dataclass
class CellGrid:
    gm: fx.GraphModule
    stack: LayerStack
    cells: Dict[CellId, Cell]
    glue: List[fx.Node]
    cell_of: Dict[fx.Node, CellId]
    num_segments: int

    @property
    def num_layers(self) -> int:
        return self.stack.num_layers
