"""stacked_weights: read weights stored stacked instead of copying them.

The batch pass stacks each weight role once per call, a copy of every layer's
weights on every call::

    stack_q = torch.stack([layers.0.q.weight, ..., layers.7.q.weight])

When the parameters already live in one contiguous ``(L, ...)`` storage
(``diagpass.stack_weights_(model.layers)``), that copy is waste: the stack *is*
the storage. This pass makes a second variant of the rewritten graph in which
every weight stack is an input::

    stack_q = placeholder[target=stacked_weights_0]    # a view, made per call

``diagpass.runtime.dispatch.GraphDispatch`` picks the variant per call: the views when every role's
parameters are consecutive slices of one storage and no gradient is needed
(a view reaching beyond one parameter would route no gradient to the others),
else the copying graph. Each variant is compiled on first use, so a model whose
weights are not stacked never compiles the second one.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch.fx as fx

from diagpass.fx_facts import graph_module
from diagpass.ir.meta import WEIGHT_STACK


@dataclasses.dataclass(frozen=True)
class LiftedStacks:
    gm: fx.GraphModule  # the variant whose weight stacks are trailing inputs, one per role
    roles: Tuple[str, ...]  # the trailing inputs' roles, in order


def lift_weight_stacks(gm: fx.GraphModule, roles: Sequence[str]) -> Optional[LiftedStacks]:
    """The variant of ``gm`` with one trailing input per role of ``roles`` (in
    that order) replacing its ``torch.stack`` of that role; a role the graph
    does not stack is an input it does not read. None if nothing is stacked."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    stacks = {n.meta[WEIGHT_STACK]: n for n in gm.graph.nodes if n.meta.get(WEIGHT_STACK) is not None}
    if not stacks or not placeholders or not set(stacks) <= set(roles):
        return None
    graph = fx.Graph()
    env = {}
    for node in gm.graph.nodes:
        if node in stacks.values():
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
        if node is placeholders[-1]:
            for k, role in enumerate(roles):
                ph = graph.placeholder(f"stacked_weights_{k}")
                if role in stacks:
                    ph.meta = dict(stacks[role].meta)
                    env[stacks[role]] = ph
    lifted = graph_module(gm, graph, type(gm).__name__)
    lifted.meta = dict(gm.meta)
    return LiftedStacks(lifted, tuple(roles))
