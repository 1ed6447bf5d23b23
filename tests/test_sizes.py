"""A graph Dynamo made dynamic on its own (the second segment count, a second batch
size) runs as the static graph of each call's sizes: weights stored stacked are read
as stacks on every count, state-in-attribute forms compile no new wavefront step,
outputs and mutated attributes match eager; ``dynamic=True``, ``mark_dynamic`` and
``max_size_specializations=0`` keep one graph for all sizes; past the limit a call
runs Dynamo's graph."""

import copy
import logging

import pytest
import torch

import diagpass
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.models.family import FamilyConfig, build_family_model
from diagpass.models.official_shapes import build_official_shape
from diagpass.report import report_count, reports_since
from diagpass.testing import assert_grads_as_exact_as_eager, assert_matches_eager, float64_copy, gradients
from tests.helpers import research_shape, steps_ids

STEPS = {"inner": "aot_eager", "cost_model": False, "wavefront_steps": True}


def _armt(stacked: bool):
    model = randomize_memory_(build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8, seed=1))
    if stacked:
        diagpass.stack_weights_(model.layers)
    return model


def _tensor_attributes(model: torch.nn.Module) -> dict:
    """Plain tensor attributes (not parameters or buffers): where research code keeps memory."""
    return {f"{name}.{k}": v for name, m in model.named_modules() for k, v in vars(m).items()
            if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("form", [pytest.param("armt", marks=pytest.mark.slow), "family", pytest.param("layer_major", marks=pytest.mark.slow)])
def test_weights_stored_stacked_are_read_as_stacks_on_every_segment_count(form):
    """ARMT's second count: Dynamo specialised the length while tracing (a SymInt of a
    constant); the family forms': the length stays a symbol, and is specialised here."""
    model = _armt(stacked=False) if form == "armt" else research_shape(form)
    diagpass.stack_weights_(model.layers)
    compiled = torch.compile(model, backend="diagonal", options={"inner": "aot_eager"})
    outs = []
    with torch.no_grad():
        for S in (5, 8, 11, 8):
            outs.append((compiled(steps_ids(S)), steps_ids(S)))
            assert diagpass.reports()[-1].batched
    c = diagpass.counters["stacked_weights"]
    assert c["view_calls"] == 4 and c["stacked_graphs_compiled"] == 3 and c.get("copying_calls", 0) == 0
    assert diagpass.counters["specialize"]["graphs_compiled"] == (0 if form == "armt" else 2)  # S=8 and S=11
    for out, ids in outs:  # after the counts: beyond 1e-5 the check compiles a reference of its own
        assert_matches_eager(model, out, ids)


@pytest.mark.parametrize("shape", [pytest.param("family", marks=pytest.mark.slow), "official"])
def test_state_in_attribute_forms_compile_no_new_wavefront_step_on_a_second_count(shape):
    if shape == "family":
        cfg = FamilyConfig(vocab_size=128, d_model=32, n_layers=3, n_heads=2, d_ff=64, segment_size=8,
                           num_mem_tokens=2, memory_kind="associative", state_in_attributes=True)
        model = build_family_model(cfg, seed=0).eval()
    else:
        model = build_official_shape("attribute_memory")
    eager, exact = copy.deepcopy(model), float64_copy(model)
    compiled = torch.compile(model, backend="diagonal", options=STEPS)
    with torch.no_grad():
        for S in (5, 8):
            assert_matches_eager(eager, compiled(steps_ids(S)), steps_ids(S))
            exact(steps_ids(S))
            if S == 5:
                first = diagpass.counters["wavefront_steps"]["steps_compiled"]
    got, want, truth = _tensor_attributes(model), _tensor_attributes(eager), _tensor_attributes(exact)
    assert got.keys() == want.keys() and got
    for k in want:  # the memory grows large (|A| ~ 200): within 2x of eager fp32's error, or of 1e-5 of its scale
        allowed = 2 * max((want[k].double() - truth[k]).abs().max().item(), 1e-5 * truth[k].abs().max().item(), 1e-6)
        assert (got[k].double() - truth[k]).abs().max().item() <= allowed, k
    c = diagpass.counters["wavefront_steps"]
    assert first > 0 and c["steps_compiled"] == first  # every wavefront of S=8 was met at S=5
    assert diagpass.counters["specialize"]["graphs_compiled"] == 1


@pytest.mark.parametrize("how", [pytest.param("dynamic=True", marks=pytest.mark.slow), "mark_dynamic", pytest.param("option 0", marks=pytest.mark.slow)])
def test_asked_for_dynamic_shapes_compile_one_graph_for_all_sizes(how):
    model = research_shape("family")  # keeps the length symbolic (ARMT's forward specialises it)
    options = {"inner": "aot_eager", **({"max_size_specializations": 0} if how == "option 0" else {})}
    compiled = torch.compile(model, backend="diagonal", options=options, dynamic=True if how == "dynamic=True" else None)
    with torch.no_grad():
        for S in (5, 8):
            ids = steps_ids(S)
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(ids, 1)
            assert_matches_eager(model, compiled(ids), ids)
    c = diagpass.counters["specialize"]
    assert c["graphs_specialized"] == 0 and c["graphs_compiled"] == 0


@pytest.mark.slow
def test_sizes_past_the_limit_run_one_graph_for_all_sizes_and_match(caplog):
    model = _armt(stacked=False)
    compiled = torch.compile(model, backend="diagonal", options={"inner": "aot_eager", "max_size_specializations": 1})
    mark = None
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="diagpass"):
        for batch in (1, 2, 3, 4, 2, 3):  # the second batch size makes the batch dim symbolic
            ids = torch.randint(0, 128, (batch, 8 * 5), generator=torch.Generator().manual_seed(batch))
            assert_matches_eager(model, compiled(ids), ids)
            if batch == 2 and mark is None:
                mark = report_count()
    c = diagpass.counters["specialize"]
    assert c["graphs_compiled"] == 1 and c["sizes_past_limit"] == 2  # batch 3 and 4: one graph for both
    assert len(reports_since(mark)) == 1  # Dynamo's graph traced again with dynamic shapes, once
    assert "met more than 1 sets of input sizes" in caplog.text


@pytest.mark.slow  # gradients on the default path: tests/runtime/test_wavefront_steps.py
def test_gradients_of_a_second_segment_count_match_eager():
    model = research_shape("family").train()
    compiled = torch.compile(model, backend="diagonal", options={"inner": "aot_eager", "cost_model": False})
    for S in (5, 8):
        ids = steps_ids(S)
        got, want = gradients(compiled, model, ids), gradients(model, model, ids)
        try:
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
        except AssertionError:
            assert_grads_as_exact_as_eager(model, (ids,), {}, got, want)
        assert any(r.batched and r.num_segments == S for r in diagpass.reports())
    assert diagpass.counters["specialize"]["graphs_compiled"] == 1


@pytest.mark.slow  # Inductor compiles; CI runs -m slow too
def test_inductor_compiles_the_specialised_graph_with_stored_stacks():
    model = research_shape("family")
    diagpass.stack_weights_(model.layers)
    compiled = torch.compile(model, backend="diagonal")
    with torch.no_grad():
        for S in (5, 8, 8):
            assert_matches_eager(model, compiled(steps_ids(S)), steps_ids(S))
    assert diagpass.counters["specialize"]["graphs_compiled"] == 1
    assert diagpass.counters["stacked_weights"]["view_calls"] == 3


def test_a_graph_without_segments_stays_one_dynamic_graph():
    """A decoding step's cache grows every call: one graph for all lengths, not a compile per length."""
    layer = torch.nn.Linear(8, 8)
    mark = report_count()
    compiled = torch.compile(layer, backend="diagonal", options={"inner": "aot_eager"})
    with torch.no_grad():
        for n in (3, 5, 7, 9):
            x = torch.randn(1, n, 8)
            torch.testing.assert_close(compiled(x), layer(x))
    c = diagpass.counters["specialize"]
    assert c["graphs_kept_dynamic"] == 1 and c["graphs_compiled"] == 0
    assert len(reports_since(mark)) == 2  # the static first graph, then the dynamic one for every length
