"""Compiled glue: a rolled graph's group calls as one opaque op, the glue through Inductor."""

import gc

import pytest
import torch
import torch.fx as fx

import diagpass
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.runtime import group_op
from diagpass.fx_facts import example_value
from diagpass.runtime.batched_cell import BatchedCell
from diagpass.runtime.kernel_cache import CompiledGroup, clear_kernel_cache
from diagpass.testing import assert_equivalent, assert_matches_eager


def _model(layers=3):
    model = build_armt("llama", num_layers=layers, segment_size=8, num_mem_tokens=2, d_mem=8, seed=5)
    randomize_memory_(model)
    return model


def _glue_graphs(monkeypatch):
    """The graphs compile_glue hands to Inductor, after the group calls became ops."""
    seen = []
    real = group_op.inner_compile

    def spy(gm, example_inputs, inner, rewritten=False):
        seen.append(gm)
        return real(gm, example_inputs, inner, rewritten)

    monkeypatch.setattr(group_op, "inner_compile", spy)
    return seen


def _op_calls(gm: fx.GraphModule):
    return [n for n in gm.graph.nodes if n.target is torch.ops.diagpass.group_call.default]


@pytest.mark.slow  # Inductor compiles of an opt-in path (compile_glue); CI runs -m slow too
def test_inference_compiles_the_glue_around_opaque_group_calls(monkeypatch):
    clear_kernel_cache()
    seen = _glue_graphs(monkeypatch)
    model = _model()
    ids = torch.randint(0, 128, (1, 8 * 5))
    compiled = torch.compile(model, backend="diagonal", options={"roll": True, "compile_glue": True})
    with torch.no_grad():
        out = compiled(ids)
        assert_matches_eager(model, out, ids)
        assert_matches_eager(model, compiled(ids), ids)  # the second call runs the bound kernels
    assert diagpass.counters["roll"]["glue_compiled"] == 1
    (glue,) = seen
    calls = _op_calls(glue)
    assert len(calls) == diagpass.counters["roll"]["group_calls"]
    assert not [n for n in glue.graph.nodes if n.op == "call_module"]  # no group runs as Python
    # S + L - 1 = 7 wavefronts; the middle ones batch 2 or 3 cells in one op call
    report = diagpass.reports()[-1]
    assert report.num_wavefronts == 7 and max(len(g) for g in report.batched_groups) == 3
    assert diagpass.counters["roll"]["kernels_compiled"] <= len(calls)


def test_without_the_option_the_glue_runs_eagerly(monkeypatch):
    seen = _glue_graphs(monkeypatch)
    model = _model(layers=2)
    ids = torch.randint(0, 128, (1, 8 * 3))
    with torch.no_grad():
        assert_matches_eager(model, torch.compile(model, backend="diagonal", options={"roll": True})(ids), ids)
    assert not seen and diagpass.counters["roll"]["glue_compiled"] == 0
    assert diagpass.counters["roll"]["group_calls"] > 0


@pytest.mark.slow  # Inductor compiles of an opt-in path (compile_glue); CI runs -m slow too
def test_a_graph_that_needs_gradients_keeps_its_glue_eager():
    """The op has no autograd formula: with gradients the glue runs as Python
    around the kernels, whose own backward runs (gradients as exact as eager)."""
    clear_kernel_cache()
    model = _model()
    ids = torch.randint(0, 128, (1, 8 * 4))
    assert_equivalent(model, ids, options={"roll": True, "compile_glue": True}, grads=True, expect_batched=True)
    assert diagpass.counters["roll"]["glue_compiled"] == 0
    assert diagpass.counters["roll"]["kernels_compiled"] > 0


def _graph_with_a_group_call(dynamic: bool) -> fx.GraphModule:
    """Dynamo's graph of ``x * 2`` (static or dynamic sizes) with one group call added."""
    captured = []

    def grab(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x: x * 2, backend=grab, dynamic=dynamic)(torch.randn(2, 3))
    torch._dynamo.reset()
    gm = captured[0]
    template = fx.symbolic_trace(lambda x: (x.relu(),))
    gm.add_submodule("g", CompiledGroup(BatchedCell(template, [0], 2), ("relu",), "inductor"))
    x = next(n for n in gm.graph.find_nodes(op="placeholder") if isinstance(example_value(n), torch.Tensor))
    out = next(iter(gm.graph.find_nodes(op="output")))
    with gm.graph.inserting_before(out):
        gm.graph.call_module("g", (x,))
    gm.recompile()
    return gm


def test_symbolic_sizes_keep_the_glue_eager():
    """Output shapes are traced once, statically: a graph with a symbolic size
    is not made opaque (its glue then runs eagerly); the same graph with
    static sizes is."""
    assert group_op.opaque_groups(_graph_with_a_group_call(dynamic=True)) is None
    static = _graph_with_a_group_call(dynamic=False)
    (site,) = group_op.opaque_groups(static)
    assert site.outputs == (((2, 3), torch.float32, torch.device("cpu")),)
    assert len(_op_calls(static)) == 1


def test_outputs_that_alias_an_input_or_each_other_are_copied():
    x = torch.randn(4, 3)
    fresh = torch.randn(3, 4)
    outs = group_op.declared_outputs([x[1:], fresh, fresh, fresh.t()], [x])
    assert outs[0].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    torch.testing.assert_close(outs[0], x[1:], rtol=0, atol=0)
    assert outs[1] is fresh  # fresh and contiguous: not copied
    assert outs[2] is not fresh and outs[2].untyped_storage().data_ptr() != fresh.untyped_storage().data_ptr()
    assert outs[3].is_contiguous()
    torch.testing.assert_close(outs[3], fresh.t(), rtol=0, atol=0)


@pytest.mark.slow  # Inductor compiles of an opt-in path (compile_glue); CI runs -m slow too
def test_registry_forgets_the_groups_of_a_dropped_graph():
    clear_kernel_cache()
    model = _model(layers=2)
    ids = torch.randint(0, 128, (1, 8 * 3))
    before = group_op.registered_ids()
    compiled = torch.compile(model, backend="diagonal", options={"roll": True, "compile_glue": True})
    with torch.no_grad():
        compiled(ids)
    ours = group_op.registered_ids() - before
    assert ours
    del compiled
    torch._dynamo.reset()
    gc.collect()
    assert not ours & group_op.registered_ids()
