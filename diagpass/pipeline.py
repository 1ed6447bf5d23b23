"""The pipeline: Dynamo's graph in, a ``Plan`` out.

    prepare       inline_subgraphs, functionalize, see_through,   the graph normalised
                  autocast (drop, lift), grad_mode
    partition     FX nodes -> cells (segment, layer) or glue      CellGrid
    complete      last-segment cells given their dead outputs     CellGrid (new cells)
    cost          weight bytes a call copies vs matmul FLOPs      BatchingCost
    dependence    the cell DAG and its dependence vectors         CellGraph
    schedule      wavefronts, groups, closed form                 Schedule
    decide        batch at all? (schedule, min_group, cost rule)
    batch         one GroupCall per group (trial-traced)          BatchedGraph
    autocast      regions restored around runs of nodes
    lower         GroupCall -> BatchedCell / compiled step        the rewritten graph (runtime)
    check         the lowered graph traced on fake tensors
    stacked       the variant reading stored weight stacks        LiftedStacks

``run`` does them in order; ``rewrite`` is the stages after ``decide``. A stage that cannot
prove its step safe raises ``NotBatchable``; ``run`` catches it, and any other
exception, and returns a plan without a rewrite whose report says why: the
backend then compiles Dynamo's graph unchanged. When only the cost rule said
no, ``rewrite_when_stacked`` runs the stages after ``decide`` later, for a
call whose weights are stored stacked (Dynamo does not guard on storage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import sys
import time
import types
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from diagpass import logs
from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.fx_facts import copy_graph_module, example_value
from diagpass.ir import CellGraph, CellGrid, Group, Schedule
from diagpass.ir.invariants import check_stage
from diagpass.ir.meta import AUTOCAST
from diagpass.options import Options
from diagpass.passes.autocast import (
    drop_noop_autocast_regions,
    has_autocast_regions,
    lift_autocast_regions,
    restore_autocast_regions,
)
from diagpass.passes.batch import batch_wavefronts
from diagpass.passes.cost import CPU_COPY_BYTES_PER_FLOP, BatchingCost, estimate_cost
from diagpass.passes.dependence import build_cell_graph
from diagpass.passes.functionalize import functionalize
from diagpass.passes.grad_mode import detach_no_grad_regions, has_grad_mode_switches
from diagpass.passes.inline_subgraphs import has_subgraph_calls, inline_subgraphs
from diagpass.passes.complete_cells import complete_cells
from diagpass.passes.partition import partition
from diagpass.passes.schedule import cells_partly_in_autocast, schedule
from diagpass.passes.segment_steps import segment_steps
from diagpass.passes.wavefront_steps import wavefront_steps
from diagpass.passes.see_through import has_concat_reads, simplify_concat_slices
from diagpass.passes.stacked_weights import LiftedStacks, lift_weight_stacks
from diagpass.report import GraphReport
from diagpass.runtime.checks import GroupTrials
from diagpass.runtime.lower import lower
from diagpass.weights import stacked_views_at

log = logging.getLogger("diagpass")

INTERNAL_ERROR = "internal error in the pass, graph left unchanged"


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """The rewritten graph, lowered (``gm``: layer weights stacked per call),
    its variant reading stored weight stacks (static shapes only), and what
    the batch pass reported: which groups batched, which did not trace. (The
    batch pass's IR graph is not kept: the compiled graphs outlive the plan.)"""

    gm: fx.GraphModule
    stacked: Optional[LiftedStacks]
    batched_groups: Tuple[Group, ...]
    unbatchable: Tuple[Tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the pipeline made of one graph. ``rewrite`` is None when the graph
    runs unchanged (``report.reason`` says why). ``weight_inputs``: input
    positions of each layer-weight role, sorted by role; set whenever a call
    may read the weights as stored stacks."""

    gm: fx.GraphModule
    options: Options
    report: GraphReport
    grid: Optional[CellGrid] = None
    cell_graph: Optional[CellGraph] = None
    schedule: Optional[Schedule] = None
    cost: Optional[BatchingCost] = None
    rewrite: Optional[Rewrite] = None
    weight_inputs: Optional[List[List[int]]] = None
    cost_refused: bool = False
    # the cost estimate is too close to call: both variants are timed; this is
    # the one the rule would pick ("batched" | "sequential"), run untimed by calls with gradients
    measured: Optional[str] = None
    # calls reading stored (or kept) stacks copy nothing for the cost rule to weigh: on CPU
    # the stacked variant is timed against the sequential graph; the pick before timing
    stacked_measured: Optional[str] = None


class _Stages(types.SimpleNamespace):
    """The stage results while the pipeline runs (``Plan``'s fields but the
    report, plus what the report needs); frozen into a ``Plan`` at the end."""

    def __init__(self, gm: fx.GraphModule, options: Options, **given):
        fields = {f.name: f.default for f in dataclasses.fields(Plan) if f.name not in ("gm", "options", "report")}
        super().__init__(**{**fields, "writes_functionalized": 0, "reason": None, "seconds": 0.0, **given},
                         gm=gm, options=options)


def run(gm: fx.GraphModule, options: Options, example_inputs=None) -> Plan:
    """All stages, in order. With the real ``example_inputs`` (the backend has
    them, ``explain`` does not) the cost rule is applied too."""
    st = _Stages(gm, options)
    t0 = time.perf_counter()
    with _gc_paused(), _fallback(st):
        prepared, st.writes_functionalized = prepare(gm, options)
        st.grid = check_stage("partition", complete_cells(check_stage("partition", partition(prepared))))
        st.cost = estimate_cost(st.grid)
        st.cell_graph = check_stage("dependence", build_cell_graph(st.grid), st.grid)
        st.schedule = check_stage("schedule", schedule(st.grid, st.cell_graph), st.grid, st.cell_graph)
        decide(st, example_inputs)  # NotBatchable: nothing to batch, or the cost rule says no
        st.rewrite = rewrite(st.grid, st.cell_graph, st.schedule, options, static=st.weight_inputs is not None)
        _conclude(st)
    st.seconds = time.perf_counter() - t0
    return _freeze(st)


def decide(st: _Stages, example_inputs) -> None:
    """Whether to batch at all: the schedule has groups of ``min_group`` cells
    (``roll`` rewrites anyway: each distinct cell then compiles once), and when
    a batched call would copy the layer weights (``passes/cost.py``), the copy
    keeps peak memory within ``max_memory_ratio`` of the sequential graph's and,
    on CPU, the FLOP rule agrees, or its estimate is within ``measure_band`` of
    the threshold: then the runtime times both variants (``st.measured``: the
    rule's own pick). Refusals for the copy leave a call whose weights are
    stored stacked free to batch (``cost_refused``); on CPU such a call is
    timed against the sequential graph (``st.stacked_measured``)."""
    options = st.options
    st.reason = _why_not(st.grid, st.schedule, options)
    if st.reason is not None and not options.roll:
        raise NotBatchable(st.reason)
    if _static(st.gm, example_inputs):  # real inputs, no symbolic size: a stacked variant can serve
        st.weight_inputs = _weight_input_indices(st.gm, st.grid)
    if _measures_stacks(st, example_inputs):
        st.stacked_measured = "batched"
        counters["backend"]["stacked_graphs_measured"] += 1
    if example_inputs is None or not _copies_weights(st, example_inputs):
        return
    if st.cost.copy_memory_ratio > options.max_memory_ratio:
        _refuse_copying(st, "memory: stacking the layer weights per call would raise the peak to about "
                        f"{st.cost.copy_memory_ratio:.2f}x the sequential graph's ({st.cost.weight_copy_bytes / 2**20:.1f} "
                        f"MiB copied, sequential peak ~{st.cost.sequential_peak_bytes / 2**20:.1f} MiB; "
                        f"options['max_memory_ratio']={options.max_memory_ratio:g})",
                        f"{{'max_memory_ratio': {math.ceil(10 * st.cost.copy_memory_ratio) / 10:g}}}")
    if not _on_cpu(example_inputs):
        return
    if _too_close_to_call(st.cost.bytes_per_flop, options.measure_band):
        st.measured = "batched" if st.cost.bytes_per_flop <= CPU_COPY_BYTES_PER_FLOP else "sequential"
        counters["backend"]["graphs_measured"] += 1
    elif st.cost.bytes_per_flop > CPU_COPY_BYTES_PER_FLOP:
        _refuse_copying(st, f"cost: on CPU, batching with layer weights copied per call does not pay: "
                        f"{st.cost.describe()} (> {CPU_COPY_BYTES_PER_FLOP:.0e})", "{'cost_model': False}")


def _refuse_copying(st: _Stages, why: str, way_out: str) -> None:
    """Sequential for copied weights; a call whose weights are stored stacked still batches."""
    st.cost_refused = True
    counters["backend"]["graphs_not_batched_cost"] += 1
    raise NotBatchable(
        f"{why}. Store the weights stacked (diagpass.stack_weights_(model.layers)) to batch without "
        f"the copy, or pass options={way_out}"
    )


def _too_close_to_call(bytes_per_flop: float, band: float) -> bool:
    """Within a factor ``band`` of the threshold: a rule from one machine cannot tell."""
    return band > 1 and CPU_COPY_BYTES_PER_FLOP / band <= bytes_per_flop <= CPU_COPY_BYTES_PER_FLOP * band


def prepare(gm: fx.GraphModule, options: Options) -> Tuple[fx.GraphModule, int]:
    """The normalisations, in order, on a copy when one of them edits in place
    (the fallback compiles the graph Dynamo gave). Returns (graph, writes made private)."""
    if has_subgraph_calls(gm) or has_grad_mode_switches(gm) or has_autocast_regions(gm) or has_concat_reads(gm):
        gm = copy_graph_module(gm)[0]
    inline_subgraphs(gm)
    gm, writes = functionalize(gm)  # a new graph if it rewrites
    simplify_concat_slices(gm)  # after functionalize: every write is private
    drop_noop_autocast_regions(gm)
    if lift_autocast_regions(gm) and options.roll:  # kernels are compiled outside the regions
        raise NotBatchable("autocast regions inside forward are not supported with roll=True")
    detach_no_grad_regions(gm)  # also refuses autocast / other global-state calls
    return check_stage("prepare", gm), writes


def rewrite(grid: CellGrid, graph: CellGraph, sched: Schedule, options: Options, static: bool) -> Rewrite:
    """batch -> autocast -> lower -> check -> stacked."""
    trials = GroupTrials()
    every_call = options.every_cell_a_call
    batched = batch_wavefronts(grid, graph, sched, options.min_group, roll=every_call, trial=trials.trial)
    if not batched.batched_groups and not every_call:
        if batched.unbatchable:  # every group's batched call failed its trial trace
            raise NotBatchable(f"the batched graph does not trace ({batched.unbatchable[0][1]})")
        raise NotBatchable("no group could be batched (inputs that cannot be stacked)")
    gm = batched.gm
    if any(AUTOCAST in n.meta for n in gm.graph.nodes):
        gm = copy_graph_module(gm)[0]
        restore_autocast_regions(gm)  # enter/exit around every run of nodes of one region
    lowered = check_stage("rewrite", lower(gm, options.inner, host_loop=options.roll))
    trials.check(lowered)
    for where, cause in batched.unbatchable:  # the other groups batched: one line per cause
        log.info("diagpass: %s runs cell by cell: its batched call does not trace (%s)", where, cause)
    stacked = _lifted(lowered, grid) if static else None  # lowered: the check gave its nodes values
    return Rewrite(lowered, stacked, batched.batched_groups, batched.unbatchable)


def rewrite_when_stacked(plan: Plan) -> Plan:
    """The stages after ``decide`` for a plan the cost rule left sequential, on the
    first call whose weights are stored stacked; the report is a new one."""
    st = _thaw(plan)
    st.cost_refused, st.reason = False, None
    st.stacked_measured = None  # the timing's outcome goes into the first plan's report
    t0 = time.perf_counter()
    with _gc_paused(), _fallback(st):
        st.rewrite = rewrite(plan.grid, plan.cell_graph, plan.schedule, plan.options, static=True)
        _conclude(st)
    st.seconds = time.perf_counter() - t0
    return _freeze(st)


def segment_steps_rewrite(plan: Plan) -> Optional[fx.GraphModule]:
    """The sequential graph cut into one call per segment (``passes/segment_steps.py``);
    None without a grid, or when it cannot be cut (then Dynamo's graph runs whole)."""
    if plan.grid is None or plan.cell_graph is None:
        return None
    steps = _steps(lambda: segment_steps(plan.grid, plan.cell_graph), "the sequential graph", "segment")
    if steps is not None:
        plan.report.segment_steps = {"steps": steps.num_steps, "structures": steps.num_structures}
    return steps.gm if steps is not None else None


def wavefront_steps_rewrite(gm: fx.GraphModule, report: GraphReport, options: Options) -> Optional[fx.GraphModule]:
    """A lowered batched graph (or its stacked variant) cut into one call per wavefront
    (``passes/wavefront_steps.py``, with ``options.symbolic_width`` and ``options.glue_steps``);
    None when it cannot be cut (then it compiles whole)."""
    steps = _steps(lambda: wavefront_steps(gm, options.symbolic_width, options.glue_steps), "the batched graph",
                   "wavefront")
    if steps is not None:
        report.wavefront_steps = {"steps": steps.num_steps, "glue_steps": steps.num_glue_steps,
                                  "structures": steps.num_structures}
    return steps.gm if steps is not None else None


def _steps(build, graph: str, kind: str):
    """``build()``'s steps; None, logged, when it refuses or fails (``graph`` compiles whole)."""
    try:
        with _gc_paused():
            steps, why = build()
    except Exception as e:  # noqa: BLE001 - a compile-time saving: never worth a crash
        log.warning("diagpass: the %s steps were not built (%s); compiling %s whole", kind, logs.first_line(e), graph,
                    exc_info=log.isEnabledFor(logging.DEBUG))
        return None
    if steps is None:
        log.info("diagpass: %s compiles whole, not %s by %s: %s", graph, kind, kind, why)
    return steps


def sequential_rewrite(plan: Plan) -> Optional[fx.GraphModule]:
    """The lowered graph with every cell its own call and none batched (for
    ``shared_sequential``); None without a grid, or if it fails (then the graph
    Dynamo gave runs, as it would without the option)."""
    if plan.grid is None or plan.schedule is None:
        return None
    options = dataclasses.replace(plan.options, min_group=sys.maxsize)
    try:
        with _gc_paused():
            return rewrite(plan.grid, plan.cell_graph, plan.schedule, options, static=False).gm
    except Exception as e:  # noqa: BLE001 - a compile-time saving: never worth a crash
        log.warning("diagpass: the cell-by-cell graph of shared subgraphs was not built (%s); "
                    "compiling Dynamo's graph", logs.first_line(e), exc_info=log.isEnabledFor(logging.DEBUG))
        return None


def disabled(gm: fx.GraphModule, options: Options) -> Plan:
    return Plan(gm, options, GraphReport(reason="disabled by options"))


def _why_not(grid: CellGrid, sched: Schedule, options: Options) -> Optional[str]:
    if sched.reason is not None or sched.batched_groups(options.min_group):
        return sched.reason
    reason = f"no wavefront has {options.min_group} or more structurally identical cells"
    partly = cells_partly_in_autocast(grid)
    if partly:
        reason += (
            f" ({len(partly)} cells, e.g. {partly[0]}, run partly inside a torch.autocast region "
            "(or an autocast(enabled=False) region under ambient autocast): such cells are not batched)"
        )
    return reason


def _conclude(st: _Stages) -> None:
    batched = bool(st.rewrite.batched_groups)
    st.reason = None if batched else (st.reason or "no group could be batched")
    counters["backend"]["graphs_batched" if batched else "graphs_rolled_unbatched"] += 1


@contextlib.contextmanager
def _fallback(st: _Stages):
    """A refusal or any surprise: no rewrite, the reason in the report."""
    try:
        yield
    except NotBatchable as e:
        st.rewrite, st.reason = None, e.reason
        counters["backend"]["graphs_not_batched"] += 1
    except Exception as e:  # noqa: BLE001 - any surprise means: do not rewrite
        # one line naming the cause; the traceback only under TORCH_LOGS="+diagpass"
        st.rewrite, st.reason = None, f"{INTERNAL_ERROR}: {logs.first_line(e)}"
        counters["backend"]["graphs_fallback_error"] += 1
        log.warning("diagpass: %s", st.reason, exc_info=log.isEnabledFor(logging.DEBUG))


def _lifted(gm: fx.GraphModule, grid: CellGrid) -> Optional[LiftedStacks]:
    try:
        return lift_weight_stacks(gm, _roles(grid))
    except Exception as e:  # noqa: BLE001 - an optimisation: never worth a crash
        log.warning("diagpass: weight stacks not lifted (%s); weights are copied per call",
                    logs.first_line(e), exc_info=log.isEnabledFor(logging.DEBUG))
        return None


def _copies_weights(st: _Stages, example_inputs) -> bool:
    """The cost rules (``passes/cost.py``) have a say: Inductor, and layer
    weights a batched call would copy (not read as stored or kept stacks)."""
    opts = st.options
    if not opts.cost_model or opts.roll or opts.inner != "inductor":
        return False
    if opts.cache_weight_stacks and st.weight_inputs is not None:
        return False  # stacked once, not per call: the user allowed the copy
    if not any(isinstance(a, torch.Tensor) for a in example_inputs):
        return False
    if st.weight_inputs is None:
        return True  # no stacked-views variant with symbolic shapes: always the copy
    return stacked_views_at(example_inputs, st.weight_inputs) is None


def _measures_stacks(st: _Stages, example_inputs) -> bool:
    """Reading stored stacks copies nothing, so the FLOP rule has nothing to weigh; on CPU
    whether batching pays then turns on how full each sequential call already keeps the
    cores (the small ARMT stored stacked: faster at batch 1, slower at batch 4, README), which
    no estimate from one machine decides: the runtime times the stacked variant against
    the sequential graph. ``measure_band=1`` (no measuring) batches them as before."""
    opts = st.options
    return (opts.cost_model and opts.inner == "inductor" and not opts.roll and opts.measure_band > 1
            and st.weight_inputs is not None and _on_cpu(example_inputs))


def _on_cpu(example_inputs) -> bool:
    return all(a.device.type == "cpu" for a in example_inputs if isinstance(a, torch.Tensor))


def _roles(grid: CellGrid) -> List[str]:
    return sorted(set(grid.stack.param_role.values()))


def _weight_input_indices(gm: fx.GraphModule, grid: CellGrid) -> List[List[int]]:
    """Input positions of the layer weights, one list per role (``q_proj.weight`` of every layer...)."""
    position = {p.name: i for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))}
    return [[position[p.name] for p in grid.stack.by_role(role)] for role in _roles(grid)]


def _static(gm: fx.GraphModule, example_inputs) -> bool:
    """Real inputs and no symbolic sizes (numbers a specialised graph baked in are
    plain): a graph compiled later on real arguments is then the graph Dynamo would
    have had compiled."""
    if example_inputs is None:
        return False
    for node, a in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        v = example_value(node)
        if not isinstance(a, torch.Tensor) and not (type(a) is type(v) and type(a) in (int, float, bool)):
            return False  # a fake, or a number Dynamo kept symbolic
        if isinstance(v, torch.Tensor) and not all(is_concrete_int(d) for d in v.shape):
            return False  # a size Dynamo specialised while tracing is a SymInt of a constant
    return True


def _thaw(plan: Plan) -> _Stages:
    given = {f.name: getattr(plan, f.name) for f in dataclasses.fields(Plan) if f.name not in ("gm", "options", "report")}
    return _Stages(plan.gm, plan.options, **given, writes_functionalized=plan.report.writes_functionalized)


def _freeze(st: _Stages) -> Plan:
    given = {f.name: getattr(st, f.name) for f in dataclasses.fields(Plan) if f.name != "report"}
    return Plan(**given, report=_report(st))


def _report(st: _Stages) -> GraphReport:
    """The report, filled from the stage results in one place."""
    r = GraphReport(num_nodes=len(st.gm.graph.nodes), reason=st.reason)
    r.writes_functionalized = st.writes_functionalized
    r.timings["passes_s"] = st.seconds
    if st.grid is not None:
        r.num_segments, r.num_layers = st.grid.num_segments, st.grid.num_layers
    if st.cost is not None:
        r.cost, r.bytes_per_flop = st.cost.describe(), st.cost.bytes_per_flop
        r.copy_memory_ratio = st.cost.copy_memory_ratio
    if st.cell_graph is not None:
        r.dependence_vectors = sorted(st.cell_graph.vectors)
    if st.schedule is not None:
        s = st.schedule
        r.wavefronts = [list(w.cells) for w in s.wavefronts]
        r.groups = [[list(g.cells) for g in w.groups] for w in s.wavefronts]
        r.closed_form = str(s.closed_form) if s.closed_form is not None else None
        r.time_function = str(s.time_function) if s.time_function is not None else None
    if st.rewrite is not None:
        r.batched_groups = [list(g.cells) for g in st.rewrite.batched_groups]
        r.batched = bool(r.batched_groups)
    if st.cost_refused:
        r.weight_inputs = st.weight_inputs
    if st.measured:
        r.measured = {}  # filled by the runtime once it has timed both variants
    if st.stacked_measured:
        r.measured_stacked = {}  # likewise, for calls that read stored stacks
    return r


@contextlib.contextmanager
def _gc_paused():
    """The passes allocate many small tuples (cell signatures) next to a heap
    of FX nodes and fake tensors: cyclic GC passes over that heap made the
    signatures several times slower at large S. Nothing the passes build is
    cyclic garbage worth collecting mid-pass."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
