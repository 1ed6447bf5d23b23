"""Cost: on CPU, batching with weights copied per call is refused where the
copy outweighs the work; stored-stacked weights and other inners batch."""

import math

import pytest
import torch

import diagpass
import diagpass.backend
import diagpass.runtime.segment_steps
import diagpass.runtime.subgraphs
from diagpass import Options
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.passes.cost import CPU_COPY_BYTES_PER_FLOP, BatchingCost, sequential_peak_bytes
from diagpass.testing import assert_equivalent
from tests.helpers import analyze, dynamo_graph

COST_REASON = "cost: on CPU, batching with layer weights copied per call does not pay"
MEMORY_REASON = "memory: stacking the layer weights per call would raise the peak"
FLOPS_ONLY = {"max_memory_ratio": 1e9}  # the FLOP rule alone (the memory rule refuses tiny models first)


def _model():
    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8, seed=1)
    randomize_memory_(model)
    return model


def _ids(S):
    return torch.randint(0, 128, (1, 8 * S), generator=torch.Generator().manual_seed(0))


def _layer_weight_bytes(model):
    return sum(p.numel() * p.element_size() for layer in model.layers for p in layer.parameters())


@pytest.mark.slow  # Inductor compiles; CI runs -m slow too
def test_cost_counts_every_layer_weight_and_matmuls_linear_in_segments():
    model = _model()
    reports = []
    for S in (4, 8):
        gm, _ = dynamo_graph(model, _ids(S))
        reports.append(analyze(gm, Options())[1])
    four, eight = reports
    assert four.cost.startswith(f"copying {_layer_weight_bytes(model) / 2**20:.1f} MiB")
    flops = [r.bytes_per_flop for r in reports]
    # same weights, twice the cells: half the bytes per FLOP (within the first/last segment's extra ops)
    assert 1.8 < flops[0] / flops[1] < 2.2


def test_cost_describes_itself():
    cost = BatchingCost(weight_copy_bytes=2**20, matmul_flops=10**9)
    assert cost.bytes_per_flop == pytest.approx(2**20 / 1e9)
    assert cost.describe() == "copying 1.0 MiB of layer weights per call against 1.00 GFLOP of layer matmuls (1.0e-03 B/FLOP)"
    assert BatchingCost(1, 0).bytes_per_flop == float("inf")


def _refused(gm, inputs, options) -> bool:
    before = diagpass.counters["backend"]["graphs_not_batched_cost"]
    rewritten, report = analyze(gm, options, inputs)
    refused = rewritten is None and report.reason is not None and report.reason.startswith((COST_REASON, MEMORY_REASON))
    assert refused == (diagpass.counters["backend"]["graphs_not_batched_cost"] == before + 1)
    assert refused or rewritten is not None
    return refused


def test_copying_tiny_model_on_cpu_does_not_pay_unless_told_or_stacked(monkeypatch):
    model = _model()
    gm, inputs = dynamo_graph(model, _ids(5))
    assert analyze(gm, Options())[1].bytes_per_flop > CPU_COPY_BYTES_PER_FLOP
    assert _refused(gm, inputs, Options(**FLOPS_ONLY))
    _, report = analyze(gm, Options(**FLOPS_ONLY), inputs)
    assert report.reason.startswith(COST_REASON)
    assert "stack_weights_" in report.reason and "cost_model" in report.reason
    assert not _refused(gm, inputs, Options(cost_model=False))
    assert not _refused(gm, inputs, Options(inner="aot_eager"))
    assert not _refused(gm, inputs, Options(roll=True))
    assert not _refused(gm, inputs, Options(cache_weight_stacks=True))  # stacked once, not per call
    assert analyze(gm, Options())[0] is not None  # explain's call: no inputs, no decision
    with monkeypatch.context() as m:  # a model with more work per weight byte
        m.setattr(diagpass.pipeline, "CPU_COPY_BYTES_PER_FLOP", 1.0)
        assert not _refused(gm, inputs, Options(**FLOPS_ONLY))

    diagpass.stack_weights_(model.layers)  # nothing to copy: batching always pays
    gm, inputs = dynamo_graph(model, _ids(5))
    with torch.no_grad():  # views are read when no gradient flows into the weights
        assert not _refused(gm, inputs, Options())
    assert _refused(gm, inputs, Options())  # with gradients the stacks are copies again


def test_copying_that_would_raise_peak_memory_is_refused_whatever_the_flops(monkeypatch):
    monkeypatch.setattr(diagpass.pipeline, "CPU_COPY_BYTES_PER_FLOP", 1.0)  # the FLOP rule says: pays
    model = _model()
    gm, inputs = dynamo_graph(model, _ids(5))
    ratio = analyze(gm, Options())[1].copy_memory_ratio
    assert ratio > 1.1  # tiny: the weights are most of the sequential peak
    assert _refused(gm, inputs, Options())
    _, report = analyze(gm, Options(), inputs)
    assert report.reason.startswith(MEMORY_REASON)
    assert "stack_weights_" in report.reason and f"'max_memory_ratio': {math.ceil(10 * ratio) / 10:g}" in report.reason
    assert not _refused(gm, inputs, Options(max_memory_ratio=ratio + 0.01))
    assert not _refused(gm, inputs, Options(cache_weight_stacks=True))  # the user allowed the copy
    diagpass.stack_weights_(model.layers)
    gm, inputs = dynamo_graph(model, _ids(5))
    with torch.no_grad():  # stored stacks read as views: nothing copied
        assert not _refused(gm, inputs, Options())


def test_sequential_peak_counts_each_storage_once_until_its_last_use():
    def f(x):
        a = x + 1
        b = a * 2  # a, b and x live here: the peak
        c = b.view(-1)  # a view: no new bytes
        return c.sum()

    gm, _ = dynamo_graph(f, torch.zeros(10, 100))
    assert sequential_peak_bytes(gm) == 3 * 4000


@pytest.mark.slow
def test_inductor_on_cpu_leaves_tiny_model_sequential_and_says_why():
    model = _model()
    report = assert_equivalent(model, _ids(5), options={"inner": "inductor"}, expect_batched=False)
    assert report.graphs[0].reason.startswith((COST_REASON, MEMORY_REASON))
    assert "stack_weights_" in report.graphs[0].reason
    assert diagpass.counters["backend"]["graphs_not_batched_cost"] == 1
    assert diagpass.counters["batch"]["cells"] == 0  # refused before the batch pass ran


@pytest.mark.slow  # Inductor compiles; CI runs -m slow too
def test_cost_refusal_is_revisited_per_call_when_weights_get_stacked(monkeypatch):
    """Dynamo does not guard on storage: the graph compiled (sequentially, by the cost rule)
    for copied weights is reused after ``stack_weights_``; that call must batch."""
    for module in (diagpass.backend, diagpass.runtime.subgraphs, diagpass.runtime.segment_steps):
        monkeypatch.setattr(module, "inner_compile", lambda gm, inputs, inner, rewritten=False: gm.forward)
    model = _model()
    ids = _ids(5)
    with torch.no_grad():
        expected = model(ids)
    compiled = torch.compile(model, backend="diagonal", options={"inner": "inductor"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), expected)
    assert diagpass.counters["backend"]["graphs_not_batched_cost"] == 1
    assert diagpass.counters["batch"]["cells"] == 0
    refused = diagpass.reports()[-1]
    assert refused.reason.startswith((COST_REASON, MEMORY_REASON)) and refused.weight_inputs

    diagpass.stack_weights_(model.layers)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), expected)
    assert diagpass.counters["stacked_weights"]["batched_after_cost"] == 1
    assert diagpass.counters["stacked_weights"]["stacked_graphs_compiled"] == 1
    assert diagpass.counters["stacked_weights"]["copying_calls"] == 0
    late = diagpass.reports()[-1]
    assert late.batched and late.reason is None and late.num_wavefronts == refused.num_wavefronts
    cells = diagpass.counters["batch"]["cells"]
    assert cells > 0

    with torch.no_grad():  # later stacked calls reuse the batched graph
        compiled(ids)
    assert diagpass.counters["stacked_weights"]["batched_after_cost"] == 1
    assert diagpass.counters["stacked_weights"]["view_calls"] == 2
    out = compiled(ids)  # gradients into the weights: the stacks would be copies again
    torch.testing.assert_close(out, expected)
    assert diagpass.counters["stacked_weights"]["view_calls"] == 2
    assert diagpass.counters["batch"]["cells"] == cells


@pytest.mark.slow
def test_inductor_graph_left_sequential_batches_once_weights_are_stacked():
    model = _model()
    ids = _ids(5)
    with torch.no_grad():
        expected = model(ids)
        compiled = torch.compile(model, backend="diagonal", options={"inner": "inductor"})
        torch.testing.assert_close(compiled(ids), expected)
        assert diagpass.counters["batch"]["cells"] == 0
        diagpass.stack_weights_(model.layers)
        torch.testing.assert_close(compiled(ids), expected, rtol=1e-5, atol=1e-5)
    assert diagpass.counters["stacked_weights"]["batched_after_cost"] == 1
    assert diagpass.counters["stacked_weights"]["view_calls"] == 1
    assert diagpass.reports()[-1].batched


def test_sdpa_called_with_keywords_is_counted():
    """transformers 4.46 GPT-NeoX calls SDPA as (query=, key=, value=): counted, not
    an internal error (it left that model unbatched)."""
    import torch.nn.functional as F

    from diagpass.passes.cost import node_flops
    from tests.helpers import analyze, dynamo_graph

    class Attn(torch.nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(query=q, key=q * 2, value=q)

    gm, _ = dynamo_graph(Attn(), torch.randn(1, 2, 5, 4))
    sdpa = [n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert sdpa and not sdpa[0].args
    assert node_flops(sdpa[0]) == 4 * (1 * 2 * 5 * 4) * 5
