"""width_free: wavefront steps whose arguments and results do not depend on their groups'
width. The cut graph must still compute the lowered batched graph bit for bit; the ramp
steps of every width must then share one structure; the stacking runs between the steps."""

import operator

import torch

from diagpass import pipeline
from diagpass.ir.meta import GROUP_INPUT
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.options import Options
from diagpass.passes.wavefront_steps import wavefront_steps
from tests.helpers import assert_same_outputs, dynamo_graph

L, S = 5, 8


def _cut(symbolic_width: bool, glue_steps: bool = True):
    model = randomize_memory_(build_armt("llama", num_layers=L, segment_size=8, num_mem_tokens=2, d_mem=8, seed=3))
    gm, inputs = dynamo_graph(model, torch.randint(0, 128, (1, 8 * S), generator=torch.Generator().manual_seed(0)))
    plan = pipeline.run(gm, Options(inner="eager", cost_model=False), inputs)
    assert plan.rewrite is not None, plan.report.reason
    steps, why = wavefront_steps(plan.rewrite.gm, symbolic_width, glue_steps)
    assert why == "", why
    return plan.rewrite.gm, inputs, steps


def _structures(steps):
    """The wavefronts' steps' structures in order (not the glue's)."""
    return [steps.gm.get_submodule(n.target).meta["structure"] for n in steps.gm.graph.nodes
            if n.op == "call_module" and not n.target.endswith(("_enter", "_leave"))]


def test_ramp_wavefronts_of_every_width_share_one_structure():
    gm, inputs, fixed = _cut(symbolic_width=False)
    _, _, free = _cut(symbolic_width=True)
    assert fixed.num_steps == free.num_steps == S + L - 1
    # fixed widths: the first two wavefronts, the first segment's cell beside a group of each
    # width 2 .. L-1, a group alone at each width L .. 2, the last cell; the entering and the
    # leaving glue
    assert fixed.num_structures == 2 * L + 2
    structures = _structures(free)
    # wavefronts 2 .. L-1 (segment 0's cell beside a group) at widths 2 .. L-1: one structure;
    # the group alone at L .. S+L-3, steady or ramp down, whatever enters or leaves: one more
    assert len(set(structures[2:L])) == 1 and len(set(structures[L:S + L - 2])) == 1
    # then: the first two wavefronts, the last cell, the entering and the leaving glue
    assert free.num_structures == 7
    assert_same_outputs(gm, free.gm, inputs)


def test_a_step_reads_its_groups_stacked_and_returns_them_stacked():
    _, _, steps = _cut(symbolic_width=True)
    steady = steps.gm.get_submodule(f"wavefront_{L}")
    nodes = [n for n in steady.graph.nodes if n.op not in ("placeholder", "output")]
    # the group call and the unpacking of its stacked results: no stack, no row, no glue
    assert sum(n.op == "call_module" for n in nodes) == 1
    assert all(n.op == "call_module" or n.args[0].op == "call_module" for n in nodes)
    rows = steady.meta["group_inputs"]
    placeholders = list(steady.graph.find_nodes(op="placeholder"))
    assert rows and all(placeholders[k].meta.get(GROUP_INPUT) for k in rows)
    # between the steps: the entering segment's hidden state (its own step's) cat to a view of
    # the L - 1 staying segments' rows of the step before; the memory a view of that step's rows
    # (cat to the first segment's last cell's, which is not a row of the group)
    outer = list(steps.gm.graph.nodes)
    call = next(n for n in outer if n.op == "call_module" and n.target == f"wavefront_{L}")
    args = [a for a in call.args if isinstance(a, torch.fx.Node)]
    cats = [a for a in args if a.target is torch.cat]
    assert cats and not any(a.target is torch.stack for a in args)
    hidden = cats[0].args[0]
    assert hidden[0].target is torch.unsqueeze and _step_of(hidden[0].args[0]) == f"wavefront_{L}_enter"
    assert hidden[1].args[1] == slice(0, L - 1) and _step_of(hidden[1].args[0]) == f"wavefront_{L - 1}"
    # the leaving segment's row goes to its own step
    leave = next(n for n in outer if n.op == "call_module" and n.target == f"wavefront_{L}_leave")
    assert leave.args[0].target is operator.getitem and leave.args[0].args[1] == L - 1 \
        and _step_of(leave.args[0]) == f"wavefront_{L}"


def test_glue_kept_in_the_steps_reads_the_entering_and_the_leaving_rows_there():
    """``glue_steps=False``: the entering segment's hidden state is cat to the stacked rest in
    the step, and the leaving segment's row is read there at -1 (the step's width less one)."""
    gm, inputs, steps = _cut(symbolic_width=True, glue_steps=False)
    assert steps.num_glue_steps == 0 and steps.num_structures == 7
    nodes = list(steps.gm.get_submodule(f"wavefront_{L}").graph.nodes)
    assert any(n.target is torch.cat and n.args[0][0].target is torch.unsqueeze for n in nodes)
    assert any(n.target is operator.getitem and n.args[1] == -1 for n in nodes)
    assert_same_outputs(gm, steps.gm, inputs)


def _step_of(n: torch.fx.Node):
    """The step whose result ``n`` unpacks (a result, or a row of a stacked result); None
    for anything else (a weight stack)."""
    while n.op != "call_module":
        if n.target is not operator.getitem:
            return None
        n = n.args[0]
    return n.target
