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

import logging
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from diagpass.counters import counters
from diagpass.errors import DiagonalMismatch
from diagpass.weights import WeightStackCache, stacked_views_at

log = logging.getLogger("diagpass")


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


def needs_grad(args) -> bool:
    """Whether a call with these arguments records a graph for backward."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


class MeasuredChoice:
    """Which of several variants of one graph a call runs, decided by timing
    them on the first real calls (for inference calls on CPU, where the cost
    estimate is too close to call: ``options['measure_band']``).

    Each call runs exactly one variant: a graph may write its inputs (a
    buffer, a memory attribute), and running two on one call would apply the
    writes twice. Calls take turns; a variant's first call (its compile) is
    not timed; after ``rounds`` timed calls each, the variant with the lowest
    median runs from then on. A call that needs gradients runs ``default``
    untimed: its forward time says little about forward plus backward.
    ``on_choice(name, medians)`` is told the outcome once.
    """

    def __init__(self, variants: Dict[str, Lazy], default: str, rounds: int = 3,
                 on_choice: Optional[Callable[[str, Dict[str, float]], None]] = None):
        self.variants, self.default, self.rounds = variants, default, rounds
        self.samples: Dict[str, List[float]] = {name: [] for name in variants}
        self.warm: set = set()
        self.chosen: Optional[str] = None
        self.on_choice = on_choice

    def __call__(self, args) -> Callable:
        if self.chosen is not None:
            return self.variants[self.chosen](args)
        if needs_grad(args):
            return self.variants[self.default](args)
        return self._timed

    def _next(self) -> str:
        cold = [name for name in self.variants if name not in self.warm]
        return cold[0] if cold else min(self.variants, key=lambda name: len(self.samples[name]))

    def _timed(self, *args):
        name = self._next()
        fn = self.variants[name](args)
        t0 = time.perf_counter()
        out = fn(*args)
        elapsed = time.perf_counter() - t0
        if name in self.warm:
            self.samples[name].append(elapsed)
        self.warm.add(name)
        if all(len(s) >= self.rounds for s in self.samples.values()):
            medians = {n: statistics.median(s) for n, s in self.samples.items()}
            self.chosen = min(medians, key=medians.get)
            counters["runtime"][f"measured_chose_{self.chosen}"] += 1
            if self.on_choice is not None:
                self.on_choice(self.chosen, medians)
        return out


def recorded(outcome: dict, what: str) -> Callable[[str, Dict[str, float]], None]:
    """A ``MeasuredChoice``'s ``on_choice`` that writes the outcome into a report's
    dict (``chose``, ``<variant>_ms``) and logs it."""

    def chosen(name: str, medians: Dict[str, float]) -> None:
        outcome.update(chose=name, **{f"{n}_ms": 1e3 * m for n, m in medians.items()})
        log.info("diagpass: %s; measured %s; runs %s", what,
                 ", ".join(f"{n} {1e3 * m:.2f} ms" for n, m in medians.items()), name)

    return chosen


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
