"""diagpass.explain reports what the compiled run does (batched, wavefronts,
reason), on models whose state Dynamo lifts differently: memory in module
attributes, the official 2024 ARMT shape, the layer-major shape, a plain ARMT,
and RMT, which must be refused for its last-to-first-layer dependence."""

import pytest
import torch

import diagpass
from diagpass.models.family import FamilyConfig, build_family_model

OPTIONS = {"inner": "eager", "cost_model": False}


def _explain_and_compile(model, ids):
    explained = diagpass.explain(model, ids, options=OPTIONS)
    assert len(explained.graphs) == 1 and not explained.graph_breaks
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="diagonal", options=OPTIONS)
    with torch.no_grad():
        compiled(ids)
    return explained.graphs[0], diagpass.reports()[-1]


def _agree(a, b):
    assert (a.batched, a.num_wavefronts, a.reason) == (b.batched, b.num_wavefronts, b.reason)
    assert (a.num_segments, a.num_layers) == (b.num_segments, b.num_layers)
    assert [[len(g) for g in w] for w in a.groups] == [[len(g) for g in w] for w in b.groups]


def _family_ids():
    return torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("outside", [False, True])
def test_attribute_memory(outside):
    config = FamilyConfig(memory_kind="associative", n_layers=3, state_in_attributes=True, memory_params_outside=outside)
    explained, compiled = _explain_and_compile(build_family_model(config, seed=3), _family_ids())
    _agree(explained, compiled)
    assert explained.batched and explained.num_wavefronts == 5 + 3 - 1


def test_layer_major_family():
    config = FamilyConfig(memory_kind="gated", n_layers=3, layer_major=True)
    explained, compiled = _explain_and_compile(build_family_model(config, seed=3), _family_ids())
    _agree(explained, compiled)
    assert explained.batched and explained.num_wavefronts == 7


RMT_REASON = "dependence vector (1, 1 - L): layer L-1 of segment s feeds layer 0 of segment s+1"


def test_family_rmt_refused_for_the_last_to_first_dependence():
    config = FamilyConfig(memory_kind="rmt", n_layers=3)
    explained, compiled = _explain_and_compile(build_family_model(config, seed=3), _family_ids())
    _agree(explained, compiled)
    assert not explained.batched and explained.reason.startswith(RMT_REASON)
    assert explained.num_wavefronts == 5 * 3 and (1, -2) in explained.dependence_vectors


@pytest.mark.slow  # the HF models' Dynamo traces, twice each (explain + compile): ~30 s
@pytest.mark.transformers
def test_hf_models():
    pytest.importorskip("transformers")
    from diagpass.models.armt import build_armt
    from diagpass.models.official_shapes import build_official_shape
    from diagpass.models.rmt import build_rmt

    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    for shape in ("attribute_memory", "horizontal"):
        explained, compiled = _explain_and_compile(build_official_shape(shape, num_layers=3, segment_size=8), ids)
        _agree(explained, compiled)
        assert explained.batched and explained.num_wavefronts == 7, shape
    explained, compiled = _explain_and_compile(build_armt("llama", num_layers=3, segment_size=8).eval(), ids)
    _agree(explained, compiled)
    assert explained.batched and explained.num_wavefronts == 7
    explained, compiled = _explain_and_compile(build_rmt("llama", num_layers=3, segment_size=8).eval(), ids)
    _agree(explained, compiled)
    assert not explained.batched and explained.reason.startswith(RMT_REASON)
    assert "layer" in explained.reason and "shape" not in explained.reason
