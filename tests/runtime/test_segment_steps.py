"""Segment steps end to end: each distinct segment compiled once, outputs, gradients and
the state a model keeps in its attributes equal eager, and a new segment count reuses
the compiled steps. aot_eager (each step through AOTAutograd) in the default suite;
Inductor under the slow marker."""

import pytest
import torch

import diagpass
import diagpass.runtime.segment_steps
from diagpass.models.family import FamilyConfig, build_family_model
from diagpass.report import report_count, reports_since
from diagpass.testing import assert_equivalent, assert_matches_eager
from tests.helpers import Autocast, research_shape, steps_armt, steps_ids

# nothing batches (no wavefront has that many cells): the sequential graph runs, as steps
STEPS = {"inner": "aot_eager", "segment_steps": True, "min_group": 10**6}


def test_inference_compiles_three_steps_for_six_segments_and_matches():
    mark = report_count()
    assert_equivalent(steps_armt(), steps_ids(6), options=STEPS, expect_batched=False)
    (report,) = reports_since(mark)
    assert report.segment_steps == {"steps": 6, "structures": 3}
    c = diagpass.counters["segment_steps"]
    assert c["steps_compiled"] == 3 and c["step_cache_hits"] == 3 and c["calls_uncompiled"] == 0


def test_the_option_off_compiles_the_graph_whole():
    mark = report_count()
    assert_equivalent(steps_armt(), steps_ids(4), options={**STEPS, "segment_steps": False}, expect_batched=False)
    assert diagpass.counters["segment_steps"]["graphs"] == 0
    assert all(r.segment_steps is None for r in reports_since(mark))


def test_a_new_segment_count_reuses_the_compiled_steps():
    model = steps_armt()
    compiled = torch.compile(model, backend="diagonal", options=STEPS)
    with torch.no_grad():
        assert_matches_eager(model, compiled(steps_ids(5)), steps_ids(5))
        first = diagpass.counters["segment_steps"]["steps_compiled"]
        assert_matches_eager(model, compiled(steps_ids(8)), steps_ids(8))  # Dynamo recompiles, sizes symbolic
    c = diagpass.counters["segment_steps"]
    # every step hits, the last one too: the size of the input it reads is baked in, and the
    # step it then becomes is the one the static graph compiled
    assert first == 3 and c["steps_compiled"] == first
    assert c["step_cache_hits"] == 2 + 8  # 5 sites then 8: 3 compiled, every other one a hit
    assert c["graphs_compiled_whole"] == 0  # a hit passes the site's own tensors to the kernel


def test_gradients_flow_through_every_step():
    assert_equivalent(steps_armt(), steps_ids(5), options=STEPS, grads=True, expect_batched=False)
    assert diagpass.counters["segment_steps"]["steps_compiled"] == 3


def test_state_kept_in_module_attributes_matches_eager():
    cfg = FamilyConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=64, segment_size=8,
                       num_mem_tokens=2, memory_kind="associative", state_in_attributes=True)
    eager, model = (build_family_model(cfg, seed=0).eval() for _ in range(2))
    ids = torch.randint(0, 64, (1, 8 * 5), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="diagonal", options=STEPS)
    with torch.no_grad():
        assert_matches_eager(eager, compiled(ids), ids)  # runs ``eager`` too: its attributes are set
    assert diagpass.counters["segment_steps"]["graphs"] == 1
    # aot_eager's decompositions round differently from eager (the inline graph: the same)
    for mine, theirs in zip(model.memory_modules(), eager.memory_modules()):
        for name in theirs._state_names:
            torch.testing.assert_close(getattr(mine, name), getattr(theirs, name), rtol=1e-4, atol=1e-4)


def test_a_step_that_does_not_compile_falls_back_to_the_whole_graph(monkeypatch, caplog):
    def broken(gm, inputs, inner, rewritten=False):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(diagpass.runtime.segment_steps, "inner_compile", broken)
    model = steps_armt()
    compiled = torch.compile(model, backend="diagonal", options=STEPS)
    with torch.no_grad():
        for _ in range(2):
            assert_matches_eager(model, compiled(steps_ids(5)), steps_ids(5))
    assert diagpass.counters["segment_steps"]["graphs_compiled_whole"] == 1
    assert "a segment step failed (RuntimeError: no kernel for you); compiling the graph whole" in caplog.text


def test_a_step_the_cpp_wrapper_fails_on_uses_the_python_wrapper(monkeypatch, caplog):
    """Inductor's C++ wrapper is a per-call saving: a step it cannot compile keeps steps
    (the Python wrapper), not the whole graph. aot_eager stands in for Inductor here."""
    real = diagpass.runtime.segment_steps.inner_compile
    seen = []

    def no_cpp(gm, inputs, inner, rewritten=False, cpp_wrapper=False):
        seen.append(cpp_wrapper)
        if cpp_wrapper:
            raise RuntimeError("no C++ for you")
        return real(gm, inputs, "aot_eager", rewritten)

    monkeypatch.setattr(diagpass.runtime.segment_steps, "inner_compile", no_cpp)
    caplog.set_level("INFO", logger="diagpass")
    with torch.no_grad():
        assert_equivalent(steps_armt(), steps_ids(5), options={**STEPS, "inner": "inductor"}, expect_batched=False)
    c = diagpass.counters["segment_steps"]
    assert seen == [True, False] * 3 and c["steps_cpp_wrapper_failed"] == 3 and c["steps_cpp_wrapper"] == 0
    assert c["graphs_compiled_whole"] == 0 and c["steps_compiled"] == 3
    assert "did not compile with the C++ wrapper (RuntimeError: no C++ for you); using the Python wrapper" in caplog.text


def test_the_cpp_wrapper_is_asked_for_only_with_inductor_and_the_option_on(monkeypatch):
    """The option off, or another inner compiler, never asks for it."""
    real = diagpass.runtime.segment_steps.inner_compile
    seen = []

    def spy(gm, inputs, inner, rewritten=False, cpp_wrapper=False):
        seen.append(cpp_wrapper)
        return real(gm, inputs, "aot_eager", rewritten)

    monkeypatch.setattr(diagpass.runtime.segment_steps, "inner_compile", spy)
    with torch.no_grad():
        assert_equivalent(steps_armt(), steps_ids(4), options={**STEPS, "inner": "inductor", "step_cpp_wrapper": False},
                          expect_batched=False)
        assert_equivalent(steps_armt(), steps_ids(4), options=STEPS, expect_batched=False)
    assert seen and not any(seen)


def test_a_transformer_xl_cache_under_inductor_matches_eager():
    """A Transformer-XL step returns its input hidden states (detached) as the next cache:
    an output that views an input, the case Inductor got wrong inside shared subgraphs."""
    cfg = FamilyConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2, segment_size=4, num_mem_tokens=2,
                       memory_kind="xl_cache")
    model = build_family_model(cfg, seed=3).eval()
    ids = torch.randint(0, 32, (2, 4 * 5), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="diagonal")  # the defaults: the cost rule refuses, steps
    with torch.no_grad():
        for _ in range(2):
            assert_matches_eager(model, compiled(ids), ids)
    assert diagpass.counters["segment_steps"]["graphs"] == 1
    assert diagpass.counters["segment_steps"]["steps_compiled"] >= 2



def test_a_model_under_autocast_runs_as_steps_and_matches_eager():
    """bf16 autocast inside forward: the steps (each entering the region) compile three
    structures, outputs stay bf16 and equal eager's, gradients too."""
    mark = report_count()
    assert_equivalent(Autocast(steps_armt()), steps_ids(5), options=STEPS, expect_batched=False, rtol=1e-2, atol=1e-2)
    (report,) = reports_since(mark)
    assert report.segment_steps == {"steps": 5, "structures": 3}
    assert_equivalent(Autocast(steps_armt()), steps_ids(5), options=STEPS, expect_batched=False, grads=True,
                      rtol=2e-2, atol=2e-2)
    assert diagpass.counters["segment_steps"]["graphs_compiled_whole"] == 0



@pytest.mark.parametrize("form", [pytest.param("layer_major", marks=pytest.mark.slow), "official_horizontal"])
def test_a_second_segment_count_of_layer_major_loops_compiles_no_new_step(form):
    """Layer-major loops cat each layer's segments and slice them again. In the second
    count's dynamic graph the last piece is symbolic; seen through all the same, no
    segment reads a later one, so the graph is cut and every step is a hit."""
    model = research_shape(form)
    compiled = torch.compile(model, backend="diagonal", options=STEPS)
    reports = []
    with torch.no_grad():
        for S in (5, 8):
            ids = torch.randint(0, 128, (1, 8 * S), generator=torch.Generator().manual_seed(S))
            mark = report_count()
            out = compiled(ids)
            reports += reports_since(mark)  # before the check: beyond 1e-5 it compiles a reference
            assert_matches_eager(model, out, ids)
            if S == 5:
                first = diagpass.counters["segment_steps"]["steps_compiled"]
    assert [r.segment_steps["steps"] for r in reports] == [5, 8]
    c = diagpass.counters["segment_steps"]
    assert first == 3 and c["steps_compiled"] == first and c["graphs_compiled_whole"] == 0


@pytest.mark.slow  # Inductor compiles; CI runs -m slow too
def test_inductor_steps_match_eager_in_inference_and_training():
    options = {**STEPS, "inner": "inductor"}
    c = diagpass.counters["segment_steps"]
    assert_equivalent(steps_armt(), steps_ids(5), options=options, expect_batched=False)
    assert c["steps_compiled"] == 3 and c["steps_cpp_wrapper"] == 3  # the C++ wrapper, on the CPU
    assert_equivalent(steps_armt(), steps_ids(5), options=options, grads=True, expect_batched=False)
    assert c["steps_compiled"] == 6 and c["steps_cpp_wrapper"] == 6  # grad mode is in the key; backward too
    assert c["steps_cpp_wrapper_failed"] == 0 and c["graphs_compiled_whole"] == 0


@pytest.mark.slow
def test_a_cpp_wrapper_step_still_checks_its_inputs_sizes_and_strides():
    """The C++ wrapper keeps Inductor's input checks: an argument with other strides
    raises (a step then falls back to the whole graph) instead of being read wrongly."""
    from diagpass.runtime.inner import inner_compile

    gm = torch.fx.symbolic_trace(lambda x, w: (torch.relu(x @ w) + 1,))
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    step = inner_compile(gm, [x, w], "inductor", cpp_wrapper=True)
    torch.testing.assert_close(step(x, w)[0], torch.relu(x @ w) + 1)
    with pytest.raises(RuntimeError, match="stride"):
        step(x.t().contiguous().t(), w)
