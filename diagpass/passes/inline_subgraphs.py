"""inline_subgraphs: ``nested_compile_region`` and checkpoint calls become plain nodes.

A layer whose ``forward`` is marked ``torch.compiler.nested_compile_region`` is
traced by Dynamo once (per distinct input structure) into a subgraph, and every
call of it is one ``invoke_subgraph`` node: Dynamo's trace no longer grows with
S x L layer bodies. The cells are those calls, so the pass puts each body back
in place of its call and the other passes see the graph they always see.

Before::

    subgraph_0 = get_attr[target=subgraph_0]
    invoke_subgraph_1 = invoke_subgraph(subgraph_0, 'subgraph_0', x_3, w1_q, w1_k, ...)
    y = getitem(invoke_subgraph_1, 0)
    z = add(y, x_3)

After::

    pow_1 = pow(x_3, 2) ... linear(norm, w1_q) ...   # body of subgraph_0
    z = add(<body output 0>, x_3)

``torch.utils.checkpoint`` regions (``tag_activation_checkpoint`` calls) are
inlined the same way, and each inlined node carries the tags the checkpoint
itself gives its ops when AOTAutograd traces it (``meta["recompute"]`` =
PREFER_RECOMPUTE, ``meta["ac_graph_id"]``): the partitioner then recomputes
the region in backward, batched or not (``passes/batch`` copies the tags onto
a group's call). Selective checkpointing (``context_fn``) is refused.

Every inlined node gets ``meta[REGION]`` (the call's name) and, for
``invoke_subgraph``, the call site's ``nn_module_stack``: the body was traced at the *first* call and its
own stack names that call's module (layer 0 for every layer), which would read
as "layer 1's weights used by layer 0's module".
"""

from __future__ import annotations

import itertools
import operator
from typing import Dict, List

import torch.fx as fx
from torch._higher_order_ops.wrap import tag_activation_checkpoint
from torch.utils.checkpoint import CheckpointPolicy

from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.ir.meta import REGION

# ids of inlined checkpoint regions; torch numbers its own from 0 per process, so
# start far away (the partitioner only needs distinct regions to differ)
_checkpoint_uid = itertools.count(1 << 20)


def _is_invoke_subgraph(node: fx.Node) -> bool:
    return node.op == "call_function" and type(node.target).__name__ == "InvokeSubgraphHOP"


def _is_checkpoint(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is tag_activation_checkpoint


def has_subgraph_calls(gm: fx.GraphModule) -> bool:
    return any(_is_invoke_subgraph(n) or _is_checkpoint(n) for n in gm.graph.nodes)


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _checkpoint_tags(gm: fx.GraphModule, call: fx.Node) -> Dict[str, object]:
    """The meta AOTAutograd's partitioner reads to recompute a region in
    backward: what ``torch.utils.checkpoint`` itself gives every op of the
    region when it is traced (``tag_activation_checkpoint_impl``: vanilla
    checkpoint = SAC with "always prefer recompute")."""
    body = _attr(gm, call.args[0].target)
    if "_checkpoint_context_fn" in getattr(body, "meta", {}):
        raise NotBatchable(
            f"{call.name}: torch.utils.checkpoint with a context_fn (selective activation "
            "checkpointing): its per-op policy is not carried through the rewrite"
        )
    unknown = set(call.kwargs) - {"use_reentrant", "preserve_rng_state", "determinism_check", "debug"}
    if unknown:
        raise NotBatchable(f"{call.name}: torch.utils.checkpoint with options {sorted(unknown)}")
    return {"recompute": CheckpointPolicy.PREFER_RECOMPUTE, "ac_graph_id": next(_checkpoint_uid)}


def _inline_call(gm: fx.GraphModule, call: fx.Node) -> None:
    checkpointed = _is_checkpoint(call)
    sub_node, operands = call.args[0], call.args[1:] if checkpointed else call.args[2:]
    if (call.kwargs and not checkpointed) or not isinstance(sub_node, fx.Node) or sub_node.op != "get_attr":
        raise NotBatchable(f"{call.name}: {call.target} call of an unexpected form")
    body = _attr(gm, sub_node.target)
    tags = _checkpoint_tags(gm, call) if checkpointed else {}
    # A checkpoint body is traced at its own call: its nodes' module stacks are
    # right. An invoke_subgraph body is traced once, at the first call.
    stack = None if checkpointed else call.meta.get("nn_module_stack")
    env: Dict[fx.Node, fx.Node] = {}
    placeholders = list(body.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(operands):
        raise NotBatchable(f"{call.name}: {len(operands)} operands for {len(placeholders)} subgraph inputs")
    env.update(zip(placeholders, operands))
    outputs = None
    with gm.graph.inserting_before(call):
        for node in body.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                outputs = fx.map_arg(node.args[0], lambda a: env[a])
                continue
            if node.op in ("get_attr", "call_module"):
                # Body-owned state (a nested subgraph, a constant): make it the
                # outer module's, under a fresh name.
                name = f"{call.name}_{node.target.replace('.', '_')}"
                setattr(gm, name, _attr(body, node.target))
                new = gm.graph.node_copy(node, lambda a: env[a])
                new.target = name
            else:
                new = gm.graph.node_copy(node, lambda a: env[a])
            new.meta[REGION] = call.name
            new.meta.update(tags)
            if stack is not None:
                new.meta["nn_module_stack"] = dict(stack)
            elif not checkpointed:
                new.meta.pop("nn_module_stack", None)
            env[node] = new
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for user in list(call.users):
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        else:
            raise NotBatchable(f"{call.name}: its result is used whole by {user.name}, not by index")
    gm.graph.erase_node(call)
    if not sub_node.users:
        gm.graph.erase_node(sub_node)


def inline_subgraphs(gm: fx.GraphModule) -> int:
    """Inline every ``invoke_subgraph`` call in place (nested ones too);
    return how many calls were inlined."""
    inlined = 0
    while True:
        calls: List[fx.Node] = [n for n in gm.graph.nodes if _is_invoke_subgraph(n) or _is_checkpoint(n)]
        if not calls:
            break
        for call in calls:
            _inline_call(gm, call)
            inlined += 1
    if inlined:
        gm.recompile()
        counters["inline_subgraphs"]["calls"] += inlined
    return inlined
