"""One compiled graph per distinct set of input sizes, for a graph Dynamo kept dynamic.

Dynamo's guards hold the relations between the sizes; the symbols' values pick the
static graph (``passes/specialize.py``) a call runs. Each is compiled on its first
call, outside Dynamo's tracing context (inside it, the inner compiler would trace
the static graph on Dynamo's symbolic fakes and add guards Dynamo has already
built). Past ``limit`` distinct sizes, calls with new sizes run one graph for all
sizes, built once by ``past_limit`` (the backend's: Dynamo's graph traced again by
``torch.compile(dynamic=True)``, which guards what its compile assumes), with one
warning naming the way out.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional

import torch.fx as fx

from diagpass.counters import counters
from diagpass.logs import first_line

log = logging.getLogger("diagpass")


class SizeSpecializations:
    """``sizes(args)``: a call's sizes (one number per symbol); ``make(args)``: the compiled
    static graph for them (the backend's: ``passes/specialize`` then the pipeline);
    ``past_limit()``: the one graph for every size past the limit."""

    def __init__(self, gm: fx.GraphModule, sizes: Callable[[tuple], tuple], make: Callable[[list], Callable],
                 limit: int, past_limit: Callable[[], Callable]):
        self.gm, self.sizes, self.make, self.limit, self.past_limit = gm, sizes, make, limit, past_limit
        self.compiled: Dict[tuple, Callable] = {}
        self.dynamic: Optional[Callable] = None

    def __call__(self, *args):
        key = self.sizes(args)
        fn = self.compiled.get(key)
        if fn is None:
            fn = self.compiled[key] = self._compile(key, args)
        return fn(*args)

    def _compile(self, key: tuple, args) -> Callable:
        if len(self.compiled) >= self.limit:
            counters["specialize"]["sizes_past_limit"] += 1
            if self.dynamic is None:
                log.warning("diagpass: this graph met more than %d sets of input sizes (now %s); calls with new "
                            "sizes run one graph compiled for all sizes (sequential where it cannot batch). Pad "
                            "inputs to whole segments, or raise options['max_size_specializations']",
                            self.limit, key)
                self.dynamic = self._past_limit()
            return self.dynamic
        try:
            fn = self.make(list(args))
            counters["specialize"]["graphs_compiled"] += 1
            return fn
        except Exception as e:  # noqa: BLE001 - Dynamo's graph is always right
            counters["specialize"]["graphs_failed"] += 1
            log.warning("diagpass: the graph for input sizes %s did not compile (%s); running Dynamo's graph",
                        key, first_line(e), exc_info=log.isEnabledFor(logging.DEBUG))
            return self.gm

    def _past_limit(self) -> Callable:
        try:
            return self.past_limit()
        except Exception as e:  # noqa: BLE001 - Dynamo's graph is always right
            log.warning("diagpass: the graph for all sizes could not be built (%s); running Dynamo's graph",
                        first_line(e))
            return self.gm
