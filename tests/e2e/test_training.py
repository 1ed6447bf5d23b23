"""Training through backend="diagonal": every parameter's gradient equals eager.

The rewrite happens before AOTAutograd, so the backward of a batched wavefront is
batched too. Cases go through ``inner="aot_eager"`` (real AOTAutograd joint graph,
no codegen: fast); one Inductor case is marked slow. ARMT needs S >= 4 so that two
middle-segment cells share a wavefront (segment 0 and the last segment form their own
groups), hence S in {4, 6}.

Budget: the whole file runs in about 2 minutes on 2 CPU cores (without -m slow); the
matrix is a covering design over (arch, S, L, batch, truncated BPTT) rather than the
full product (each aot_eager case costs 10-30 s of tracing on 2 cores).
"""

import pytest
import torch

import diagpass
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.testing import assert_equivalent
from tests.helpers import middle_cells_that_batch

SEG = 4


def _model(arch, num_layers):
    model = build_armt(arch, num_layers=num_layers, segment_size=SEG, hidden_size=32, d_mem=8, seed=1)
    randomize_memory_(model)  # W_v = 0 at init would make every memory gradient trivial
    return model.train()


def _ids(batch, segments, seed=0):
    return torch.randint(0, 128, (batch, segments * SEG), generator=torch.Generator().manual_seed(seed))


def _memory_params(model):
    names = ["memory"]
    for i in range(model.num_layers):
        names += [f"layers.{i}.{p}" for p in ("W_q.weight", "W_k.weight", "W_v.weight", "w_b.weight", "w_b.bias")]
    return names


# (arch, S, L, batch, detach_every): each value of every factor appears for both archs
# (counting the slow cases, which CI runs too)
CASES = [
    ("llama", 4, 2, 1, None),
    pytest.param("llama", 6, 3, 2, 2, marks=pytest.mark.slow),
    pytest.param("gpt2", 6, 2, 2, None, marks=pytest.mark.slow),
    pytest.param("gpt2", 4, 3, 1, 1, marks=pytest.mark.slow),
    ("gpt2", 4, 2, 1, 3),
]


@pytest.mark.parametrize("arch,segments,layers,batch,detach_every", CASES)
def test_gradients_equal_eager(arch, segments, layers, batch, detach_every):
    model = _model(arch, layers)
    ids = _ids(batch, segments)
    kwargs = {} if detach_every is None else {"detach_every": detach_every}
    assert_equivalent(model, ids, options={"inner": "aot_eager"}, grads=True, expect_batched=True, **kwargs)
    # the detach between segments stays glue: truncated BPTT batches exactly as much
    # as full BPTT (every middle cell that shares its wavefront with another)
    assert diagpass.counters["batch"]["cells"] == len(middle_cells_that_batch(segments, layers)) > 0
    # the compiled run's gradients are left on the model: every parameter got one, and the
    # memory parameters (projections, memory tokens) got a non-trivial one
    # (with detach_every=1 no gradient crosses a segment, so the write projections
    # W_k, W_v, w_b get none and the memory tokens a zero one: the memory tokens come
    # after the segment's tokens, so they act only through later segments' reads)
    params = dict(model.named_parameters())
    write_only = ("W_k.", "W_v.", "w_b.")
    for name, p in params.items():
        if detach_every == 1 and any(w in name for w in write_only):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
            if name in _memory_params(model) and not (detach_every == 1 and name == "memory"):
                assert p.grad.abs().max() > 0, name


def test_truncated_bptt_changes_gradients():
    """Guard for the matrix above: detach_every really reaches the model (eager only)."""
    model = _model("llama", 2)
    ids = _ids(1, 6)

    def grads(**kw):
        model.zero_grad(set_to_none=True)
        model(ids, **kw).pow(2).mean().backward()
        return model.layers[0].W_k.weight.grad.clone()

    assert not torch.allclose(grads(), grads(detach_every=2))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_compiled_forward_without_autograd(mode):
    model = _model("llama", 2)
    ids = _ids(2, 4)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with torch.no_grad():
        expected = model(ids)
    compiled = torch.compile(model, backend="diagonal", options={"inner": "aot_eager"})
    with ctx():
        got = compiled(ids)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert diagpass.counters["backend"]["graphs_batched"] >= 1
    assert diagpass.counters["batch"]["cells"] == len(middle_cells_that_batch(4, 2))


@pytest.mark.slow
def test_gradients_equal_eager_inductor():
    model = _model("llama", 2)
    report = assert_equivalent(
        model, _ids(1, 4), options={"inner": "inductor", "cost_model": False}, grads=True, expect_batched=True, rtol=1e-4, atol=1e-4
    )
    assert report.batched
    # with gradients the calls are inlined: Inductor's backward of shared subgraphs is wrong in torch 2.13
    assert not diagpass.counters["subgraphs"]["calls"]
