"""see_through: a slice of a concatenation is the piece it covers.

Layer-major ("horizontal") loops run every segment through layer l, ``torch.cat``
the segment outputs, and let layer l+1 slice its segments out of the cat again.
Through the cat, every cell of layer l+1 reads *all* cells of layer l, so the
dependence pass sees (s', l) -> (s, l+1) for every s' and finds no diagonal. The
slice is the piece: reading it directly leaves the true edge (s, l) -> (s, l+1).
Memory kept as one ``torch.stack`` of all layers and read back as ``memory[l]``
is the same pattern with select in place of slice.

Before::

    cat    = torch.cat([h_0, h_1, h_2], 1)                 # h_s: (B, 10, D)
    seg_1  = getitem(cat, (slice(None), slice(10, 20)))   # reads h_0, h_1, h_2
    mems   = torch.stack([m_0, m_1])
    m      = getitem(mems, 1)

After::

    cat    = torch.cat([h_0, h_1, h_2], 1)   # kept only if something else reads it
    # seg_1's users read h_1, m's users read m_1

Rewritten (each exact: the same values, the same gradients to the pieces):

* ``cat(pieces, d)`` sliced along d by ``getitem`` (basic slices, step 1, every
  other dim whole), ``narrow`` or ``split`` + ``getitem``, where the range is
  exactly one piece;
* ``stack(xs, d)`` indexed at d by ``getitem`` (an int at position d, whole
  slices before), ``select`` or ``unbind`` + ``getitem``: ``xs[i]``.

* ``cat.new_zeros(size)`` (``new_ones``/``new_empty``/``new_full``): only the
  dtype and device are read; the first piece, of the same dtype and device,
  replaces the cat as ``self``.

Left alone: ranges that cover part of a piece or several pieces, symbolic sizes,
a read whose value is a graph output (the output would become the piece itself,
possibly a graph input: different aliasing than eager's fresh view), and any
case where a user of the read, the piece, or the cat may write in place (a
view of the cat shares its storage; the piece does not). The replacement keeps
the read's shape and dtype; where its strides differ the piece must be
contiguous, so every ``view`` the read allowed the piece allows too.

Contract: ``simplify_concat_slices(gm) -> int`` edits ``gm.graph`` in place
(run it on the copy the backend made, before partition), returns the number of
reads rewritten, erases the rewritten reads and any cat/stack/split left
without users, and bumps ``counters["see_through"]["slices"|"selects"|"metadata_reads"]``.
"""

from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from diagpass.counters import counters
from diagpass.fx_facts import example_value

_CAT = {torch.cat, torch.concat, torch.concatenate}
_INPLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift, operator.imatmul,
}


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", "")


def _is(node, kind: str) -> bool:
    """``node`` is a call of torch op ``kind`` (function or method form)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    if kind == "cat" and node.op == "call_function":
        return node.target in _CAT
    return _name(node) == kind and (node.op == "call_method" or node.target is getattr(torch, kind, None))


def _may_write(node: fx.Node) -> bool:
    """Conservative: could this node write into one of its inputs?"""
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return True
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = _name(node) if node.op in ("call_function", "call_method") else ""
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def _arg(node: fx.Node, i: int, key: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _tensor(node) -> Optional[torch.Tensor]:
    v = example_value(node) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _static_sizes(values: Sequence[torch.Tensor], dim: int) -> Optional[List[int]]:
    sizes = [v.shape[dim] for v in values]
    return sizes if all(isinstance(s, int) for s in sizes) else None


def _known_equal(a, b) -> bool:
    """``a == b`` for every value of the sizes Dynamo kept symbolic (decided without a guard)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def _same_shape(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(_known_equal(x, y) for x, y in zip(a, b))


def _symbolic_range(start, stop, sizes: Sequence) -> Optional[Tuple]:
    """[start, stop) of a slice of pieces some of whose sizes are symbolic (a dynamic
    graph's last segment): bounds that are ints >= 0, None, or nodes of sizes
    (``slice(70, s70 + 16)``); a negative bound needs the length, so None."""
    def bound(x):
        x = example_value(x) if isinstance(x, fx.Node) else x
        return x if x is None or isinstance(x, (int, torch.SymInt)) else False

    lo, hi = bound(start), bound(stop)
    if lo is False or hi is False or any(isinstance(x, int) and x < 0 for x in (lo, hi)):
        return None
    return (0 if lo is None else lo), (sum(sizes) if hi is None else hi)


def _parts(node: fx.Node) -> Optional[Tuple[List[fx.Node], int, List[torch.Tensor]]]:
    """(pieces, normalised dim, their example values) of a cat/stack node."""
    pieces = _arg(node, 0, "tensors")
    if not isinstance(pieces, (list, tuple)) or not pieces or not all(isinstance(p, fx.Node) for p in pieces):
        return None
    values = [_tensor(p) for p in pieces]
    out = _tensor(node)
    dim = _arg(node, 1, "dim", 0)
    if out is None or any(v is None for v in values) or not isinstance(dim, int):
        return None
    dim = dim + out.dim() if dim < 0 else dim
    return list(pieces), dim, values


def _full(s) -> bool:
    return isinstance(s, slice) and s.start is None and s.stop is None and s.step is None


def _index_at(index, dim: int):
    """The entry of a getitem index at ``dim`` if every other entry is a whole
    slice (trailing Ellipsis allowed); else None."""
    items = index if isinstance(index, tuple) else (index,)
    if items and items[-1] is Ellipsis:
        items = items[:-1]
    if len(items) <= dim or not all(_full(s) for i, s in enumerate(items) if i != dim):
        return None
    return items[dim]


def _range(start, stop, length: int) -> Optional[Tuple[int, int]]:
    """Normalised [start, stop) of a basic slice on a dim of ``length``."""
    if not all(x is None or isinstance(x, int) for x in (start, stop)):
        return None
    start = 0 if start is None else (start + length if start < 0 else start)
    stop = length if stop is None else (stop + length if stop < 0 else stop)
    return max(0, min(start, length)), max(0, min(stop, length))


def _piece_for_range(sizes: Sequence, lo, hi) -> Optional[int]:
    offset = 0
    for k, size in enumerate(sizes):
        if _known_equal(offset, lo) and _known_equal(offset + size, hi):
            return k
        offset += size
    return None


def _concat_read(read: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(cat node, piece) if ``read`` takes exactly one piece of a cat."""
    if _is(read, "narrow"):
        cat, dim, start, length = (_arg(read, i, k) for i, k in enumerate(("input", "dim", "start", "length")))
        if not _is(cat, "cat") or _parts(cat) is None:
            return None
        pieces, cdim, values = _parts(cat)
        sizes = _static_sizes(values, cdim)
        if sizes is None or not isinstance(dim, int) or not isinstance(start, int) or not isinstance(length, int):
            return None
        dim = dim + _tensor(cat).dim() if dim < 0 else dim
        span = _range(start, start + length, sum(sizes)) if start >= 0 else None
        k = _piece_for_range(sizes, *span) if dim == cdim and span else None
        return (cat, pieces[k]) if k is not None else None
    if read.op != "call_function" or read.target is not operator.getitem or len(read.args) != 2:
        return None
    source, index = read.args
    if _is(source, "cat") and _parts(source) is not None:
        pieces, cdim, values = _parts(source)
        sizes = _static_sizes(values, cdim)
        entry = _index_at(index, cdim)
        if not isinstance(entry, slice) or entry.step not in (None, 1):
            return None
        if sizes is None:  # a piece Dynamo kept symbolic
            sizes = [v.shape[cdim] for v in values]
            span = _symbolic_range(entry.start, entry.stop, sizes)
        else:
            span = _range(entry.start, entry.stop, sum(sizes))
        k = _piece_for_range(sizes, *span) if span else None
        return (source, pieces[k]) if k is not None else None
    if _is(source, "split") and isinstance(index, int):
        cat = _arg(source, 0, "tensor", _arg(source, 0, "self"))
        split_size = _arg(source, 1, "split_size_or_sections", _arg(source, 1, "split_size"))
        dim = _arg(source, 2, "dim", 0)
        if not _is(cat, "cat") or _parts(cat) is None or not isinstance(dim, int):
            return None
        pieces, cdim, values = _parts(cat)
        sizes = _static_sizes(values, cdim)
        dim = dim + _tensor(cat).dim() if dim < 0 else dim
        if sizes is None or dim != cdim:
            return None
        total = sum(sizes)
        if isinstance(split_size, int) and split_size > 0:
            bounds = [(lo, min(lo + split_size, total)) for lo in range(0, total, split_size)]
        elif isinstance(split_size, (list, tuple)) and all(isinstance(s, int) for s in split_size):
            edges = [sum(split_size[:i]) for i in range(len(split_size) + 1)]
            bounds = list(zip(edges, edges[1:]))
        else:
            return None
        if not -len(bounds) <= index < len(bounds):
            return None
        k = _piece_for_range(sizes, *bounds[index])
        return (cat, pieces[k]) if k is not None else None
    return None


def _stack_read(read: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(stack node, element) if ``read`` selects one element of a stack."""
    if _is(read, "select"):
        stack, dim, i = (_arg(read, j, k) for j, k in enumerate(("input", "dim", "index")))
    elif read.op == "call_function" and read.target is operator.getitem and len(read.args) == 2:
        stack, index = read.args
        if _is(stack, "unbind"):
            stack, dim, i = _arg(stack, 0, "input", _arg(stack, 0, "self")), _arg(stack, 1, "dim", 0), index
        elif _is(stack, "stack") and _parts(stack) is not None:
            dim = _parts(stack)[1]
            i = _index_at(index, dim)
        else:
            return None
    else:
        return None
    if not _is(stack, "stack") or _parts(stack) is None or not isinstance(i, int) or isinstance(i, bool):
        return None
    xs, sdim, _ = _parts(stack)
    if not isinstance(dim, int):
        return None
    dim = dim + _tensor(stack).dim() if dim < 0 else dim
    if dim != sdim or not -len(xs) <= i < len(xs):
        return None
    return stack, xs[i]


def _safe(read: fx.Node, container: fx.Node, piece: fx.Node) -> bool:
    rv, pv = _tensor(read), _tensor(piece)
    if rv is None or pv is None or not _same_shape(rv.shape, pv.shape) or rv.dtype != pv.dtype:
        return False
    if not _same_shape(rv.stride(), pv.stride()) and not statically_known_true(pv.is_contiguous()):
        return False
    if any(u.op == "output" for u in read.users):
        return False
    watched = [read, container, piece, *container.users]
    return not any(_may_write(u) for n in watched for u in n.users)


_METADATA_ONLY = {"new_zeros", "new_ones", "new_empty", "new_full"}


def _metadata_read(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(cat/stack, first piece) if ``node`` reads only the dtype and device of a
    cat or stack: ``cat.new_zeros(size)`` (a layer-major layer allocating its
    memory from its input). Any piece of the same dtype and device gives the
    same result, without depending on every piece."""
    if node.op != "call_method" or node.target not in _METADATA_ONLY or not node.args:
        return None
    container = node.args[0]
    if not (_is(container, "cat") or _is(container, "stack")) or _parts(container) is None:
        return None
    piece, out = _parts(container)[0][0], _tensor(container)
    pv = _tensor(piece)
    if pv is None or pv.dtype != out.dtype or pv.device != out.device:
        return None
    return container, piece


def _erase_if_dead(node: fx.Node, graph: fx.Graph) -> None:
    if node.op in ("call_function", "call_method") and not node.users:
        inputs = node.all_input_nodes
        graph.erase_node(node)
        for a in inputs:
            if _is(a, "cat") or _is(a, "stack") or _is(a, "split") or _is(a, "unbind"):
                _erase_if_dead(a, graph)


def simplify_concat_slices(gm: fx.GraphModule) -> int:
    """Replace reads of one piece of a cat (or one element of a stack) by the
    piece itself; return how many reads were rewritten. See the module
    docstring for what is rewritten and the contract."""
    graph = gm.graph
    rewritten = 0
    for read in list(graph.nodes):
        if read.op not in ("call_function", "call_method") or getattr(read, "_erased", False):
            continue
        meta = _metadata_read(read)
        if meta is not None:
            read.replace_input_with(*meta)
            _erase_if_dead(meta[0], graph)
            counters["see_through"]["metadata_reads"] += 1
            rewritten += 1
            continue
        kind, found = "slices", _concat_read(read)
        if found is None:
            kind, found = "selects", _stack_read(read)
        if found is None or not _safe(read, *found):
            continue
        read.replace_all_uses_with(found[1])
        _erase_if_dead(read, graph)
        counters["see_through"][kind] += 1
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten


def has_concat_reads(gm: fx.GraphModule) -> bool:
    """Whether ``simplify_concat_slices`` would rewrite anything (the backend
    copies Dynamo's graph for the in-place passes only when one has work)."""
    for read in gm.graph.nodes:
        if read.op not in ("call_function", "call_method"):
            continue
        if _metadata_read(read) is not None:
            return True
        found = _concat_read(read) or _stack_read(read)
        if found is not None and _safe(read, *found):
            return True
    return False
