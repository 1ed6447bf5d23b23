"""complete_cells: the last segment's cells given the outputs of their middle neighbours.

Eager runs every segment's memory update, the last one's too, and discards the
last. Dynamo keeps those dead nodes, so a last-segment cell differs from its
middle neighbour only in which values leave it (where a pass dropped them, also
by a missing tail): it has a signature of its own, never joins
the middle segments' group, and every wavefront holding it is a structure of its
own (a new segment count then meets new ones, ``runtime/segment_steps.py``).
Here each such cell gets its neighbour's outputs, and any missing nodes back,
copied from the cell of the same layer one segment earlier; they read only the cell's own values, its
layer's parameters and graph inputs, and nothing reads them. The cell's live
values are still computed by its own nodes, so nothing it returns changes; with
the signature of its neighbour it batches with it.

Before (segment 2 of 3, one layer; ``k2``/``m2`` were dead)::

    cell (1, 0): h1 = attn(x1, m0);  k1 = linear(h1, W_k);  m1 = add(m0, k1)
    cell (2, 0): h2 = attn(x2, m1)

After (on a copy of the graph; where no node is missing, only the cell's outputs change)::

    cell (1, 0): h1 = attn(x1, m0);  k1 = linear(h1, W_k);  m1 = add(m0, k1)
    cell (2, 0): h2 = attn(x2, m1);  k2 = linear(h2, W_k);  m2 = add(m1, k2)   # m2: no users

A cell is completed only if its nodes are, in order, a subsequence of its
neighbour's that matches op for op (same targets and constants, arguments in
the same places), and its signature then equals the neighbour's; otherwise it
is left as it was.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from diagpass.counters import counters
from diagpass.fx_facts import copy_graph_module, example_value
from diagpass.ir.cells import Cell, CellGrid, LayerStack
from diagpass.ir.meta import AUTOCAST
from diagpass.passes.schedule import cell_constants, cell_signature

# R's extra nodes, in order, and R's matched nodes and inputs -> C's
_Completion = Tuple[List[fx.Node], Dict[fx.Node, fx.Node]]


def complete_cells(grid: CellGrid) -> CellGrid:
    """``grid`` itself when no cell is completed; else a new grid (over a copy of its graph
    where nodes are added)."""
    last = grid.num_segments - 1
    found: Dict[Tuple[int, int], Tuple[Cell, _Completion]] = {}
    for layer in range(grid.num_layers):
        cell, ref = grid.cells.get((last, layer)), grid.cells.get((last - 1, layer))
        if last < 2 or cell is None or ref is None or len(ref.nodes) < len(cell.nodes):
            continue
        if _signature(cell, grid) == _signature(ref, grid):
            continue
        completion = _embed(cell, ref, grid)
        if completion is not None:
            found[cell.id] = (ref, completion)
    if not found:
        return grid
    new = _rebuild(grid, found)
    if any(_signature(new.cells[cid], new) != _signature(new.cells[ref.id], new) for cid, (ref, _) in found.items()):
        counters["complete_cells"]["refused_signature"] += 1
        return grid
    counters["complete_cells"]["cells_completed"] += len(found)
    counters["complete_cells"]["nodes_added"] += sum(len(c[0]) for _, c in found.values())
    return new


def _signature(cell: Cell, grid: CellGrid):
    return cell_signature(cell, grid, constant_slots=cell_constants(cell))


def _embed(cell: Cell, ref: Cell, grid: CellGrid) -> Optional[_Completion]:
    """Match ``cell``'s nodes, in order, to a subsequence of ``ref``'s; the rest are extras."""
    env: Dict[fx.Node, fx.Node] = {}
    ref_nodes, ref_inputs, mine = set(ref.nodes), set(ref.inputs), set(cell.inputs)
    extras: List[fx.Node] = []
    j = 0
    for r in ref.nodes:
        binding = _match(r, cell.nodes[j], env, ref_nodes, ref_inputs, mine) if j < len(cell.nodes) else None
        if binding is not None:
            env.update(binding)
            env[r] = cell.nodes[j]
            j += 1
        else:
            extras.append(r)
    if j < len(cell.nodes):
        return None
    if not set(cell.outputs) <= {env[o] for o in ref.outputs if o in env}:
        return None  # a value leaving the cell that leaves its neighbour from elsewhere
    extra = set(extras)
    for r in extras:
        for a in r.all_input_nodes:
            if a not in env and a not in extra and not _layer_free(a, cell.layer, grid.stack):
                return None  # another segment's value: it would add a dependence
    return extras, env


def _layer_free(a: fx.Node, layer: int, stack: LayerStack) -> bool:
    """A value the cell may read whatever its segment: its layer's parameter, or another graph input."""
    if a in stack.param_layer:
        return stack.param_layer[a] == layer
    return a.op in ("placeholder", "get_attr")


def _match(r: fx.Node, c: fx.Node, env, ref_nodes, ref_inputs, mine) -> Optional[Dict[fx.Node, fx.Node]]:
    """The new bindings if ``c`` is ``r`` with ``env``'s values, else None."""
    if (r.op, r.target) != (c.op, c.target) or len(r.args) != len(c.args) or set(r.kwargs) != set(c.kwargs):
        return None
    if any(r.meta.get(k) != c.meta.get(k) for k in ("recompute", AUTOCAST)):
        return None
    binding: Dict[fx.Node, fx.Node] = {}

    def same(a, b) -> bool:
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return False
            if a in ref_nodes:
                return env.get(a) is b
            if a not in ref_inputs or b not in mine:
                return False
            bound = env.get(a, binding.get(a))
            if bound is None:
                binding[a] = b
                return True
            return bound is b
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, slice):
            return isinstance(b, slice) and all(same(x, y) for x, y in ((a.start, b.start), (a.stop, b.stop), (a.step, b.step)))
        return type(a) is type(b) and (a is b or a == b)

    if not (same(r.args, c.args) and same(r.kwargs, c.kwargs)):
        return None
    return binding


def _rebuild(grid: CellGrid, found) -> CellGrid:
    """New cells, each found cell with its extras inserted in ``ref``'s order (each right
    after the node it follows there), over a copy of the graph where one has extras (else
    over the same graph, unchanged: only the cells' outputs differ)."""
    if any(extras for _, (extras, _) in found.values()):
        gm, new = copy_graph_module(grid.gm)
    else:
        gm, new = grid.gm, _Identity()
    nodes = {cid: [new[n] for n in c.nodes] for cid, c in grid.cells.items()}
    outputs = {cid: [new[o] for o in c.outputs] for cid, c in grid.cells.items()}
    for cid, (ref, (extras, env)) in found.items():
        extra = set(extras)
        first = nodes[cid][0]
        copies: Dict[fx.Node, fx.Node] = {}
        order: List[fx.Node] = []
        for r in ref.nodes:
            if r not in extra:
                order.append(new[env[r]])
                continue
            with gm.graph.inserting_after(order[-1]) if order else gm.graph.inserting_before(first):
                node = gm.graph.node_copy(r, lambda a: copies[a] if a in copies else new[env.get(a, a)])
            node.meta = {**r.meta, "example_value": _fresh(example_value(r))}
            node.meta.pop("val", None)
            copies[r] = node
            order.append(node)
        nodes[cid] = order
        outputs[cid] = [copies[o] if o in copies else new[env[o]] for o in ref.outputs]
    return _grid(grid, gm, new, nodes, outputs)


def _grid(grid: CellGrid, gm: fx.GraphModule, new, nodes, outputs) -> CellGrid:
    stack = grid.stack
    if gm is not grid.gm:  # the copy's placeholders
        stack = LayerStack(stack.num_layers, list(stack.prefixes), {new[n]: v for n, v in stack.param_layer.items()},
                           {new[n]: v for n, v in stack.param_role.items()})
    cells: Dict[Tuple[int, int], Cell] = {}
    for cid in grid.cells:
        cell = cells[cid] = Cell(*cid, nodes=nodes[cid])
        cell.finalize()
        cell.outputs = outputs[cid]  # a completed cell's extra outputs have no users, yet are its outputs
    cell_of = {n: cid for cid, c in cells.items() for n in c.nodes}
    if gm is not grid.gm:
        gm.recompile()  # the inserted nodes
    return CellGrid(gm, stack, cells, [new[n] for n in grid.glue], cell_of, grid.num_segments)


class _Identity(dict):
    def __missing__(self, node):
        return node


def _fresh(v):
    """A fake of ``v``'s metadata with storage of its own (the copy is a new value, not ``ref``'s)."""
    if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
        with v.fake_mode:
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device,
                                       requires_grad=v.requires_grad)
    if isinstance(v, (tuple, list)):
        return type(v)(_fresh(x) for x in v)
    return v
