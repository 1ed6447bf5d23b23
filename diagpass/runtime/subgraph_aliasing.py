"""What a group call may alias or mutate, decided on its own traced aten graph.

``invoke_subgraph`` assumes its subgraph mutates no input and returns nothing
that aliases an input or another output: Dynamo checks that before it forms one
(``check_aliasing_and_input_mutation``), and Inductor lowers the subgraph's
outputs as fresh buffers. A call built here from a ``BatchedCell`` must be
checked the same way. A Transformer-XL cell, for one, returns its input hidden
states (detached) as the next segment's cache: a view of its operand. Inlined,
AOTAutograd sees that view; as a subgraph output Inductor would hand out a
buffer it had already reused, and the next segment reads garbage.

The call is traced with ``make_fx`` on fresh fake operands (each its own
storage, so every alias found is the call's own), and torch's analysis
(``check_input_alias_and_mutation_return_outputs``) lists the aliases. An
output that is a chain of aten view ops on one operand is returned as an
``OperandView``: the caller computes it outside the subgraph, by the same view
ops, so its aliasing is exactly the eager model's. Anything else (an operand
mutated, outputs aliasing each other, an alias through a non-view op) gives
None: the call stays inline.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._higher_order_ops.utils import _maybe_fake_tracing, check_input_alias_and_mutation_return_outputs
from torch._subclasses.fake_tensor import FakeTensorMode


@dataclasses.dataclass(frozen=True)
class OperandView:
    """Output ``output`` of a call is operand ``operand`` after ``views``:
    ``(aten view op, the other args, kwargs)``, applied in order."""

    output: int
    operand: int
    views: Tuple[tuple, ...]

    def emit(self, graph: fx.Graph, operand: fx.Node) -> fx.Node:
        value = operand
        for op, rest, kwargs in self.views:
            value = graph.call_function(op, (value, *rest), dict(kwargs))
        return value


@dataclasses.dataclass(frozen=True)
class CallAliasing:
    """The outputs of one call that are views of its operands; the others are fresh."""

    views: Tuple[OperandView, ...]

    def fresh_outputs(self, num_outputs: int) -> Tuple[int, ...]:
        aliased = {v.output for v in self.views}
        return tuple(j for j in range(num_outputs) if j not in aliased)


def call_aliasing(call: fx.GraphModule, values: Sequence[torch.Tensor]) -> Tuple[Optional[CallAliasing], str]:
    """``call`` (a graph of one call) traced on fresh fakes of ``values``' metadata:
    its ``CallAliasing``, or None and why it cannot be a subgraph."""
    mode = FakeTensorMode()
    with mode, torch.no_grad():
        fakes = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device) for v in values]
    try:
        with torch.no_grad():
            traced = _maybe_fake_tracing(call, fakes, pre_dispatch=False)
    except Exception as e:  # noqa: BLE001 - then it is not proven safe: inline
        return None, f"it did not trace on fake operands ({type(e).__name__})"
    _, inp_out, out_out, mutated, _ = check_input_alias_and_mutation_return_outputs(traced)
    if mutated:
        return None, f"it mutates operand(s) {sorted(set(mutated))}"
    if out_out:
        return None, "two of its outputs share storage"
    outputs = pytree.tree_leaves(traced.graph.find_nodes(op="output")[0].args[0])
    placeholders = list(traced.graph.find_nodes(op="placeholder"))
    views = []
    for operand, output in sorted(inp_out.items()):
        chain = _view_chain(outputs[output], placeholders[operand])
        if chain is None:
            return None, f"output {output} aliases operand {operand} other than by view ops"
        views.append(OperandView(output, operand, chain))
    return CallAliasing(tuple(views)), ""


def _view_chain(node: fx.Node, base: fx.Node) -> Optional[Tuple[tuple, ...]]:
    """The view ops that lead from ``base`` to ``node``, first op first; None if
    the path is not a chain of aten view ops whose other arguments are constants."""
    chain = []
    while node is not base:
        target = node.target if node.op == "call_function" else None
        if not (isinstance(target, torch._ops.OpOverload) and target.is_view and node.args):
            return None
        rest, kwargs = node.args[1:], node.kwargs
        if not isinstance(node.args[0], fx.Node) or any(isinstance(a, fx.Node) for a in pytree.tree_leaves((rest, kwargs))):
            return None
        chain.append((target, tuple(rest), tuple(kwargs.items())))
        node = node.args[0]
    return tuple(reversed(chain))
