"""Roll: each distinct batched step compiles once and is reused across graphs."""

import pytest
import torch

import diagpass
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.passes.roll import clear_kernel_cache, power_of_two_chunks
from diagpass.testing import assert_equivalent, assert_matches_eager


def test_power_of_two_chunks():
    assert power_of_two_chunks(1) == [1]
    assert power_of_two_chunks(7) == [4, 2, 1]
    assert power_of_two_chunks(8) == [8]
    assert sum(power_of_two_chunks(13)) == 13


def _model():
    model = build_armt("llama", num_layers=4, segment_size=8, num_mem_tokens=2, d_mem=8, seed=3)
    randomize_memory_(model)
    return model


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_roll_equals_eager_with_gradients(inner):
    clear_kernel_cache()
    model = _model()
    ids = torch.randint(0, 128, (2, 8 * 7 - 3))
    report = assert_equivalent(model, ids, options={"roll": True, "inner": inner}, grads=True, expect_batched=True)
    graph = report.graphs[0]
    assert graph.num_wavefronts == 7 + 4 - 1
    roll = diagpass.counters["roll"]
    # every cell runs through a cached kernel: 28 cells, far fewer compiles
    assert roll["group_calls"] >= 10
    assert 0 < roll["kernels_compiled"] <= 8


def test_new_segment_count_compiles_no_new_step():
    """S = 7 needs group sizes {1, 2, 4} (middle segments 1..5, L = 4); S = 6
    and S = 10 need no size that S = 7 did not: zero kernel compilations."""
    clear_kernel_cache()
    model = _model()
    compiled = torch.compile(model, backend="diagonal", options={"roll": True, "inner": "aot_eager"})
    with torch.no_grad():
        ids = torch.randint(0, 128, (1, 8 * 7))
        assert_matches_eager(model, compiled(ids), ids)
        first = diagpass.counters["roll"]["kernels_compiled"]
        assert first > 0
        for segments in (6, 10):
            ids = torch.randint(0, 128, (1, 8 * segments))
            # eager fp32 itself is up to 5e-5 off fp64 on some inputs at S = 10
            assert_matches_eager(model, compiled(ids), ids)
    assert diagpass.counters["roll"]["kernels_compiled"] == first
    assert diagpass.counters["backend"]["graphs_batched"] == 3  # Dynamo traced 3 graphs


def test_roll_compiles_rmt_cells_once_without_batching():
    """RMT cannot batch, but with roll its S*L cells share a few kernels."""
    from diagpass.models.rmt import build_rmt

    clear_kernel_cache()
    model = build_rmt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, seed=0)
    ids = torch.randint(0, 128, (1, 8 * 6))
    report = assert_equivalent(model, ids, options={"roll": True, "inner": "aot_eager"}, expect_batched=False)
    assert "1 - L" in report.graphs[0].reason
    roll = diagpass.counters["roll"]
    assert roll["group_calls"] == 6 * 3
    assert roll["kernels_compiled"] <= 6  # first/middle/last segment x first/other layer


def test_roll_sequential_baseline_with_huge_min_group():
    clear_kernel_cache()
    model = _model()
    ids = torch.randint(0, 128, (1, 8 * 6))
    assert_equivalent(model, ids, options={"roll": True, "inner": "eager", "min_group": 10**6}, expect_batched=False)
    assert diagpass.counters["roll"]["group_calls"] == 6 * 4
    assert diagpass.counters["batch"]["cells"] == 0
