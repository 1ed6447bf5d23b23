"""Analysis — effects: which nodes write which tensors, which values alias.

Read from the ATen ops each node dispatches, not from names: the graph runs
once on the placeholders' fake tensors under a dispatch mode that reads every
op's schema alias annotations (``Tensor(a!)`` = written). So
``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``, ``x **= 2``,
``x[i] = v``, ``x.masked_fill_(m, v)`` and ``torch.add(a, b, out=x)`` are all
writes of ``x``, while ``operator.and_`` (``aten.bitwise_and``) is not.

A write counts only if it lands in a storage the node received (an op may
fill tensors it created itself). Storages are compared by identity
(``StorageWeakRef``), so a write through a view is a write of its base.

Nothing is rewritten; ``passes/functionalize.py`` acts on the result.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.passes.graph_utils import example_value

Storage = StorageWeakRef


def _storages(value) -> FrozenSet[Storage]:
    out = set()
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            try:
                out.add(StorageWeakRef(leaf.untyped_storage()))
            except (RuntimeError, NotImplementedError):  # sparse, nested: no plain storage
                continue
    return frozenset(out)


class _WriteRecorder(TorchDispatchMode):
    """Collects the storages of every argument an op's schema marks as written."""

    def __init__(self):
        super().__init__()
        self.written: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        if schema is not None:
            for i, arg in enumerate(schema.arguments):
                info = arg.alias_info
                if info is None or not info.is_write:
                    continue
                value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
                self.written |= _storages(value)
        return func(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Effects:
    """writes[n]: the storages ``n`` writes among those it received (only
    nodes that write appear). storages[n]: the storages ``n``'s value refers
    to (its output and, for a list, every element). returns_input[n]: the
    input node whose very tensor ``n`` returns (in-place ops return self)."""

    writes: Dict[fx.Node, FrozenSet[Storage]]
    storages: Dict[fx.Node, FrozenSet[Storage]]
    returns_input: Dict[fx.Node, fx.Node]


class _EffectsInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.writes: Dict[fx.Node, FrozenSet[Storage]] = {}
        self.storages: Dict[fx.Node, FrozenSet[Storage]] = {}
        self.returns_input: Dict[fx.Node, fx.Node] = {}

    def run_node(self, n: fx.Node):
        if n.op in ("placeholder", "get_attr", "output"):
            result = super().run_node(n)
            self.storages[n] = _storages(result)
            return result
        if isinstance(n.target, torch._ops.HigherOrderOperator):
            # A dispatch mode needs a rule per higher-order op; Dynamo's speculation
            # of their bodies (checkpoint, cond, ...) already refuses writes to inputs.
            result = super().run_node(n)
            self.storages[n] = _storages(result)
            return result
        received = set().union(*(self.storages.get(a, frozenset()) for a in n.all_input_nodes))
        recorder = _WriteRecorder()
        with recorder:
            result = super().run_node(n)
        hit = recorder.written & received
        if hit:
            self.writes[n] = frozenset(hit)
            same = [a for a in n.all_input_nodes if self.env.get(a) is result]
            if same:
                self.returns_input[n] = same[0]
        self.storages[n] = _storages(result)
        return result


def may_write(gm: fx.GraphModule) -> bool:
    """False only if no op in ``gm`` wrote any tensor while Dynamo traced it.

    Every node's ``example_value`` is the fake tensor its op produced during
    tracing, and a write bumps the version counter a tensor shares with all
    its views; so all counters at 0 prove there was no write. A node without
    a fake value, or a counter that cannot be read, answers True (analyse)."""
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if "example_value" not in node.meta and "val" not in node.meta:
            if node.op in ("call_function", "call_method", "call_module"):
                return True
            continue
        for leaf in pytree.tree_leaves(example_value(node)):
            if isinstance(leaf, torch.Tensor):
                try:
                    if leaf._version:
                        return True
                except RuntimeError:  # inference tensors keep no counter
                    return True
    return False


def analyze_effects(gm: fx.GraphModule) -> Effects:
    """Run ``gm`` once on its placeholders' fake tensors and record its effects
    (nothing to run when ``may_write`` proves the graph writes nothing)."""
    if not may_write(gm):
        counters["effects"]["graphs_proven_write_free"] += 1
        return Effects({}, {}, {})
    counters["effects"]["graphs_analyzed"] += 1
    fakes = [example_value(n) for n in gm.graph.find_nodes(op="placeholder")]
    mode = _fake_mode(fakes)
    if mode is None:
        raise NotBatchable("placeholders carry no fake tensors: cannot tell which ops write which tensors")
    interp = _EffectsInterpreter(gm)
    try:
        with mode:
            interp.run(*fakes)
    except Exception as e:  # noqa: BLE001 - the effects are unknown: nothing can be proven
        raise NotBatchable(
            f"could not trace the graph on fake tensors to find in-place writes ({type(e).__name__}: {e})"
        ) from e
    return Effects(interp.writes, interp.storages, interp.returns_input)


def _fake_mode(fakes) -> Optional[object]:
    return next((f.fake_mode for f in fakes if hasattr(f, "fake_mode")), None)
