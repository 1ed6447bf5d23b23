"""The two code shapes of the official ARMT repository (diagpass.models.official_shapes):
exact against eager (outputs and the module attributes the model mutates) and,
where the passes support the shape, batched with S + L - 1 wavefronts."""

import pytest
import torch

pytest.importorskip("transformers")

import diagpass  # noqa: E402
from diagpass.models.official_shapes import AttributeMemoryLayer, build_official_shape  # noqa: E402
from tests.helpers import middle_cells_that_batch  # noqa: E402

SEG, L = 8, 3
OPTIONS = {"inner": "eager", "cost_model": False}


def _ids(num_segments, extra=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, num_segments * SEG + extra), generator=g)


def _attribute_state(model):
    """What the 2024 shape leaves in its layers: memory tensors and the flag."""
    return [(layer.W_mem.clone(), layer.z.clone(), layer.first_seg) for layer in model.memory_layers]


def _compiled_run(model, ids):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="diagonal", options=OPTIONS)
    with torch.no_grad():
        return compiled(ids), diagpass.reports()[-1]


def _assert_batched_diagonally(report, num_segments, last_joins=True):
    assert report.batched, report.reason
    assert (report.num_segments, report.num_layers) == (num_segments, L)
    assert report.num_wavefronts == num_segments + L - 1
    batched = {c for g in report.batched_groups for c in g}
    assert middle_cells_that_batch(num_segments, L, last_joins) <= batched


def test_attribute_memory_layers_are_written_into_the_hf_models_own_list():
    model = build_official_shape("attribute_memory", num_layers=L, segment_size=SEG)
    hf_list = model.memory_cell.model.model.layers
    assert model.memory_cell.layers is hf_list and all(isinstance(m, AttributeMemoryLayer) for m in hf_list)
    assert model.memory_layers[0].mem.W_mv.weight.abs().sum() > 0  # randomised: memory is not inert


@pytest.mark.parametrize("num_segments,extra", [(5, 0), (4, 3)])
def test_attribute_memory_shape_exact_and_batched(num_segments, extra):
    model = build_official_shape("attribute_memory", num_layers=L, segment_size=SEG)
    ids = _ids(num_segments, extra)
    with torch.no_grad():
        ref = model(ids)
    ref_state = _attribute_state(model)
    assert not torch.equal(ref_state[0][0], torch.zeros_like(ref_state[0][0]))
    out, report = _compiled_run(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (a, z, first), (a_ref, z_ref, first_ref) in zip(_attribute_state(model), ref_state):
        torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
        assert first is first_ref is False
    _assert_batched_diagonally(report, num_segments + (extra > 0), last_joins=extra == 0)  # a shorter one differs


def test_attribute_memory_memory_matters():
    """The memory path changes the logits (else exactness would prove little)."""
    model = build_official_shape("attribute_memory", num_layers=L, segment_size=SEG)
    ids = _ids(3)
    with torch.no_grad():
        ref = model(ids)
        for layer in model.memory_layers:
            layer.mem.W_mv.weight.zero_()
        assert (model(ids)[:, SEG:] - ref[:, SEG:]).abs().max() > 1e-3


def test_horizontal_layers_wrap_at_dot_layer_with_getattr_forwarding():
    model = build_official_shape("horizontal", num_layers=L, segment_size=SEG)
    layer = model.memory_layers[0]
    assert layer.self_attn is layer.layer.self_attn  # reached through __getattr__


@pytest.mark.parametrize("num_segments,extra", [(5, 0), (4, 3)])
def test_horizontal_shape_exact(num_segments, extra):
    model = build_official_shape("horizontal", num_layers=L, segment_size=SEG)
    ids = _ids(num_segments, extra, seed=1)
    with torch.no_grad():
        ref = model(ids)
    out, _ = _compiled_run(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_segments", [5, 6])
def test_horizontal_shape_batched(num_segments):
    """Layer-major: each layer is one run of the graph; partition splits it by
    the calls of the layer's block. Dependence as segment-major ARMT, so the
    same wavefronts and the same group sizes (segment 0: no read; the last
    segment's dead write is given back, passes/complete_cells.py, so it joins)."""
    model = build_official_shape("horizontal", num_layers=L, segment_size=SEG)
    ids = _ids(num_segments, seed=1)
    with torch.no_grad():
        ref = model(ids)
    out, report = _compiled_run(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _assert_batched_diagonally(report, num_segments)
    assert report.dependence_vectors == [(0, 1), (1, 0)]
    middle = [[3]] * (num_segments - 3)  # t = 3 .. S-1: three middle (or last-segment) cells
    assert [[len(g) for g in w] for w in report.groups] == [[1], [1, 1], [2, 1], *middle, [2], [1]]


def test_attribute_memory_shape_with_a_padding_mask_exact_and_batched():
    """A per-segment attention mask with padding: HF builds the 4D causal mask
    in the graph (transformers 4.46: ``causal_mask *= ...`` and a slice
    assignment, in-place on graph-local tensors, functionalized)."""
    num_segments = 5
    model = build_official_shape("attribute_memory", num_layers=L, segment_size=SEG)
    ids = _ids(num_segments)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first sequence
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    torch._dynamo.reset()
    mark = diagpass.report.report_count()
    with torch.no_grad():
        out = torch.compile(model, backend="diagonal", options=OPTIONS)(ids, attention_mask=mask)
    (report,) = diagpass.report.reports_since(mark)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _assert_batched_diagonally(report, num_segments)
    from diagpass.models.hf_layers import transformers_version

    if transformers_version().major < 5:  # 4.46: *= and a slice assignment per segment
        assert report.writes_functionalized >= 2 * num_segments
