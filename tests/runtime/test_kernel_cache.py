"""Roll: each distinct batched step compiles once and is reused across graphs."""

import pytest
import torch

import diagpass
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.runtime.kernel_cache import admits_group_size, clear_kernel_cache, symbolic_group_args, symbolic_rows
from diagpass.testing import assert_equivalent, assert_matches_eager


def test_symbolic_group_size_admits_what_the_compile_assumed():
    x, w = torch.zeros(5, 3, 4), torch.zeros(7)
    fakes, shape_env, symbol = symbolic_group_args([x, w], [0, None], 5)
    assert str(fakes[0].shape[0]) == str(symbol) and tuple(fakes[0].shape[1:]) == (3, 4)
    assert tuple(fakes[1].shape) == (7,)  # shared inputs stay static
    assert admits_group_size(shape_env, symbol)(2) and admits_group_size(shape_env, symbol)(64)
    assert not admits_group_size(shape_env, symbol)(1)  # G = 1 compiles with static shapes
    if fakes[0].shape[0] == 5:  # a cell that branches on G: the compile is specialised
        pass
    assert admits_group_size(shape_env, symbol)(5) and not admits_group_size(shape_env, symbol)(4)


def test_rows_of_one_group_share_its_width_as_one_symbol():
    """G = 2 with the rows an entering segment is cat to (G - 1 = 1): one symbol G, the
    row input G - 1, so nothing is specialised to 1 and the widths that keep the relation
    are admitted. A size with no group relation gets a symbol of its own (1: a constant)."""
    rest, stack, weights, other = torch.zeros(1, 3), torch.zeros(2, 3), torch.zeros(2, 4, 4), torch.zeros(1, 5)
    fakes, admits = symbolic_rows([rest, stack, weights, other, 7], [0, 1, 2, 3], [(0, 1), (0, 0), (0, 0), (1, None)])
    G = fakes[1].shape[0]
    assert str(fakes[0].shape[0]) == str(G - 1) and str(fakes[2].shape[0]) == str(G)
    assert fakes[3].shape[0] == 1 and fakes[4] == 7  # specialised as before; numbers pass through
    assert admits((1, 2, 2, 1)) and admits((2, 3, 3, 1)) and admits((9, 10, 10, 1))
    assert not admits((2, 2, 2, 1))  # not G - 1 rows
    assert not admits((1, 2, 3, 1))  # two widths for one group
    assert not admits((0, 1, 1, 1))  # G = 1 is below the symbol's range
    assert not admits((1, 2, 2, 2))  # the constant


def test_a_group_whose_inputs_disagree_on_its_width_gets_a_symbol_per_size():
    fakes, admits = symbolic_rows([torch.zeros(3, 2), torch.zeros(3, 2)], [0, 1], [(0, 0), (0, 1)])
    assert str(fakes[0].shape[0]) == str(fakes[1].shape[0])  # 3 rows each: one size, one symbol
    assert admits((4, 4)) and not admits((4, 3))


def _model():
    model = build_armt("llama", num_layers=4, segment_size=8, num_mem_tokens=2, d_mem=8, seed=3)
    randomize_memory_(model)
    return model


@pytest.mark.parametrize("inner", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow), pytest.param("inductor", marks=pytest.mark.slow)])
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


@pytest.mark.slow
@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_new_segment_count_compiles_no_new_step(inner):
    """S = 4 has groups of at most 2 middle cells (segments 1, 2); S = 6 and
    S = 10 have groups of 3 and 4: the kernel compiled for a symbolic group
    size serves them, zero kernel compilations."""
    clear_kernel_cache()
    model = _model()
    compiled = torch.compile(model, backend="diagonal", options={"roll": True, "inner": inner})
    with torch.no_grad():
        ids = torch.randint(0, 128, (1, 8 * 4))
        assert_matches_eager(model, compiled(ids), ids)
        first = diagpass.counters["roll"]["kernels_compiled"]
        assert first > 0
        for segments in (6, 10):
            ids = torch.randint(0, 128, (1, 8 * segments))
            # eager fp32 itself is up to 5e-5 off fp64 on some inputs at S = 10
            assert_matches_eager(model, compiled(ids), ids)
    assert diagpass.counters["roll"]["kernels_compiled"] == first
    assert diagpass.counters["roll"]["kernels_specialized"] == 0
    assert diagpass.counters["backend"]["graphs_batched"] == 3  # Dynamo traced 3 graphs
    widths = [len(g) for g in diagpass.reports()[-1].batched_groups]
    assert max(widths) == 4  # S = 10 really ran groups wider than any S = 4 had


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
