"""Lowering: the batch pass's ``GroupCall`` modules become the modules that run them.

Before (``ir.rewrite.BatchedGraph``)::

    out = diag_t2_g0(x, A, w_q_0_1)     # GroupCall: template, in_dims, G

After::

    out = diag_t2_g0(x, A, w_q_0_1)     # BatchedCell (vmap), or for the host loop
                                        # (roll) a CompiledGroup: a kernel from the cache

The graph is copied; the IR graph is left as the pass produced it.
"""

from __future__ import annotations

import torch.fx as fx

from diagpass.counters import counters
from diagpass.fx_facts import copy_graph_module
from diagpass.ir.rewrite import GroupCall
from diagpass.runtime.batched_cell import BatchedCell
from diagpass.runtime.kernel_cache import CompiledGroup


def lower(gm: fx.GraphModule, inner: str, host_loop: bool = True) -> fx.GraphModule:
    """``host_loop``: calls emitted for it (``GroupCall.rolled``) take their
    kernels from the cache; False leaves them ``BatchedCell`` (regions)."""
    lowered, _ = copy_graph_module(gm)
    for name, call in list(gm.named_children()):
        if not isinstance(call, GroupCall):
            continue
        module = BatchedCell(call.template, call.in_dims, call.group_size)
        if call.rolled and host_loop:
            module = CompiledGroup(module, call.structure, inner)
        setattr(lowered, name, module)
        counters["lower"]["group_modules"] += 1
    return lowered
