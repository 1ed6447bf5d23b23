"""width_free: a wavefront step whose arguments and results do not depend on its group's width.

Part of ``wavefront_steps``: it moves a group call's stacking and unstacking out of
its step (into the outer graph, between steps), so that the step reads the group's
inputs already stacked and returns its results stacked. The ramp wavefronts of every
width (1 < G <= L) then have one graph, and the runtime compiles it once for a
symbolic G (``runtime/segment_steps.py``): a new segment count, or one below L,
meets no new width. Nothing is computed differently: a stack moves, a stack of an
in-step value and outside ones becomes a ``cat`` of the first and a stack of the
rest, a stack of consecutive rows of one result becomes a view of them (no copy),
and a row read in the step at G - 1 is read at -1.

Before (wavefront 3, G = 3; placement from ``wavefront_steps``)::

    step 2:  out = diag_t2(..);  o = out[0];  r0 = o[0];  r1 = o[1]
    step 3:  h = embedding(ids_3)
             x = stack([h, r0, r1]);  w = w_q[0:3]
             out = diag_t3(x, w);  o = out[0];  r0 = o[0];  r1 = o[1];  r2 = o[2]
             y = lm_head(r2)                         # returns r0, r1, y

After::

    step 2:  out = diag_t2(..);  o = out[0]          # returns o
    outer:   s = o[0:2];  w = w_q[0:3]               # the rows r0, r1 as one view
    step 3:  h = embedding(ids_3)
             x = cat([h.unsqueeze(0), s])
             out = diag_t3(x, w);  o = out[0]
             y = lm_head(o[-1])                      # returns o, y

The moved stacks and slices carry ``meta[GROUP_INPUT]``, a ``GroupRows``: the group call
and how many rows fewer than its width they have (``s`` above: G - 1), so that the
runtime compiles one symbol per group and not one per size; a step's placeholder copies
it. Left as they are (the step's graph then names its width): a stack of in-step
values with outside ones between them, a row read in the step at an index other
than G - 1, and the rows of a result one of whose rows nobody reads when that row
needs a gradient (returned whole, the result would give a parameter only that row reads a
zero gradient instead of None).
"""

from __future__ import annotations

import operator
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from diagpass.counters import counters
from diagpass.fx_facts import copy_graph_module, example_value, static_meta
from diagpass.ir.meta import GROUP_INPUT, REPLACES, GroupRows
from diagpass.passes.cut import is_outer, outside_after, outside_before

Place = Dict[fx.Node, Tuple[float, float]]


def width_free(gm: fx.GraphModule, place: Place) -> Tuple[fx.GraphModule, Place]:
    """A copy of ``gm`` and its placement with every group call's stacking and
    unstacking outside its step, where that is possible (module docstring)."""
    gm, copied = copy_graph_module(gm)
    place = {copied[n]: p for n, p in place.items()}
    for call in list(gm.graph.nodes):
        module = gm.get_submodule(call.target) if call.op == "call_module" else None
        # a group call whose function does not depend on its width (it reads G from its
        # stacked arguments: runtime/batched_cell.py), nothing else
        if getattr(module, "width_free_structure", None) is not None and module.group_size >= 2:
            _inputs_outside(gm, call, module.in_dims, module.group_size, place)
            _results_outside(gm, call, module.group_size, place)
    gm.graph.lint()
    gm.recompile()
    return gm, place


def _step(n: fx.Node, place: Place) -> Optional[float]:
    """The region ``n`` is computed in; None for graph inputs."""
    return place[n][0] if n in place else None


def _inputs_outside(gm: fx.GraphModule, call: fx.Node, in_dims: tuple, G: int, place: Place) -> None:
    t = _step(call, place)
    for a, d in zip(call.args, in_dims):
        if d is None or not isinstance(a, fx.Node) or _step(a, place) != t:
            continue
        if _is_slice_of(a) and _step(a.args[0], place) != t:
            _move(a, outside_before(t), place)
            a.meta[GROUP_INPUT] = _rows_of(call, a, G if d == 0 else None)
            counters["wavefront_steps"]["group_inputs_outside"] += 1
        elif a.target is torch.stack and _stack_dim(a) == 0 and d == 0:
            _split_stack(gm, call, a, G, t, place)


def _rows_of(call: fx.Node, n: fx.Node, G: Optional[int]) -> GroupRows:
    """What ``n``'s leading dim is: its group's width less a constant, where it is
    the rows of ``call``'s group (the runtime then compiles one symbol per group, so
    that G - 1 = 1 rows at G = 2 is not a size of its own, specialised to 1)."""
    value = example_value(n)
    if G is None or not isinstance(value, torch.Tensor) or value.dim() == 0 or not 0 <= G - value.shape[0] < G:
        return GroupRows(call.name, None)
    return GroupRows(call.name, G - int(value.shape[0]))


def _is_slice_of(n: fx.Node) -> bool:
    """``x[a:b]`` (or a tuple of slices and ints): a view whose bounds are constants."""
    if n.op != "call_function" or n.target is not operator.getitem or not isinstance(n.args[0], fx.Node):
        return False
    idx = n.args[1]
    parts = idx if isinstance(idx, tuple) else (idx,)
    return isinstance(parts[0], slice) and all(
        isinstance(p, int) or (isinstance(p, slice) and not any(isinstance(b, fx.Node) for b in (p.start, p.stop, p.step)))
        for p in parts)


def _stack_dim(n: fx.Node) -> Optional[int]:
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    return dim if isinstance(dim, int) else None


def _split_stack(gm: fx.GraphModule, call: fx.Node, stack: fx.Node, G: int, t: float, place: Place) -> None:
    """``stack(items)`` whose items are a run of outside values, with in-step values
    only before or after it: the run stacked outside the step (a view, when the run is
    consecutive rows of one result)."""
    items = stack.args[0]
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, fx.Node) for i in items):
        return
    if static_meta([example_value(i) for i in items]) is None:
        return  # sizes Dynamo kept symbolic: such a step is compiled per size anyway
    inside = [_step(i, place) == t for i in items]
    first = inside.index(False) if False in inside else None
    if first is None:
        return
    last = len(inside) - 1 - inside[::-1].index(False)
    if any(inside[first:last + 1]):
        return  # in-step values between outside ones
    run, key = list(items[first:last + 1]), place[stack][1]
    whole = first == 0 and last == len(items) - 1
    with gm.graph.inserting_before(stack):
        outer = _rows_view(gm, stack, run, (outside_before(t), key), place)
        if outer is None:
            outer = _rows_cat(gm, stack, run, (outside_before(t), key), place)
        if outer is None and whole:
            _move(stack, outside_before(t), place)
            stack.meta[GROUP_INPUT] = _rows_of(call, stack, G)
            counters["wavefront_steps"]["group_inputs_outside"] += 1
            return
        if outer is None:
            outer = _node_like(gm, stack, torch.stack, (run,), {}, (outside_before(t), key), place)
        replacement = outer if whole else _cat_around(gm, stack, items, inside, first, outer, t, key, place)
    stack.replace_all_uses_with(replacement)
    gm.graph.erase_node(stack)
    del place[stack]
    for row in run:  # rows the view replaced
        if not row.users and row.op == "call_function":
            gm.graph.erase_node(row)
            del place[row]
    outer.meta[GROUP_INPUT] = _rows_of(call, outer, G)
    counters["wavefront_steps"]["group_inputs_outside"] += 1


def _cat_around(gm, stack, items, inside, first, outer, t, key, place) -> fx.Node:
    """``cat`` of the in-step items (each unsqueezed) and the run stacked outside, in order."""
    parts = []
    for k, i in enumerate(items):
        if k == first:
            parts.append(outer)
        elif inside[k]:
            parts.append(_node_like(gm, stack, torch.unsqueeze, (i, 0), {}, (t, key - 0.5), place))
    counters["wavefront_steps"]["stacks_split"] += 1
    return _node_like(gm, stack, torch.cat, (parts,), {}, (t, key), place)


def _rows_view(gm: fx.GraphModule, like: fx.Node, run: list, where, place: Place) -> Optional[fx.Node]:
    """``result[j:j + k]`` for a run of rows ``result[j] .. result[j + k - 1]`` taken outside a
    step (``_results_outside``) of a contiguous result: the same values as their stack, no
    copy. None otherwise."""
    result = run[0].args[0] if _is_row(run[0]) else None
    if result is None or not all(_is_row(r) and r.args[0] is result and is_outer(place[r][0]) for r in run):
        return None
    j = run[0].args[1]
    value = example_value(result)
    if [r.args[1] for r in run] != list(range(j, j + len(run))) or not isinstance(value, torch.Tensor) \
            or not value.is_contiguous():
        return None
    counters["wavefront_steps"]["stacks_as_views"] += 1
    return _node_like(gm, like, operator.getitem, (result, slice(j, j + len(run))), {}, where, place)


def _rows_cat(gm: fx.GraphModule, like: fx.Node, run: list, where, place: Place) -> Optional[fx.Node]:
    """``cat`` of the run's stretches of consecutive rows of one result, each a view
    (``_rows_view``), and its other items unsqueezed: the entering segment's hidden state
    and the rows of the staying ones. None where no stretch has two rows or more (a stack
    is then as cheap)."""
    stretches: list = []
    for item in run:
        last = stretches[-1][-1] if stretches else None
        if last is not None and _is_row(item) and _is_row(last) and item.args[0] is last.args[0] \
                and item.args[1] == last.args[1] + 1:
            stretches[-1].append(item)
        else:
            stretches.append([item])
    views = [_rows_view(gm, like, s, where, place) if len(s) > 1 else None for s in stretches]
    if not any(v is not None for v in views):
        return None
    parts = []
    for stretch, view in zip(stretches, views):
        parts += [view] if view is not None else \
            [_node_like(gm, like, torch.unsqueeze, (item, 0), {}, where, place) for item in stretch]
    counters["wavefront_steps"]["stacks_as_cats"] += 1
    return _node_like(gm, like, torch.cat, (parts,), {}, where, place)


def _node_like(gm: fx.GraphModule, like: fx.Node, target, args, kwargs, where, place: Place) -> fx.Node:
    """A new ``call_function`` with ``like``'s metadata and its own example value."""
    n = gm.graph.call_function(target, args, kwargs)
    n.meta.update({k: v for k, v in like.meta.items() if k != REPLACES})
    n.meta["example_value"] = _example(target, *fx.node.map_arg((args, kwargs), example_value))
    place[n] = where
    return n


def _example(target, args, kwargs):
    """``target`` run on fakes of the arguments' values: in their fake mode when they
    share one, else on fresh fakes of their metadata (the batch pass traces each group
    in a mode of its own)."""
    leaves = [v for v in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
    modes = {id(v.fake_mode): v.fake_mode for v in leaves if isinstance(v, FakeTensor)}
    if len(modes) == 1 and len(leaves) == sum(isinstance(v, FakeTensor) for v in leaves):
        with next(iter(modes.values())):
            return target(*args, **kwargs)
    mode = FakeTensorMode()

    def fresh(v):
        if not isinstance(v, torch.Tensor):
            return v
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).requires_grad_(v.requires_grad)

    with mode:
        args, kwargs = torch.utils._pytree.tree_map(fresh, (args, kwargs))
        return target(*args, **kwargs)


def _move(n: fx.Node, region: float, place: Place) -> None:
    place[n] = (region, place[n][1])


def _results_outside(gm: fx.GraphModule, call: fx.Node, G: int, place: Place) -> None:
    """Each result's rows read only after the step are taken outside it (the step
    returns the stacked result); a row read in the step at G - 1 is read at -1."""
    t = _step(call, place)
    for result in list(call.users):
        rows = list(result.users)
        if _step(result, place) != t or not all(_is_row(r) for r in rows):
            continue
        dead = [r for r in rows if not r.users]
        if dead and any(getattr(r.meta.get(REPLACES), "requires_grad", False) for r in dead):
            continue  # returned whole, it would give what only that row reads a zero gradient, not None
        for r in rows:
            users = [_step(u, place) for u in r.users]
            if not users:
                gm.graph.erase_node(r)
                del place[r]
            elif t not in users:
                place[r] = (outside_after(t), place[r][1])
                counters["wavefront_steps"]["group_results_outside"] += 1
            elif r.args[1] == G - 1:
                r.args = (result, -1)


def _is_row(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int) and n.args[1] >= 0
