"""functionalize: every in-place write lands on a tensor only it reads.

FX edges do not order an in-place op against the other readers of the tensor
it writes, so any later reordering (every pass below reorders) could move a
reader across the write. This pass makes each write private, after which the
data edges alone carry the order. Which nodes write what comes from
``passes/effects.py`` (the ATen ops' schemas), not from op names.

Before (cell (s, l) writes its memory input; the next cell and a returned list
also read it)::

    mem_1 = add(mem_0, upd)                 # (s-1, l)'s new memory
    seen  = [mem_1]                         # read before the write
    r     = relu(mem_1, inplace=True)       # cell (s, l): writes mem_1
    out   = add(mem_1, m)                   # reads the written mem_1
    return (out, seen)

After::

    mem_1 = add(mem_0, upd)
    seen  = [mem_1]
    mem_1c = clone(mem_1)                   # the write's own copy
    r     = relu(mem_1c, inplace=True)      # writes a tensor nobody else reads
    out   = add(r, m)                       # later reads read the write's result
    return (out, seen)

``x[i] = v`` (``operator.setitem`` returns None) becomes ``x' = assign_item(x, i, v)``,
an in-place op that returns the tensor it wrote.

Refused with the reason (``NotBatchable``): writes to graph inputs (parameters,
buffers, forward arguments, tensors held in module attributes), writes through
a view whose base or sibling view is read after the write, ops that write
more than one tensor or that return something other than the written tensor.
"""

from __future__ import annotations

import bisect
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.passes.effects import Effects, Storage, analyze_effects
from diagpass.fx_facts import copy_graph_module, example_value
from diagpass.ir.meta import PRIVATE_WRITE


def assign_item(tensor: torch.Tensor, index, value) -> torch.Tensor:
    """``tensor[index] = value``, returning ``tensor`` (``setitem`` returns None)."""
    tensor[index] = value
    return tensor


def functionalize(gm: fx.GraphModule) -> Tuple[fx.GraphModule, int]:
    """Return (graph whose every write is private, writes rewritten). The input
    graph is not edited; without writes it is returned as it is."""
    effects = analyze_effects(gm)
    if not effects.writes:
        return gm, 0
    new, val_map = copy_graph_module(gm)
    moved = _translate(effects, val_map)
    rewriter = _Rewriter(new, moved)
    for node in [val_map[n] for n in gm.graph.nodes if n in effects.writes]:
        rewriter.make_private(node)
    new.graph.lint()
    new.recompile()
    counters["functionalize"]["writes"] += len(effects.writes)
    counters["functionalize"]["clones"] += rewriter.clones
    counters["functionalize"]["setitems"] += rewriter.setitems
    return new, len(effects.writes)


def _translate(effects: Effects, val_map: Dict[fx.Node, fx.Node]) -> Effects:
    """The same effects, keyed by the copied graph's nodes."""
    return Effects(
        {val_map[n]: w for n, w in effects.writes.items()},
        {val_map[n]: s for n, s in effects.storages.items()},
        {val_map[n]: val_map[a] for n, a in effects.returns_input.items()},
    )


class _Rewriter:
    """Rewrites writes one by one, in graph order.

    A clone starts a new *epoch* of the storage it copies: nodes after the
    clone that the analysis saw on that storage now hold the clone's lineage
    (every later read was redirected to the write's result), nodes before it
    the original. ``epochs[storage]`` lists the clone positions."""

    def __init__(self, gm: fx.GraphModule, effects: Effects):
        self.gm = gm
        self.fx = effects
        self.pos: Dict[fx.Node, float] = {n: float(i) for i, n in enumerate(gm.graph.nodes)}
        self.by_storage: Dict[Storage, List[fx.Node]] = {}
        for n, stores in effects.storages.items():
            for s in stores:
                self._hold(n, s)
        self.epochs: Dict[Storage, List[float]] = {}
        self.clones = 0
        self.setitems = 0

    def _hold(self, node: fx.Node, storage: Storage) -> None:
        self.by_storage.setdefault(storage, []).append(node)

    def _epoch_start(self, storage: Storage, at: float) -> float:
        starts = self.epochs.get(storage, [])
        k = bisect.bisect_left(starts, at)
        return starts[k - 1] if k else float("-inf")

    def make_private(self, n: fx.Node) -> None:
        written = self.fx.writes[n]
        if len(written) != 1:
            raise NotBatchable(f"node {n.name} ({_op_name(n)}) writes {len(written)} tensors in place")
        storage = next(iter(written))
        start = self._epoch_start(storage, self.pos[n])
        aliases = [a for a in self.by_storage.get(storage, []) if a is not n and start <= self.pos[a] < self.pos[n]]
        holders = [a for a in n.all_input_nodes if a in aliases]
        if len(holders) != 1:
            raise NotBatchable(
                f"node {n.name} ({_op_name(n)}) writes a tensor it reads under {len(holders)} names (views)"
            )
        x = holders[0]
        if not isinstance(example_value(x), torch.Tensor):
            raise NotBatchable(f"node {n.name} ({_op_name(n)}) writes into {x.name}, which is not a tensor")
        self._refuse_input_write(n, aliases)
        self._refuse_views_read_after(n, x, aliases)
        result = self._result_form(n, x)
        # Always a fresh copy, even where nothing read x before the write: after
        # batching x may be a view of a group's stacked output (a write into it
        # would bump the version of a tensor autograd saved), and the copy is
        # what keeps the write private whatever the later passes place around it.
        x = self._clone_before(n, x, storage)
        at = self.pos[n]
        out = self._as_returning_self(n, x, storage) if result == "none" else n
        for u in list(holders[0].users):
            if u is not out and self.pos.get(u, float("inf")) > at:
                u.replace_input_with(holders[0], out)
        out.meta[PRIVATE_WRITE] = x.name
        if "out" in out.kwargs:
            self._drop_out_argument(out, x)

    def _drop_out_argument(self, n: fx.Node, x: fx.Node) -> None:
        """``op(..., out=x)`` with ``x`` private equals ``op(...)`` when the result
        has x's shape and dtype (no resize, no cast); vmap has no rule for ``out=``."""
        kwargs = {k: v for k, v in n.kwargs.items() if k != "out"}
        value = example_value(x)
        args = fx.node.map_arg(n.args, example_value)
        fake_kwargs = fx.node.map_arg(kwargs, example_value)
        try:
            with value.fake_mode:
                fresh = n.target(*args, **fake_kwargs)
        except Exception:  # noqa: BLE001 - keep the out= form: exact, just not batched
            return
        if not isinstance(fresh, torch.Tensor) or fresh.shape != value.shape or fresh.dtype != value.dtype:
            return
        n.kwargs = kwargs
        n.meta["example_value"] = fresh
        del n.meta[PRIVATE_WRITE]
        if not x.users and x.target is torch.clone:
            self.gm.graph.erase_node(x)
        counters["functionalize"]["out_arguments_dropped"] += 1

    def _refuse_input_write(self, n: fx.Node, aliases: List[fx.Node]) -> None:
        inputs = [a for a in aliases if a.op in ("placeholder", "get_attr")]
        if inputs:
            raise NotBatchable(
                f"in-place op {_op_name(n)} (node {n.name}) writes graph input {inputs[0].name} "
                "(a forward argument, parameter, buffer or tensor attribute): its effect is visible "
                "outside the graph; write a new tensor (out-of-place op) to enable batching"
            )

    def _refuse_views_read_after(self, n: fx.Node, x: fx.Node, aliases: List[fx.Node]) -> None:
        for a in aliases:
            if a is x:
                continue
            late = [u for u in a.users if u is not n and self.pos.get(u, float("inf")) > self.pos[n]]
            if late:
                raise NotBatchable(
                    f"in-place op {_op_name(n)} (node {n.name}) writes {x.name}, and {late[0].name} "
                    f"reads the same storage afterwards through {a.name} (a view or base): not "
                    "provably safe to reorder; use the out-of-place op to enable batching"
                )

    def _result_form(self, n: fx.Node, x: fx.Node) -> str:
        if self.fx.returns_input.get(n) is x:
            return "self"
        if n.op == "call_function" and n.target is operator.setitem and not n.users:
            return "none"
        raise NotBatchable(
            f"in-place op {_op_name(n)} (node {n.name}) writes {x.name} but returns another value"
        )

    def _clone_before(self, n: fx.Node, x: fx.Node, storage: Storage) -> fx.Node:
        graph = self.gm.graph
        with graph.inserting_before(n):
            c = graph.call_function(torch.clone, (x,))
        c.meta = {k: v for k, v in x.meta.items() if k != PRIVATE_WRITE}
        value = example_value(x)
        if isinstance(value, torch.Tensor) and hasattr(value, "fake_mode"):
            with value.fake_mode:
                c.meta["example_value"] = torch.clone(value)
        n.replace_input_with(x, c)
        self.pos[c] = self.pos[n] - 0.5
        bisect.insort(self.epochs.setdefault(storage, []), self.pos[c])
        self._hold(c, storage)  # same key, new epoch: see the class docstring
        self.clones += 1
        return c

    def _as_returning_self(self, n: fx.Node, x: fx.Node, storage: Storage) -> fx.Node:
        graph = self.gm.graph
        with graph.inserting_before(n):
            out = graph.call_function(assign_item, tuple(n.args), dict(n.kwargs))
        out.meta = dict(n.meta)
        out.meta["example_value"] = example_value(x)
        graph.erase_node(n)
        self.pos[out] = self.pos.pop(n)
        self._hold(out, storage)
        self.setitems += 1
        return out


def _op_name(n: fx.Node) -> str:
    return str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
