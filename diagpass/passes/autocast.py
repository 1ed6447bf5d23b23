"""autocast: regions become node metadata, and back after batching.

Dynamo records ``with torch.autocast(...)`` inside ``forward`` as a pair of
global-state calls with no data edges (like ``no_grad``, see ``grad_mode``).
A region with ``enabled=False`` while autocast is already off for its device
(the state the graph was traced in: Dynamo guards on it, so every call of
this graph runs with it) and no enabled region around it is a no-op: every
op in it dispatches exactly as outside. transformers 4.4x wraps its rotary
embedding in such a region in every layer call.

Before::

    ctx = _enter_autocast('cpu', None, False, None)
    freqs = matmul(inv_freq, pos).transpose(1, 2)
    _exit_autocast(ctx)

After::

    freqs = matmul(inv_freq, pos).transpose(1, 2)

Regions that do change the dtype (``enabled=True``, e.g. a bf16 block inside
``forward``) travel with the nodes they cover: ``lift_autocast_regions``
records each node's enclosing regions in ``meta["diagpass_autocast"]`` and
erases the enter/exit pair, the passes move nodes freely (a batched group's
call carries its cells' regions; a cell only partly inside a region never
batches, see ``schedule.cell_signature``), and ``restore_autocast_regions``
puts enter/exit pairs back around every run of nodes with equal regions in
the rewritten graph. Every op then runs under the autocast state it ran under
in eager::

    ctx = _enter_autocast('cpu', torch.bfloat16, True, None)
    h = linear(x, w)                      # meta["diagpass_autocast"] = (('cpu', bf16, True, None),)
    _exit_autocast(ctx)
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.fx as fx
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

from diagpass.counters import counters
from diagpass.fx_facts import copy_graph_module
from diagpass.ir.meta import AUTOCAST


def _regions(gm: fx.GraphModule) -> List[Tuple[fx.Node, fx.Node, bool]]:
    """(enter, exit, is a no-op) for every well-nested region, outermost last."""
    out, stack = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is _enter_autocast:
            stack.append(node)
        elif node.target is _exit_autocast and stack and node.args and node.args[0] is stack[-1]:
            enter = stack.pop()
            enclosed_by_enabled = any(_enabled(e) for e in stack)
            out.append((enter, node, not _enabled(enter) and not enclosed_by_enabled and not _ambient(enter)))
    return out


def _enabled(enter: fx.Node) -> bool:
    args = list(enter.args) + [None] * 4
    enabled = enter.kwargs.get("enabled", args[2])
    return enabled is not False


def _ambient(enter: fx.Node) -> bool:
    device = enter.kwargs.get("device_type", enter.args[0] if enter.args else None)
    if not isinstance(device, str):
        return True  # unknown device: assume it matters
    try:
        return torch.is_autocast_enabled(device)
    except RuntimeError:
        return True


def has_autocast_regions(gm: fx.GraphModule) -> bool:
    """Whether drop/lift would edit the graph (the backend copies it only then)."""
    return bool(_regions(gm))


def drop_noop_autocast_regions(gm: fx.GraphModule) -> int:
    """Erase no-op regions' enter/exit nodes in place (the backend passes a
    copy); return how many."""
    dropped = 0
    for enter, exit_, noop in _regions(gm):
        if noop and len(enter.users) == 1:  # only its exit reads the context
            gm.graph.erase_node(exit_)
            gm.graph.erase_node(enter)
            dropped += 1
    if dropped:
        gm.recompile()
        counters["autocast"]["noop_regions_dropped"] += dropped
    return dropped



def _region_args(enter: fx.Node) -> tuple:
    names = ("device_type", "dtype", "enabled", "cache_enabled")
    args = list(enter.args) + [enter.kwargs.get(k) for k in names[len(enter.args):]]
    return tuple(args[:4])


def lift_autocast_regions(gm: fx.GraphModule) -> int:
    """Record every enabled region on the nodes inside it and erase its
    enter/exit (in place, on the backend's copy); return how many."""
    lifted = 0
    for enter, exit_, noop in _regions(gm):
        if noop or len(enter.users) != 1:
            continue
        inside, node = [], enter.next
        while node is not exit_:
            inside.append(node)
            node = node.next
        region = _region_args(enter)
        for node in inside:
            node.meta[AUTOCAST] = (region,) + tuple(node.meta.get(AUTOCAST, ()))
        gm.graph.erase_node(exit_)
        gm.graph.erase_node(enter)
        lifted += 1
    if lifted:
        gm.recompile()
        counters["autocast"]["regions_lifted"] += lifted
    return lifted


def restore_autocast_regions(gm: fx.GraphModule) -> int:
    """Wrap each maximal run of nodes with equal ``meta[AUTOCAST]`` in enter/exit
    pairs (outermost region first); return how many runs."""
    runs, current, stack = [], [], None
    for node in gm.graph.nodes:
        if node.op == "placeholder":  # a step's inputs sit among its nodes: they run under no state
            continue
        regions = node.meta.get(AUTOCAST) if node.op != "output" else None
        if regions != stack and current:
            runs.append((stack, current))
            current = []
        stack = regions
        if regions:
            current.append(node)
    if current:
        runs.append((stack, current))
    for regions, nodes in runs:
        contexts = []
        with gm.graph.inserting_before(nodes[0]):
            for region in regions:
                contexts.append(gm.graph.call_function(_enter_autocast, region))
        with gm.graph.inserting_after(nodes[-1]):
            for ctx in contexts:  # inserting_after each time: the last inserted runs first
                gm.graph.call_function(_exit_autocast, (ctx,))
    if runs:
        gm.recompile()
        counters["autocast"]["regions_restored"] += len(runs)
    return len(runs)


def without_restored_regions(gm: fx.GraphModule) -> Optional[fx.GraphModule]:
    """``gm`` again in the lifted form: a copy without the enter/exit pairs
    ``restore_autocast_regions`` put back (``gm`` itself when it has none), or None
    when a pair covers a node that does not carry its region in ``meta[AUTOCAST]``
    (erasing it would lose the region). What cuts a graph into steps works on this
    form; each step restores its own regions."""
    regions = _regions(gm)
    if not regions:
        return gm
    gm = copy_graph_module(gm)[0]
    for enter, exit_, _ in _regions(gm):
        region, node = _region_args(enter), enter.next
        if len(enter.users) != 1:
            return None
        while node is not exit_:
            if node.target not in (_enter_autocast, _exit_autocast) and region not in node.meta.get(AUTOCAST, ()):
                return None
            node = node.next
        gm.graph.erase_node(exit_)
        gm.graph.erase_node(enter)
    gm.recompile()
    return gm
