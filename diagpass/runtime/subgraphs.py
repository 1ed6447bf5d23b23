"""Shared subgraphs: each distinct group call one subgraph Inductor compiles once.

Inlined, every group call of the rewritten graph is traced and lowered anew:
Inductor's work grows with the number of wavefronts (S + L - 1 of them), and
with every cell when the graph runs cell by cell. But a steady state calls one
module S times. Here each call becomes ``invoke_subgraph`` (torch's higher-order
op for repeated regions): AOTAutograd traces one subgraph per identifier, forward
and backward, and Inductor lowers a subgraph once and calls it from the
generated code, so the cost follows the distinct calls, not the calls. The glue
and the schedule stay one Inductor graph (no host loop, unlike ``roll``).

Before (lowered rewritten graph)::

    out_t7 = diag_t7_g0(x7, A, w_q)              # call_module: a BatchedCell
    out_t8 = diag_t7_g0(x8, A, w_q)              # same module, same argument metadata

After::

    out_t7 = invoke_subgraph(subgraph_0, "diagpass_subgraph_0", x7, A, w_q)
    out_t8 = invoke_subgraph(subgraph_0, "diagpass_subgraph_0", x8, A, w_q)

One identifier means one traced subgraph, so calls share one only when their
module and the metadata (shape, stride, dtype, requires_grad) of every argument
are equal; a call whose arguments carry no static metadata gets a subgraph of its
own. Calls inside ``torch.utils.checkpoint`` stay inline: their recompute tags
are per op. Non-tensor arguments become constants of the subgraph.
"""

from __future__ import annotations

import itertools
from typing import Dict, Optional

import torch.fx as fx
from torch._higher_order_ops.invoke_subgraph import invoke_subgraph

from diagpass.counters import counters
from diagpass.fx_facts import copy_graph_module, example_value, static_meta
from diagpass.runtime.batched_cell import BatchedCell

_IDS = itertools.count()  # identifiers unique in the process: no two graphs' subgraphs can meet


def as_shared_subgraphs(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose ``BatchedCell`` calls are ``invoke_subgraph`` calls."""
    out, _ = copy_graph_module(gm)
    names: Dict[tuple, str] = {}
    for node in list(out.graph.nodes):
        module = out.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, BatchedCell) or node.kwargs or node.meta.get("recompute") is not None:
            continue
        key = _call_key(node)
        name = names.get(key) if key is not None else None
        if name is None:
            name = f"diagpass_subgraph_{next(_IDS)}"
            setattr(out, name, module.as_graph(node.args, lambda a: isinstance(a, fx.Node)))
            counters["subgraphs"]["subgraphs"] += 1
            if key is not None:
                names[key] = name
        with out.graph.inserting_before(node):
            subgraph = out.graph.get_attr(name)
            operands = [a for a in node.args if isinstance(a, fx.Node)]
            call = out.graph.call_function(invoke_subgraph, (subgraph, name, *operands))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        out.graph.erase_node(node)
        counters["subgraphs"]["calls"] += 1
    out.graph.lint()
    out.delete_all_unused_submodules()
    out.recompile()
    return out


def _call_key(node: fx.Node) -> Optional[tuple]:
    values = [example_value(a) for a in node.args if isinstance(a, fx.Node)]
    meta = static_meta(values) if all(v is not None for v in values) else None
    if meta is None:
        return None
    constants = tuple((i, a) for i, a in enumerate(node.args) if not isinstance(a, fx.Node))
    if not all(isinstance(c, (int, float, bool, str, type(None))) for _, c in constants):
        return None
    return (node.target, meta, constants)
