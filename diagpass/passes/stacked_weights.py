"""Pass 6 — stacked_weights: read weights stored stacked instead of copying them.

The batch pass stacks each weight role once per call, a copy of every layer's
weights on every call (small ARMT-LLaMA, d=256, L=8: ~34 MB, ~16 ms on one core)::

    stack_q = torch.stack([layers.0.q.weight, ..., layers.7.q.weight])

When the parameters already live in one contiguous ``(L, ...)`` storage
(``diagpass.stack_weights_(model.layers)``), that copy is waste: the stack *is*
the storage. This pass makes a second variant of the rewritten graph in which
every weight stack is an input::

    stack_q = placeholder[target=stacked_weights_0]    # a view, made per call

``diagpass.weights.WeightStackDispatch`` picks the variant per call: the views when every role's
parameters are consecutive slices of one storage and no gradient is needed
(a view reaching beyond one parameter would route no gradient to the others),
else the copying graph. Each variant is compiled on first use, so a model whose
weights are not stacked never compiles the second one.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch.fx as fx


@dataclasses.dataclass
class LiftedStacks:
    gm: fx.GraphModule  # the variant whose weight stacks are trailing inputs
    param_indices: List[List[int]]  # per stack: positions of its parameters among the inputs
    stack_values: List[object]  # per stack: example value (fake tensor) of the stack


def lift_weight_stacks(gm: fx.GraphModule) -> Optional[LiftedStacks]:
    """The variant of ``gm`` with its weight stacks as inputs; None if it has none."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    position = {p: i for i, p in enumerate(placeholders)}
    stacks = [n for n in gm.graph.nodes if n.meta.get("diagpass_weight_stack") is not None]
    if not stacks or not placeholders:
        return None
    graph = fx.Graph()
    env = {}
    new_stack_inputs = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda a: env[a])
            if node is placeholders[-1]:
                for k, stack in enumerate(stacks):
                    ph = graph.placeholder(f"stacked_weights_{k}")
                    ph.meta = dict(stack.meta)
                    new_stack_inputs.append(ph)
            continue
        if node in stacks:
            env[node] = new_stack_inputs[stacks.index(node)]
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    lifted = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    lifted.meta = dict(gm.meta)
    indices = [[position[p] for p in stack.args[0]] for stack in stacks]
    values = [stack.meta.get("val", stack.meta.get("example_value")) for stack in stacks]
    return LiftedStacks(lifted, indices, values)
