"""cut: a graph split into steps, each step one ``call_module`` of its own subgraph.

The shared half of ``segment_steps`` and ``wavefront_steps``: they decide which
region every compute node belongs to; this builds the outer graph. Region
``PROLOGUE`` and ``EPILOGUE`` stay in the outer graph as they are, and so do the
regions between two steps (``outside_before(r)``, ``outside_after(r)``); every other
region (in increasing order) becomes ``{prefix}_{r}``, a plain ``fx.GraphModule``
of the values it reads, returning the values read outside it, with
``meta["structure"]`` (``fx_facts.graph_structure``): equal for steps that
compute the same function of their inputs. Autocast regions travel as node
metadata (``passes/autocast.py``): each step, and the outer graph, gets its
enter/exit pairs back around its own runs of nodes, so a region the cut splits
is entered again in every step it spans and every op runs under the autocast
state it ran under in eager.

Before (regions: ``x_1`` in the prologue, the rest in region 1)::

    x_1 = getitem(split(ids), 1)
    h = layer(x_1, m_0, w);  y = lm_head(h)

After::

    x_1 = getitem(split(ids), 1)
    x_1c = x_1.clone(memory_format=contiguous)    # a view of an input: its strides follow N
    step_1 = segment_1(x_1c, m_0, w);  h = step_1[0];  y = step_1[1]
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from diagpass.counters import counters
from diagpass.fx_facts import example_value, graph_module, graph_structure, storages_of
from diagpass.ir.meta import AUTOCAST, REPLACES
from diagpass.passes.autocast import restore_autocast_regions

PROLOGUE, EPILOGUE = -1, 1 << 30


# Between steps ``r - 1`` and ``r`` (integers), in this order: the step of what enters
# at ``r`` (``entering(r)``), the outer graph (``outside_before(r)``, which is
# ``outside_after(r - 1)``), the step of what leaves at ``r - 1`` (``leaving(r - 1)``).


def outside_after(r: int) -> float:
    """The region of the outer graph between step ``r`` and step ``r + 1``."""
    return r + 0.5


def outside_before(r: int) -> float:
    """The region of the outer graph between step ``r - 1`` and step ``r``."""
    return r - 0.5


def entering(r: int) -> float:
    """A step of its own before step ``r``, before the outer graph that precedes it."""
    return r - 0.75


def leaving(r: int) -> float:
    """A step of its own after step ``r``, after the outer graph that follows it."""
    return r + 0.75


def is_outer(r) -> bool:
    """Whether region ``r`` stays in the outer graph (not a step of its own)."""
    return r in (PROLOGUE, EPILOGUE) or r % 1 == 0.5


def step_name(prefix: str, r) -> str:
    """``{prefix}_{r}``; ``{prefix}_{r}_enter`` for ``entering(r)``, ``{prefix}_{r}_leave`` for ``leaving(r)``."""
    if r == int(r):
        return f"{prefix}_{int(r)}"
    if r % 1 == 0.25:
        return f"{prefix}_{int(r + 0.75)}_enter"
    return f"{prefix}_{int(r - 0.75)}_leave"


@dataclasses.dataclass(frozen=True)
class Steps:
    """The outer graph: prologue, one ``call_module`` per step, epilogue. ``num_steps``
    counts the steps of integer regions, ``num_glue_steps`` those of ``entering`` and
    ``leaving`` regions; ``num_structures`` both."""

    gm: fx.GraphModule
    num_steps: int
    num_structures: int
    num_glue_steps: int = 0


class NotCrossable(Exception):
    """A value that cannot cross a step's cut."""


def cut(gm: fx.GraphModule, place: Dict[fx.Node, tuple], kind: str) -> Tuple[Optional[Steps], str]:
    """``place``: every compute node -> (region, sort keys...); the steps are named
    ``{kind}_{r}`` and counted under ``counters[f"{kind}_steps"]``. (the cut graph, "")
    or (None, why not): the order is not topological, or a value crossing a cut is
    not a tensor or a number."""
    order = sorted(place, key=lambda n: place[n])
    if not topological(gm, order):
        return None, f"a {kind} reads a later one"
    regions: Dict[int, List[fx.Node]] = {}
    for n in order:
        regions.setdefault(place[n][0], []).append(n)
    try:
        steps = _cut_regions(gm, regions, kind)
    except NotCrossable as e:
        return None, f"a value crossing a {kind}'s cut is not a tensor or a number ({e})"
    counters[f"{kind}_steps"]["graphs"] += 1
    counters[f"{kind}_steps"]["steps"] += steps.num_steps
    counters[f"{kind}_steps"]["glue_steps"] += steps.num_glue_steps
    return steps, ""


def _cut_regions(gm: fx.GraphModule, regions: Dict[int, List[fx.Node]], prefix: str) -> Steps:
    """``regions``: region -> its nodes in a valid order (each region reads only earlier ones)."""
    out = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    root: Dict[str, torch.nn.Module] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            env[n] = out.node_copy(n, env.__getitem__)
    input_storages = graph_input_storages(gm)
    views = {n for n in regions.get(PROLOGUE, ()) if views_an_input(n, input_storages) or is_view(n)}
    dense: Dict[fx.Node, fx.Node] = {}
    for r in sorted(regions):
        nodes = regions[r]
        if is_outer(r):
            for n in nodes:
                env[n] = out.node_copy(n, env.__getitem__)
            continue
        sub, inputs, outputs = _region(gm, nodes)
        name = step_name(prefix, r)
        root[name] = sub
        call = out.call_module(name, tuple(_dense(out, env, dense, i, views) for i in inputs))
        for j, o in enumerate(outputs):
            env[o] = out.call_function(operator.getitem, (call, j))
            env[o].meta.update(o.meta)
            env[o].meta.pop(AUTOCAST, None)  # unpacking a step's outputs is not an op autocast affects
    for n in gm.graph.find_nodes(op="output"):
        out.node_copy(n, env.__getitem__)
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            root[n.target] = operator.attrgetter(n.target)(gm)
    out.lint()
    new = graph_module(root, out, type(gm).__name__)
    new.meta = dict(gm.meta)
    restore_autocast_regions(new)  # the prologue's and epilogue's nodes (each step restores its own)
    steps = [m for _, m in new.named_children() if "structure" in m.meta]
    glue = sum(not is_outer(r) and r != int(r) for r in regions)  # entering and leaving regions
    return Steps(new, len(steps) - glue, len({m.meta["structure"] for m in steps}), glue)


def topological(gm: fx.GraphModule, order: List[fx.Node]) -> bool:
    seen = {n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")}
    for n in order:
        if any(a not in seen for a in n.all_input_nodes):
            return False
        seen.add(n)
    return True


def graph_input_storages(gm: fx.GraphModule) -> set:
    return set().union(*(storages_of(example_value(n)) for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")))


def is_view(n: fx.Node) -> bool:
    """Whether ``n``'s value shares the storage of one of its inputs' values."""
    mine = storages_of(example_value(n))
    return bool(mine) and any(mine <= storages_of(example_value(a)) for a in n.all_input_nodes)


def is_number(n: fx.Node) -> bool:
    """Whether ``n``'s value is a number or a tuple of them (a size Dynamo kept symbolic,
    its arithmetic, ``x.size()``): no tensor in it."""
    v = example_value(n)
    values = v if isinstance(v, (tuple, list)) else (v,)
    return v is not None and all(isinstance(x, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))
                                 for x in values)


def reads_only_prologue(n: fx.Node, place: Dict[fx.Node, tuple]) -> bool:
    return all(a.op in ("placeholder", "get_attr") or place[a][0] == PROLOGUE for a in n.all_input_nodes)


def views_an_input(n: fx.Node, inputs: set) -> bool:
    """Whether ``n``'s value (a tensor, or a tuple of them: a split) shares a graph input's storage."""
    mine = storages_of(example_value(n))
    return bool(mine) and mine <= inputs


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
        dense[node].meta.pop(AUTOCAST, None)  # a copy: autocast does not affect it
    return dense[node]


def _region(gm: fx.GraphModule, nodes: List[fx.Node]) -> Tuple[fx.GraphModule, list, list]:
    """One region's nodes as a graph of the values it reads; its outputs are
    the values read outside it."""
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
    outputs = [n for n in nodes if any(u not in inside for u in n.users) or _unread_row_of_a_read_stack(n)]
    for o in outputs:
        _require_tensor(o)
    g.output(tuple(env[o] for o in outputs))
    sub = graph_module(gm, g, "Step")
    restore_autocast_regions(sub)  # a region the cut splits is entered again in every step it spans
    sub.meta["structure"] = graph_structure(sub)
    return sub, inputs, outputs


def _unread_row_of_a_read_stack(n: fx.Node) -> bool:
    """A group's unpacked output nobody reads whose stacked output is read elsewhere (a
    last-segment cell's memory update, ``passes/complete_cells.py``): returned too, it is
    a view of a buffer computed anyway, and the wavefront where the last segment enters
    is then the steady one's structure (in inference: with gradients, a parameter only that
    write reads would get a zero gradient instead of None). A stack nobody reads is left
    for the compiler to drop."""
    if REPLACES not in n.meta or n.users or n.target is not operator.getitem:
        return False
    if getattr(n.meta[REPLACES], "requires_grad", False):
        return False  # a step output would get a gradient (zeros) where eager's parameters get none
    stack = n.args[0]
    return isinstance(stack, fx.Node) and any(row.users for row in stack.users)


def _require_value(n: fx.Node) -> None:
    """A tensor, or a number (a size Dynamo kept symbolic: concrete per call)."""
    if not isinstance(example_value(n), (torch.Tensor, int, float, bool, torch.SymInt, torch.SymFloat)):
        raise NotCrossable(f"{n.name}: {type(example_value(n)).__name__}")


def _require_tensor(n: fx.Node) -> None:
    if not isinstance(example_value(n), torch.Tensor):
        raise NotCrossable(f"{n.name}: {type(example_value(n)).__name__}")
