import torch

from diagpass.passes.partition import find_layer_stack, partition


def test_layer_stack_from_parameter_names(per_layer_graph):
    _, _, gm = per_layer_graph
    stack = find_layer_stack(gm)
    assert stack.num_layers == 2 and stack.prefixes == ["layers"]
    assert sorted(set(stack.param_role.values())) == ["layers.*.m.bias", "layers.*.m.weight", "layers.*.w.bias", "layers.*.w.weight"]
    assert [stack.param_layer[p] for p in stack.by_role("layers.*.w.weight")] == [0, 1]


def test_every_segment_layer_pair_is_one_cell(per_layer_graph):
    _, _, gm = per_layer_graph
    grid = partition(gm)
    assert (grid.num_segments, grid.num_layers) == (4, 2)
    assert sorted(grid.cells) == [(s, l) for s in range(4) for l in range(2)]
    # the memory update (mem + mean) belongs to the cell that computes it
    middle = grid.cells[(1, 1)]
    targets = [str(getattr(n.target, "__name__", n.target)) for n in middle.nodes]
    assert targets.count("linear") == 2 and "tanh" in targets and "mean" in targets
    # split, zeros and the final cat are glue
    glue = {str(getattr(n.target, "__name__", n.target)) for n in grid.glue}
    assert {"split", "cat", "zeros"} <= glue


def test_cells_of_middle_segments_read_and_write_state(per_layer_graph):
    _, _, gm = per_layer_graph
    grid = partition(gm)
    cell = grid.cells[(2, 0)]
    producers = {grid.cell_of.get(a) for a in cell.inputs if a.op != "placeholder"}
    assert (1, 0) in producers  # memory from the previous segment, same layer
    consumers = {grid.cell_of.get(u) for o in cell.outputs for u in o.users}
    assert {(2, 1), (3, 0)} <= consumers


def test_tied_layers_are_refused():
    import torch.nn as nn
    import pytest
    from diagpass.errors import NotBatchable
    from tests.passes.conftest import MemLayer, PerLayerMemory, capture

    model = PerLayerMemory(layers=2)
    shared = MemLayer()
    model.layers = nn.ModuleList([shared, shared])
    gm = capture(model, torch.randn(1, 12, 8))
    with pytest.raises(NotBatchable, match="stack|layer"):
        partition(gm)
