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


def _cut(symbolic_width: bool):
    model = randomize_memory_(build_armt("llama", num_layers=L, segment_size=8, num_mem_tokens=2, d_mem=8, seed=3))
    gm, inputs = dynamo_graph(model, torch.randint(0, 128, (1, 8 * S), generator=torch.Generator().manual_seed(0)))
    plan = pipeline.run(gm, Options(inner="eager", cost_model=False), inputs)
    assert plan.rewrite is not None, plan.report.reason
    steps, why = wavefront_steps(plan.rewrite.gm, symbolic_width)
    assert why == "", why
    return plan.rewrite.gm, inputs, steps


def _structures(steps):
    return [steps.gm.get_submodule(n.target).meta["structure"] for n in steps.gm.graph.nodes if n.op == "call_module"]


def test_ramp_wavefronts_of_every_width_share_one_structure():
    gm, inputs, fixed = _cut(symbolic_width=False)
    _, _, free = _cut(symbolic_width=True)
    assert fixed.num_steps == free.num_steps == S + L - 1
    # fixed widths: L ramp-up structures (segment 0's cells are not grouped), L - 1 down, the steady one
    assert fixed.num_structures == 2 * L
    structures = _structures(free)
    # wavefronts 2 .. L-2 (segment 0 inside, a segment entering) at widths 2 .. L-2: one structure;
    # the ramp down at widths L-1 .. 2: one more
    assert len(set(structures[2:L - 1])) == 1 and len(set(structures[S:S + L - 2])) == 1
    # then: the first two wavefronts, segment 0 leaving as segment L-1 enters, the steady state, the last cell
    assert free.num_structures == 7
    assert_same_outputs(gm, free.gm, inputs)


def test_a_step_reads_its_groups_stacked_and_returns_them_stacked():
    _, _, steps = _cut(symbolic_width=True)
    steady = steps.gm.get_submodule(f"wavefront_{L}")
    nodes = list(steady.graph.nodes)
    assert not any(n.target is torch.stack for n in nodes)  # stacked between the steps
    # the entering segment's hidden state joins the stacked rest in the step
    assert any(n.target is torch.cat and n.args[0][0].target is torch.unsqueeze for n in nodes)
    # the leaving segment's row (its logits are computed in the step) is read at -1, not L-1
    assert any(n.target is operator.getitem and n.args[1] == -1 for n in nodes)
    rows = steady.meta["group_inputs"]
    placeholders = list(steady.graph.find_nodes(op="placeholder"))
    assert rows and all(placeholders[k].meta.get(GROUP_INPUT) for k in rows)
    # between the steps: the rows of the step before, stacked (the memory: the group's rows and
    # the first segment's last cell) or, consecutive rows of one result, a view of them
    outer = list(steps.gm.graph.nodes)
    call = next(n for n in outer if n.op == "call_module" and n.target == f"wavefront_{L}")
    args = [a for a in call.args if isinstance(a, torch.fx.Node)]
    stacks = [a for a in args if a.target is torch.stack]
    views = [a for a in args if a.target is operator.getitem and isinstance(a.args[1], slice)
             and _step_of(a.args[0]) == f"wavefront_{L - 1}"]
    assert stacks and all(_step_of(row) == f"wavefront_{L - 1}" for s in stacks for row in s.args[0])
    assert [v.args[1] for v in views] == [slice(0, L - 1)]  # the hidden states of the L - 1 staying segments


def _step_of(n: torch.fx.Node):
    """The step whose result ``n`` unpacks (a result, or a row of a stacked result); None
    for anything else (a weight stack)."""
    while n.op != "call_module":
        if n.target is not operator.getitem:
            return None
        n = n.args[0]
    return n.target
