"""The ``diagonal`` torch.compile backend: options, the pipeline, compile what a call needs.

    torch.compile(model, backend="diagonal", options={"inner": "inductor"})

``pipeline.run`` turns Dynamo's graph into a ``Plan`` (the analysis and, when
batching is safe and pays, the rewritten graph); this module hands the plan's
graphs to the inner compiler, through the per-call dispatcher when a call's
weights may be read as stored stacks (``runtime/dispatch.py``). A refused or
failed rewrite compiles Dynamo's graph unchanged; a user never sees a
traceback from the pass.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional

import torch
import torch.fx as fx

from diagpass import logs, pipeline, variants
from diagpass.counters import counters
from diagpass.errors import DiagonalMismatch  # noqa: F401 - public: diagpass.DiagonalMismatch
from diagpass.fx_facts import copy_graph_module
from diagpass.options import Options
from diagpass.pipeline import Plan
from diagpass.report import record
from diagpass.runtime.dispatch import GraphDispatch, Lazy, needs_grad, verified
from diagpass.runtime.group_op import compile_rolled
from diagpass.runtime.inner import inner_compile
from diagpass.runtime.segment_steps import compile_steps, with_fallback
from diagpass.runtime.subgraphs import compile_shared_subgraphs
from diagpass.sizes import per_size
from diagpass.weights import WeightStackCache


def diagonal_backend(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None, **kwargs):
    entered = time.perf_counter()
    opts = Options.from_dict({**(options or {}), **kwargs})
    recompile_reason = logs.recompile_reason()
    logs.warn_near_recompile_limit(gm, recompile_reason)
    analyse = lambda g, args: _plan(g, args, opts, recompile_reason)  # noqa: E731
    if opts.enabled and opts.max_size_specializations:  # a dynamic graph: one static graph per call's sizes
        compiled = per_size(gm, example_inputs, opts.max_size_specializations, analyse, _compile_plan, entered,
                            past_limit=lambda: _for_all_sizes(gm, opts))
        if compiled is not None:
            return compiled
    return _compile_plan(analyse(gm, example_inputs), example_inputs, entered)


def _for_all_sizes(gm: fx.GraphModule, opts: Options) -> Callable:
    """Dynamo's graph traced again with every size symbolic: one graph, guarded by Dynamo."""
    options = {**dataclasses.asdict(opts), "max_size_specializations": 0}
    return torch.compile(gm, backend=functools.partial(diagonal_backend, options=options), dynamic=True)


def _plan(gm: fx.GraphModule, example_inputs, opts: Options, recompile_reason) -> Plan:
    plan = pipeline.run(gm, opts, example_inputs) if opts.enabled else pipeline.disabled(gm, opts)
    plan.report.recompile_reason = recompile_reason
    return plan


def _compile_plan(plan: Plan, example_inputs, entered: float) -> Callable:
    record(plan.report)
    opts, t0 = plan.options, time.perf_counter()
    original = copy_graph_module(plan.gm)[0] if opts.verify and plan.rewrite is not None else None
    compiled = _compile(plan, example_inputs)
    plan.report.timings.update(inner_s=time.perf_counter() - t0, entered_at=entered, left_at=time.perf_counter())
    logs.report_graph(plan.report, plan.gm, plan.rewrite.gm if plan.rewrite else None, opts.min_group)
    return verified(compiled, original, opts.rtol, opts.atol) if original is not None else compiled


def _compile(plan: Plan, example_inputs) -> Callable:
    """Compile now what these inputs run; the other variants on their first call.
    The closures keep the compiled graphs, not the plan (grid, schedule, IR)."""
    rewrite, options, arity = plan.rewrite, plan.options, len(example_inputs)
    if rewrite is not None:
        sequential = Lazy(lambda args: _sequential(plan, args))
        copying = Lazy(lambda args: _compile_rewritten(rewrite.gm, args, options, plan.report))
        if plan.measured:
            copying = variants.measured(plan, copying, sequential, example_inputs)
        if rewrite.stacked is None:
            if plan.measured:
                return lambda *args: copying(args)(*args)
            return copying(example_inputs)
        stacked = variants.stacked(plan, Lazy(lambda full: _compile_rewritten(rewrite.stacked.gm, full, options, plan.report),
                                      counter="stacked_graphs_compiled"), sequential, arity)
        cache = WeightStackCache() if options.cache_weight_stacks else None
        dispatch = GraphDispatch(plan.weight_inputs, stacked, copying=copying, cache=cache)
        if dispatch.views(example_inputs) is None and cache is None:
            copying(example_inputs)  # a MeasuredChoice compiled both variants already
        # else the stacked variant compiles on its first call, outside Dynamo's tracing context: its
        # extra inputs' sizes would become symbols its guards cannot name (GQA: IndexError in produce_guards)
        return dispatch
    if not plan.cost_refused:  # nothing to batch: segment steps, or Dynamo's graph
        return _sequential(plan, example_inputs, cell_by_cell=False)
    # The cost rule left the graph sequential for copied weights: batched after all on
    # the first call whose weights are stored stacked.
    compiled = _sequential(plan, example_inputs)
    if plan.weight_inputs is None:
        return compiled
    sequential = Lazy(lambda args: compiled)
    batched = Lazy(lambda full: _batched_when_stacked(plan, full, compiled, arity), counter="batched_after_cost")
    return GraphDispatch(plan.weight_inputs, variants.stacked(plan, batched, sequential, arity), sequential=sequential)


def _sequential(plan: Plan, example_inputs, cell_by_cell: bool = True) -> Callable:
    """One step per segment (``segment_steps``), cells as shared subgraphs (``shared_sequential``),
    or a copy of Dynamo's graph inline (the plan's cells may be its nodes, which Inductor may edit)."""
    opts, dynamo_gm = plan.options, plan.gm
    steps = pipeline.segment_steps_rewrite(plan) if opts.segment_steps else None
    whole = lambda args: inner_compile(copy_graph_module(dynamo_gm)[0], list(args), opts.inner)  # noqa: E731
    if steps is not None:  # each distinct segment compiled once (runtime/segment_steps.py)
        return with_fallback(compile_steps(steps, opts.inner, cpp_wrapper=opts.step_cpp_wrapper), whole)
    shared = cell_by_cell and opts.shared_sequential and opts.compiles_shared_subgraphs and not needs_grad(example_inputs)
    gm = pipeline.sequential_rewrite(plan) if shared else None
    if gm is not None:
        return compile_shared_subgraphs(gm, example_inputs, opts.inner)
    return whole(example_inputs)


def _batched_when_stacked(plan: Plan, full_args, sequential: Callable, arity: int) -> Callable:
    late = pipeline.rewrite_when_stacked(plan)
    record(late.report)
    logs.report_graph(late.report, plan.gm, late.rewrite.gm if late.rewrite else None, plan.options.min_group)
    if late.rewrite is None or late.rewrite.stacked is None:
        return variants.dropping_stacks(sequential, arity)
    counters["stacked_weights"]["stacked_graphs_compiled"] += 1
    compiled = _compile_rewritten(late.rewrite.stacked.gm, list(full_args), plan.options, late.report)
    if not plan.options.verify:
        return compiled
    return verified(compiled, lambda *full: plan.gm(*full[:arity]), plan.options.rtol, plan.options.atol)


def _compile_rewritten(gm: fx.GraphModule, args, opts: Options, report) -> Callable:
    steps = pipeline.wavefront_steps_rewrite(gm, report, opts) if opts.wavefront_steps and not opts.roll else None
    if steps is None:
        return _compile_whole(gm, args, opts)
    compiled = compile_steps(steps, opts.inner, True, "wavefront_steps", opts.step_cpp_wrapper)
    return with_fallback(compiled, lambda real: _compile_whole(gm, real, opts), kind="wavefront_steps")


def _compile_whole(gm: fx.GraphModule, args, opts: Options) -> Callable:
    if opts.compiles_shared_subgraphs and not needs_grad(args):
        return compile_shared_subgraphs(gm, args, opts.inner)
    if opts.roll:
        return compile_rolled(gm, args, opts.inner, opts.compile_glue)
    return inner_compile(gm, list(args), opts.inner, rewritten=True)
