"""A graph Dynamo kept dynamic, compiled per call's sizes: the backend's side of
``passes/specialize.py`` (the static graph of one call's sizes) and
``runtime/specialize.py`` (which of them a call runs).

Only sizes Dynamo made dynamic on its own (automatic dynamic shapes, after a
second size) are specialised: ``torch.compile(dynamic=True)`` and
``torch._dynamo.mark_dynamic`` ask for one graph for all sizes, and get it. The
first sizes are specialised now, inside the backend, so that a graph the pass
cannot specialise compiles as it is, as before; every graph is compiled on its
first call.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.fx as fx

from diagpass.counters import counters
from diagpass.logs import first_line
from diagpass.passes.specialize import concrete, specialize, symbolic_sizes
from diagpass.runtime.specialize import SizeSpecializations

log = logging.getLogger("diagpass")


def per_size(gm: fx.GraphModule, example_inputs, limit: int,
             compile: Callable[[fx.GraphModule, list], Callable]) -> Optional[SizeSpecializations]:
    """None for a static graph, one the user asked to keep dynamic, or one whose sizes
    cannot be specialised (logged)."""
    if _asked_dynamic(example_inputs):
        return None
    try:
        sizes = symbolic_sizes(gm)
        if sizes is None:
            return None
        first = specialize(gm, sizes, concrete(example_inputs))
    except Exception as e:  # noqa: BLE001 - the dynamic graph compiles as it is: never worth a crash
        counters["specialize"]["graphs_kept_dynamic"] += 1
        log.info("diagpass: the dynamic graph compiles once for all sizes, not per size (%s)", first_line(e),
                 exc_info=log.isEnabledFor(logging.DEBUG))
        return None
    made = {sizes.read(example_inputs): first}

    def make(args: list) -> Callable:
        static = made.pop(sizes.read(args), None)
        return compile(static if static is not None else specialize(gm, sizes, args), args)

    return SizeSpecializations(gm, sizes.read, make, limit)


def _asked_dynamic(example_inputs) -> bool:
    """``dynamic=True`` compiles with ``assume_static_by_default`` off; ``mark_dynamic``
    leaves its dims on the tensor (both read at the backend call, inside the compile)."""
    if not torch._dynamo.config.assume_static_by_default:
        return True
    return any(getattr(a, "_dynamo_dynamic_indices", None) for a in example_inputs if isinstance(a, torch.Tensor))
