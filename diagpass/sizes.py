"""A graph Dynamo kept dynamic, compiled per call's sizes: the backend's side of
``passes/specialize.py`` (the static graph of one call's sizes) and
``runtime/specialize.py`` (which of them a call runs).

Only sizes Dynamo made dynamic on its own (automatic dynamic shapes, after a
second size) are specialised: ``torch.compile(dynamic=True)`` and
``torch._dynamo.mark_dynamic`` ask for one graph for all sizes, and get it. The
first sizes are specialised and analysed now, inside the backend, so that a graph
the pass cannot specialise, or one without segments (a decoding step, whose cache
length grows every call), compiles dynamic as before; every static graph is
compiled on its first call.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
import torch.fx as fx

from diagpass.counters import counters
from diagpass.logs import first_line
from diagpass.passes.specialize import concrete, specialize, symbolic_sizes
from diagpass.pipeline import Plan
from diagpass.runtime.specialize import SizeSpecializations

log = logging.getLogger("diagpass")


def per_size(gm: fx.GraphModule, example_inputs, limit: int, analyse: Callable[[fx.GraphModule, list], Plan],
             compile: Callable[[Plan, list, float], Callable], entered: float,
             past_limit: Callable[[], Callable]) -> Optional[SizeSpecializations]:
    """None for a static graph, one the user asked to keep dynamic, one whose sizes
    cannot be specialised (logged), or one without segments (a decoding step: one
    graph for every cache length beats a compile per length)."""
    if _asked_dynamic(example_inputs):
        return None
    try:
        sizes = symbolic_sizes(gm)
        if sizes is None:
            return None
        args = concrete(example_inputs)
        first = analyse(specialize(gm, sizes, args), args)
    except Exception as e:  # noqa: BLE001 - the dynamic graph compiles as it is: never worth a crash
        return _kept_dynamic(f"its sizes were not specialised ({first_line(e)})", e)
    if first.report.num_segments < 2:
        return _kept_dynamic("it has no segments to batch or step")
    made = {sizes.read(example_inputs): (first, entered)}

    def make(args: list) -> Callable:
        plan, at = made.pop(sizes.read(args), (None, time.perf_counter()))
        return compile(plan if plan is not None else analyse(specialize(gm, sizes, args), args), args, at)

    return SizeSpecializations(gm, sizes.read, make, limit, past_limit)


def _kept_dynamic(why: str, error: Optional[Exception] = None) -> None:
    counters["specialize"]["graphs_kept_dynamic"] += 1
    log.info("diagpass: the dynamic graph compiles once for all sizes, not per size: %s", why,
             exc_info=error is not None and log.isEnabledFor(logging.DEBUG))
    return None


def _asked_dynamic(example_inputs) -> bool:
    """``dynamic=True`` compiles with ``assume_static_by_default`` off; ``mark_dynamic``
    leaves its dims on the tensor (both read at the backend call, inside the compile)."""
    if not torch._dynamo.config.assume_static_by_default:
        return True
    return any(getattr(a, "_dynamo_dynamic_indices", None) for a in example_inputs if isinstance(a, torch.Tensor))
