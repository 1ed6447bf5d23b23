"""The batch pass's output: a graph whose batched groups are ``GroupCall`` modules.

A ``GroupCall`` is IR, not code: one cell's subgraph (``template``), which of
its inputs are stacked over the group (``in_dims``), the group size, and the
``structure`` that says which calls compute the same function. The runtime
lowers each to the module that runs it (``diagpass/runtime/lower.py``): a
``BatchedCell`` (vmap of the template), or with ``roll`` a step from the
compiled-step cache.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from diagpass.ir.schedule import Group


class GroupCall(torch.nn.Module):
    """One batched call of the rewritten graph, before lowering."""

    def __init__(self, template: fx.GraphModule, in_dims: Sequence[Optional[int]], group_size: int,
                 structure: tuple, rolled: bool):
        super().__init__()
        self.template = template
        self.in_dims = tuple(in_dims)
        self.group_size = group_size
        self.structure = structure
        self.rolled = rolled

    def forward(self, *args):
        raise RuntimeError("diagpass: a GroupCall is IR; diagpass.runtime.lower turns it into the module that runs it")


@dataclasses.dataclass(frozen=True)
class BatchedGraph:
    """``gm`` calls one ``GroupCall`` per batched group (modules shared by
    groups of one structure); ``unbatchable`` lists the groups whose batched
    call did not trace, (which group, the cause), one per distinct cause."""

    gm: fx.GraphModule
    batched_groups: Tuple[Group, ...]
    unbatchable: Tuple[Tuple[str, str], ...] = ()

    def group_calls(self) -> List[Tuple[str, GroupCall]]:
        return [(name, m) for name, m in self.gm.named_children() if isinstance(m, GroupCall)]
