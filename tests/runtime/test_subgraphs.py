"""Shared subgraphs: every group call an ``invoke_subgraph`` of a subgraph shared by equal calls."""

import torch
from torch._higher_order_ops.invoke_subgraph import invoke_subgraph

import diagpass
from diagpass.counters import counters
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.options import Options
from diagpass.runtime.subgraph_aliasing import call_aliasing
from diagpass.runtime.subgraphs import as_shared_subgraphs
from diagpass.testing import assert_matches_eager
from tests.helpers import analyze, dynamo_graph


def _model(layers=3):
    model = build_armt("llama", num_layers=layers, segment_size=8, num_mem_tokens=2, d_mem=8, seed=3)
    return randomize_memory_(model).eval()


def _subgraphs_of(model, segments: int):
    ids = torch.randint(0, 128, (1, 8 * segments), generator=torch.Generator().manual_seed(0))
    gm, example_inputs = dynamo_graph(model, ids)
    rewritten, _ = analyze(gm, Options(cost_model=False), example_inputs)
    assert rewritten is not None
    shared = as_shared_subgraphs(rewritten)
    calls = [n for n in shared.graph.nodes if n.op == "call_function" and n.target is invoke_subgraph]
    return rewritten, shared, calls


def test_every_cell_is_a_call_and_equal_calls_share_one_subgraph():
    S, L = 6, 3
    rewritten, shared, calls = _subgraphs_of(_model(L), S)
    # no BatchedCell call is left inline: every cell of the grid runs in a subgraph
    assert not [n for n in shared.graph.nodes if n.op == "call_module"]
    assert len(calls) == len([n for n in rewritten.graph.nodes if n.op == "call_module"])
    names = [c.args[0].target for c in calls]
    assert all(c.args[1] == c.args[0].target for c in calls)  # one identifier per subgraph
    assert len(set(names)) < len(calls)  # the steady state shares
    # batched: the middle segments' full wavefronts run L cells in one call
    widths = [getattr(shared, c.args[0].target).batched.group_size for c in calls]
    assert widths.count(L) >= (S - 2) - L + 1
    assert widths.count(1) > 0  # and single cells are calls too


def test_the_number_of_subgraphs_does_not_grow_with_the_segments():
    model = _model(2)
    _, _, short = _subgraphs_of(model, 4)
    _, _, long = _subgraphs_of(model, 7)
    assert len(long) > len(short)
    assert len({c.args[0].target for c in long}) == len({c.args[0].target for c in short})


def test_the_variant_reading_stored_stacks_shares_as_much():
    # its group calls read views of the stacks: they carry the check's metadata too
    from diagpass.pipeline import run

    ids = torch.randint(0, 128, (1, 8 * 6), generator=torch.Generator().manual_seed(0))
    gm, example_inputs = dynamo_graph(_model(3), ids)
    plan = run(gm, Options(cost_model=False), example_inputs)
    names = {}
    for variant in (plan.rewrite.gm, plan.rewrite.stacked.gm):
        shared = as_shared_subgraphs(variant)
        calls = [n for n in shared.graph.nodes if n.op == "call_function" and n.target is invoke_subgraph]
        names[variant] = (len(calls), len({c.args[0].target for c in calls}))
    (copying, stacked) = names.values()
    assert stacked == copying and stacked[1] < stacked[0]


def test_calls_whose_arguments_differ_get_subgraphs_of_their_own():
    rewritten, shared, calls = _subgraphs_of(_model(3), 6)
    by_name = {}
    for c in calls:
        metas = tuple(
            (tuple(v.shape), tuple(v.stride()), v.dtype, v.requires_grad)
            for a in c.args[2:] for v in [a.meta.get("example_value", a.meta.get("val"))]
        )
        by_name.setdefault(c.args[0].target, set()).add(metas)
    assert all(len(metas) == 1 for metas in by_name.values())


def _inductor_inference_matches_eager(model, ids, options):
    """Compiled with ``options`` (Inductor, counters cleared first), one inference call equals eager."""
    counters.clear()
    fast = torch.compile(model, backend="diagonal", options=options)
    with torch.no_grad():
        out = fast(ids)
    assert_matches_eager(model, out, ids)


def test_inference_with_inductor_runs_shared_subgraphs_and_matches_eager():
    ids = torch.randint(0, 128, (2, 8 * 5), generator=torch.Generator().manual_seed(1))
    _inductor_inference_matches_eager(_model(3), ids, {"cost_model": False, "wavefront_steps": False})
    assert counters["subgraphs"]["calls"] > counters["subgraphs"]["subgraphs"] > 0
    assert counters["batch"]["groups"] > 0
    assert diagpass.reports()[-1].reason is None


def _xl_cache_model():
    from diagpass.models.family import FamilyConfig, build_family_model

    config = FamilyConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2, segment_size=4, num_mem_tokens=2,
                          memory_kind="xl_cache")
    return build_family_model(config, seed=3).eval()


def test_outputs_that_view_an_operand_are_computed_outside_the_subgraph():
    # a Transformer-XL cell returns its input hidden states (detached) as the next
    # segment's cache; returned from a subgraph, Inductor would reuse that buffer
    ids = torch.randint(0, 32, (2, 4 * 5), generator=torch.Generator().manual_seed(0))
    gm, example_inputs = dynamo_graph(_xl_cache_model(), ids)
    rewritten, _ = analyze(gm, Options(cost_model=False), example_inputs)
    counters.clear()
    shared = as_shared_subgraphs(rewritten)
    assert counters["subgraphs"]["outputs_as_views"] > 0
    assert not [n for n in shared.graph.nodes if n.op == "call_module"]  # and still every call a subgraph
    for call in shared.graph.find_nodes(op="call_function", target=invoke_subgraph):
        operands = [a.meta.get("example_value", a.meta.get("val")) for a in call.args[2:]]
        aliasing, _ = call_aliasing(getattr(shared, call.args[0].target), operands)
        assert aliasing.views == ()  # what a subgraph returns is fresh
    with torch.no_grad():
        torch.testing.assert_close(shared(*example_inputs), rewritten(*example_inputs), rtol=0, atol=0)


def test_a_transformer_xl_cache_cell_by_cell_under_inductor_matches_eager():
    # the cost rule sends this tiny model to the sequential graph, here cell by cell as shared subgraphs
    ids = torch.randint(0, 32, (2, 4 * 5), generator=torch.Generator().manual_seed(0))
    _inductor_inference_matches_eager(_xl_cache_model(), ids, {"shared_sequential": True, "segment_steps": False})
    assert counters["subgraphs"]["calls"] > 0 and counters["subgraphs"]["outputs_as_views"] > 0
