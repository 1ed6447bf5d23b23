"""specialize: a graph Dynamo kept dynamic, made the static graph of one call's sizes.

Dynamo unrolls the segment loop, so every segment count is a graph of its own; on
the second count its automatic dynamic shapes make the input length a symbol (the
count itself stays guarded). The passes then meet symbolic sizes: the last
segment's chunk is not the middle ones', so its cells group apart, and weights
stored stacked cannot be read as stacks (that variant is compiled on real
arguments later). This pass gives the passes the graph Dynamo would have traced
for these sizes: the graph runs once on static fakes of the real arguments
(Dynamo's own ops in Dynamo's order, so views, in-place writes and version
counters come out as Dynamo's did) and every number computed from a symbolic
size becomes a constant. The runtime (``runtime/specialize.py``) keeps one such
graph per distinct set of sizes.

Before (S=8, the length ``s70`` symbolic)::

    s70: SymInt, ids: i64[1, s70]
    sym_sum = torch.sym_sum([-56, s70])          # the last segment's end
    getitem_7 = ids[(slice(None), slice(56, sym_sum))]   # i64[1, s70 - 56]

After (a call with 64 tokens)::

    s70: 64 (unused), ids: i64[1, 64]
    getitem_7 = ids[(slice(None), slice(56, 64))]        # i64[1, 8]

Checkpoint and ``nested_compile_region`` bodies are inlined first
(``passes/inline_subgraphs``): their nodes need static values too.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_flatten

from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.fx_facts import copy_graph_module, example_value, storages_of
from diagpass.passes.inline_subgraphs import inline_subgraphs

SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)

# where a symbol's value is read in a call's arguments: (input position, "int" | "size" |
# "stride" | "offset", dim)
Source = Tuple[int, str, int]

# reads of a tensor's metadata: no effect, and their value is fixed by the sizes
_METADATA_METHODS = {"size", "stride", "dim", "numel", "storage_offset"}

@dataclasses.dataclass(frozen=True)
class SymbolicSizes:
    """The symbols a dynamic graph's inputs carry, each with the argument it is read from."""

    sources: Tuple[Tuple[sympy.Symbol, Source], ...]

    def read(self, args: Sequence) -> tuple:
        """A call's sizes: one number per symbol (cheap, every call)."""
        return tuple(_read(args, src) for _, src in self.sources)

    def binding(self, args: Sequence) -> Dict[sympy.Symbol, int]:
        return {sym: sympy.Integer(v) for (sym, _), v in zip(self.sources, self.read(args))}


def symbolic_sizes(gm: fx.GraphModule) -> Optional[SymbolicSizes]:
    """None for a static graph; else where each input symbol is read. Raises
    ``NotBatchable`` when a placeholder's size is an expression of symbols no
    input gives alone (nothing to read the call's sizes from)."""
    sources: Dict[sympy.Symbol, Source] = {}
    free = set()
    for i, ph in enumerate(gm.graph.find_nodes(op="placeholder")):
        for src, expr in _symbolic_fields(i, example_value(ph)):
            free |= expr.free_symbols
            if isinstance(expr, sympy.Symbol):
                sources.setdefault(expr, src)
    if not free:
        return None
    unread = free - set(sources)
    if unread:
        raise NotBatchable(f"input sizes {sorted(map(str, unread))} are not read from any one input")
    return SymbolicSizes(tuple(sorted(sources.items(), key=lambda kv: str(kv[0]))))


def specialize(gm: fx.GraphModule, sizes: SymbolicSizes, args: Sequence, whole: bool = False) -> fx.GraphModule:
    """A static copy of ``gm`` for ``args`` (real tensors and numbers, as the call passes them).
    ``whole``: every node runs again (by default only those whose values change with the sizes)."""
    binding = sizes.binding(args)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for i, ph in enumerate(placeholders):
        for src, expr in _symbolic_fields(i, example_value(ph)):
            if expr.xreplace(binding) != _read(args, src):
                raise NotBatchable(f"input {ph.name}'s {src[1]} is {_read(args, src)}, not {expr} = "
                                   f"{expr.xreplace(binding)} for these sizes")
    out = copy_graph_module(gm)[0]
    inline_subgraphs(out)
    if any(isinstance(getattr(out, n.target, None), fx.GraphModule) for n in out.graph.find_nodes(op="get_attr")):
        raise NotBatchable("a subgraph call stayed after inlining: its body's sizes would stay symbolic")
    symbolic = {n for n in out.graph.nodes if _is_symbolic(example_value(n))}
    if whole or not _rerun_changing_values(out, symbolic, args):
        mode = FakeTensorMode()
        _StaticValues(out, mode).run(*_static_fakes(mode, args))
        counters["specialize"]["graphs_run_whole"] += 1
    _fold_numbers(out, symbolic)
    out.recompile()
    counters["specialize"]["graphs_specialized"] += 1
    return out


def _rerun_changing_values(gm: fx.GraphModule, symbolic: set, args: Sequence) -> bool:
    """Only the nodes whose values change with the sizes run again, in Dynamo's fake mode;
    the rest keep Dynamo's values, which no size changes. A value changes if it has a
    symbolic size, or shares storage with a value that changes (a view of the input, a
    write into it: it must stay a view of the new value). Every fake's version counter
    ends as Dynamo's. False, having changed nothing, where Dynamo's values are not all
    one mode's fakes or an input that changes shares storage (run the whole graph)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    values = [v for n in gm.graph.nodes for v in tree_flatten(example_value(n))[0] if isinstance(v, torch.Tensor)]
    modes = {id(v.fake_mode): v.fake_mode for v in values if isinstance(v, FakeTensor)}
    if len(modes) != 1 or len(values) != sum(isinstance(v, FakeTensor) for v in values):
        return False
    rerun = _changing(gm, symbolic)
    changing_inputs = [a for ph, a in zip(placeholders, args) if ph in rerun and isinstance(a, torch.Tensor)]
    others = [a for ph, a in zip(placeholders, args) if ph not in rerun]
    if any(a.storage_offset() for a in changing_inputs) or len(storages_of(changing_inputs)) != len(changing_inputs) \
            or storages_of(changing_inputs) & storages_of(others):
        return False  # fresh fakes would not share what the arguments share
    if any(isinstance(a, torch.Tensor) and not isinstance(example_value(ph), FakeTensor)
           for ph, a in zip(placeholders, args) if ph not in rerun):
        return False
    mode = next(iter(modes.values()))
    inputs = [a if ph in rerun or not isinstance(a, torch.Tensor) else example_value(ph)
              for ph, a in zip(placeholders, args)]
    versions = [(v, v._version) for v in values]
    recorded = {n: example_value(n) for n in rerun}
    _StaticValues(gm, mode, rerun).run(*_static_fakes(mode, inputs, fresh=set(map(id, changing_inputs))))
    _unsafe_set_versions(versions)  # what a node run again wrote into Dynamo's values
    for n, old in recorded.items():  # and the new values' counters as Dynamo's were
        new = tree_flatten(example_value(n))[0]
        old = tree_flatten(old)[0]
        _unsafe_set_versions([(a, b._version) for a, b in zip(new, old)
                              if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)])
    counters["specialize"]["nodes_run_again"] += len(rerun)
    counters["specialize"]["nodes_kept"] += len(gm.graph.nodes) - len(rerun)
    return True


def _changing(gm: fx.GraphModule, symbolic: set) -> set:
    """The nodes whose values change with the sizes (``_rerun_changing_values``)."""
    changing, storages = set(), set()
    for n in gm.graph.nodes:
        mine = storages_of(example_value(n))
        if n in symbolic or (mine & storages and any(a in changing for a in n.all_input_nodes)):
            changing.add(n)
            storages |= mine
    return changing


def _unsafe_set_versions(pairs) -> None:
    pairs = [(t, v) for t, v in pairs if not t.is_inference()]
    if pairs:
        torch._C._autograd._unsafe_set_version_counter(tuple(t for t, _ in pairs), tuple(v for _, v in pairs))


def _static_fakes(mode: FakeTensorMode, args: Sequence, fresh: Optional[set] = None) -> list:
    """Static fakes of the real tensors in ``args`` (all of them, or those in ``fresh``: new
    tensors of their metadata, not the mode's memo of the same tensor, which may be symbolic);
    fakes and numbers as they are."""
    out = []
    for a in args:
        if not isinstance(a, torch.Tensor) or isinstance(a, FakeTensor):
            out.append(a)
        elif fresh is None:
            out.append(mode.from_tensor(a, static_shapes=True))
        elif id(a) in fresh:
            with mode:
                fake = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
            out.append(fake.requires_grad_(a.requires_grad))
        else:
            out.append(a)
    return out


class _StaticValues(fx.Interpreter):
    """Runs the graph on static fakes of the arguments, recording each node's value where
    Dynamo recorded one (with ``rerun``: only those nodes run, and the nodes Dynamo recorded
    no value for; the rest give Dynamo's); grad mode and autocast are restored whatever
    happens."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, rerun: Optional[set] = None):
        super().__init__(gm)
        self.mode, self.rerun = mode, rerun

    def run(self, *fakes):
        grad = torch.is_grad_enabled()
        try:
            with self.mode, torch.autocast("cpu", enabled=torch.is_autocast_enabled("cpu")):
                return super().run(*fakes)
        finally:
            torch.set_grad_enabled(grad)

    def fetch_attr(self, target: str):
        value = super().fetch_attr(target)
        return self.mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value

    def run_node(self, n: fx.Node):
        if self.rerun is not None and n not in self.rerun and n.op != "placeholder" \
                and example_value(n) is not None:
            return example_value(n)
        value = super().run_node(n)
        for key in ("example_value", "val"):
            if key in n.meta:
                n.meta[key] = value
        return value


def _fold_numbers(gm: fx.GraphModule, symbolic: set) -> None:
    """Every number that was symbolic becomes a constant in its users; the size reads and
    arithmetic that made it go (placeholders stay: the call still passes them)."""
    folded: List[fx.Node] = []
    for n in gm.graph.nodes:
        if n not in symbolic or n.op == "output":
            continue
        value = example_value(n)
        leaves, _ = tree_flatten(value)
        if any(isinstance(v, (torch.Tensor,) + SYMBOLIC) for v in leaves):
            continue
        if n.op != "placeholder" and not _pure(n):
            continue
        _replace_uses(n, value)
        folded.append(n)
        counters["specialize"]["numbers_folded"] += 1
    for n in reversed(folded):
        if n.op != "placeholder" and not n.users:
            gm.graph.erase_node(n)


def _replace_uses(n: fx.Node, value) -> None:
    constant = tuple(value) if isinstance(value, torch.Size) else value
    for user in list(n.users):
        user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda a: constant if a is n else a)


def _pure(n: fx.Node) -> bool:
    """A metadata read, or a function of numbers only (size arithmetic: Dynamo puts no
    other number-only call in a graph)."""
    if n.op == "call_method":
        return n.target in _METADATA_METHODS or (n.target == "__getitem__" and not _reads_tensors(n))
    if n.op != "call_function" or isinstance(n.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return False
    return n.target is getattr or not _reads_tensors(n)


def _reads_tensors(n: fx.Node) -> bool:
    leaves, _ = tree_flatten([example_value(a) for a in n.all_input_nodes])
    return any(isinstance(v, torch.Tensor) for v in leaves)


def _is_symbolic(value) -> bool:
    leaves, _ = tree_flatten(value)
    return any(next(_symbolic_fields(0, v), None) is not None for v in leaves)


def _symbolic_fields(i: int, value):
    """(source, sympy expression) of each symbolic number a placeholder's value carries."""
    if isinstance(value, SYMBOLIC):
        yield (i, "int", 0), value.node.expr
    elif isinstance(value, torch.Tensor):
        for kind, numbers in (("size", value.shape), ("stride", value.stride()), ("offset", (value.storage_offset(),))):
            for d, x in enumerate(numbers):
                if isinstance(x, torch.SymInt):
                    yield (i, kind, d), x.node.expr


def concrete(args: Sequence) -> list:
    """The backend's example inputs as a call passes them: Dynamo gives a number it
    kept symbolic as a SymInt; its hint is the call's value (read without a guard)."""
    return [_hint(a) for a in args]


def _hint(a):
    return a.node.hint if isinstance(a, SYMBOLIC) else a


def _read(args: Sequence, src: Source):
    i, kind, d = src
    a = args[i]
    if kind == "int":
        return _hint(a)
    if kind == "size":
        return a.shape[d]
    if kind == "stride":
        return a.stride(d)
    return a.storage_offset()
