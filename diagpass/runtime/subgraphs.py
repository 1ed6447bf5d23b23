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
are equal; a call whose arguments carry no static metadata stays inline, and so
do calls inside ``torch.utils.checkpoint``: their recompute tags are per op.
Non-tensor arguments become constants of the subgraph.

A subgraph must not mutate an operand nor return an alias
(``runtime/subgraph_aliasing.py``): an output that is a view of an operand is
computed outside, by the same view ops, and a call that mutates or aliases
otherwise stays inline::

    out = invoke_subgraph(subgraph_1, "diagpass_subgraph_1", h, w)   # out[0] fresh
    cache = aten.detach(h)                                            # was out[1]
"""

from __future__ import annotations

import itertools
import logging
import operator
from typing import Callable, Dict, Optional, Tuple

import torch.fx as fx
from torch._higher_order_ops.invoke_subgraph import invoke_subgraph
from torch.multiprocessing.reductions import StorageWeakRef

from diagpass.counters import counters
from diagpass.logs import first_line
from diagpass.fx_facts import copy_graph_module, example_value, static_meta
from diagpass.runtime.batched_cell import BatchedCell
from diagpass.runtime.inner import inner_compile
from diagpass.runtime.subgraph_aliasing import CallAliasing, call_aliasing

log = logging.getLogger("diagpass")

_IDS = itertools.count()  # identifiers unique in the process: no two graphs' subgraphs can meet


def compile_shared_subgraphs(gm: fx.GraphModule, args, inner: str) -> Callable:
    """``gm`` compiled with each distinct call one subgraph; inline if that fails.
    Inference only: Inductor's backward of such subgraphs gave wrong gradients (README)."""
    try:
        return inner_compile(as_shared_subgraphs(gm), list(args), inner, rewritten=True)
    except Exception as e:  # noqa: BLE001 - a compile-time saving: never worth a wrong or failed call
        counters["subgraphs"]["graphs_inlined"] += 1
        log.warning("diagpass: the shared subgraphs did not compile (%s); compiling the calls inline",
                    first_line(e), exc_info=log.isEnabledFor(logging.DEBUG))
        return inner_compile(gm, list(args), inner, rewritten=True)


def as_shared_subgraphs(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose ``BatchedCell`` calls are ``invoke_subgraph`` calls."""
    out, _ = copy_graph_module(gm)
    made: Dict[tuple, Tuple[Optional[str], Optional[CallAliasing]]] = {}
    for node in list(out.graph.nodes):
        module = out.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, BatchedCell) or node.kwargs or node.meta.get("recompute") is not None:
            continue
        key, why = _call_key(node)
        if key is not None and key not in made:
            made[key] = _subgraph(out, module, node)
        name, aliasing = made[key] if key is not None else (None, None)
        if name is None:  # why: from the key, or logged once by _subgraph for all calls of that key
            counters["subgraphs"]["calls_inline"] += 1
            if why:
                log.debug("diagpass: group call %s stays inline: %s", node.name, why)
            continue
        _replace(out, node, name, aliasing)
    out.graph.lint()
    out.delete_all_unused_submodules()
    out.recompile()
    return out


def _subgraph(out: fx.GraphModule, module: BatchedCell, node: fx.Node) -> Tuple[Optional[str], Optional[CallAliasing]]:
    """A new subgraph attribute for calls like ``node``, without its outputs that view
    an operand; (None, None) when the call cannot be a subgraph."""
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    whole = module.as_graph(node.args, lambda a: isinstance(a, fx.Node))
    aliasing, why = call_aliasing(whole, [example_value(a) for a in operands])
    if aliasing is None:
        log.info("diagpass: group call %s stays inline: %s", node.name, why)
        return None, None
    fresh = aliasing.fresh_outputs(len(example_value(node)))
    if not fresh:
        log.info("diagpass: group call %s stays inline: every output is a view of an operand", node.name)
        return None, None
    name = f"diagpass_subgraph_{next(_IDS)}"
    setattr(out, name, module.as_graph(node.args, lambda a: isinstance(a, fx.Node), outputs=fresh))
    counters["subgraphs"]["subgraphs"] += 1
    return name, aliasing


def _replace(out: fx.GraphModule, node: fx.Node, name: str, aliasing: CallAliasing) -> None:
    """``node`` -> ``invoke_subgraph``; each read of an output that views an operand
    -> those view ops on the operand."""
    graph = out.graph
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    fresh = aliasing.fresh_outputs(len(example_value(node)))
    views = {v.output: v for v in aliasing.views}
    with graph.inserting_before(node):
        call = graph.call_function(invoke_subgraph, (graph.get_attr(name), name, *operands))
    call.meta.update(node.meta)
    call.meta.pop("val", None)
    call.meta["example_value"] = tuple(example_value(node)[j] for j in fresh)
    for user in list(node.users):
        j = user.args[1]
        with graph.inserting_before(user):
            if j in views:
                new = views[j].emit(graph, operands[views[j].operand])
                counters["subgraphs"]["outputs_as_views"] += 1
            else:
                new = graph.call_function(operator.getitem, (call, fresh.index(j)))
        if new not in operands:  # an empty view chain is the operand itself: its meta stays its own
            new.meta.update(user.meta)
        user.replace_all_uses_with(new)
        graph.erase_node(user)
    graph.erase_node(node)
    counters["subgraphs"]["calls"] += 1


def _call_key(node: fx.Node) -> Tuple[Optional[tuple], str]:
    """What calls must agree on to share one subgraph; None (and why) for a call that
    cannot be one: operands without static metadata, operands sharing storage, a
    non-constant argument, a result read other than by ``getitem``."""
    values = [example_value(a) for a in node.args if isinstance(a, fx.Node)]
    meta = static_meta(values) if all(v is not None for v in values) else None
    if meta is None:
        return None, "an operand has no static metadata"
    storages = [StorageWeakRef(v.untyped_storage()) for v in values]
    if len(set(storages)) < len(storages):
        return None, "two operands share storage"
    constants = tuple((i, a) for i, a in enumerate(node.args) if not isinstance(a, fx.Node))
    if not all(isinstance(c, (int, float, bool, str, type(None))) for _, c in constants):
        return None, "an argument is neither a tensor nor a constant"
    outs = example_value(node)
    if not isinstance(outs, tuple) or not all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users
    ):
        return None, "its result is read other than by getitem"
    return (node.target, meta, constants), ""
