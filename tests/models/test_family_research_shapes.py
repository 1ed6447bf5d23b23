"""The family models in research-code shapes (issue 14): in-place residuals and
``F.silu(inplace=True)``, masks built with ``&``/``|`` + ``masked_fill_``, rope
inside ``autocast(enabled=False)``. Same maths as the plain forms: exact,
batched with the anti-diagonal wavefront count, gradients too."""

from __future__ import annotations

import pytest
import torch

import diagpass
from diagpass.models.family import FamilyConfig, build_family_model
from diagpass.testing import assert_equivalent

S, L, SEG = 5, 3, 4

SHAPES = {
    "inplace_ops": dict(inplace_ops=True, ffn_kind="swiglu"),
    "mask_ops": dict(mask_ops=True),
    "autocast_rope": dict(autocast_rope=True, rope=True),
    "per_layer_scale": dict(per_layer_scale=True),
    "all": dict(inplace_ops=True, mask_ops=True, autocast_rope=True, rope=True, ffn_kind="swiglu", per_layer_scale=True),
}


def _config(kind: str, **shape) -> FamilyConfig:
    return FamilyConfig(
        vocab_size=32, d_model=16, n_layers=L, n_heads=2, segment_size=SEG, num_mem_tokens=2,
        memory_kind=kind, d_mem=2, nu=1, **shape,
    )


# The single shapes are in "all" too: they run under -m slow, "all" in the default suite.
CASES = [
    pytest.param("associative", shape, marks=() if shape == "all" else pytest.mark.slow) for shape in sorted(SHAPES)
] + [("xl_cache", "all")]


@pytest.mark.parametrize("kind,shape", CASES)
def test_research_code_shapes_batch_exactly(kind, shape):
    model = build_family_model(_config(kind, **SHAPES[shape]), seed=3)
    ids = torch.randint(0, 32, (2, S * SEG), generator=torch.Generator().manual_seed(0))
    lifted = diagpass.counters["batch"]["constants_lifted"]
    report = assert_equivalent(model, ids, options={"inner": "eager", "cost_model": False}, expect_batched=True)
    graph = report.graphs[0]
    assert graph.num_wavefronts == S + L - 1
    assert max(len(g) for g in graph.batched_groups) == L
    if SHAPES[shape].get("inplace_ops"):
        assert graph.writes_functionalized > 0
    if SHAPES[shape].get("per_layer_scale"):  # one scale per layer: lifted in every group
        assert diagpass.counters["batch"]["constants_lifted"] - lifted >= len(graph.batched_groups)


@pytest.mark.slow
def test_research_code_shapes_train_exactly():
    # without per_layer_scale: its gradients are checked in tests/passes/test_constants.py, and
    # here they sent the comparison to the slow float64 oracle (108 s instead of 16 s)
    shape = {k: v for k, v in SHAPES["all"].items() if k != "per_layer_scale"}
    model = build_family_model(_config("associative", **shape), seed=4).train()
    ids = torch.randint(0, 32, (2, S * SEG), generator=torch.Generator().manual_seed(1))
    before = diagpass.counters["autocast"]["noop_regions_dropped"]
    assert_equivalent(model, ids, options={"inner": "aot_eager", "cost_model": False}, grads=True, expect_batched=True)
    assert diagpass.counters["autocast"]["noop_regions_dropped"] > before


def _subgraph_calls():
    return diagpass.counters["subgraphs"]["calls"]


def _wavefront_steps():
    return diagpass.counters["wavefront_steps"]["steps_compiled"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["associative", "xl_cache"])
@pytest.mark.parametrize("whole, count", [(True, _subgraph_calls), (False, _wavefront_steps)], ids=["whole", "steps"])
def test_research_code_shapes_under_inductor(kind, whole, count):
    # in-place ops, &/| masks, autocast regions under Inductor: the batched graph compiled whole
    # (every call a shared subgraph; xl_cache returns views of its inputs, computed outside the
    # subgraph) and the default, one compiled step per wavefront
    model = build_family_model(_config(kind, **SHAPES["all"]), seed=3).eval()
    ids = torch.randint(0, 32, (2, S * SEG), generator=torch.Generator().manual_seed(0))
    before = count()
    with torch.no_grad():
        assert_equivalent(model, ids, options={"cost_model": False, "wavefront_steps": not whole}, expect_batched=True)
    assert count() > before
    assert diagpass.counters["wavefront_steps"]["graphs_compiled_whole"] == 0  # no step fell back
    assert diagpass.counters["wavefront_steps"]["steps_cpp_wrapper_failed"] == 0  # each step took the C++ wrapper
