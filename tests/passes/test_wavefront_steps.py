"""wavefront_steps: the batched graph as one call per wavefront. The cut graph must compute
the lowered batched graph bit for bit, and the steady wavefronts (no first-segment cell,
all L layers) must share one structure, so that the distinct steps follow L, not S."""

import operator

import pytest
import torch

from diagpass import pipeline
from diagpass.fx_facts import module_structure
from diagpass.ir.meta import WAVEFRONT
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.models.family import FamilyConfig, build_family_model
from diagpass.options import Options
from diagpass.passes.wavefront_steps import wavefront_steps
from tests.helpers import Autocast, assert_same_outputs, autocast_regions, dynamo_graph


def _cut(model, x):
    gm, inputs = dynamo_graph(model, x)
    plan = pipeline.run(gm, Options(inner="eager", cost_model=False), inputs)
    assert plan.rewrite is not None, plan.report.reason
    steps, why = wavefront_steps(plan.rewrite.gm)
    return plan.rewrite.gm, inputs, steps, why


def _armt(L=3):
    return randomize_memory_(build_armt("llama", num_layers=L, segment_size=8, num_mem_tokens=2, d_mem=8, seed=3))


def _structures(steps, glue=False):
    """The structures of the wavefronts' steps in order; ``glue``: of the glue steps."""
    calls = [n for n in steps.gm.graph.nodes if n.op == "call_module" and n.target.endswith(("_enter", "_leave")) == glue]
    return [steps.gm.get_submodule(n.target).meta["structure"] for n in calls]


@pytest.mark.parametrize("S", [6, 9])
def test_armt_steady_wavefronts_share_one_structure(S):
    L = 3
    gm, inputs, steps, why = _cut(_armt(L), torch.randint(0, 128, (1, 8 * S)))
    assert why == "" and steps.num_steps == S + L - 1 and steps.num_glue_steps == 2 * S
    structures = _structures(steps)
    # wavefronts L .. S+L-3 hold no first-segment cell: one group call, whose width is its
    # inputs' (passes/width_free.py), whether a segment enters or leaves there (the glue is
    # in steps of its own); the last segment's cells are the middle ones'
    # (passes/complete_cells.py)
    assert len(set(structures[L:S + L - 2])) == 1
    # the first segment's cell beside the rest at 0 .. L-1, then the last cell alone
    assert len(set(structures[:L] + structures[-1:])) == L + 1
    # every segment's entering glue one structure, its leaving glue another
    glue = _structures(steps, glue=True)
    assert len(set(glue)) == 2 and not set(glue) & set(structures)
    assert steps.num_structures == L + 4
    assert_same_outputs(gm, steps.gm, inputs)


def test_distinct_steps_do_not_grow_with_the_segment_count():
    counts = [_cut(_armt(), torch.randint(0, 128, (1, 8 * S)))[2].num_structures for S in (6, 12)]
    assert counts[0] == counts[1]


def test_weight_stacks_are_made_once_outside_and_groups_batch_inside():
    gm, inputs, steps, _ = _cut(_armt(), torch.randint(0, 128, (1, 8 * 6)))
    outer = list(steps.gm.graph.nodes)
    assert any(n.target is torch.stack for n in outer)  # the layer weights' stacks, once per call
    assert not any("embedding" in str(n.target) for n in outer)  # each step embeds its own segment
    inside = [m for n in outer if n.op == "call_module" for m in steps.gm.get_submodule(n.target).graph.nodes]
    assert sum(m.op == "call_module" for m in inside) >= 4  # the group calls, all inside the steps
    assert all(n.target.startswith("wavefront_") for n in outer if n.op == "call_module")
    for n in outer:
        if n.op == "call_module":
            assert n.users and all(u.target is operator.getitem for u in n.users)


@pytest.mark.parametrize("kind", ["associative", "gated", "xl_cache"])
def test_family_models_cut_bit_for_bit(kind):
    cfg = FamilyConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=64, segment_size=8,
                       num_mem_tokens=2, memory_kind=kind)
    S = 7
    gm, inputs, steps, why = _cut(build_family_model(cfg, seed=0).eval(), torch.randint(0, 64, (1, 8 * S)))
    assert why == "", why
    assert steps.num_steps == S + 3 - 1 and steps.num_glue_steps == 2 * S
    assert steps.num_structures < steps.num_steps
    assert_same_outputs(gm, steps.gm, inputs)


def test_an_untagged_node_or_a_stateful_module_call_is_refused():
    gm, _, _, _ = _cut(_armt(L=2), torch.randint(0, 128, (1, 8 * 4)))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    del node.meta[WAVEFRONT]
    steps, why = wavefront_steps(gm)
    assert steps is None and "was not emitted by the batch pass" in why
    assert module_structure(torch.nn.Linear(2, 2)) is None  # holds parameters: never shared


def test_autocast_regions_are_cut_with_the_wavefronts():
    """The batched graph under ``torch.autocast``: the pairs the rewrite restored are
    erased again and every step enters the region around its own ops; bit for bit, and
    the steady wavefronts still one structure."""
    S, L = 6, 3
    gm, inputs, steps, why = _cut(Autocast(_armt(L)), torch.randint(0, 128, (1, 8 * S)))
    assert why == "" and steps.num_steps == S + L - 1 and steps.num_structures == L + 4
    for n in steps.gm.graph.nodes:
        if n.op == "call_module":
            sub = steps.gm.get_submodule(n.target)
            assert autocast_regions(sub)[:1] == ["_enter_autocast"] and autocast_regions(sub)[-1:] == ["_exit_autocast"]
    assert gm(*inputs)[0].dtype == torch.bfloat16
    assert_same_outputs(gm, steps.gm, inputs)
