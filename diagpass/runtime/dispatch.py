"""The per-call dispatcher: which compiled graph a call runs.

Three variants of one graph, each compiled on its first use:

- ``stacked``: the rewritten graph reading the layer weights as views of their
  stored stacks (``diagpass.stack_weights_``); extra trailing inputs, one per
  weight role;
- ``copying``: the rewritten graph that stacks (copies) the weights per call;
- ``sequential``: Dynamo's graph unchanged.

A call whose weights are stored stacked, with no gradient flowing into them,
runs ``stacked`` on views of the stored stacks; with a ``WeightStackCache``
(``options={'cache_weight_stacks': True}``) such a call whose weights are not
stored stacked runs ``stacked`` too, on stacks kept between calls. Any other
call runs ``copying`` when there is one, else ``sequential`` (the cost rule
left the graph sequential for copied weights).
Dynamo does not guard on storage, so the same compiled frame serves a model
before and after ``stack_weights_``, and another instance of the class.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from diagpass.counters import counters
from diagpass.errors import DiagonalMismatch
from diagpass.weights import WeightStackCache, stacked_views_at


class Lazy:
    """``self(args)`` -> the function ``make(args)`` built on the first call."""

    def __init__(self, make: Callable, counter: Optional[str] = None):
        self.make, self.counter, self.fn = make, counter, None

    def __call__(self, args) -> Callable:
        if self.fn is None:
            self.fn = self.make(args)
            if self.counter:
                counters["stacked_weights"][self.counter] += 1
        return self.fn


class GraphDispatch:
    """``weight_inputs``: input positions of each weight role's parameters,
    in the order of ``stacked``'s trailing inputs."""

    def __init__(self, weight_inputs: List[List[int]], stacked: Lazy,
                 copying: Optional[Lazy] = None, sequential: Optional[Lazy] = None,
                 cache: Optional[WeightStackCache] = None):
        assert (copying is None) != (sequential is None)
        self.weight_inputs = weight_inputs
        self.stacked, self.copying, self.sequential = stacked, copying, sequential
        self.cache = cache

    def views(self, args) -> Optional[list]:
        return stacked_views_at(args, self.weight_inputs)

    def stacks(self, args) -> Optional[list]:
        """What ``stacked`` would read for ``args``: views, or kept stacks; None: neither."""
        views = self.views(args)
        if views is not None:
            counters["stacked_weights"]["view_calls"] += 1
            return views
        if self.cache is None:
            return None
        stacks = self.cache.stacks_at(args, self.weight_inputs)
        if stacks is not None:
            counters["stacked_weights"]["cached_stack_calls"] += 1
        return stacks

    def __call__(self, *args):
        stacks = self.stacks(args)
        if stacks is not None:
            full = (*args, *stacks)
            return self.stacked(full)(*full)
        if self.copying is not None:
            counters["stacked_weights"]["copying_calls"] += 1
            return self.copying(args)(*args)
        return self.sequential(args)(*args)


def verified(compiled: Callable, original, rtol: float, atol: float) -> Callable:
    """``compiled``, checked once against ``original`` (an uncompiled copy of
    Dynamo's graph) on its first call: ``options={'verify': True}``."""
    state = {"checked": False}

    def run(*args):
        out = compiled(*args)
        if not state["checked"]:
            state["checked"] = True
            with torch.no_grad():
                expected = original(*args)
            try:
                torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
            except AssertionError as e:
                raise DiagonalMismatch(f"diagpass verify: batched graph differs from the original: {e}") from e
            counters["runtime"]["verified"] += 1
        return out

    return run
