"""A cost estimate too close to call: both variants compiled, timed on real calls, the faster kept."""

import time

import pytest
import torch

import diagpass
import diagpass.runtime.segment_steps
import diagpass.runtime.subgraphs
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.report import report_count, reports_since
from diagpass.runtime.dispatch import Lazy, MeasuredChoice
from diagpass.testing import assert_matches_eager


def _variants(log, slow_s=0.004):
    def slow(*args):
        log.append("slow")
        time.sleep(slow_s)
        return args[0] + 1

    def fast(*args):
        log.append("fast")
        return args[0] + 1

    return {"slow": Lazy(lambda args: slow), "fast": Lazy(lambda args: fast)}


def test_calls_take_turns_then_the_faster_variant_runs():
    log, outcome = [], {}
    choice = MeasuredChoice(_variants(log), default="slow", rounds=3,
                            on_choice=lambda name, medians: outcome.update(name=name, **medians))
    x = torch.zeros(2)
    for calls in range(1, 13):
        out = choice((x,))(x)
        assert len(log) == calls  # one variant per call: a graph writing its inputs writes them once
        torch.testing.assert_close(out, x + 1)
    # 1 untimed + 3 timed calls each, then only the winner
    assert log[:8].count("slow") == 4 and log[:8].count("fast") == 4
    assert set(log[8:]) == {"fast"}
    assert choice.chosen == "fast" and outcome["name"] == "fast"
    assert outcome["slow"] > outcome["fast"]


def test_a_call_that_needs_gradients_runs_the_default_untimed():
    log = []
    choice = MeasuredChoice(_variants(log), default="slow")
    w = torch.zeros(2, requires_grad=True)
    for _ in range(5):
        choice((w,))(w)
    assert log == ["slow"] * 5
    assert choice.chosen is None and all(not s for s in choice.samples.values())
    with torch.no_grad():
        choice((w,))(w)  # inference: timing starts
    assert len(log) == 6 and choice.warm


def _model():
    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8, seed=11)
    randomize_memory_(model)
    return model


@pytest.mark.slow  # two Inductor variants compiled; CI runs -m slow too
def test_a_close_estimate_times_both_and_keeps_one_exactly():
    model = _model()
    ids = torch.randint(0, 128, (1, 8 * 5))
    # any estimate is "close" under this band: the rule's threshold does not decide
    mark = report_count()
    options = {"measure_band": 1e12, "max_memory_ratio": 1e9}  # tiny: the memory rule refuses first
    compiled = torch.compile(model, backend="diagonal", options=options)
    with torch.no_grad():
        for _ in range(10):
            assert_matches_eager(model, compiled(ids), ids)
    (report,) = reports_since(mark)
    assert report.batched and report.measured["chose"] in ("batched", "sequential")
    assert report.measured["batched_ms"] > 0 and report.measured["sequential_ms"] > 0
    chose = diagpass.counters["runtime"]
    assert chose["measured_chose_batched"] + chose["measured_chose_sequential"] == 1
    assert diagpass.counters["backend"]["graphs_measured"] == 1


def _calls_match_eager(model, compiled, ids, calls=10):
    with torch.no_grad():
        for _ in range(calls):
            assert_matches_eager(model, compiled(ids), ids)


@pytest.mark.slow  # two Inductor variants compiled; CI runs -m slow too
def test_weights_stored_stacked_are_timed_against_the_sequential_graph():
    """Reading stored stacks copies nothing, so the cost rule cannot say whether batching pays
    (at batch 4 it did not, README): on CPU the stacked variant is timed against the sequential one."""
    model = _model()
    diagpass.stack_weights_(model.layers)
    ids = torch.randint(0, 128, (1, 8 * 5))
    mark = report_count()
    _calls_match_eager(model, torch.compile(model, backend="diagonal"), ids)
    (report,) = reports_since(mark)
    assert report.batched and report.measured is None  # nothing copied: the copy rule had no say
    assert report.measured_stacked["chose"] in ("batched", "sequential")
    assert report.measured_stacked["batched_ms"] > 0 and report.measured_stacked["sequential_ms"] > 0
    assert diagpass.counters["backend"]["stacked_graphs_measured"] == 1
    chose = diagpass.counters["runtime"]
    assert chose["measured_chose_batched"] + chose["measured_chose_sequential"] == 1
    c = diagpass.counters["stacked_weights"]
    assert c["view_calls"] == 10 and c["stacked_graphs_compiled"] == 1 and c["copying_calls"] == 0


def test_weights_stacked_after_a_cost_refusal_are_timed_too(monkeypatch):
    """The memory rule refused the copy; the first stacked call batches, and is then timed
    against the sequential graph compiled already (graphs run uncompiled: the plumbing)."""
    for module in (diagpass.backend, diagpass.runtime.subgraphs, diagpass.runtime.segment_steps):
        monkeypatch.setattr(module, "inner_compile", lambda gm, inputs, inner, rewritten=False: gm.forward)
    model = _model()
    ids = torch.randint(0, 128, (1, 8 * 5))
    mark = report_count()
    compiled = torch.compile(model, backend="diagonal")
    _calls_match_eager(model, compiled, ids, calls=1)
    refused = reports_since(mark)[0]
    assert not refused.batched and refused.measured_stacked is not None
    diagpass.stack_weights_(model.layers)
    _calls_match_eager(model, compiled, ids)
    assert refused.measured_stacked["chose"] in ("batched", "sequential")
    assert diagpass.counters["stacked_weights"]["batched_after_cost"] == 1
    chose = diagpass.counters["runtime"]
    assert chose["measured_chose_batched"] + chose["measured_chose_sequential"] == 1


def test_band_one_turns_measuring_off():
    model = _model()
    ids = torch.randint(0, 128, (1, 8 * 5))
    mark = report_count()
    with torch.no_grad():
        torch.compile(model, backend="diagonal", options={"measure_band": 1, "max_memory_ratio": 1e9})(ids)
    assert diagpass.counters["backend"]["graphs_measured"] == 0
    assert diagpass.counters["backend"]["stacked_graphs_measured"] == 0
    reports = reports_since(mark)
    assert reports and all(r.measured is None and r.measured_stacked is None for r in reports)


def test_measure_band_below_one_is_refused():
    with pytest.raises(Exception, match="measure_band"):
        torch.compile(_model(), backend="diagonal", options={"measure_band": 0.5})(torch.zeros(1, 16, dtype=torch.long))
