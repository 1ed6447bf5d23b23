"""Wavefront steps end to end: the batched graph run one compiled step per wavefront matches
eager (outputs, gradients), batching really happened, the steady wavefronts compiled once,
and a failing step falls back to the batched graph compiled whole. aot_eager in the default
suite; Inductor under the slow marker."""

import pytest
import torch

import diagpass
import diagpass.runtime.segment_steps
from diagpass.report import report_count, reports_since
from diagpass.testing import assert_equivalent, assert_matches_eager
from diagpass.models.armt import build_armt, randomize_memory_
from tests.helpers import Autocast, research_shape, steps_armt, steps_ids

BATCHED = {"inner": "aot_eager", "cost_model": False, "wavefront_steps": True}


def test_inference_batches_and_compiles_each_distinct_wavefront_once():
    mark = report_count()
    assert_equivalent(steps_armt(), steps_ids(7), options=BATCHED)  # expect_batched: groups of 2 or more ran
    (report,) = reports_since(mark)
    # wavefronts 3..8 (group calls only: the glue is in steps of its own, one entering and one
    # leaving per segment, each one structure) are one step; the last segment entering at 6 too
    # (passes/complete_cells.py). Then the first three wavefronts and the last cell.
    assert report.wavefront_steps == {"steps": 9, "glue_steps": 14, "structures": 7}
    c = diagpass.counters["wavefront_steps"]
    assert c["steps_compiled"] == 7 and c["step_cache_hits"] == 16 and c["calls_uncompiled"] == 0


def test_gradients_flow_through_every_wavefront():
    assert_equivalent(steps_armt(), steps_ids(6), options=BATCHED, grads=True)
    # with gradients the last segment's unread memory write is not a step output (it would give
    # a parameter only it reads a zero gradient, not None): the wavefronts it is in stay apart
    assert diagpass.counters["wavefront_steps"]["steps_compiled"] == 9


def test_the_option_off_compiles_the_batched_graph_whole():
    mark = report_count()
    assert_equivalent(steps_armt(), steps_ids(5), options={**BATCHED, "wavefront_steps": False})
    assert diagpass.counters["wavefront_steps"]["graphs"] == 0
    assert all(r.wavefront_steps is None for r in reports_since(mark))


def test_a_new_segment_count_compiles_only_the_wavefronts_it_has_not_met():
    model = steps_armt()
    compiled = torch.compile(model, backend="diagonal", options=BATCHED)
    with torch.no_grad():
        assert_matches_eager(model, compiled(steps_ids(7)), steps_ids(7))
        first = diagpass.counters["wavefront_steps"]["steps_compiled"]
        assert_matches_eager(model, compiled(steps_ids(9)), steps_ids(9))  # Dynamo recompiles, sizes symbolic
    c = diagpass.counters["wavefront_steps"]
    assert first == 7 and c["steps_compiled"] == first  # every wavefront of S=9 was met at S=7
    assert c["graphs_compiled_whole"] == 0  # a hit passes the site's own tensors to the kernel


# the defaults in the default suite; each option off (a minute each here) with the slow cases
@pytest.mark.parametrize("symbolic_width, glue_steps, new_steps", [
    (True, True, 0), pytest.param(True, False, 2, marks=pytest.mark.slow), pytest.param(False, True, 5, marks=pytest.mark.slow)])
def test_a_segment_count_below_L_then_above_compiles_only_the_kinds_of_wavefront_it_has_not_met(
        symbolic_width, glue_steps, new_steps):
    """S = 3 < L = 5 meets the ramps at widths up to 2 only. With symbolic widths and the
    glue in steps of its own (the defaults), S = 8 compiles nothing: its wavefronts are
    group calls (a first-segment cell beside some) of widths the kernel compiled at G = 2
    admits (its rows G - 1 = 1 are G - 1, not a size specialised to 1). With the glue in the
    wavefronts' steps, S = 8 compiles the kinds S = 3 never has: segment 0 leaving as
    segment 4 enters, and the steady one. With fixed widths, each width from 3 to 5 it has
    not met."""
    model = randomize_memory_(build_armt("llama", num_layers=5, segment_size=8, num_mem_tokens=2, d_mem=8, seed=5))
    compiled = torch.compile(model, backend="diagonal", options={**BATCHED, "symbolic_width": symbolic_width,
                                                                   "glue_steps": glue_steps})
    c = diagpass.counters["wavefront_steps"]
    compiled_after = []
    with torch.no_grad():
        for S in (3, 8, 12):
            assert_matches_eager(model, compiled(steps_ids(S)), steps_ids(S))
            compiled_after.append(c["steps_compiled"])
    assert compiled_after[1] - compiled_after[0] == new_steps
    assert compiled_after[2] == compiled_after[1]  # S = 12: nothing new, with any
    assert c["graphs_compiled_whole"] == 0 and c["calls_uncompiled"] == 0
    assert (c["steps_width_free"] > 0) == symbolic_width


def test_a_step_that_does_not_compile_falls_back_to_the_whole_graph(monkeypatch, caplog):
    def broken(gm, inputs, inner, rewritten=False, **symbols):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(diagpass.runtime.segment_steps, "inner_compile", broken)
    model = steps_armt()
    compiled = torch.compile(model, backend="diagonal", options=BATCHED)
    with torch.no_grad():
        for _ in range(2):
            assert_matches_eager(model, compiled(steps_ids(5)), steps_ids(5))
    assert diagpass.counters["wavefront_steps"]["graphs_compiled_whole"] == 1
    assert "a wavefront step failed (RuntimeError: no kernel for you); compiling the graph whole" in caplog.text



def test_a_model_under_autocast_batches_as_wavefront_steps_and_matches_eager():
    """bf16 autocast inside forward: the groups' trial traces run under the region (they
    failed on mixed dtypes before), the batched graph runs as wavefront steps, outputs
    stay bf16."""
    mark = report_count()
    assert_equivalent(Autocast(steps_armt()), steps_ids(6), options=BATCHED, expect_batched=True, rtol=2e-2, atol=2e-2)
    (report,) = reports_since(mark)
    assert report.wavefront_steps == {"steps": 8, "glue_steps": 12, "structures": 7}
    assert diagpass.counters["wavefront_steps"]["graphs_compiled_whole"] == 0



@pytest.mark.parametrize("form", [pytest.param("family", marks=pytest.mark.slow), pytest.param("layer_major", marks=pytest.mark.slow), "official_horizontal"])
def test_a_second_segment_count_of_research_shapes_compiles_no_new_step(form):
    """The second count's graph is dynamic (the length symbolic). Its size arithmetic
    (``sym_sum``, a slice's end) is glue in the prologue, not part of the group that first
    read it (it could not cross the cut), its numbers fold when a step is specialised,
    and the layer-major loop's last, symbolic piece is seen through: every wavefront of
    S=8 was met at S=5."""
    model = research_shape(form)
    compiled = torch.compile(model, backend="diagonal", options=BATCHED)
    reports = []
    with torch.no_grad():
        for S in (5, 8):
            ids = torch.randint(0, 128, (1, 8 * S), generator=torch.Generator().manual_seed(S))
            mark = report_count()
            out = compiled(ids)
            reports += reports_since(mark)  # before the check: it may compile a reference of its own
            assert_matches_eager(model, out, ids)
            if S == 5:
                first = diagpass.counters["wavefront_steps"]["steps_compiled"]
    assert [r.wavefront_steps["steps"] for r in reports] == [7, 10]  # both graphs cut, both batched
    c = diagpass.counters["wavefront_steps"]
    assert c["steps_compiled"] == first and c["graphs_compiled_whole"] == 0


@pytest.mark.slow  # Inductor compiles; CI runs -m slow too
def test_inductor_wavefront_steps_match_eager_in_inference_and_training():
    options = {**BATCHED, "inner": "inductor"}
    c = diagpass.counters["wavefront_steps"]
    assert_equivalent(steps_armt(), steps_ids(6), options=options)
    assert c["steps_compiled"] == 7 and c["steps_cpp_wrapper"] == 7  # the C++ wrapper, on the CPU
    assert_equivalent(steps_armt(), steps_ids(6), options=options, grads=True)
    assert c["steps_compiled"] == 16 and c["steps_cpp_wrapper"] == 16  # grad mode is in the key (9 with grads)
    assert c["steps_cpp_wrapper_failed"] == 0 and c["graphs_compiled_whole"] == 0
