"""schedule: wavefronts, groups of identical cells, closed form.

Before: a ``CellGraph``. After: a ``Schedule``. For ARMT with S=3, L=3::

    t=0: [(0,0)]                 groups [[(0,0)]]
    t=1: [(0,1), (1,0)]          groups [[(0,1)], [(1,0)]]   # segment 0 has no read
    t=2: [(0,2), (1,1), (2,0)]   groups [[(0,2)], [(1,1), (2,0)]]
    t=3: [(1,2), (2,1)]          groups [[(1,2), (2,1)]]
    t=4: [(2,2)]
    closed form: S + L - 1 (time function t = s + l)

Wavefronts are ``networkx.topological_generations`` of the cell DAG: exact
for any dependence pattern. The closed form comes from the best *linear*
schedule t = a*s + b*l over the dependence vectors, solved with sympy in the
symbols S and L; when it needs as many steps as there are cells it is also
the explanation of why a model cannot be batched.

Cells are grouped by ``cell_signature``: two cells may share a batched call
only if their subgraphs are identical op for op (targets, constants, shapes,
dtypes, which values leave the cell) up to *which* outside values they read.
"""

from __future__ import annotations

import operator
from typing import Dict, List, Optional, Sequence, Tuple

import networkx as nx
import sympy
import torch
import torch.fx as fx

from diagpass.counters import counters
from diagpass.ir.cell_graph import CellGraph
from diagpass.ir.cells import Cell, CellGrid
from diagpass.ir.schedule import ConstantSite, Group, Schedule, Wavefront
from diagpass.ir.meta import AUTOCAST
from diagpass.fx_facts import example_value

S, L = sympy.symbols("S L", positive=True, integer=True)
_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _value_key(v):
    if isinstance(v, torch.Tensor):
        # requires_grad is left out: stacking mixes them freely and autograd
        # still routes each cell's gradient to its own input.
        return ("T", tuple(d if isinstance(d, int) else str(d) for d in v.shape), v.dtype)
    if isinstance(v, (tuple, list)):
        return tuple(_value_key(x) for x in v)
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(v))
    return (type(v).__name__, repr(v) if isinstance(v, _SIMPLE) else id(v))


# Binary ops where a Python number equals a 0-dim tensor of the other operand's
# dtype bit for bit (one correctly rounded operation; the scalar is cast to that
# dtype either way). Division is left out: a kernel may multiply by the reciprocal
# of a scalar divisor. bf16/fp16 are left out: their scalar ops run in fp32.
_LIFTABLE_FUNCTIONS = {operator.mul, operator.add, operator.sub, torch.mul, torch.add, torch.sub}
_LIFTABLE_METHODS = {"mul", "add", "sub"}
_LIFT_DTYPES = {torch.float32: (int, float), torch.float64: (int, float), torch.int64: (int,)}


def constant_sites(node: fx.Node) -> List[Tuple[int, object, torch.dtype]]:
    """(argument position, value, dtype) of each Python number ``node`` combines
    with a tensor where passing it as a 0-dim tensor gives the same result."""
    if node.kwargs or len(node.args) != 2:
        return []
    if not (
        (node.op == "call_function" and node.target in _LIFTABLE_FUNCTIONS)
        or (node.op == "call_method" and node.target in _LIFTABLE_METHODS)
    ):
        return []
    sites = []
    for pos in (0, 1) if node.op == "call_function" else (1,):
        value, other = node.args[pos], node.args[1 - pos]
        tensor = example_value(other) if isinstance(other, fx.Node) else None
        if isinstance(value, bool) or not isinstance(tensor, torch.Tensor):
            continue
        kinds = _LIFT_DTYPES.get(tensor.dtype)
        result = example_value(node)
        if kinds and isinstance(value, kinds) and isinstance(result, torch.Tensor) and result.dtype == tensor.dtype:
            sites.append((pos, value, tensor.dtype))
    return sites


def cell_constants(cell: Cell) -> List[ConstantSite]:
    """(node index in the cell, argument position, value, dtype) of every
    liftable constant: cells that differ only in these batch, with them
    stacked as an input (``passes/batch.py``)."""
    return [(i, pos, v, dt) for i, n in enumerate(cell.nodes) for pos, v, dt in constant_sites(n)]


def cells_partly_in_autocast(grid: CellGrid) -> List[tuple]:
    """Cells with nodes inside and outside an autocast region: never batched
    (a batched call runs in one autocast state)."""
    return sorted(cid for cid, c in grid.cells.items() if len({n.meta.get(AUTOCAST) for n in c.nodes}) > 1)


def cell_signature(cell: Cell, grid: CellGrid, constant_slots: Sequence[ConstantSite] = ()) -> Optional[tuple]:
    """A hashable description that is equal iff two cells compute the same
    function of their inputs; None if the cell must never be batched. The
    ``constant_slots`` (the cell's ``cell_constants``) count as inputs (their
    values left out): equal then means the same function of inputs and
    those constants."""
    slotted = {(i, pos): ("const", dt) for i, pos, _, dt in constant_slots}
    index = {n: i for i, n in enumerate(cell.nodes)}
    slots = {n: k for k, n in enumerate(cell.inputs)}

    def enc(a):
        if isinstance(a, fx.Node):
            return ("n", index[a]) if a in index else ("in", slots[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(enc(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, enc(v)) for k, v in a.items()))
        if isinstance(a, slice):
            return ("slice", enc(a.start), enc(a.stop), enc(a.step))
        if isinstance(a, _SIMPLE) or a is Ellipsis:
            return (type(a).__name__, repr(a))
        return (type(a).__name__, id(a))  # unknown objects: equal only if identical

    if len({n.meta.get(AUTOCAST) for n in cell.nodes}) > 1:
        return None  # partly inside an autocast region: a batched call runs in one state
    body = []
    for i, n in enumerate(cell.nodes):
        if n.op == "call_module":  # (random ops and unproven writes: partition refused the graph)
            return None
        args = tuple(slotted.get((i, pos)) or enc(a) for pos, a in enumerate(n.args))
        # recompute: a checkpointed cell and a plain one compute the same values but
        # are not one group (the group's call becomes one checkpoint region)
        body.append((n.op, n.target, args, enc(n.kwargs), _value_key(example_value(n)), n.meta.get("recompute"), n.meta.get(AUTOCAST)))
    inputs = tuple(
        (grid.stack.param_role.get(a), _value_key(example_value(a))) for a in cell.inputs
    )
    outputs = tuple(index[o] for o in cell.outputs)
    return (tuple(body), inputs, outputs)


def _symbolic(d: int, num_layers: int):
    if num_layers > 2 and d == 1 - num_layers:
        return 1 - L
    if num_layers > 2 and d == num_layers - 1:
        return L - 1
    return sympy.Integer(d)


def linear_schedule(graph: CellGraph) -> Tuple[Optional[sympy.Expr], Optional[sympy.Expr], Optional[tuple]]:
    """Best t = a*s + b*l (b = ±1) for the dependence vectors, in S and L.

    Returns (steps, time function, the vector that bounds a) or Nones if no
    linear schedule exists.
    """
    s, l = sympy.symbols("s l", integer=True)
    best = None
    for b in (1, -1):
        if any(ds == 0 and b * dl < 1 for ds, dl in graph.vectors):
            continue
        a, culprit = sympy.Integer(0), None
        for ds, dl in sorted(graph.vectors):
            if ds > 0:
                need = sympy.ceiling((1 - b * _symbolic(dl, graph.num_layers)) / ds)
                value = need.subs(L, graph.num_layers)
                if value > a.subs(L, graph.num_layers):
                    a, culprit = need, (ds, dl)
        steps = sympy.simplify(a * (S - 1) + (L - 1) + 1)
        concrete = steps.subs({S: graph.num_segments, L: graph.num_layers})
        if best is None or concrete < best[0]:
            best = (concrete, steps, a * s + b * l, culprit)
    if best is None:
        return None, None, None
    return best[1], best[2], best[3]


def _reason(graph: CellGraph, steps, culprit) -> str:
    n = graph.num_segments * graph.num_layers
    if graph.num_segments == 1:
        return (
            "a single segment: its layers run one after another and there is no other "
            "segment to batch with (diagonal batching needs at least 2 segments)"
        )
    if culprit is None:
        return f"every cell depends on the previous one: {n} steps for {n} cells"
    ds, dl = culprit
    src = f"layer {'L-1' if dl == 1 - graph.num_layers else 'l'}"
    dst = "layer 0" if dl == 1 - graph.num_layers else f"layer l{dl:+d}"
    return (
        f"dependence vector ({ds}, {_symbolic(dl, graph.num_layers)}): {src} of segment s feeds "
        f"{dst} of segment s+{ds}, so any schedule needs {steps} = "
        f"{n} steps for {n} cells; no two cells can run together"
    )


def schedule(grid: CellGrid, graph: CellGraph) -> Schedule:
    exact = {cid: cell_signature(cell, grid) for cid, cell in grid.cells.items()}
    # Grouped by the signature with liftable constants as slots: cells that differ
    # only in such constants (a per-layer scale, a per-segment offset) share a group.
    constants = {cid: cell_constants(cell) for cid, cell in grid.cells.items()}
    signatures = {cid: cell_signature(cell, grid, constant_slots=constants[cid]) for cid, cell in grid.cells.items()}
    wavefronts: List[Wavefront] = []
    for t, generation in enumerate(nx.topological_generations(graph.dag)):
        cells = sorted(generation, key=lambda c: (c[1], c[0]))
        by_sig: Dict[object, List] = {}
        for cid in cells:
            key = signatures[cid] if signatures[cid] is not None else ("unique", cid)
            by_sig.setdefault(key, []).append(cid)
        groups = tuple(Group(tuple(g)) for g in by_sig.values())
        wavefronts.append(Wavefront(t, tuple(cells), groups))
    steps, time_fn, culprit = linear_schedule(graph)
    width = max((len(w.cells) for w in wavefronts), default=0)
    reason = _reason(graph, steps, culprit) if width <= 1 and len(grid.cells) > 1 else None
    counters["schedule"]["wavefronts"] += len(wavefronts)
    return Schedule(
        tuple(wavefronts), graph.num_segments, graph.num_layers, exact, constants, steps, time_fn, reason
    )
