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
cut is not a tensor, or the graph has autocast regions, random ops or module calls
(a compiled step is shared across graphs: a module's own weights would be baked in).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from diagpass.counters import counters
from diagpass.fx_facts import example_value, graph_structure, is_random
from diagpass.ir.cell_graph import CellGraph
from diagpass.ir.cells import CellGrid
from diagpass.ir.meta import AUTOCAST

_PROLOGUE, _EPILOGUE = -1, 1 << 30


@dataclasses.dataclass(frozen=True)
class SegmentSteps:
    """The outer graph: prologue, one ``call_module`` per segment (targets
    ``segment_{s}``, each an ``fx.GraphModule``), epilogue."""

    gm: fx.GraphModule
    num_steps: int
    num_structures: int


def segment_steps(grid: CellGrid, cells: CellGraph) -> Tuple[Optional[SegmentSteps], str]:
    """(the cut graph, "") or (None, why not)."""
    gm = grid.gm
    if any(AUTOCAST in n.meta for n in gm.graph.nodes):
        return None, "autocast regions"
    if any(is_random(n) for n in gm.graph.nodes):
        return None, "random ops (reordered, they would draw other numbers)"
    if any(n.op == "call_module" for n in gm.graph.nodes):  # its weights would be baked into a shared step
        return None, "a module call in the graph"
    place = _placement(grid, cells)
    order = sorted(place, key=lambda n: place[n])
    if not _topological(gm, order):
        return None, "a cell reads a later segment"
    regions: Dict[int, List[fx.Node]] = {}
    for n in order:
        regions.setdefault(place[n][0], []).append(n)
    try:
        out = _cut(gm, regions)
    except _NotCrossable as e:
        return None, f"a value crossing a segment's cut is not a tensor or a number ({e})"
    structures = {m.meta["structure"] for _, m in out.named_children()}
    counters["segment_steps"]["graphs"] += 1
    counters["segment_steps"]["steps"] += len(regions) - (_PROLOGUE in regions) - (_EPILOGUE in regions)
    return SegmentSteps(out, len(list(out.named_children())), len(structures)), ""


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
            place[n] = (_EPILOGUE, 0, index[n])
        else:
            last = max(s * L + l for s, l in sources)
            place[n] = (last // L, 2 * last + 2, index[n])
    inputs = _input_storages(grid.gm)
    for n in reversed(free):
        users = {place[u][0] if u in place else _EPILOGUE for u in n.users}
        if len(users) == 1 and not _views_an_input(n, inputs):
            (r,) = users
            place[n] = (r, 0 if r in (_PROLOGUE, _EPILOGUE) else 2 * r * L, index[n])
        else:
            place[n] = (_PROLOGUE, 0, index[n])
    for n in free:  # a slice of a mask or position table built once: a view, outside too
        outer = all(a.op in ("placeholder", "get_attr") or place[a][0] == _PROLOGUE for a in n.all_input_nodes)
        if outer and place[n][0] != _PROLOGUE and _is_view(n):
            place[n] = (_PROLOGUE, 0, index[n])
    return place


def _input_storages(gm: fx.GraphModule) -> set:
    return set().union(*(_storages(example_value(n)) for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")))


def _is_view(n: fx.Node) -> bool:
    """Whether ``n``'s value shares the storage of one of its inputs' values."""
    mine = _storages(example_value(n))
    return bool(mine) and any(mine <= _storages(example_value(a)) for a in n.all_input_nodes)


def _storages(v) -> set:
    values = v if isinstance(v, (tuple, list)) else (v,)
    return {StorageWeakRef(t.untyped_storage()) for t in values if isinstance(t, torch.Tensor)}


def _views_an_input(n: fx.Node, inputs: set) -> bool:
    """Whether ``n``'s value (a tensor, or a tuple of them: a split) shares a graph input's storage."""
    mine = _storages(example_value(n))
    return bool(mine) and mine <= inputs


def _topological(gm: fx.GraphModule, order: List[fx.Node]) -> bool:
    seen = {n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")}
    for n in order:
        if any(a not in seen for a in n.all_input_nodes):
            return False
        seen.add(n)
    return True


class _NotCrossable(Exception):
    """A value that cannot cross a step's cut."""


def _cut(gm: fx.GraphModule, regions: Dict[int, List[fx.Node]]) -> fx.GraphModule:
    out = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    root: Dict[str, torch.nn.Module] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            env[n] = out.node_copy(n, env.__getitem__)
    input_storages = _input_storages(gm)
    views = {n for n in regions.get(_PROLOGUE, ()) if _views_an_input(n, input_storages) or _is_view(n)}
    dense: Dict[fx.Node, fx.Node] = {}
    for r in sorted(regions):
        nodes = regions[r]
        if r in (_PROLOGUE, _EPILOGUE):
            for n in nodes:
                env[n] = out.node_copy(n, env.__getitem__)
            continue
        sub, inputs, outputs = _region(gm, nodes)
        name = f"segment_{r}"
        root[name] = sub
        call = out.call_module(name, tuple(_dense(out, env, dense, i, views) for i in inputs))
        for j, o in enumerate(outputs):
            env[o] = out.call_function(operator.getitem, (call, j))
            env[o].meta.update(o.meta)
    for n in gm.graph.find_nodes(op="output"):
        out.node_copy(n, env.__getitem__)
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            root[n.target] = operator.attrgetter(n.target)(gm)
    out.lint()
    new = fx.GraphModule(root, out, class_name=type(gm).__name__)
    new.meta = dict(gm.meta)
    return new


def _dense(out: fx.Graph, env: Dict[fx.Node, fx.Node], dense: Dict[fx.Node, fx.Node], node: fx.Node,
           views: set) -> fx.Node:
    """A step's argument; a view of a graph input (a segment's slice) as a contiguous
    copy, made once: its strides would otherwise follow the input's length, and a
    step compiled for one segment count would not serve another."""
    if node not in views or not isinstance(example_value(node), torch.Tensor):
        return env[node]
    if node not in dense:
        dense[node] = out.call_method("clone", (env[node],), {"memory_format": torch.contiguous_format})
        dense[node].meta.update(node.meta)
    return dense[node]


def _region(gm: fx.GraphModule, nodes: List[fx.Node]) -> Tuple[fx.GraphModule, list, list]:
    """One segment's nodes as a graph of the values it reads; its outputs are
    the values read outside it. ``meta["structure"]``: ``fx_facts.graph_structure``."""
    inside = set(nodes)
    g = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    inputs: List[fx.Node] = []

    def read(a: fx.Node) -> fx.Node:
        if a not in env:
            _require_value(a)
            inputs.append(a)
            env[a] = g.placeholder(f"in_{len(inputs) - 1}")
            env[a].meta.update(a.meta)
        return env[a]

    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                read(a)
        env[n] = g.node_copy(n, env.__getitem__)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    for o in outputs:
        _require_tensor(o)
    g.output(tuple(env[o] for o in outputs))
    sub = fx.GraphModule(gm, g, class_name="SegmentStep")
    sub.meta["structure"] = graph_structure(sub)
    return sub, inputs, outputs


def _require_value(n: fx.Node) -> None:
    """A tensor, or a number (a size Dynamo kept symbolic: concrete per call)."""
    if not isinstance(example_value(n), (torch.Tensor, int, float, bool, torch.SymInt, torch.SymFloat)):
        raise _NotCrossable(f"{n.name}: {type(example_value(n)).__name__}")


def _require_tensor(n: fx.Node) -> None:
    if not isinstance(example_value(n), torch.Tensor):
        raise _NotCrossable(f"{n.name}: {type(example_value(n)).__name__}")
