"""Which compiled variant of a rewritten graph a call runs, when the cost rule left it to
measurement: the batched graph or the sequential one, timed side by side on the first
calls (``runtime/dispatch.py``'s ``MeasuredChoice``), for copied and for stored-stack weights.
"""

from __future__ import annotations

from typing import Callable

from diagpass.pipeline import Plan
from diagpass.runtime.dispatch import Lazy, MeasuredChoice, recorded


def stacked(plan: Plan, batched: Lazy, sequential: Lazy, arity: int):
    """What a call reading stored stacks runs: the batched variant, or on CPU the faster of it
    and the sequential graph, timed on the first calls (``pipeline._measures_stacks``)."""
    if not plan.stacked_measured:
        return batched
    unstacked = Lazy(lambda full: dropping_stacks(sequential(full[:arity]), arity))
    return MeasuredChoice({"batched": batched, "sequential": unstacked}, plan.stacked_measured,
                          on_choice=recorded(plan.report.measured_stacked, "weights stored stacked"))


def dropping_stacks(sequential: Callable, arity: int) -> Callable:
    """The sequential graph called with a stacked variant's arguments (the stacks trail)."""
    return lambda *full: sequential(*full[:arity])


def measured(plan: Plan, batched: Lazy, sequential: Lazy, example_inputs) -> MeasuredChoice:
    """Both variants compiled now; inference calls then time them (``measure_band``)."""
    batched(example_inputs)
    sequential(example_inputs)
    return MeasuredChoice({"batched": batched, "sequential": sequential}, plan.measured,
                          on_choice=recorded(plan.report.measured, f"the cost rule said {plan.measured}"))
