"""The ``diagonal`` torch.compile backend.

    torch.compile(model, backend="diagonal", options={"inner": "inductor"})

Runs partition -> dependence -> schedule -> batch on Dynamo's graph and hands
the result to the inner compiler. Anything a pass cannot prove safe raises
``NotBatchable``; the backend then logs the reason on the ``diagpass``
logger and compiles the graph unchanged. Unexpected errors inside the passes
are treated the same way: a user never sees a traceback from the pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from typing import Callable, List, Optional

import torch
import torch.fx as fx

from diagpass import logs
from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.passes.batch import batch_wavefronts
from diagpass.passes.cost import CPU_COPY_BYTES_PER_FLOP, estimate_cost
from diagpass.passes.autocast import (
    drop_noop_autocast_regions,
    has_autocast_regions,
    lift_autocast_regions,
    restore_autocast_regions,
)
from diagpass.passes.dependence import build_cell_graph
from diagpass.passes.functionalize import functionalize
from diagpass.passes.graph_utils import copy_graph_module
from diagpass.passes.grad_mode import detach_no_grad_regions, has_grad_mode_switches
from diagpass.passes.inline_subgraphs import has_subgraph_calls, inline_subgraphs
from diagpass.passes.partition import partition
from diagpass.passes.schedule import cells_partly_in_autocast, schedule
from diagpass.passes.see_through import has_concat_reads, simplify_concat_slices
from diagpass.passes.stacked_weights import lift_weight_stacks
from diagpass.weights import OnFirstUse, SequentialUnlessStacked, WeightStackDispatch, stacked_views_at
from diagpass.report import GraphReport

log = logging.getLogger("diagpass")

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
INTERNAL_ERROR = "internal error in the pass, graph left unchanged"


@dataclasses.dataclass(frozen=True)
class Options:
    """Backend options (``torch.compile(..., options={...})``).

    inner:     compiler for the rewritten graph: "inductor" | "aot_eager" | "eager".
    min_group: smallest group of identical cells worth one batched call.
    verify:    on the first call also run the original graph and raise
               ``DiagonalMismatch`` if outputs differ (rtol/atol below).
    enabled:   False compiles the graph unchanged (same inner compiler): the
               sequential baseline.
    cost_model: on CPU with Inductor, do not batch when the layer weights would
               be copied per call and the copy outweighs what batching can save
               (``passes/cost.py``); False batches whenever it is safe.
    roll:      compile each distinct batched step once (cached across graphs
               and segment counts) and run the schedule as a host loop, glue
               eager; compile cost independent of the number of segments.
    """

    inner: str = "inductor"
    min_group: int = 2
    verify: bool = False
    rtol: float = 1e-5
    atol: float = 1e-5
    enabled: bool = True
    roll: bool = False
    cost_model: bool = True

    @classmethod
    def from_dict(cls, options: Optional[dict]) -> "Options":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"diagpass: unknown option(s) {unknown}; known options are {sorted(known)}"
            )
        opts = cls(**options)
        if opts.inner not in INNER_COMPILERS:
            raise ValueError(f"diagpass: options['inner'] must be one of {INNER_COMPILERS}, got {opts.inner!r}")
        if not isinstance(opts.min_group, int) or opts.min_group < 2:
            raise ValueError(f"diagpass: options['min_group'] must be an int >= 2, got {opts.min_group!r}")
        return opts


class DiagonalMismatch(AssertionError):
    """``verify=True`` found the batched graph's outputs differ from the original's."""


# Reports of the graphs compiled most recently, newest last. ``report_count``
# only grows: ``reports_since(mark)`` stays right when old reports are dropped.
reports: List[GraphReport] = []
report_count = 0
_MAX_REPORTS = 1024


def _record(report: GraphReport) -> None:
    global report_count
    reports.append(report)
    report_count += 1
    del reports[:-_MAX_REPORTS]


def reports_since(mark: int) -> List[GraphReport]:
    """Reports of the graphs compiled after ``report_count`` was ``mark``."""
    new = report_count - mark
    return list(reports[-new:]) if new > 0 else []


@contextlib.contextmanager
def _gc_paused():
    """The passes allocate many small tuples (cell signatures) next to a heap
    of ~10^5 FX nodes and fake tensors: cyclic GC passes over that heap made
    the signatures 5x slower at S=128 (3.9 s -> 0.7 s paused). Nothing the
    passes build is cyclic garbage worth collecting mid-pass."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def analyze(gm: fx.GraphModule, options: Options, example_inputs=None):
    """Run the passes; return (rewritten gm or None, report). With the real
    ``example_inputs`` (the backend has them, ``explain`` does not) the cost
    decision is applied too."""
    with _gc_paused():
        return _analyze(gm, options, example_inputs)


def _analyze(gm: fx.GraphModule, options: Options, example_inputs):
    report = GraphReport(num_nodes=len(gm.graph.nodes))
    t0 = time.perf_counter()
    try:
        if (
            has_subgraph_calls(gm) or has_grad_mode_switches(gm)
            or has_autocast_regions(gm) or has_concat_reads(gm)
        ):
            gm = _copy(gm)  # the passes that edit in place; the fallback keeps the original
        inline_subgraphs(gm)
        gm, report.writes_functionalized = functionalize(gm)  # a new graph if it rewrites
        simplify_concat_slices(gm)  # after functionalize: every write is private
        drop_noop_autocast_regions(gm)
        if lift_autocast_regions(gm) and options.roll:  # kernels are compiled outside the regions
            raise NotBatchable("autocast regions inside forward are not supported with roll=True")
        detach_no_grad_regions(gm)  # also refuses autocast / other global-state calls
        grid = partition(gm)
        report.num_segments, report.num_layers = grid.num_segments, grid.num_layers
        cost = estimate_cost(grid)
        report.cost, report.bytes_per_flop = cost.describe(), cost.bytes_per_flop
        graph = build_cell_graph(grid)
        report.dependence_vectors = sorted(graph.vectors)
        sched = schedule(grid, graph)
        report.wavefronts = [list(w.cells) for w in sched.wavefronts]
        report.groups = [[list(g.cells) for g in w.groups] for w in sched.wavefronts]
        report.closed_form = str(sched.closed_form) if sched.closed_form is not None else None
        report.time_function = str(sched.time_function) if sched.time_function is not None else None
        reason = sched.reason
        if reason is None and not sched.batched_groups(options.min_group):
            reason = f"no wavefront has {options.min_group} or more structurally identical cells"
            partly = cells_partly_in_autocast(grid)
            if partly:
                reason += (
                    f" ({len(partly)} cells, e.g. {partly[0]}, run partly inside a torch.autocast region "
                    "(or an autocast(enabled=False) region under ambient autocast): such cells are not batched)"
                )
        if reason is not None and not options.roll:
            raise NotBatchable(reason)
        if example_inputs is not None and _copying_does_not_pay(gm, grid, cost, example_inputs, options):
            counters["backend"]["graphs_not_batched_cost"] += 1
            if _static(gm, example_inputs):  # a call with the weights stored stacked batches
                report.weight_inputs = _weight_input_indices(gm, grid)
            raise NotBatchable(
                f"cost: on CPU, batching with layer weights copied per call does not pay: {cost.describe()} "
                f"(> {CPU_COPY_BYTES_PER_FLOP:.0e}). Store the weights stacked "
                "(diagpass.stack_weights_(model.layers)) to batch without the copy, or pass "
                "options={'cost_model': False}"
            )
        # With roll, even an unbatchable schedule is rewritten: every distinct
        # cell then compiles once instead of once per copy (RMT, short inputs).
        result = batch_wavefronts(grid, sched, options.min_group, roll=options.roll, inner=options.inner)
        if not result.batched_groups and not options.roll:
            if result.unbatchable:  # every group's batched call failed its trial trace
                raise NotBatchable(f"the batched graph does not trace ({result.unbatchable[0][1]})")
            raise NotBatchable("no group could be batched (inputs that cannot be stacked)")
        restore_autocast_regions(result.gm)  # enter/exit around every run of nodes of one region
        _check_with_fake_tensors(result.gm)
        for where, cause in result.unbatchable:  # the other groups batched: one line per cause
            log.info("diagpass: %s runs cell by cell: its batched call does not trace (%s)", where, cause)
        report.batched_groups = [list(g.cells) for g in result.batched_groups]
        report.batched = bool(result.batched_groups)
        report.reason = None if report.batched else (reason or "no group could be batched")
        counters["backend"]["graphs_batched" if report.batched else "graphs_rolled_unbatched"] += 1
        return result.gm, report  # the backend logs the report (logs.report_graph)
    except NotBatchable as e:
        report.reason = e.reason
        counters["backend"]["graphs_not_batched"] += 1
        return None, report
    except Exception as e:  # noqa: BLE001 - any surprise means: do not rewrite
        # one line naming the cause; the traceback only under TORCH_LOGS="+diagpass"
        report.reason = f"{INTERNAL_ERROR}: {logs.first_line(e)}"
        counters["backend"]["graphs_fallback_error"] += 1
        log.warning("diagpass: %s", report.reason, exc_info=log.isEnabledFor(logging.DEBUG))
        return None, report
    finally:
        report.timings["passes_s"] = time.perf_counter() - t0


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    return copy_graph_module(gm)[0]


def _check_with_fake_tensors(gm: fx.GraphModule) -> None:
    """Trace the rewritten graph on the placeholders' fake tensors: a batched
    call that cannot run (an op vmap cannot batch) fails here, not at run time.
    Glue whose inputs did not change is not re-run (``diagpass.fake_check``)."""
    from diagpass.fake_check import ChangedNodesFakeProp
    from diagpass.runtime import memoized_fake_outputs

    fakes = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    mode = next((f.fake_mode for f in fakes if hasattr(f, "fake_mode")), None)
    if mode is None:
        raise NotBatchable("placeholders carry no fake tensors to check the rewrite with")
    try:
        # a failing trial is an expected outcome: torch's tracebacks of it go to DEBUG
        with logs.quiet_trial("the fake-tensor check of the batched graph"), mode, memoized_fake_outputs():
            ChangedNodesFakeProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    except Exception as e:  # noqa: BLE001
        log.debug("diagpass: the batched graph does not trace", exc_info=True)
        raise NotBatchable(f"the batched graph does not trace ({logs.first_line(e)})") from e


# Inductor options for the rewritten graph. reorder_for_locality moves each producer right
# before its consumer; it moved every segment's final norm + lm_head to the closing cat, and
# each of them reads a slice of a batched group's output, so every group buffer stayed alive
# to the end (small ARMT S=32, weights stacked: 28.9 MiB allocated at the peak, 7.6 MiB
# without the reordering, latency unchanged: 482.5 vs 477.3 ms, one thread).
# realize_reads_threshold 2 (stock 4): a pointwise result read by two or three kernels is
# stored instead of recomputed from its inputs; the batched residual sum was recomputed
# in the last FFN kernel from three width-8 [8, 80, 256] inputs kept alive for it (same
# model: 7.6 -> 7.0 MiB at the peak, one such buffer fewer; latency equal, 261.9 vs
# 263.4 ms, 15 interleaved rounds, two threads).
REWRITTEN_INDUCTOR_CONFIG = {"reorder_for_locality": False, "realize_reads_threshold": 2}


def inner_compile(gm: fx.GraphModule, example_inputs, inner: str, rewritten: bool = False) -> Callable:
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        # The decomposing variant: plain aot_eager replays traced `view`s in
        # backward that can be invalid for the real strides of vmapped ops.
        from torch._dynamo.backends.debugging import aot_eager_decomp_partition

        return aot_eager_decomp_partition(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=REWRITTEN_INDUCTOR_CONFIG if rewritten else None)


def _compile_rewritten(gm: fx.GraphModule, example_inputs, opts: Options) -> Callable:
    """The rewritten graph compiled; with weight stacks and static shapes, a
    dispatch that reads weights stored stacked (``diagpass.stack_weights_``) as
    views instead of copying them. Only the variant the example inputs need is
    compiled now; the other compiles on its first use (shapes are static, so
    compiling then on real arguments gives the same graph)."""

    def compile_now(g, inputs):
        # roll: glue runs eagerly, each group compiles its own kernel once
        return g.forward if opts.roll else inner_compile(g, inputs, opts.inner, rewritten=True)

    lifted = None
    if _static(gm, example_inputs):
        try:
            lifted = lift_weight_stacks(gm)
        except Exception as e:  # noqa: BLE001 - an optimisation: never worth a crash
            log.warning("diagpass: weight stacks not lifted (%s); weights are copied per call",
                        logs.first_line(e), exc_info=log.isEnabledFor(logging.DEBUG))
    if lifted is None:
        return compile_now(gm, example_inputs)
    copying = OnFirstUse(lambda args: compile_now(gm, list(args)))
    stacked = OnFirstUse(lambda args: compile_now(lifted.gm, list(args)), counter="stacked_graphs_compiled")
    dispatch = WeightStackDispatch(copying, stacked, lifted.param_indices)
    if dispatch.views(example_inputs) is None:
        copying(example_inputs)
    # else the stacked variant compiles on its first call, outside Dynamo's tracing
    # context: its extra inputs (views of the stored stacks) are no graph inputs of
    # Dynamo's, and compiled inside that context their sizes became symbols of
    # Dynamo's ShapeEnv that its guards cannot name (GQA: IndexError in produce_guards)
    return dispatch


def _copying_does_not_pay(gm: fx.GraphModule, grid, cost, example_inputs, opts: Options) -> bool:
    """The cost decision (``passes/cost.py``): CPU, Inductor, layer weights a
    batched call would copy (what ``WeightStackDispatch`` would choose for
    these inputs), and a copy too large for the work batched."""
    if not opts.cost_model or opts.roll or opts.inner != "inductor":
        return False
    tensors = [a for a in example_inputs if isinstance(a, torch.Tensor)]
    if not tensors or any(a.device.type != "cpu" for a in tensors):
        return False
    if cost.bytes_per_flop <= CPU_COPY_BYTES_PER_FLOP:
        return False
    if not _static(gm, example_inputs):
        return True  # no stacked-views variant with symbolic shapes: always the copy
    return stacked_views_at(example_inputs, _weight_input_indices(gm, grid)) is None


def _weight_input_indices(gm: fx.GraphModule, grid) -> List[List[int]]:
    """Input positions of the layer weights, one list per role (``q_proj.weight`` of every layer...)."""
    position = {p: i for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))}
    roles = sorted(set(grid.stack.param_role.values()))
    return [[position[p] for p in grid.stack.by_role(role)] for role in roles]


def _batched_when_stacked(gm: fx.GraphModule, sequential: Callable, report: GraphReport, opts: Options) -> Callable:
    """A graph the cost decision left sequential, batched after all on the first call whose
    layer weights are stored stacked: Dynamo does not guard on storage, so the graph compiled
    for copied weights also runs a model whose weights were stacked after compiling, or
    another instance of the model class. ``gm`` is a copy the inner compiler has not seen."""
    verify_against = _copy(gm) if opts.verify else None

    def build(args) -> Callable:
        rewritten, late = analyze(gm, dataclasses.replace(opts, cost_model=False), list(args))
        _record(late)
        if rewritten is None:
            logs.report_graph(late, gm, None, opts.min_group)
            return sequential
        compiled = _compile_rewritten(rewritten, list(args), opts)
        logs.report_graph(late, gm, rewritten, opts.min_group)
        return _verified(compiled, verify_against, opts) if verify_against is not None else compiled

    return SequentialUnlessStacked(sequential, OnFirstUse(build, counter="batched_after_cost"), report.weight_inputs)


def _static(gm: fx.GraphModule, example_inputs) -> bool:
    """No symbolic sizes anywhere in the inputs: a graph compiled later on real
    arguments is then the graph Dynamo would have had compiled."""
    if not all(isinstance(a, torch.Tensor) for a in example_inputs):
        return False
    for node in gm.graph.find_nodes(op="placeholder"):
        v = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape):
            return False
    return True


def _verified(compiled: Callable, original: fx.GraphModule, opts: Options) -> Callable:
    state = {"checked": False}

    def run(*args):
        out = compiled(*args)
        if not state["checked"]:
            state["checked"] = True
            with torch.no_grad():
                expected = original(*args)
            try:
                torch.testing.assert_close(out, expected, rtol=opts.rtol, atol=opts.atol)
            except AssertionError as e:
                raise DiagonalMismatch(f"diagpass verify: batched graph differs from the original: {e}") from e
            counters["backend"]["verified"] += 1
        return out

    return run


def _warn_near_recompile_limit(gm: fx.GraphModule, reason: Optional[str]) -> None:
    """Dynamo silently runs a frame eagerly after ``recompile_limit`` compiles
    of it: say so one compile before, naming the guard whose failure caused
    this recompile (``logs.recompile_reason``: Dynamo's own words). The most
    common guard for these models is the number of segments (Dynamo
    specialises on it), but a flag, a Python scalar or a module attribute can
    be the cause as well; the warning states the guard, not an assumption."""
    compile_id = gm.meta.get("dynamo_compile_id")
    attempt = getattr(compile_id, "frame_compile_id", None)
    limit = torch._dynamo.config.recompile_limit
    if isinstance(attempt, int) and attempt + 1 >= limit - 1:
        counters["backend"]["recompile_limit_warnings"] += 1
        log.warning(
            "diagpass: compile %d of this frame; the guard that failed: %s. At "
            "torch._dynamo.config.recompile_limit=%d Dynamo stops compiling this frame and "
            "runs it eagerly. If the guard is on the input length (one graph per number of "
            "segments), pad inputs to a few fixed lengths (whole segments) or use "
            "options={'roll': True}; otherwise keep that value fixed; or raise the limit. "
            'All reasons: TORCH_LOGS="recompiles".',
            attempt + 1,
            reason or "Dynamo did not record one",
            limit,
        )


def diagonal_backend(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None, **kwargs):
    entered = time.perf_counter()
    opts = Options.from_dict({**(options or {}), **kwargs})
    recompile_reason = logs.recompile_reason()
    _warn_near_recompile_limit(gm, recompile_reason)
    rewritten, report = analyze(gm, opts, example_inputs) if opts.enabled else (None, GraphReport(reason="disabled by options"))
    report.recompile_reason = recompile_reason
    _record(report)
    t0 = time.perf_counter()
    if rewritten is None:
        pristine = _copy(gm) if report.weight_inputs else None  # the inner compiler may edit gm
        compiled = inner_compile(gm, example_inputs, opts.inner)
        if pristine is not None:
            compiled = _batched_when_stacked(pristine, compiled, report, opts)
    else:
        compiled = _compile_rewritten(rewritten, example_inputs, opts)
    report.timings["inner_s"] = time.perf_counter() - t0
    report.timings["entered_at"] = entered  # perf_counter(): Dynamo time = entered_at - call start
    report.timings["left_at"] = time.perf_counter()
    logs.report_graph(report, gm, rewritten, opts.min_group)
    if opts.verify and rewritten is not None:
        return _verified(compiled, gm, opts)
    return compiled
