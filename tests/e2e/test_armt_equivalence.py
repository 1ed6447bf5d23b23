"""ARMT over Hugging Face decoders: the diagonal backend equals eager, and batches.

The wide matrix runs with inner="eager" (the rewrite is what is tested);
a few cases go through Inductor.
"""

import pytest
import torch

import diagpass
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.testing import assert_equivalent
from tests.helpers import anti_diagonals, middle_cells_that_batch

L = 3
SEGMENT = 8


def _model(arch, num_layers=L):
    model = build_armt(arch, num_layers=num_layers, segment_size=SEGMENT, num_mem_tokens=2, d_mem=8, seed=1)
    randomize_memory_(model)
    return model


def _ids(batch, segments, partial):
    n = segments * SEGMENT - (3 if partial else 0)
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(segments))


def _check(arch, segments, batch, partial, inner="eager"):
    model = _model(arch)
    # cost_model off: a tiny model on CPU would (rightly) not batch with copied weights
    options = {"inner": inner, "cost_model": False}
    report = assert_equivalent(model, _ids(batch, segments, partial), options=options)
    graph = report.graphs[0]
    assert (graph.num_segments, graph.num_layers) == (segments, L)
    assert graph.num_wavefronts == segments + L - 1
    assert graph.wavefronts == anti_diagonals(segments, L)
    expected = middle_cells_that_batch(segments, L, last_joins=not partial)  # a shorter last segment differs
    got = {c for g in graph.batched_groups for c in g}
    assert got == expected
    assert diagpass.counters["batch"]["cells"] == len(expected)
    assert report.batched == bool(expected)
    if not expected:
        assert report.reason
    return report


@pytest.mark.parametrize("segments", [1, 2, 3, L, 2 * L + 1])
@pytest.mark.parametrize("batch,partial", [(1, False), (1, True), (3, False), (3, True)])
def test_armt_llama_matrix(segments, batch, partial):
    _check("llama", segments, batch, partial)


@pytest.mark.parametrize("segments", [1, 2, 3, L, 2 * L + 1])
@pytest.mark.parametrize("batch,partial", [(1, True), (3, False)])
def test_armt_gpt2_matrix(segments, batch, partial):
    _check("gpt2", segments, batch, partial)


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
def test_armt_other_architectures(arch):
    _check(arch, L, 2, True)


def test_armt_llama_inductor():
    _check("llama", L + 1, 2, True, inner="inductor")


@pytest.mark.slow
def test_armt_gpt2_inductor():
    _check("gpt2", L + 1, 1, False, inner="inductor")


@pytest.mark.slow
def test_armt_aot_eager_gradients():
    model = _model("llama")
    report = assert_equivalent(
        model, _ids(2, L + 2, True), options={"inner": "aot_eager"}, grads=True, expect_batched=True
    )
    assert report.graphs[0].num_wavefronts == 2 * L + 1


def test_memory_is_not_trivial():
    """The equivalence above would prove nothing if memory were zero."""
    model = _model("llama")
    ids = _ids(1, 3, False)
    other = ids.clone()
    other[:, :SEGMENT] = (other[:, :SEGMENT] + 1) % 128
    with torch.no_grad():
        delta = (model(ids)[:, -SEGMENT:] - model(other)[:, -SEGMENT:]).abs().max()
    assert delta > 1e-3
