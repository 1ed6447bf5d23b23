"""complete_cells: a last-segment cell whose state update is dead is given its
neighbour's outputs (and the nodes Dynamo dropped), so that it batches with the
middle segments; its live values, and the graph's outputs, do not change."""

import torch

import diagpass
from diagpass import pipeline
from diagpass.fx_facts import copy_graph_module
from diagpass.models.family import FamilyConfig, build_family_model
from diagpass.options import Options
from diagpass.passes.complete_cells import complete_cells
from diagpass.passes.dependence import build_cell_graph
from diagpass.passes.partition import partition
from diagpass.testing import assert_matches_eager
from diagpass.passes.schedule import cell_constants, cell_signature, schedule
from tests.helpers import dynamo_graph
from tests.passes.conftest import PerLayerMemory, capture


def _signature(grid, cid):
    cell = grid.cells[cid]
    return cell_signature(cell, grid, constant_slots=cell_constants(cell))


def test_a_dead_state_update_becomes_an_output_and_the_cell_joins_its_group(per_layer_graph):
    _, _, gm = per_layer_graph  # S=4, L=2: the last segment's memory update is dead (Dynamo keeps it)
    grid = partition(gm)
    assert _signature(grid, (3, 0)) != _signature(grid, (2, 0))
    done = complete_cells(grid)
    assert diagpass.counters["complete_cells"]["cells_completed"] == 2
    assert diagpass.counters["complete_cells"]["nodes_added"] == 0
    assert all(_signature(done, (3, layer)) == _signature(done, (2, layer)) for layer in range(2))


def test_a_dropped_state_update_is_copied_back_and_the_cell_joins_its_group(per_layer_graph):
    model, x, gm = per_layer_graph
    gm, _ = copy_graph_module(gm)
    gm.graph.eliminate_dead_code()  # as a graph from another front end, or a pass, may come
    gm.recompile()
    grid = partition(gm)
    assert len(grid.cells[(3, 0)].nodes) < len(grid.cells[(2, 0)].nodes)
    nodes_before = len(gm.graph.nodes)
    done = complete_cells(grid)
    assert done is not grid and len(gm.graph.nodes) == nodes_before  # a copy: the input grid is untouched
    c = diagpass.counters["complete_cells"]
    assert c["cells_completed"] == 2 and c["nodes_added"] > 0
    for layer in range(2):
        assert _signature(done, (3, layer)) == _signature(done, (2, layer))
        extra = done.cells[(3, layer)].outputs[-1]
        assert not extra.users  # the copied update: an output of the cell nobody reads
    sched = schedule(done, build_cell_graph(done))
    # t=3: (3,0) and (2,1) now one group (before: two, the last segment's cell differed)
    assert [list(g.cells) for g in sched.wavefronts[3].groups] == [[(3, 0), (2, 1)]]
    torch.testing.assert_close(done.gm(x, *model.parameters()), gm(x, *model.parameters()), rtol=0, atol=0)


def test_a_cell_that_computes_something_else_is_left_alone():
    class NoTanhLast(PerLayerMemory):
        """The last segment's layers skip the tanh: their nodes are a subsequence of the
        middle cells' (one fewer), but not the same function."""

        def forward(self, x):
            mems = [torch.zeros(x.shape[0], 1, x.shape[-1]) for _ in self.layers]
            segs = x.split(self.segment, dim=1)
            outs = []
            for s, seg in enumerate(segs):
                for l, layer in enumerate(self.layers):
                    if s == len(segs) - 1:
                        seg = seg + (layer.w(seg) + mems[l])
                        mems[l] = mems[l] + layer.m(seg).mean(1, keepdim=True)
                    else:
                        seg, mems[l] = layer(seg, mems[l])
                outs.append(seg)
            return torch.cat(outs, 1)

    torch.manual_seed(0)
    model, x = NoTanhLast(layers=2), torch.randn(2, 16, 8)
    grid = partition(capture(model, x))
    assert len(grid.cells[(3, 0)].nodes) < len(grid.cells[(2, 0)].nodes)
    assert complete_cells(grid) is grid
    assert diagpass.counters["complete_cells"]["cells_completed"] == 0


def test_a_last_segment_of_another_length_is_left_alone():
    torch.manual_seed(0)
    model, x = PerLayerMemory(layers=2), torch.randn(2, 14, 8)  # segments of 4, 4, 4, 2
    grid = partition(capture(model, x))
    assert complete_cells(grid) is grid


def _family(L=3):
    return build_family_model(FamilyConfig(vocab_size=128, d_model=32, n_layers=L, n_heads=2, d_ff=64,
                                           segment_size=4, num_mem_tokens=2, memory_kind="associative"), seed=0).eval()


def test_the_family_models_last_segment_batches_and_the_result_is_unchanged():
    S, L = 5, 3
    gm, inputs = dynamo_graph(_family(L), torch.randint(0, 128, (1, 4 * S)))
    plan = pipeline.run(gm, Options(inner="eager", cost_model=False), inputs)
    assert diagpass.counters["complete_cells"]["cells_completed"] == L
    batched = {c for g in plan.rewrite.batched_groups for c in g.cells}
    assert {(S - 1, layer) for layer in range(L - 1)} <= batched  # the last cell of all waits alone
    with torch.no_grad():  # batched matmuls round differently: fp32's tolerance, not bit for bit
        torch.testing.assert_close(plan.rewrite.gm(*inputs), gm(*inputs), rtol=1e-5, atol=1e-5)


def test_a_second_segment_count_after_a_short_first_compiles_only_the_steady_step():
    """S = L first: no wavefront holds L middle cells. With the last segment's cells like
    the middle ones, and each wavefront's glue in steps of its own, S = 7 meets no new step:
    its steady wavefronts (all layers, middle cells) are the ramp down's group call at
    another width (symbolic widths, passes/width_free.py). The first count compiles the
    first two wavefronts, the first segment's cell beside a group (widths 2 and 3), the
    group alone (3 and 2), the last cell, and the entering and the leaving glue."""
    L = 4
    model = _family(L)
    diagpass.stack_weights_(model.layers)
    fast = torch.compile(model, backend="diagonal", options={"inner": "aot_eager"})
    c = diagpass.counters["wavefront_steps"]
    with torch.no_grad():
        for S in (4, 7):
            ids = torch.randint(0, 128, (1, 4 * S))
            before = c["steps_compiled"]
            assert_matches_eager(model, fast(ids), ids)  # the randomised memory is chaotic: eager's own error rules
            new = c["steps_compiled"] - before
            assert new == (7 if S == 4 else 0), (S, new)
