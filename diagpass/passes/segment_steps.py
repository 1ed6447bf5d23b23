"""segment_steps: the sequential graph as one call per segment, so that equal segments compile once.

Not a batching rewrite: the graph the cost rule falls back to, reordered segment by
segment (a valid order: a cell reads only cells of its own or earlier segments) and
cut into one subgraph per segment. The middle segments compute the same function of
the same kinds of inputs, so their subgraphs have one structure and the runtime
compiles it once (``runtime/segment_steps.py``); inside a subgraph the compiler
fuses as freely as in the whole graph.

Before (Dynamo's graph, segment- or layer-major)::

    x_0 = embedding(ids_0, emb.weight)          # glue, no cell source
    h_0_0 = layer(x_0, m_0) ... h_0_1 = layer(h_0_0, m_1)   # cells (0, 0), (0, 1)
    y_0 = lm_head(norm(h_0_1))                  # glue, reads segment 0
    x_1 = embedding(ids_1, emb.weight) ...
    out = cat([y_0, y_1, y_2])                  # glue, reads every segment

After::

    ids_0 = getitem(split(ids), 0) ...          # prologue: views of the input
    step_0 = segment_0(ids_0, w..)              # embedding, cells of segment 0, the glue they make ready
    y_0 = step_0[0];  m_0 = step_0[1] ...
    step_1 = segment_1(ids_1, m_0, .., w..)     # segments 1 .. S-2: one structure
    out = cat([y_0, y_1, y_2])                  # epilogue: glue reading several segments

The prologue and epilogue (views of the input, glue several steps read, the
final concatenation) run as they are; each segment's subgraph is a plain ``fx.GraphModule`` whose
``meta["structure"]`` is equal for subgraphs that compute the same function.
Refused (None, with the reason) when the order is not valid, a value crossing a
cut is not a tensor, or the graph has random ops or module calls (a compiled step
is shared across graphs: a module's own weights would be baked in). Autocast regions
are node metadata here; the cut gives each step its own (``passes/cut.py``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch.fx as fx

from diagpass.fx_facts import is_random
from diagpass.ir.cell_graph import CellGraph
from diagpass.ir.cells import CellGrid
from diagpass.passes.cut import (EPILOGUE, PROLOGUE, Steps, cut, graph_input_storages, is_number, is_view,
                                 reads_only_prologue, views_an_input)


def segment_steps(grid: CellGrid, cells: CellGraph) -> Tuple[Optional[Steps], str]:
    """(the cut graph, "") or (None, why not)."""
    gm = grid.gm
    if any(is_random(n) for n in gm.graph.nodes):
        return None, "random ops (reordered, they would draw other numbers)"
    if any(n.op == "call_module" for n in gm.graph.nodes):  # its weights would be baked into a shared step
        return None, "a module call in the graph"
    return cut(gm, _placement(grid, cells), "segment")


def _placement(grid: CellGrid, cells: CellGraph) -> Dict[fx.Node, Tuple[int, int, int]]:
    """Every compute node's (region, position in the segment-major order, graph index).

    Cells go to their segment; glue that reads cells right after its last source
    cell, or after every step when it reads several segments and feeds no cell
    (the closing concatenation). Glue that reads no cell goes to the one step that
    uses it (an embedding, a mask built per segment), before its cells; to the
    prologue when several steps use it, or when it only views a graph input (the
    segment slices: their offsets would make every step's structure differ)."""
    nodes = list(grid.gm.graph.nodes)
    L, index = grid.num_layers, {n: i for i, n in enumerate(nodes)}
    pos = {n: cid[0] * L + cid[1] for n, cid in grid.cell_of.items()}
    feeds_cell: Dict[fx.Node, bool] = {}
    for n in reversed(nodes):
        feeds_cell[n] = any(u in pos or feeds_cell.get(u, False) for u in n.users)
    place: Dict[fx.Node, Tuple[int, int, int]] = {}
    free: List[fx.Node] = []  # glue that reads no cell, placed by its users below
    for n in nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        sources = cells.glue_sources.get(n, ())
        if n in pos:
            place[n] = (pos[n] // L, 2 * pos[n] + 1, index[n])
        elif not sources:
            free.append(n)
        elif len({s for s, _ in sources}) > 1 and not feeds_cell[n]:
            place[n] = (EPILOGUE, 0, index[n])
        else:
            last = max(s * L + l for s, l in sources)
            place[n] = (last // L, 2 * last + 2, index[n])
    inputs = graph_input_storages(grid.gm)
    for n in reversed(free):
        users = {place[u][0] if u in place else EPILOGUE for u in n.users}
        if len(users) == 1 and not views_an_input(n, inputs):
            (r,) = users
            place[n] = (r, 0 if r in (PROLOGUE, EPILOGUE) else 2 * r * L, index[n])
        else:
            place[n] = (PROLOGUE, 0, index[n])
    for n in free:  # a slice of a mask or position table built once, and the numbers bounding it: outside too
        if reads_only_prologue(n, place) and place[n][0] != PROLOGUE and (is_view(n) or is_number(n)):
            place[n] = (PROLOGUE, 0, index[n])
    return place
