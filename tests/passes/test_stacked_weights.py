"""stacked_weights: the rewritten graph's per-call weight stacks become inputs."""

import torch

from diagpass.ir.meta import WEIGHT_STACK
from diagpass.passes.batch import batch_wavefronts
from diagpass.passes.dependence import build_cell_graph
from diagpass.passes.partition import partition
from diagpass.passes.schedule import schedule
from diagpass.passes.stacked_weights import lift_weight_stacks
from diagpass.runtime.lower import lower

from tests.helpers import dynamo_graph

from .conftest import PerLayerMemory
from .graph_text import render


def _rewritten(min_group=2):
    """Dynamo's graph of a 4-segment x 2-layer per-layer-memory model, its
    inputs, its cell grid, and the batch pass's graph."""
    torch.manual_seed(0)
    model = PerLayerMemory(layers=2)
    gm, inputs = dynamo_graph(model, torch.randn(2, 16, 8))
    grid = partition(gm)
    graph = build_cell_graph(grid)
    batched = batch_wavefronts(grid, graph, schedule(grid, graph), min_group=min_group)
    return gm, inputs, grid, batched.gm


def _roles(grid):
    return sorted(set(grid.stack.param_role.values()))


def _weight_lines(n):
    """The nodes that make or read a weight stack, and the batched calls."""
    stacks = [a for a in n.all_input_nodes
              if WEIGHT_STACK in a.meta or (a.op == "placeholder" and a.name.startswith("stacked_weights_"))]
    return n.op == "call_module" or WEIGHT_STACK in n.meta or bool(stacks)


ROLES = ["layers.*.m.bias", "layers.*.m.weight", "layers.*.w.bias", "layers.*.w.weight"]

# each role stacked once per call, sliced by each group (both groups are
# layers 0..1, so both take [0:2])
GOLDEN_BEFORE = """\
input l_x_
input layers.0.w.weight
input layers.0.w.bias
input layers.0.m.weight
input layers.0.m.bias
input layers.1.w.weight
input layers.1.w.bias
input layers.1.m.weight
input layers.1.m.bias
stack_1 = stack([layers.0.w.weight, layers.1.w.weight])
getitem = getitem(stack_1, 0:2)
stack_2 = stack([layers.0.w.bias, layers.1.w.bias])
getitem_1 = getitem(stack_2, 0:2)
stack_4 = stack([layers.0.m.weight, layers.1.m.weight])
getitem_2 = getitem(stack_4, 0:2)
stack_5 = stack([layers.0.m.bias, layers.1.m.bias])
getitem_3 = getitem(stack_5, 0:2)
diag_t1_g0 = call_module:diag_t1_g0(stack, getitem, getitem_1, stack_3, getitem_2, getitem_3)
getitem_10 = getitem(stack_1, 0:2)
getitem_11 = getitem(stack_2, 0:2)
getitem_12 = getitem(stack_4, 0:2)
getitem_13 = getitem(stack_5, 0:2)
diag_t1_g0_1 = call_module:diag_t1_g0(stack_6, getitem_10, getitem_11, stack_7, getitem_12, getitem_13)
return (cat,)"""

# one trailing input per role, in sorted role order (m.bias, m.weight,
# w.bias, w.weight); the slices read them; the stacks are gone
GOLDEN_AFTER = """\
input l_x_
input layers.0.w.weight
input layers.0.w.bias
input layers.0.m.weight
input layers.0.m.bias
input layers.1.w.weight
input layers.1.w.bias
input layers.1.m.weight
input layers.1.m.bias
input stacked_weights_0
input stacked_weights_1
input stacked_weights_2
input stacked_weights_3
getitem = getitem(stacked_weights_3, 0:2)
getitem_1 = getitem(stacked_weights_2, 0:2)
getitem_2 = getitem(stacked_weights_1, 0:2)
getitem_3 = getitem(stacked_weights_0, 0:2)
diag_t1_g0 = call_module:diag_t1_g0(stack, getitem, getitem_1, stack_3, getitem_2, getitem_3)
getitem_10 = getitem(stacked_weights_3, 0:2)
getitem_11 = getitem(stacked_weights_2, 0:2)
getitem_12 = getitem(stacked_weights_1, 0:2)
getitem_13 = getitem(stacked_weights_0, 0:2)
diag_t1_g0_1 = call_module:diag_t1_g0(stack_6, getitem_10, getitem_11, stack_7, getitem_12, getitem_13)
return (cat,)"""


def test_lift_weight_stacks_golden():
    _, _, grid, gm = _rewritten()
    assert _roles(grid) == ROLES
    before = render(gm, placeholders=True, keep=_weight_lines)
    assert before == GOLDEN_BEFORE
    lifted = lift_weight_stacks(gm, ROLES)
    assert lifted is not None and lifted.roles == tuple(ROLES)
    assert render(lifted.gm, placeholders=True, keep=_weight_lines) == GOLDEN_AFTER
    lifted.gm.graph.lint()
    # no weight is stacked any more (the activations still are); the input
    # graph is left as it was
    weight_stacks = [n for n in lifted.gm.graph.nodes if n.target is torch.stack
                     and any(a.op == "placeholder" for a in n.args[0])]
    assert not weight_stacks
    assert render(gm, placeholders=True, keep=_weight_lines) == before
    # each input takes over its stack's metadata, role included
    inputs = {p.name: p for p in lifted.gm.graph.find_nodes(op="placeholder")}
    assert [inputs[f"stacked_weights_{k}"].meta.get(WEIGHT_STACK) for k in range(4)] == ROLES


def test_a_role_not_stacked_is_an_unused_input():
    _, _, grid, gm = _rewritten()
    roles = sorted(_roles(grid) + ["layers.*.a.weight"])  # sorts first
    lifted = lift_weight_stacks(gm, roles)
    assert lifted.roles == tuple(roles)
    placeholders = [p for p in lifted.gm.graph.find_nodes(op="placeholder") if p.name.startswith("stacked_weights_")]
    assert [p.name for p in placeholders] == [f"stacked_weights_{k}" for k in range(5)]
    assert [len(p.users) for p in placeholders] == [0, 2, 2, 2, 2]
    # the stacked roles are shifted by one: m.bias is now input 1
    first_call = next(n for n in lifted.gm.graph.nodes if n.op == "call_module")
    assert first_call.args[-1].args[0].name == "stacked_weights_1"  # m.bias's slice


def test_nothing_to_lift_is_none():
    gm, _, grid, unbatched = _rewritten(min_group=99)  # no group batches: no weight stacks
    assert not any(WEIGHT_STACK in n.meta for n in unbatched.graph.nodes)
    assert lift_weight_stacks(unbatched, _roles(grid)) is None
    assert lift_weight_stacks(gm, _roles(grid)) is None  # Dynamo's graph itself


def test_lifted_variant_fed_stacks_equals_the_copying_graph():
    _, inputs, grid, gm = _rewritten()
    lifted = lift_weight_stacks(gm, _roles(grid))
    position = {p: i for i, p in enumerate(grid.gm.graph.find_nodes(op="placeholder"))}
    stacks = [torch.stack([inputs[position[p]] for p in grid.stack.by_role(role)]) for role in lifted.roles]
    with torch.no_grad():
        expected = lower(gm, "eager")(*inputs)
        got = lower(lifted.gm, "eager")(*inputs, *stacks)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        # the lifted graph reads its trailing inputs, not the parameters:
        # stacks of other values give another result
        other = lower(lifted.gm, "eager")(*inputs, *[s + 1 for s in stacks])
    assert not torch.allclose(other[0], expected[0])
