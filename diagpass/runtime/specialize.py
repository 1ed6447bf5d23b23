"""One compiled graph per distinct set of input sizes, for a graph Dynamo kept dynamic.

Dynamo's guards hold the relations between the sizes; the symbols' values pick the
static graph (``passes/specialize.py``) a call runs. Each is compiled on its first
call, outside Dynamo's tracing context (inside it, the inner compiler would trace
the static graph on Dynamo's symbolic fakes and add guards Dynamo has already
built). Past ``limit`` distinct sizes a call runs Dynamo's graph as it is, with
one warning naming the way out.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict

import torch.fx as fx

from diagpass.counters import counters
from diagpass.logs import first_line

log = logging.getLogger("diagpass")


class SizeSpecializations:
    """``sizes(args)``: a call's sizes (one number per symbol); ``make(args)``: the compiled
    static graph for them (the backend's: ``passes/specialize`` then the pipeline)."""

    def __init__(self, gm: fx.GraphModule, sizes: Callable[[tuple], tuple], make: Callable[[list], Callable],
                 limit: int):
        self.gm, self.sizes, self.make, self.limit = gm, sizes, make, limit
        self.compiled: Dict[tuple, Callable] = {}

    def __call__(self, *args):
        key = self.sizes(args)
        fn = self.compiled.get(key)
        if fn is None:
            fn = self.compiled[key] = self._compile(key, args)
        return fn(*args)

    def _compile(self, key: tuple, args) -> Callable:
        if len(self.compiled) >= self.limit:
            counters["specialize"]["sizes_past_limit"] += 1
            if len(self.compiled) == self.limit:
                log.warning("diagpass: this graph met more than %d sets of input sizes (now %s); calls with new "
                            "sizes run Dynamo's graph uncompiled. Pad inputs to whole segments, or pass "
                            "options={'max_size_specializations': 0} to compile one graph for all sizes",
                            self.limit, key)
            return self.gm
        try:
            fn = self.make(list(args))
            counters["specialize"]["graphs_compiled"] += 1
            return fn
        except Exception as e:  # noqa: BLE001 - Dynamo's graph is always right
            counters["specialize"]["graphs_failed"] += 1
            log.warning("diagpass: the graph for input sizes %s did not compile (%s); running Dynamo's graph",
                        key, first_line(e), exc_info=log.isEnabledFor(logging.DEBUG))
            return self.gm
