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
from typing import Dict, FrozenSet, List, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.amp.autocast_mode import _enter_autocast
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.fx_facts import example_value, storages_of

Storage = StorageWeakRef


class MetadataWrite(Exception):
    """An op that changes a tensor's shape or strides in place (``unsqueeze_``,
    ``resize_``, ``set_``): not run on Dynamo's fake values, not rewritten."""


_METADATA_WRITES = {"resize_", "resize_as_", "set_"}


class _WriteRecorder(TorchDispatchMode):
    """Collects the storages of every argument an op's schema marks as written."""

    def __init__(self):
        super().__init__()
        self.written: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.inplace_view in getattr(func, "tags", ()) or func.__name__.split(".")[0] in _METADATA_WRITES:
            raise MetadataWrite(str(func))
        schema = getattr(func, "_schema", None)
        if schema is not None:
            for i, arg in enumerate(schema.arguments):
                info = arg.alias_info
                if info is None or not info.is_write:
                    continue
                value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
                self.written |= storages_of(value)
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
            self.storages[n] = storages_of(result)
            return result
        if isinstance(n.target, torch._ops.HigherOrderOperator):
            # A dispatch mode needs a rule per higher-order op; Dynamo's speculation
            # of their bodies (checkpoint, cond, ...) already refuses writes to inputs.
            result = super().run_node(n)
            self.storages[n] = storages_of(result)
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
        self.storages[n] = storages_of(result)
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
        if _counter_bumped(example_value(node)):
            return True
    return False


def _counter_bumped(value) -> bool:
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            try:
                if leaf._version:
                    return True
            except RuntimeError:  # inference tensors keep no counter
                return True
    return False


def _suspects(gm: fx.GraphModule) -> Optional[List[fx.Node]]:
    """Nodes that may have written: a write bumps the counter of the tensor it
    received (shared with its views), so a writer reads a bumped tensor. None
    (interpret the whole graph) when a node reads a value without a fake to
    tell by, other than an autocast context (Dynamo records none for it), or
    when a suspect reads such a context (it cannot be run alone)."""
    out = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        unknown = [a for a in node.all_input_nodes if "example_value" not in a.meta and "val" not in a.meta]
        if any(a.target is not _enter_autocast for a in unknown):
            return None
        if any(_counter_bumped(example_value(a)) for a in node.all_input_nodes if a not in unknown):
            if unknown:
                return None
            out.append(node)
    return out


def _run_alone(node: fx.Node):
    args = fx.node.map_arg(node.args, example_value)
    kwargs = fx.node.map_arg(node.kwargs, example_value)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _effects_of_suspects(gm: fx.GraphModule, mode) -> Optional[Effects]:
    """Each suspect run alone on Dynamo's own fake values (which keep the
    aliasing Dynamo traced), under the recorder; None if a suspect cannot be
    run that way (then the whole graph is interpreted)."""
    suspects = _suspects(gm)
    if suspects is None or any(
        n.op not in ("call_function", "call_method") or isinstance(n.target, torch._ops.HigherOrderOperator)
        for n in suspects
    ):
        return None
    storages = {n: storages_of(example_value(n)) for n in gm.graph.nodes if n.op != "output"}
    writes, returns_input = {}, {}
    seen: Dict[tuple, tuple] = {}  # signature -> (written argument positions, position of the returned one)
    for n in suspects:
        leaves = pytree.tree_leaves((n.args, n.kwargs))
        signature = _signature(n, leaves, storages)
        found = seen.get(signature) if signature is not None else None
        if found is None:
            found = _run_suspect(n, leaves, storages, mode)
            if signature is not None:
                seen[signature] = found
        else:
            counters["effects"]["suspects_alike"] += 1
        written, same = found
        if written:
            writes[n] = frozenset().union(*(storages[leaves[i]] for i in written))
            if same is not None:
                returns_input[n] = leaves[same]
    return Effects(writes, storages, returns_input)


def _run_suspect(n: fx.Node, leaves: list, storages, mode) -> tuple:
    """``n`` run alone under the recorder: the positions in ``leaves`` of the arguments
    whose storages it wrote, and of the one it returned (None)."""
    received = set().union(*(storages.get(a, frozenset()) for a in n.all_input_nodes))
    recorder = _WriteRecorder()
    with mode, torch.no_grad(), recorder:
        result = _run_alone(n)
    counters["effects"]["suspects_run"] += 1
    hit = recorder.written & received
    written = tuple(i for i, a in enumerate(leaves) if isinstance(a, fx.Node) and storages.get(a, frozenset()) & hit)
    same = next((i for i, a in enumerate(leaves) if isinstance(a, fx.Node) and example_value(a) is result), None)
    return written, same


def _signature(n: fx.Node, leaves: list, storages) -> Optional[tuple]:
    """All that running ``n`` alone on fake values depends on: its op, and per argument
    the tensor's metadata and which earlier argument shares its storage, or the constant.
    Suspects with one signature write the same arguments (e.g. every ``linear`` that
    reads a parameter stored stacked, whose fake's counter Dynamo's fakeification of the
    view bumped): run once. None (run it) for
    an argument whose value is neither a tensor nor a hashable constant."""
    parts: list = []
    first: Dict[FrozenSet[Storage], int] = {}
    for i, a in enumerate(leaves):
        value = example_value(a) if isinstance(a, fx.Node) else a
        if isinstance(value, torch.Tensor):
            shared = first.setdefault(storages.get(a, frozenset()) if isinstance(a, fx.Node) else frozenset(), i)
            parts.append((tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.device,
                          value.requires_grad, value.is_inference(), value._is_view(), value.layout, shared))
        elif isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format)):
            parts.append((type(value), value))
        else:
            return None
    try:
        hash(n.target)
    except TypeError:
        return None
    return (n.op, n.target, str(pytree.tree_structure((n.args, n.kwargs))), tuple(parts))


def analyze_effects(gm: fx.GraphModule) -> Effects:
    """The graph's effects: nothing when ``may_write`` proves it writes
    nothing; else the suspects run alone; else (a suspect without fake
    inputs, a higher-order op) the whole graph interpreted once on its
    placeholders' fake tensors."""
    if not may_write(gm):
        counters["effects"]["graphs_proven_write_free"] += 1
        return Effects({}, {}, {})
    fakes = [example_value(n) for n in gm.graph.find_nodes(op="placeholder")]
    mode = _fake_mode(fakes)
    if mode is None:
        raise NotBatchable("placeholders carry no fake tensors: cannot tell which ops write which tensors")
    try:
        effects = _effects_of_suspects(gm, mode)
        if effects is not None:
            counters["effects"]["graphs_analyzed_by_suspects"] += 1
            return effects
        counters["effects"]["graphs_interpreted"] += 1
        interp = _EffectsInterpreter(gm)
        # writes and aliasing do not depend on grad mode; without it an out= op
        # or a write to a leaf that requires grad would raise
        with mode, torch.no_grad():
            interp.run(*fakes)
    except MetadataWrite as e:
        raise NotBatchable(f"in-place op {e} changes a tensor's shape or strides: not rewritten") from e
    except Exception as e:  # noqa: BLE001 - the effects are unknown: nothing can be proven
        raise NotBatchable(
            f"could not trace the graph on fake tensors to find in-place writes ({type(e).__name__}: {e})"
        ) from e
    return Effects(interp.writes, interp.storages, interp.returns_input)


def _fake_mode(fakes) -> Optional[object]:
    return next((f.fake_mode for f in fakes if hasattr(f, "fake_mode")), None)
