"""runtime/specialize: one compiled graph per distinct set of sizes, compiled on its
first call; past the limit one graph for all sizes, built once (warned once); when a
compile fails, Dynamo's graph runs."""

import logging

import torch
import torch.fx as fx

import diagpass
from diagpass.runtime.specialize import SizeSpecializations


def _gm() -> fx.GraphModule:
    return fx.symbolic_trace(lambda x: x + 1)


def _specializations(limit=2, fail=False, past_limit=None):
    made = []

    def make(args):
        if fail:
            raise RuntimeError("no graph for you")
        made.append(args[0].shape[0])
        return lambda x: x * 0 + x.shape[0]  # tells which graph ran

    if past_limit is None:
        def past_limit():
            made.append("all sizes")
            return lambda x: x * 0 - 1

    return SizeSpecializations(_gm(), lambda args: (args[0].shape[0],), make, limit, past_limit), made


def test_each_distinct_size_compiles_once_on_its_first_call():
    spec, made = _specializations(limit=4)
    for n in (3, 5, 3, 5, 3):
        torch.testing.assert_close(spec(torch.zeros(n)), torch.full((n,), float(n)))
    assert made == [3, 5]
    assert diagpass.counters["specialize"]["graphs_compiled"] == 2


def test_sizes_past_the_limit_run_one_graph_for_all_sizes_with_one_warning(caplog):
    spec, made = _specializations(limit=2)
    with caplog.at_level(logging.WARNING, logger="diagpass"):
        outs = [spec(torch.zeros(n)) for n in (1, 2, 3, 4, 3, 1)]
    assert made == [1, 2, "all sizes"]  # built once, on the first size past the limit
    torch.testing.assert_close(outs[2], -torch.ones(3))
    torch.testing.assert_close(outs[5], torch.ones(1))  # a size met before the limit keeps its graph
    assert diagpass.counters["specialize"]["sizes_past_limit"] == 2  # sizes 3 and 4, each once
    warnings = [r for r in caplog.records if "sets of input sizes" in r.getMessage()]
    assert len(warnings) == 1 and "max_size_specializations" in warnings[0].getMessage()


def test_a_graph_for_all_sizes_that_cannot_be_built_runs_dynamos_graph(caplog):
    def broken():
        raise RuntimeError("no dynamic graph")

    spec, _ = _specializations(limit=1, past_limit=broken)
    with caplog.at_level(logging.WARNING, logger="diagpass"):
        spec(torch.zeros(1))
        torch.testing.assert_close(spec(torch.zeros(2)), torch.ones(2))  # x + 1: Dynamo's graph
    assert "could not be built (RuntimeError: no dynamic graph)" in caplog.text


def test_a_graph_that_does_not_compile_runs_dynamos_graph(caplog):
    spec, _ = _specializations(fail=True)
    with caplog.at_level(logging.WARNING, logger="diagpass"):
        torch.testing.assert_close(spec(torch.zeros(2)), torch.ones(2))
        torch.testing.assert_close(spec(torch.zeros(2)), torch.ones(2))
    assert diagpass.counters["specialize"]["graphs_failed"] == 1  # not retried
    assert "did not compile (RuntimeError: no graph for you)" in caplog.text
