"""segment_steps: the sequential graph as one call per segment. The cut graph must compute
Dynamo's graph bit for bit (same ops, another order), and the middle segments must share
one structure (else nothing is compiled once)."""

import operator

import pytest
import torch

from diagpass import pipeline
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.models.family import FamilyConfig, build_family_model
from diagpass.models.official_shapes import build_official_shape
from diagpass.options import Options
from diagpass.passes.segment_steps import segment_steps
from tests.helpers import Autocast, assert_same_outputs, autocast_regions, dynamo_graph


def _cut(model, x):
    gm, inputs = dynamo_graph(model, x)
    plan = pipeline.run(gm, Options(inner="eager"), inputs)
    steps, why = segment_steps(plan.grid, plan.cell_graph)
    return gm, inputs, steps, why


def _armt(L=3):
    return randomize_memory_(build_armt("llama", num_layers=L, segment_size=8, num_mem_tokens=2, d_mem=8, seed=3))


def test_armt_cuts_into_one_call_per_segment_with_three_structures():
    S = 6
    gm, inputs, steps, why = _cut(_armt(), torch.randint(0, 128, (1, 8 * S)))
    assert why == "" and steps.num_steps == S
    # segment 0 (no memory read), segments 1..S-2, the last one (its new memory is dead)
    assert steps.num_structures == 3
    calls = [n for n in steps.gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == [f"segment_{s}" for s in range(S)]
    structures = [steps.gm.get_submodule(n.target).meta["structure"] for n in calls]
    assert len(set(structures[1:S - 1])) == 1 and structures[0] != structures[1] != structures[-1]
    # each step embeds its own segment; outside the steps only views of the input and the
    # closing concatenation run
    order = list(steps.gm.graph.nodes)
    assert not any("embedding" in str(n.target) for n in order)
    for n in calls:
        assert any("embedding" in str(m.target) for m in steps.gm.get_submodule(n.target).graph.nodes)
    cats = [i for i, n in enumerate(order) if n.target is torch.cat and i > order.index(calls[-1])]
    assert cats
    assert_same_outputs(gm, steps.gm, inputs)


@pytest.mark.parametrize("form", [dict(layer_major=True), dict(state_in_attributes=True), dict(stacked_memory=True)])
def test_family_loop_shapes_cut_the_same(form):
    """Layer-major loops (the official armt.py shape), state in attributes, one stacked
    state tensor: the same segment-major steps, the middle ones of one structure."""
    cfg = FamilyConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=64, segment_size=8,
                       num_mem_tokens=2, memory_kind="associative", **form)
    model = build_family_model(cfg, seed=0).eval()
    S = 6
    gm, inputs, steps, why = _cut(model, torch.randint(0, 64, (1, 8 * S)))
    assert why == "", why
    assert steps.num_steps == S and steps.num_structures <= 4
    assert_same_outputs(gm, steps.gm, inputs)


@pytest.mark.parametrize("shape", ["horizontal", "attribute_memory"])
def test_official_armt_shapes_cut_into_at_most_three_structures(shape):
    """The current armt.py shape builds its mask and positions once for the whole
    sequence and slices them per segment: those slices stay outside the steps (their
    offsets would make every step differ), passed in as contiguous copies."""
    gm, inputs, steps, why = _cut(build_official_shape(shape), torch.randint(0, 128, (2, 8 * 5)))
    assert why == "" and steps.num_steps == 5 and steps.num_structures <= 3
    assert_same_outputs(gm, steps.gm, inputs)


def test_random_ops_never_reach_the_cut():
    """Dropout in training: reordered, the ops would draw other numbers than eager. The
    partition refuses such graphs already (no grid, so no steps); the pass refuses too."""
    model = randomize_memory_(build_armt("gpt2", num_layers=2, segment_size=8, num_mem_tokens=2, d_mem=8)).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1  # the reference model's are 0
    gm, inputs = dynamo_graph(model, torch.randint(0, 128, (1, 8 * 4)))
    plan = pipeline.run(gm, Options(inner="eager", segment_steps=True), inputs)
    assert plan.grid is None and "random op" in plan.report.reason
    assert pipeline.segment_steps_rewrite(plan) is None


def test_outputs_of_a_step_are_read_only_through_getitem():
    gm, inputs, steps, _ = _cut(_armt(L=2), torch.randint(0, 128, (1, 8 * 4)))
    for n in steps.gm.graph.nodes:
        if n.op == "call_module":
            assert n.users and all(u.target is operator.getitem for u in n.users)


def test_an_autocast_region_around_the_loop_is_entered_again_in_every_step():
    """``torch.autocast`` around the whole segment loop: every step enters the region
    around all of its ops, so each op runs under the state it ran under in eager; the
    outputs (bf16) equal Dynamo's graph bit for bit, and the middle steps still share one
    structure."""
    S = 5
    gm, inputs, steps, why = _cut(Autocast(_armt()), torch.randint(0, 128, (1, 8 * S)))
    assert why == "" and steps.num_steps == S and steps.num_structures == 3
    for n in steps.gm.graph.nodes:
        if n.op == "call_module":
            ops = [m for m in steps.gm.get_submodule(n.target).graph.nodes if m.op == "call_function"]
            assert autocast_regions(steps.gm.get_submodule(n.target)) == ["_enter_autocast", "_exit_autocast"]
            assert ops[0].target.__name__ == "_enter_autocast" and ops[-1].target.__name__ == "_exit_autocast"
    assert gm(*inputs)[0].dtype == torch.bfloat16
    assert_same_outputs(gm, steps.gm, inputs)
