"""grad_mode: turn ``with torch.no_grad()`` regions into detaches.

Dynamo records a no-grad block inside ``forward`` as global-state calls with
no data edges; moving nodes across them (as every later pass does) would move
them in or out of the block. Values computed under no-grad equal the same
values computed with grad and then detached, so:

Before::

    _set_grad_enabled(False)
    gamma = clamp(1 - kz / k2, 0, 1)        # no autograd history
    _set_grad_enabled(True)
    z_new = z + gamma * k

After::

    gamma = clamp(1 - kz / k2, 0, 1)
    gamma_d = gamma.detach()                # every use outside the block
    z_new = z + gamma_d * k

Other nodes with global side effects (autocast enter/exit, anything Dynamo
kept although nothing reads it) make the whole graph ``NotBatchable``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.fx_facts import example_value, is_compute

_SET_GRAD = torch._C._set_grad_enabled


_GLOBAL_STATE_NAMES = ("autocast", "grad_enabled", "inference_mode", "nesting", "_enter_", "_exit_", "set_")


def _side_effect(node: fx.Node) -> bool:
    """Calls that change global state: a known name, or a call whose result is
    None and unused (a pure op returns a tensor; Dynamo keeps the call only
    for its effect)."""
    if not is_compute(node) or node.target is _SET_GRAD:
        return False
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    if any(k in name for k in _GLOBAL_STATE_NAMES):
        return True
    return not node.users and "example_value" in node.meta and node.meta["example_value"] is None


def has_grad_mode_switches(gm: fx.GraphModule) -> bool:
    """Whether ``detach_no_grad_regions`` would edit the graph (the backend
    copies Dynamo's graph only when a pass will edit it)."""
    return bool(gm.graph.find_nodes(op="call_function", target=_SET_GRAD))


def detach_no_grad_regions(gm: fx.GraphModule) -> int:
    """Rewrite no-grad regions in place; return how many were rewritten."""
    regions, current = [], None
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _SET_GRAD:
            enabled = node.args[0] if node.args else node.kwargs.get("mode")
            if enabled is False and current is None:
                current = (node, [])
            elif enabled is True and current is not None:
                regions.append((current[0], current[1], node))
                current = None
            else:
                raise NotBatchable(f"grad mode switched in an unsupported pattern at node {node.name}")
        elif _side_effect(node):
            raise NotBatchable(
                f"node {node.name} ({getattr(node.target, '__name__', node.target)}) changes global "
                "state; reordering around it is not provably safe"
            )
        elif current is not None and node.op != "output":
            current[1].append(node)
    if current is not None:
        raise NotBatchable("a no-grad region is not closed inside the graph")
    for enter, body, exit_ in regions:
        inside = set(body)
        for node in body:
            outside = [u for u in node.users if u not in inside]
            if not outside or not isinstance(example_value(node), torch.Tensor):
                continue
            with gm.graph.inserting_after(node):
                detached = gm.graph.call_method("detach", (node,))
            detached.meta = dict(node.meta)
            for u in outside:
                u.replace_input_with(node, detached)
        gm.graph.erase_node(enter)
        gm.graph.erase_node(exit_)
    if regions:
        gm.recompile()
        counters["grad_mode"]["regions_detached"] += len(regions)
    return len(regions)
