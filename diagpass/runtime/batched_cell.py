"""``BatchedCell``: one cell's subgraph run for a whole group at once.

The rewritten graph calls it as a submodule (FX targets must be importable
or modules; a vmapped closure is neither). Under AOTAutograd/Inductor it is
traced away: what reaches Inductor are plain batched aten ops (bmm, batched
SDPA), forward and backward.

``torch.vmap`` batches the cell over a new leading group dim, except for
nodes run *directly* on the stacked tensors:

- ``scaled_dot_product_attention``: on CPU its kernel has no batching rule and
  vmap would fall back to a Python loop, but SDPA already accepts extra
  leading batch dims, so the group dim is folded into the batch instead.
- ``torch.cat``: vmap's rule reads concrete sizes, which specialises a kernel
  compiled for a symbolic group size (``runtime/kernel_cache.py``) to one width; cat
  of the stacked inputs along the shifted dim is the same op.
- ops of the row-wise table (``diagpass/runtime/row_wise.py``: ``lstm_cell`` and the
  other RNN cells, which vmap cannot batch): the group dim is folded into the
  op's batch dim when the group shares the weights, as for SDPA; otherwise the
  op's decomposition runs under vmap.

The template is cut at every direct node into pieces; pieces run under vmap.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from diagpass.counters import counters
from diagpass.fx_facts import SDPA_TARGETS, example_value, graph_structure, is_sdpa
from diagpass.runtime.row_wise import row_wise_spec

def is_direct_cat(node: fx.Node) -> bool:
    """``torch.cat(tensors, dim)`` of same-rank tensors (cat's legacy rule
    skips 1-D empty inputs, which stacking would not)."""
    if node.op != "call_function" or node.target is not torch.cat or set(node.kwargs) - {"dim"}:
        return False
    if len(node.args) not in (1, 2) or not isinstance(node.args[0], (list, tuple)):
        return False
    dim = node.args[1] if len(node.args) == 2 else node.kwargs.get("dim", 0)
    values = [example_value(a) if isinstance(a, fx.Node) else None for a in node.args[0]]
    if not isinstance(dim, int) or not all(isinstance(v, torch.Tensor) for v in values):
        return False
    return len({v.dim() for v in values}) == 1 and values[0].dim() > 0


def is_row_wise(node: fx.Node) -> bool:
    return node.op == "call_function" and row_wise_spec(node.target, node.args, node.kwargs) is not None


def is_direct(node: fx.Node) -> bool:
    return is_sdpa(node) or is_direct_cat(node) or is_row_wise(node)


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A value of the template by name (pieces hold no fx.Node: picklable)."""

    name: str


@dataclasses.dataclass
class _Direct:
    """One node run directly on stacked values (SDPA)."""

    name: str
    target: object
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class _Piece:
    gm: Optional[fx.GraphModule]  # None for a direct (SDPA) node
    node: Optional[_Direct]
    inputs: List[str]
    outputs: List[str]


def _split_at_direct_nodes(template: fx.GraphModule) -> Tuple[List[str], List[_Piece], List[str]]:
    graph = template.graph
    placeholders = [n.name for n in graph.find_nodes(op="placeholder")]
    out_node = next(iter(graph.find_nodes(op="output")))
    final = [a.name for a in out_node.args[0]]
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]

    runs: List[List[fx.Node]] = [[]]
    for n in body:
        if is_direct(n):
            runs.append([n])
            runs.append([])
        else:
            runs[-1].append(n)
    runs = [r for r in runs if r]

    users_after = {}
    for i, run in enumerate(runs):
        for n in run:
            for a in n.all_input_nodes:
                users_after.setdefault(a.name, set()).add(i)
    pieces = []
    for i, run in enumerate(runs):
        names = {n.name for n in run}
        inputs = []
        for n in run:
            for a in n.all_input_nodes:
                if a.name not in names and a.name not in inputs:
                    inputs.append(a.name)
        outputs = [
            n.name
            for n in run
            if n.name in final or any(j > i for j in users_after.get(n.name, ()))
        ]
        if len(run) == 1 and is_direct(run[0]):
            n = run[0]
            ref = lambda a: _Ref(a.name)  # noqa: E731
            direct = _Direct(n.name, n.target, fx.map_arg(n.args, ref), fx.map_arg(n.kwargs, ref))
            pieces.append(_Piece(None, direct, inputs, outputs))
            continue
        g = fx.Graph()
        env = {}
        for name in inputs:
            env[name] = g.placeholder(name)
        for n in run:
            env[n.name] = g.node_copy(n, lambda a: env[a.name])
        g.output(tuple(env[o] for o in outputs))
        pieces.append(_Piece(fx.GraphModule(template, g), None, inputs, outputs))
    return placeholders, pieces, final


def _fetch(env, a):
    """(value, batched) of a direct node's argument: a template value or a constant."""
    return env[a.name] if isinstance(a, _Ref) else (a, False)


def _fetch_arg(env, a, G):
    """(value, batched) of an argument that may be a list of template values
    (lstm_cell's ``hx``): a list with any stacked element comes back with
    every element stacked."""
    if not isinstance(a, (list, tuple)):
        return _fetch(env, a)
    items = [_fetch(env, x) for x in a]
    if not any(b for _, b in items):
        return type(a)(v for v, _ in items), False
    return type(a)(BatchedCell._stacked(v, b, G) for v, b in items), True


class BatchedCell(torch.nn.Module):
    """Runs ``template`` (one cell: inputs -> tuple of outputs) over a group.

    ``in_dims[k]`` is 0 if input k is stacked over the group (G, ...), None
    if it is shared by every cell. Every output comes back stacked (G, ...).
    """

    def __init__(self, template: fx.GraphModule, in_dims: Sequence[Optional[int]], group_size: int):
        super().__init__()
        self.template = template
        self.in_dims = tuple(in_dims)
        self.group_size = group_size
        self._placeholders, self._pieces, self._final = _split_at_direct_nodes(template)
        for i, p in enumerate(self._pieces):
            if p.gm is not None:
                self.add_module(f"piece{i}", p.gm)

    @functools.cached_property
    def structure(self) -> tuple:
        """Equal for calls computing the same function (``fx_facts.module_structure``)."""
        return graph_structure(self.template), self.in_dims, self.group_size

    @functools.cached_property
    def width_free_structure(self) -> Optional[tuple]:
        """``structure`` less G: equal for calls computing the same function of their
        arguments whatever their width, since G is read from the stacked arguments
        (``_group_size``); None without a stacked argument (G would be ``group_size``)."""
        if all(d is None for d in self.in_dims) or any(True for _ in self.parameters()) or any(True for _ in self.buffers()):
            return None
        return ("BatchedCell", graph_structure(self.template), self.in_dims)

    def _group_size(self, args):
        """G from the stacked arguments, not ``self.group_size``: a kernel
        compiled for a symbolic group size (``runtime/kernel_cache.py``) then serves
        every G."""
        for a, d in zip(args, self.in_dims):
            if d is not None and isinstance(a, torch.Tensor):
                return a.shape[0]
        return self.group_size

    @staticmethod
    def _stacked(value, batched: bool, G):
        if batched or not isinstance(value, torch.Tensor):
            return value
        return value.expand(G, *value.shape)

    def as_graph(self, args, is_input, outputs: Optional[Sequence[int]] = None) -> fx.GraphModule:
        """One call of this module as a graph: the arguments ``is_input`` accepts
        are placeholders, the others constants; the output is the tuple of results
        (those numbered in ``outputs``, when given)."""
        g = fx.Graph()
        call_args = [g.placeholder(f"arg{i}") if is_input(a) else a for i, a in enumerate(args)]
        call = g.call_module("batched", tuple(call_args))
        kept = range(len(self._final)) if outputs is None else outputs
        g.output(tuple(g.call_function(operator.getitem, (call, j)) for j in kept))
        return fx.GraphModule({"batched": self}, g)

    def forward(self, *args):
        G = self._group_size(args)
        env = {
            name: (a, d is not None)
            for name, a, d in zip(self._placeholders, args, self.in_dims)
        }
        for piece in self._pieces:
            if piece.gm is None:
                env[piece.node.name] = self._direct(piece.node)(piece.node, env, G)
                continue
            values = [env[name] for name in piece.inputs]
            if not any(b for _, b in values):
                outs = piece.gm(*[v for v, _ in values])
                batched = False
            else:
                dims = tuple(0 if b else None for _, b in values)
                gm = self._by_refs(piece.gm) if isinstance(G, torch.SymInt) else piece.gm
                outs = torch.vmap(gm, in_dims=dims, out_dims=0)(*[v for v, _ in values])
                batched = True
            for name, out in zip(piece.outputs, outs):
                env[name] = (out, batched)
        return tuple(self._stacked(*env[name], G) for name in self._final)

    def _by_refs(self, gm: fx.GraphModule) -> fx.GraphModule:
        """``gm`` for a symbolic G (``_BY_REFS``), made once per piece."""
        cache = self.__dict__.setdefault("_by_refs_pieces", {})
        if id(gm) not in cache:
            cache[id(gm)] = _by_refs(gm)
        return cache[id(gm)]

    def _direct(self, node: _Direct):
        if node.target in SDPA_TARGETS:
            return self._sdpa
        if row_wise_spec(node.target, node.args, node.kwargs) is not None:
            return self._row_wise
        return self._cat

    def _row_wise(self, node: _Direct, env, G):
        """A row-wise table op on stacked values: folded into its batch dim
        when the group shares its weights, else its decomposition under vmap."""
        spec = row_wise_spec(node.target, node.args, node.kwargs)
        values = [_fetch_arg(env, a, G) for a in node.args]
        if not any(b for _, b in values):
            return node.target(*[v for v, _ in values]), False
        shared_batched = any(b for i, (_, b) in enumerate(values) if i in spec.shared_args)
        ranks = [
            t.dim() - b if isinstance(t, torch.Tensor) else None
            for i in spec.row_args
            for v, b in [values[i]]
            for t in (v if isinstance(v, (list, tuple)) else [v])
        ]
        if not shared_batched and all(r == spec.rank for r in ranks):
            counters["runtime"]["row_wise_folded"] += 1
            return self._fold_rows(node, spec, values, G), True
        counters["runtime"]["row_wise_decomposed"] += 1
        dims = tuple(0 if b else None for _, b in values)
        return torch.vmap(spec.decomposition, in_dims=dims, out_dims=0)(*[v for v, _ in values]), True

    def _fold_rows(self, node: _Direct, spec, values, G):
        """(G, B, ...) rows folded to (G * B, ...), one call, unfolded again.
        Row arguments not stacked (a zero state shared by the group) are
        expanded to G first."""

        def fold(x):
            return self._stacked(*x, G).flatten(0, 1)

        args = []
        for i, (v, b) in enumerate(values):
            if i not in spec.row_args:
                args.append(v)
            elif isinstance(v, (list, tuple)):
                args.append(type(v)(fold((t, b)) for t in v))
            else:
                args.append(fold((v, b)))
        out = node.target(*args)
        return torch.utils._pytree.tree_map(lambda t: t.unflatten(0, (G, -1)), out)

    def _cat(self, node: _Direct, env, G):
        """cat of per-cell tensors = cat of stacked tensors one dim further in."""
        dim = node.args[1] if len(node.args) == 2 else node.kwargs.get("dim", 0)
        values = [_fetch(env, a) for a in node.args[0]]
        if not any(b for _, b in values):
            return torch.cat([v for v, _ in values], dim), False
        return torch.cat([self._stacked(v, b, G) for v, b in values], dim + 1 if dim >= 0 else dim), True

    def _sdpa(self, node: _Direct, env, G):
        """SDPA on stacked (G, B, ...) tensors, the group dim folded into B.

        Folded explicitly (not left to SDPA's own leading-dim support): the
        CPU decompositions Inductor and AOTAutograd use assume 4-D inputs.
        """
        names = ("query", "key", "value", "attn_mask")
        bound = dict(zip(names, node.args[:4]))
        bound.update({k: v for k, v in node.kwargs.items() if k in names})
        rest_args = node.args[4:]
        rest_kwargs = {k: v for k, v in node.kwargs.items() if k not in names}

        q, k, v = (self._stacked(*_fetch(env, bound[n]), G) for n in names[:3])
        lead = q.shape[1] if q.dim() >= 4 else None  # per-cell batch dim, folded into G

        def fold(x):
            return x if lead is None else x.reshape(G * x.shape[1], *x.shape[2:])

        mask, mask_batched = _fetch(env, bound.get("attn_mask"))
        if isinstance(mask, torch.Tensor):
            rank = q.dim() - 1  # per-cell rank of q, which the mask broadcasts against
            if not mask_batched:
                mask = mask.reshape(*([1] * (rank - mask.dim())), *mask.shape).unsqueeze(0)
            else:
                mask = mask.reshape(G, *([1] * (rank + 1 - mask.dim())), *mask.shape[1:])
            if lead is not None:
                mask = mask.expand(G, lead, *mask.shape[2:])
            mask = fold(mask)
        out = node.target(fold(q), fold(k), fold(v), mask, *rest_args, **rest_kwargs)
        return (out if lead is None else out.reshape(G, lead, *out.shape[1:])), True


def _layer_norm_by_refs(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    import torch._refs

    return torch._refs.native_layer_norm(x, list(normalized_shape), weight, bias, eps)[0]


# Ops whose batching rule reads a symbolic group size as an int (``layer_norm``'s asks
# ``aten.size``): traced for a symbolic G (the width-free steps, runtime/segment_steps.py;
# roll's kernels), the kernel would be specialised to one width. Their reference
# decomposition (what Inductor lowers them to) batches without it.
_BY_REFS = {F.layer_norm: _layer_norm_by_refs, torch.layer_norm: _layer_norm_by_refs}


def _by_refs(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with the ops of ``_BY_REFS`` replaced (``gm`` itself when it has none)."""
    if not any(n.op == "call_function" and n.target in _BY_REFS for n in gm.graph.nodes):
        return gm
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for n in new.graph.nodes:
        if n.op == "call_function" and n.target in _BY_REFS:
            n.target = _BY_REFS[n.target]
    new.recompile()
    return new
