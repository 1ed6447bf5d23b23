"""Fake-tensor checks of a rewrite: each batched group alone, then the whole graph.

``GroupTrials.trial`` traces one group's ``BatchedCell`` on fake stacked inputs
when the batch pass builds the group (the pass calls it through the function
the pipeline hands it): a group that does not trace is then left unbatched and
the rest still batch. ``GroupTrials.check`` traces the lowered graph. A group
module called again on arguments of the metadata it was traced with returns
fresh fakes of the recorded output metadata instead of re-running vmap: the
check costs one trace per distinct call, not one per wavefront.

The pipeline traces the batched graph on fake tensors before compiling it, so
that a batched call that cannot run (an op vmap cannot batch) fails inside
the backend and the graph falls back, instead of failing at run time.

Most of a rewritten graph is glue copied from Dynamo's graph, which Dynamo
already traced: a copied node whose inputs carry the same metadata as in the
original graph computes what it computed there, so its recorded fake value is
reused instead of re-running the op (re-propagating tens of thousands of
glue nodes cost seconds at long inputs). Only new nodes (weight stacks, batched calls, the
``getitem`` that stand for cell outputs) run, and any node downstream of a
value whose metadata differs from the one it replaces.

Invariant relied on (``diagpass/ir/meta.py``): the batch pass marks copied
nodes (``meta[COPIED]``, their ``example_value`` is the original's) and every
node that stands for an original cell output records that output's fake value
(``meta[REPLACES]``).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from diagpass import logs
from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.fx_facts import example_value, static_meta, tensor_meta
from diagpass.ir.meta import COPIED, REPLACES
from diagpass.runtime.batched_cell import BatchedCell

log = logging.getLogger("diagpass")


def _same_meta(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        try:
            return bool(tensor_meta(a) == tensor_meta(b))
        except Exception:  # noqa: BLE001 - symbolic sizes that cannot be compared: not the same
            return False
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_meta(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and isinstance(a, (int, float, bool, type(None))) and a == b


class ChangedNodesFakeProp(FakeTensorProp):
    """``FakeTensorProp`` that reuses the recorded fake value of every copied
    node whose inputs all match the original graph's metadata."""

    def __init__(self, gm: fx.GraphModule, mode, traced: Optional[Dict[tuple, tuple]] = None):
        super().__init__(gm, mode)
        self.unchanged: Dict[fx.Node, bool] = {}
        # (call target, argument metadata) -> output metadata of a group call already traced
        self.traced = {} if traced is None else traced

    def call_module(self, target, args, kwargs):
        key = (target, static_meta(args)) if not kwargs else None
        hit = self.traced.get(key) if key is not None and key[1] is not None else None
        if hit is not None:
            counters["check"]["fake_check_reused_traces"] += 1
            return _fresh(hit)
        out = super().call_module(target, args, kwargs)
        meta = static_meta(out) if isinstance(out, tuple) else None
        if key is not None and key[1] is not None and meta is not None:
            self.traced[key] = meta
        return out

    def run_node(self, n: fx.Node):
        inputs_unchanged = all(self.unchanged.get(i, False) for i in n.all_input_nodes)
        original = example_value(n)
        if n.op != "placeholder" and n.meta.get(COPIED) and inputs_unchanged and original is not None:
            self.unchanged[n] = True
            counters["check"]["fake_check_nodes_reused"] += 1
            return original
        out = super().run_node(n)
        counters["check"]["fake_check_nodes_run"] += 1
        if n.op == "placeholder":
            self.unchanged[n] = True
        else:
            ref = n.meta.get(REPLACES, original if n.meta.get(COPIED) else None)
            self.unchanged[n] = ref is not None and _same_meta(out, ref)
        return out


def _fresh(meta: tuple) -> tuple:
    return tuple(
        torch.empty_strided(shape, stride, dtype=dtype, device=device, requires_grad=grad)
        for shape, stride, dtype, device, grad in meta
    )


class GroupTrials:
    """The trial traces of one rewrite, and the check of the graph they built."""

    def __init__(self):
        self.traced: Dict[tuple, tuple] = {}

    def trial(self, name: str, template: fx.GraphModule, in_dims, group_size: int, fake_args: List) -> Optional[str]:
        """Trace the group call ``name`` on ``fake_args`` (stacked as the call
        stacks them); None if it traces, else the cause in one line."""
        try:
            with logs.quiet_trial("the trial trace of a batched group"):
                outs = BatchedCell(template, in_dims, group_size)(*fake_args)
        except Exception as e:  # noqa: BLE001 - the group is then not batched: never a wrong answer
            log.debug("diagpass: a batched group does not trace", exc_info=True)
            return logs.first_line(e)
        key, meta = static_meta(fake_args), static_meta(outs)
        if key is not None and meta is not None:
            self.traced[(name, key)] = meta
        counters["check"]["groups_traced"] += 1
        return None

    def check(self, gm: fx.GraphModule) -> None:
        """Trace the lowered rewritten graph on the placeholders' fake tensors:
        a batched call that cannot run fails here, not at run time."""
        fakes = [example_value(n) for n in gm.graph.find_nodes(op="placeholder")]
        mode = next((f.fake_mode for f in fakes if hasattr(f, "fake_mode")), None)
        if mode is None:
            raise NotBatchable("placeholders carry no fake tensors to check the rewrite with")
        try:
            # a failing check is an expected outcome: torch's tracebacks of it go to DEBUG
            with logs.quiet_trial("the fake-tensor check of the batched graph"), mode:
                ChangedNodesFakeProp(gm, mode, self.traced).propagate_dont_convert_inputs(*fakes)
        except Exception as e:  # noqa: BLE001
            log.debug("diagpass: the batched graph does not trace", exc_info=True)
            raise NotBatchable(f"the batched graph does not trace ({logs.first_line(e)})") from e
