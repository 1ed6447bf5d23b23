"""batch: one batched call per group of identical cells.

Before (wavefront t = 2 of ARMT, cells (1,1) and (2,0) identical)::

    q_1_1 = linear(h_1_0, layers.1.q.weight) ... A_1_1 = add(A_0_1, ...)
    q_2_0 = linear(h_2_0, layers.0.q.weight) ... A_2_0 = add(A_1_0, ...)

After::

    w_q     = stack([layers.0.q.weight, ..., layers.{L-1}.q.weight])  # once per call
    x       = stack([h_1_0, h_2_0])          # inputs that differ per cell
    w_q_0_1 = w_q[0:2]                       # weights: a view, never a re-stack
    out     = diag_t2_g0(x, A, w_q_0_1, ...) # GroupCall: lowered to a vmap of the cell
    h_1_1   = out[0][0];  h_2_0' = out[0][1] ...

The new graph is emitted in schedule order: glue that needs no cell first,
then every wavefront's groups, each followed by the glue it makes ready.
Groups with the same structure (signature, size, stacked inputs) call one
shared module: a steady state of S wavefronts has one GroupCall, not S.
Groups smaller than ``min_group`` (and cells that must never batch) are
copied node for node. Inputs shared by every cell of a group (the memory
embeddings, a mask) are passed once, unstacked.

Each new group module is a ``GroupCall`` (``diagpass/ir/rewrite.py``), IR
that the runtime lowers. When it is built it is handed to ``trial`` (the
pipeline passes the runtime's trace on fake stacked inputs): a group whose
batched call does not trace (an op vmap cannot batch and the row-wise table
cannot fold) is copied node for node like a small group, the other groups
still batch, and the cause is recorded once; the pipeline's whole-graph fake
check stays the safety net. With ``roll`` every group is emitted as a call
(singletons too), so each distinct step compiles once.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from diagpass.counters import counters
from diagpass.fx_facts import example_value, graph_module
from diagpass.ir.cell_graph import CellGraph
from diagpass.ir.cells import Cell, CellGrid
from diagpass.ir.meta import AUTOCAST, COPIED, REPLACES, WAVEFRONT, WEIGHT_STACK
from diagpass.ir.rewrite import BatchedGraph, GroupCall
from diagpass.ir.schedule import Group, Schedule

# trial(name, template, in_dims, group size, fake arguments) -> None, or why the call does not trace
Trial = Callable[[str, fx.GraphModule, tuple, int, list], Optional[str]]


def _template(cell: Cell, lifted: Sequence[Tuple[int, int]] = ()) -> fx.GraphModule:
    """One cell as a graph of its inputs; each ``lifted`` constant (node index,
    argument position) becomes one more input, after the cell's own."""
    g = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for k, a in enumerate(cell.inputs):
        ph = g.placeholder(f"in_{k}")
        ph.meta = dict(a.meta)
        env[a] = ph
    slots = {site: g.placeholder(f"const_{k}") for k, site in enumerate(lifted)}
    for i, n in enumerate(cell.nodes):
        env[n] = g.node_copy(n, lambda x: env[x])
        for pos in range(len(n.args)):
            if (i, pos) in slots:
                env[n].update_arg(pos, slots[(i, pos)])
        if n.op == "call_method" and n.target == "view" and not _is_dtype_view(n):
            # Same values; but under vmap the batched layout can make a view
            # impossible (and AOTAutograd's backward of view is a view).
            env[n].target = "reshape"
    g.output(tuple(env[o] for o in cell.outputs))
    return fx.GraphModule(torch.nn.Module(), g)


def _is_dtype_view(node: fx.Node) -> bool:
    return any(isinstance(a, torch.dtype) for a in node.args[1:]) or "dtype" in node.kwargs


class _Emitter:
    """Builds the rewritten graph in schedule order."""

    def __init__(self, grid: CellGrid, sched: Schedule, trial: Optional[Trial]):
        self.grid = grid
        self.sched = sched
        self.trial_fn = trial
        self.graph = fx.Graph()
        self.env: Dict[fx.Node, fx.Node] = {}
        self.modules: Dict[str, torch.nn.Module] = {}
        self.stacks: Dict[str, fx.Node] = {}
        # One module per distinct (structure, group size, stacked inputs):
        # equal signatures mean the same function, so every wavefront of the
        # steady state calls one module (one template, one fake trace, one
        # codegen), not a copy per group.
        self.module_for: Dict[tuple, str] = {}
        # module keys whose trial trace failed -> the cause (tried once per key)
        self.failed: Dict[tuple, str] = {}
        self.causes: List[Tuple[str, str]] = []

    def copy(self, node: fx.Node) -> None:
        self.env[node] = self.graph.node_copy(node, lambda x: self.env[x])
        self.env[node].meta[COPIED] = True

    def weight_stack(self, role: str) -> fx.Node:
        if role not in self.stacks:
            params = [self.env[p] for p in self.grid.stack.by_role(role)]
            self.stacks[role] = self.graph.call_function(torch.stack, (params,))
            self.stacks[role].meta[WEIGHT_STACK] = role
            counters["batch"]["weight_stacks"] += 1
        return self.stacks[role]

    def group_input(self, nodes: List[fx.Node]):
        """(value, in_dim) for one input slot across a group, or None."""
        first = nodes[0]
        if all(n is first for n in nodes):
            return self.env[first], None
        if not all(isinstance(example_value(n), torch.Tensor) for n in nodes):
            return None  # differing non-tensors (ints, symbols) cannot be stacked
        stack = self.grid.stack
        roles = {stack.param_role.get(n) for n in nodes}
        if len(roles) == 1 and None not in roles:
            rows = [stack.role_position(n) for n in nodes]
            all_w = self.weight_stack(roles.pop())
            if rows == list(range(rows[0], rows[0] + len(rows))):
                index = slice(rows[0], rows[-1] + 1)
            else:
                index = rows
            return self.graph.call_function(operator.getitem, (all_w, index)), 0
        counters["batch"]["stacked_inputs"] += 1
        return self.graph.call_function(torch.stack, ([self.env[n] for n in nodes],)), 0

    def lifted_constants(self, cells: List[Cell], args: List, dims: List) -> List[Tuple[int, int]]:
        """The constants in which the group's cells differ (schedule grouped
        them with constants as slots), each appended to ``args`` as a 0-dim
        tensor per cell, stacked: ``tensor([c_0, ..., c_{G-1}], dtype)``."""
        per_cell = [self.sched.constants[c.id] for c in cells]
        lifted = []
        for k, (i, pos, _, dtype) in enumerate(per_cell[0]):
            values = [sites[k][2] for sites in per_cell]
            if any(v != values[0] or type(v) is not type(values[0]) for v in values):
                args.append(self.graph.call_function(torch.tensor, (values,), {"dtype": dtype}))
                dims.append(0)
                lifted.append((i, pos))
                counters["batch"]["constants_lifted"] += 1
        return lifted

    def batched(self, name: str, cell_ids: Sequence, rolled: bool = False) -> bool:
        cells = [self.grid.cells[c] for c in cell_ids]
        rep = cells[0]
        mark = self._last_node()
        args, dims = [], []
        for k in range(len(rep.inputs)):
            slot = self.group_input([c.inputs[k] for c in cells])
            if slot is None:
                counters["batch"]["groups_skipped_nontensor_input"] += 1
                self._rollback(mark)
                return False
            args.append(slot[0])
            dims.append(slot[1])
        lifted = self.lifted_constants(cells, args, dims)
        structure = (self.sched.signatures[rep.id], tuple(dims))
        key = (structure, len(cells), rolled, tuple(lifted))
        target = self.module_for.get(key)
        if target is None and key not in self.failed:
            module = GroupCall(_template(rep, lifted), dims, len(cells), structure, rolled)
            cause = self.trial(name, module, cells, args, dims)
            if cause is not None:
                self.failed[key] = cause
                self.refuse(name, cells, cause)
        if key in self.failed:
            counters["batch"]["groups_unbatchable"] += 1
            self._rollback(mark)
            return False
        if target is None:
            target = self.module_for[key] = name
            self.modules[name] = module
            counters["batch"]["modules"] += 1
        call = self.graph.call_module(target, tuple(args))
        _carry_checkpoint_tags(call, cells)
        regions = rep.nodes[0].meta.get(AUTOCAST)  # one per cell: schedule.cell_signature
        if regions:
            call.meta[AUTOCAST] = regions
        for j in range(len(rep.outputs)):
            stacked = self.graph.call_function(operator.getitem, (call, j))
            for i, cell in enumerate(cells):
                out = self.env[cell.outputs[j]] = self.graph.call_function(operator.getitem, (stacked, i))
                if regions:
                    stacked.meta[AUTOCAST] = out.meta[AUTOCAST] = regions
                out.meta[REPLACES] = example_value(cell.outputs[j])
        return True

    def trial(self, name: str, module: GroupCall, cells: List[Cell], args: List, dims: List) -> Optional[str]:
        """``trial`` on fake inputs built as the call builds them (a stack of
        the cells' values, or the one shared value); None if it traces."""
        mode = next((m for m in (getattr(example_value(a), "fake_mode", None) for a in cells[0].inputs) if m), None)
        if mode is None or self.trial_fn is None:
            return None  # nothing to trace with: the pipeline's whole-graph check decides
        with mode, contextlib.ExitStack() as regions:
            try:
                fakes = [self._fake_arg(cells, k, a, d) for k, (a, d) in enumerate(zip(args, dims))]
            except Exception as e:  # noqa: BLE001 - inputs that do not stack: not batched
                return f"the group's inputs do not stack ({type(e).__name__}: {e})".splitlines()[0]
            for region in cells[0].nodes[0].meta.get(AUTOCAST, ()):  # the call runs under its cells' regions
                regions.enter_context(torch.autocast(*region))
            return self.trial_fn(name, module.template, module.in_dims, module.group_size, fakes)

    @staticmethod
    def _fake_arg(cells: List[Cell], k: int, arg: fx.Node, dim):
        """Fake value of argument ``k``: a cell input (stacked over the group
        if ``dim`` is 0), or a lifted constant (``torch.tensor`` of Python
        values: its node is run as it is)."""
        if k < len(cells[0].inputs):
            values = [example_value(c.inputs[k]) for c in cells]
            return values[0] if dim is None else torch.stack(values)
        return arg.target(*arg.args, **arg.kwargs)

    def refuse(self, name: str, cells: List[Cell], cause: str) -> None:
        """Recorded once per distinct cause, not per wavefront. The backend
        logs it (one line) once it knows whether the graph batched at all:
        if not, the cause is the graph's reason instead."""
        if any(c == cause for _, c in self.causes):
            return
        ids = ", ".join(str(c.id) for c in cells)
        self.causes.append((f"group {name} (cells {ids})", cause))

    def _last_node(self) -> Optional[fx.Node]:
        return next(iter(reversed(self.graph.nodes)), None)

    def _rollback(self, mark: Optional[fx.Node]) -> None:
        """Erase the nodes emitted after ``mark`` (a refused group's stacks):
        unused, they would still run under the eager inner compiler."""
        while self._last_node() is not mark:
            node = self._last_node()
            self.stacks = {r: n for r, n in self.stacks.items() if n is not node}
            self.graph.erase_node(node)


_CHECKPOINT_IDS = itertools.count(1 << 24)


def _carry_checkpoint_tags(call: fx.Node, cells: List[Cell]) -> None:
    """Cells inside ``torch.utils.checkpoint`` (tags from inline_subgraphs)
    make their group's call a checkpoint region of its own: AOTAutograd copies
    the call's ``recompute``/``ac_graph_id`` onto every op traced under it."""
    tagged = [n.meta["recompute"] for c in cells for n in c.nodes if n.meta.get("recompute") is not None]
    if tagged:
        call.meta["recompute"] = tagged[0]
        call.meta["ac_graph_id"] = next(_CHECKPOINT_IDS)
        counters["batch"]["checkpointed_groups"] += 1


def _glue_buckets(grid: CellGrid, graph: CellGraph, wave_of: Dict) -> Dict[int, List[fx.Node]]:
    anc = graph.glue_sources
    buckets: Dict[int, List[fx.Node]] = {}
    for node in grid.glue:
        w = max((wave_of[c] for c in anc.get(node, ())), default=-1)
        buckets.setdefault(w, []).append(node)
    return buckets


def _lookup(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _emit_rolled(em: "_Emitter", name: str, group: Group, done: List[Group], min_group: int) -> None:
    """Roll mode: every group (singletons too) runs a cached kernel; one
    kernel serves every group width (``runtime/kernel_cache.py``). Groups below
    ``min_group`` run cell by cell (the sequential baseline)."""
    chunks = [group.cells] if group.size >= min_group else [[c] for c in group.cells]
    for k, chunk in enumerate(chunks):
        if not em.batched(f"{name}_{k}", chunk, rolled=True):
            for cid in chunk:
                for node in em.grid.cells[cid].nodes:
                    em.copy(node)
            continue
        counters["roll"]["group_calls"] += 1
        if len(chunk) > 1:
            done.append(Group(tuple(chunk)))
            counters["batch"]["groups"] += 1
            counters["batch"]["cells"] += len(chunk)


@contextlib.contextmanager
def _tagged(em: "_Emitter", wave: int, role: str):
    """Every node emitted inside gets ``WAVEFRONT`` (wave, role)."""
    mark = em._last_node()
    yield
    node = em._last_node()
    while node is not mark and node is not None:
        node.meta[WAVEFRONT] = (wave, role)
        node = node.prev if node.prev.op != "root" else None


def _emit_groups(em: "_Emitter", wave, done: List[Group], min_group: int, roll: bool) -> None:
    sched, grid = em.sched, em.grid
    for j, group in enumerate(wave.groups):
        has_signature = sched.signatures[group.cells[0]] is not None
        if roll and has_signature:
            _emit_rolled(em, f"diag_t{wave.index}_g{j}", group, done, min_group)
            continue
        batchable = group.size >= min_group and has_signature
        if batchable and em.batched(f"diag_t{wave.index}_g{j}", group.cells):
            done.append(group)
            counters["batch"]["groups"] += 1
            counters["batch"]["cells"] += group.size
            continue
        for cid in group.cells:
            for node in grid.cells[cid].nodes:
                em.copy(node)


def batch_wavefronts(
    grid: CellGrid, graph: CellGraph, sched: Schedule, min_group: int = 2, roll: bool = False,
    trial: Optional[Trial] = None,
) -> BatchedGraph:
    gm = grid.gm
    wave_of = {c: w.index for w in sched.wavefronts for c in w.cells}
    buckets = _glue_buckets(grid, graph, wave_of)
    em = _Emitter(grid, sched, trial)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            em.copy(node)
    with _tagged(em, -1, "glue"):
        for node in buckets.get(-1, []):
            em.copy(node)

    done: List[Group] = []
    for wave in sched.wavefronts:
        with _tagged(em, wave.index, "group"):
            _emit_groups(em, wave, done, min_group, roll)
        with _tagged(em, wave.index, "glue"):
            for node in buckets.get(wave.index, []):
                em.copy(node)
    for node in gm.graph.find_nodes(op="output"):
        em.copy(node)

    root = dict(em.modules)
    for node in em.graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in root:
            root[node.target] = _lookup(gm, node.target)
    em.graph.lint()
    new_gm = graph_module(root, em.graph, type(gm).__name__)
    new_gm.meta = dict(gm.meta)
    return BatchedGraph(new_gm, tuple(done), tuple(em.causes))
