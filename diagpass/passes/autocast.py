"""Pass 0c — autocast: drop ``torch.autocast`` regions that change nothing.

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

Regions that do change the dtype (``enabled=True``) are left in place;
``grad_mode`` then refuses the graph with the reason.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.fx as fx
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

from diagpass.counters import counters


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


def has_noop_autocast_regions(gm: fx.GraphModule) -> bool:
    return any(noop for _, _, noop in _regions(gm))


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
