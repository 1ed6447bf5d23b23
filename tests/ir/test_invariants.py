"""diagpass/ir/invariants.py: each stage check accepts real stage output and
rejects data that breaks the contract it states."""

import dataclasses

import pytest
import torch
import torch.nn as nn

import diagpass
from diagpass import Options, pipeline
from diagpass.ir import CellGraph, Group, Schedule, Wavefront
from diagpass.ir.invariants import ENV_FLAG, InvariantViolation, check_stage, enabled
from diagpass.passes.batch import batch_wavefronts
from diagpass.passes.dependence import build_cell_graph
from diagpass.passes.partition import partition
from diagpass.passes.schedule import schedule
from diagpass.runtime.lower import lower

from tests.helpers import dynamo_graph
from tests.passes.conftest import PerLayerMemory


def Net():
    """Per-layer memory, 2 layers; 4 segments of 4 tokens below."""
    return PerLayerMemory(layers=2)


@pytest.fixture(autouse=True)
def _checking_on(monkeypatch):
    monkeypatch.setenv(ENV_FLAG, "1")


@pytest.fixture
def stages():
    """Real output of each stage for the 4 x 2 model."""
    torch.manual_seed(0)
    gm, inputs = dynamo_graph(Net(), torch.randn(2, 16, 8))
    prepared, _ = pipeline.prepare(gm, Options(inner="eager"))
    grid = partition(prepared)
    graph = build_cell_graph(grid)
    sched = schedule(grid, graph)
    batched = batch_wavefronts(grid, graph, sched, min_group=2)
    return dict(gm=gm, inputs=inputs, prepared=prepared, grid=grid, graph=graph, sched=sched, batched=batched.gm)


def _raises(stage, what, value, *context):
    with pytest.raises(InvariantViolation, match=f"after {stage}: .*{what}"):
        check_stage(stage, value, *context)


# --- prepare -------------------------------------------------------------------

def test_prepare_accepts_prepared_graph(stages):
    assert check_stage("prepare", stages["prepared"]) is stages["prepared"]


def test_prepare_rejects_a_placeholder_without_example_value(stages):
    gm = stages["prepared"]
    x = next(iter(gm.graph.find_nodes(op="placeholder")))
    x.meta.pop("example_value", None)
    x.meta.pop("val", None)
    _raises("prepare", f"placeholder {x.name} lost its example value", gm)


def test_prepare_rejects_a_graph_that_does_not_lint(stages):
    gm = stages["prepared"]
    first = next(n for n in gm.graph.nodes if n.op == "call_function")
    last = list(gm.graph.nodes)[-2]
    with gm.graph.inserting_before(first):
        gm.graph.call_function(torch.neg, (last,))  # reads a value defined later
    _raises("prepare", "graph lint", gm)


# --- partition -----------------------------------------------------------------

def test_partition_accepts_real_grid(stages):
    assert check_stage("partition", stages["grid"]) is stages["grid"]
    assert len(stages["grid"].cells) == 4 * 2


def test_partition_rejects_cell_of_that_disagrees(stages):
    grid = stages["grid"]
    node = grid.cells[(1, 0)].nodes[0]
    cell_of = dict(grid.cell_of)
    cell_of[node] = (1, 1)
    _raises("partition", rf"cell_of\[{node.name}\] is not \(1, 0\)", dataclasses.replace(grid, cell_of=cell_of))


def test_partition_rejects_a_node_in_two_cells(stages):
    grid = stages["grid"]
    node = grid.cells[(1, 0)].nodes[0]
    grid.cells[(2, 0)].nodes.append(node)
    _raises("partition", f"{node.name} in two cells", grid)


def test_partition_rejects_a_compute_node_in_no_cell(stages):
    grid = stages["grid"]
    node = grid.cells[(1, 0)].nodes.pop()
    _raises("partition", f"{node.name} is in no cell and not glue", grid)


def test_partition_rejects_a_node_in_glue_and_a_cell(stages):
    grid = stages["grid"]
    node = grid.cells[(0, 1)].nodes[0]
    _raises("partition", f"{node.name} is glue and in cell", dataclasses.replace(grid, glue=[*grid.glue, node]))


def test_partition_rejects_a_random_op(stages):
    grid = stages["grid"]
    out = next(iter(grid.gm.graph.find_nodes(op="output")))
    with grid.gm.graph.inserting_before(out):
        noise = grid.gm.graph.call_function(torch.rand, (2,))
    _raises("partition", f"{noise.name} is random", dataclasses.replace(grid, glue=[*grid.glue, noise]))


# --- dependence ----------------------------------------------------------------

def test_dependence_accepts_real_cell_graph(stages):
    assert check_stage("dependence", stages["graph"], stages["grid"]) is stages["graph"]
    assert set(stages["graph"].vectors) == {(0, 1), (1, 0)}


def _with_dag(graph: CellGraph, edit) -> CellGraph:
    dag = graph.dag.copy()
    edit(dag)
    return dataclasses.replace(graph, dag=dag)


def test_dependence_rejects_a_cycle(stages):
    graph = stages["graph"]
    cyclic = _with_dag(graph, lambda d: d.add_edge((1, 0), (0, 0)))  # (0,0) -> (1,0) is an edge
    cyclic = dataclasses.replace(cyclic, vectors=frozenset(cyclic.vectors | {(-1, 0)}))
    _raises("dependence", "cycle", cyclic, stages["grid"])


def test_dependence_rejects_wrong_vectors(stages):
    graph = stages["graph"]
    _raises("dependence", "vectors differ", dataclasses.replace(graph, vectors=frozenset({(1, 0)})), stages["grid"])
    # an edge whose difference is in no vector
    skew = _with_dag(graph, lambda d: d.add_edge((0, 0), (2, 1)))
    _raises("dependence", "vectors differ", skew, stages["grid"])


def test_dependence_rejects_vertices_that_are_not_the_cells(stages):
    graph = stages["graph"]
    extra = _with_dag(graph, lambda d: d.add_node((9, 0)))
    _raises("dependence", "vertices are not the cells", extra, stages["grid"])


def test_dependence_rejects_glue_without_sources(stages):
    graph, grid = stages["graph"], stages["grid"]
    sources = dict(graph.glue_sources)
    dropped = grid.glue[-1]
    del sources[dropped]
    _raises("dependence", "glue without sources", dataclasses.replace(graph, glue_sources=sources), grid)


# --- schedule ------------------------------------------------------------------

def test_schedule_accepts_real_schedule(stages):
    s = stages["sched"]
    assert check_stage("schedule", s, stages["grid"], stages["graph"]) is s
    assert s.num_steps == 4 + 2 - 1


def _waves(s: Schedule, waves) -> Schedule:
    return dataclasses.replace(s, wavefronts=tuple(waves))


def _backwards(s: Schedule) -> Schedule:
    """The same wavefronts, last to first (each numbered by its new place)."""
    return _waves(s, (dataclasses.replace(w, index=t) for t, w in enumerate(reversed(s.wavefronts))))


def test_schedule_rejects_a_cell_in_two_wavefronts(stages):
    s = stages["sched"]
    w0, w1 = s.wavefronts[0], s.wavefronts[1]
    dup = w0.cells[0]
    w1 = Wavefront(w1.index, w1.cells + (dup,), w1.groups + (Group((dup,)),))
    _raises("schedule", rf"cell \(0, 0\) in two wavefronts", _waves(s, [w0, w1, *s.wavefronts[2:]]),
            stages["grid"], stages["graph"])


def test_schedule_rejects_an_edge_going_backwards(stages):
    s = stages["sched"]
    # the same wavefronts, last to first: every edge now goes back in time
    _raises("schedule", "does not go forward in time", _backwards(s), stages["grid"], stages["graph"])
    # and two cells of one chain in one wavefront: not forward either
    w0, w1 = s.wavefronts[0], s.wavefronts[1]
    merged = Wavefront(0, w0.cells + w1.cells, w0.groups + w1.groups)
    rest = [Wavefront(k, w.cells, w.groups) for k, w in enumerate(s.wavefronts[2:], start=1)]
    _raises("schedule", "does not go forward in time", _waves(s, [merged, *rest]), stages["grid"], stages["graph"])


def test_schedule_rejects_wavefronts_out_of_index_order(stages):
    s = stages["sched"]
    reordered = _waves(s, reversed(s.wavefronts))  # indices kept: 4, 3, ..., 0
    _raises("schedule", "is number 0 in the schedule", reordered, stages["grid"], stages["graph"])


def test_schedule_rejects_groups_that_do_not_partition_their_wavefront(stages):
    s = stages["sched"]
    w1 = s.wavefronts[1]
    assert w1.groups and w1.groups[0].size == 2
    lost = Wavefront(w1.index, w1.cells, ())
    _raises("schedule", "groups of wavefront 1 do not partition it", _waves(s, [s.wavefronts[0], lost, *s.wavefronts[2:]]),
            stages["grid"], stages["graph"])


def test_schedule_rejects_a_group_without_signatures(stages):
    s = stages["sched"]
    group = s.wavefronts[1].groups[0]
    signatures = dict(s.signatures)
    signatures[group.cells[0]] = None
    _raises("schedule", "has a cell without a signature", dataclasses.replace(s, signatures=signatures),
            stages["grid"], stages["graph"])


def test_schedule_rejects_wavefronts_that_miss_a_cell(stages):
    s = stages["sched"]
    _raises("schedule", "do not cover the cells", _waves(s, s.wavefronts[:-1]), stages["grid"], stages["graph"])


# --- rewrite -------------------------------------------------------------------

def test_rewrite_accepts_the_lowered_graph_and_rejects_group_calls_left(stages):
    batched = stages["batched"]
    lowered = lower(batched, "eager")
    assert check_stage("rewrite", lowered) is lowered
    _raises("rewrite", "group calls not lowered: .*diag_t1_g0", batched)


def test_rewrite_rejects_a_graph_that_does_not_lint(stages):
    lowered = lower(stages["batched"], "eager")
    first = next(n for n in lowered.graph.nodes if n.op == "call_function")
    last = list(lowered.graph.nodes)[-2]
    with lowered.graph.inserting_before(first):
        lowered.graph.call_function(torch.neg, (last,))  # reads a value defined later
    _raises("rewrite", "graph lint", lowered)


# --- switched off ------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", ""])
def test_check_stage_does_nothing_when_off(stages, monkeypatch, value):
    monkeypatch.setenv(ENV_FLAG, value)
    assert not enabled()
    s = stages["sched"]
    broken = _backwards(s)
    assert check_stage("schedule", broken, stages["grid"], stages["graph"]) is broken
    assert check_stage("rewrite", stages["batched"]) is stages["batched"]
    monkeypatch.delenv(ENV_FLAG)
    assert not enabled()
    assert check_stage("rewrite", stages["batched"]) is stages["batched"]


# --- in the pipeline ---------------------------------------------------------------

def test_a_violation_in_the_pipeline_leaves_the_graph_unchanged(stages, monkeypatch):
    gm = stages["gm"]
    plan = pipeline.run(gm, Options(inner="eager"))
    assert plan.rewrite is not None and plan.report.reason is None  # control: it batches

    real = pipeline.schedule

    def backwards(grid, graph):
        return _backwards(real(grid, graph))

    monkeypatch.setattr(pipeline, "schedule", backwards)
    diagpass.counters.clear()
    plan = pipeline.run(gm, Options(inner="eager"))
    assert plan.rewrite is None
    assert plan.report.reason.startswith("internal error")
    assert "invariant broken after schedule" in plan.report.reason
    assert not plan.report.batched
    assert diagpass.counters["backend"]["graphs_fallback_error"] == 1
