"""Weights stored stacked (diagpass.stack_weights_) are read as views, never wrongly."""

import pytest
import torch

import diagpass
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.testing import assert_equivalent
from diagpass.weights import stacked_view


def _model(arch="llama", stacked=True):
    model = build_armt(arch, num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    randomize_memory_(model)
    if stacked:
        diagpass.stack_weights_(model.layers)
    return model


def _ids(S=6, batch=1):
    return torch.randint(0, 128, (batch, 8 * S), generator=torch.Generator().manual_seed(0))


def test_stack_weights_keeps_parameters_and_values():
    model = _model(stacked=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
    roles = diagpass.stack_weights_(model.layers)
    assert roles == len(list(model.layers[0].parameters()))
    assert diagpass.stack_weights_(model.layers) == roles  # idempotent: already stacked
    assert {n: p for n, p in model.named_parameters()} == params  # same Parameter objects
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    q = [layer.layer.self_attn.q_proj.weight for layer in model.layers]
    view = stacked_view(q)
    assert view is not None and view.data_ptr() == q[0].data_ptr()
    torch.testing.assert_close(view, torch.stack(q), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), out, rtol=0, atol=0)


def test_stacked_view_refuses_anything_else():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    assert stacked_view([a, b]) is None  # two storages
    big = torch.randn(3, 4, 4)
    assert stacked_view([big[0], big[2]]) is None  # not consecutive
    assert stacked_view([big[1], big[0]]) is None  # wrong order
    assert stacked_view([big[0].t(), big[1].t()]) is None  # not contiguous
    assert stacked_view([big[0], big[1]]).shape == (2, 4, 4)


@pytest.mark.parametrize("inner", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
def test_inference_reads_views_and_matches(inner):
    model = _model()
    assert_equivalent(model, _ids(), options={"inner": inner}, expect_batched=True)
    c = diagpass.counters["stacked_weights"]
    assert c["view_calls"] == 1 and c["copying_calls"] == 0
    assert c["stacked_graphs_compiled"] == 1


def test_unstacked_model_copies_and_never_compiles_the_variant():
    model = _model(stacked=False)
    assert_equivalent(model, _ids(), options={"inner": "eager"}, expect_batched=True)
    c = diagpass.counters["stacked_weights"]
    assert c["copying_calls"] == 1 and c["view_calls"] == 0 and c["stacked_graphs_compiled"] == 0


def test_broken_layout_after_compile_falls_back_to_copying():
    """A parameter replaced after compilation (load_state_dict(assign=True),
    .to(), manual surgery) is no longer a slice of the stack: the views would
    read stale weights. The dispatch must notice and copy."""
    model = _model()
    ids = _ids()
    fast = torch.compile(model, backend="diagonal", options={"inner": "eager"})
    with torch.no_grad():
        fast(ids)
        w = model.layers[1].layer.mlp.up_proj.weight
        w.data = w.data.clone() * 1.5  # same Parameter, new storage
        expected = model(ids)
        got = fast(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    c = diagpass.counters["stacked_weights"]
    assert c["view_calls"] == 1 and c["copying_calls"] == 1


@pytest.mark.slow
def test_optimizer_steps_keep_the_layout_and_training_copies():
    model = _model(arch="gpt2")
    ids = _ids(S=5, batch=2)
    assert_equivalent(model, ids, options={"inner": "aot_eager"}, grads=True, expect_batched=True)
    assert diagpass.counters["stacked_weights"]["view_calls"] == 0  # gradients need the copying graph
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()  # in place: the parameters stay slices of their stacks
    torch._dynamo.reset()
    diagpass.counters.clear()
    assert_equivalent(model, ids, options={"inner": "eager"}, expect_batched=True)
    assert diagpass.counters["stacked_weights"]["view_calls"] == 1


@pytest.mark.slow  # Inductor under dynamic shapes; CI runs -m slow too
def test_dynamic_shapes_never_lift():
    model = _model()
    fast = torch.compile(model, backend="diagonal", options={"inner": "eager"}, dynamic=True)
    with torch.no_grad():
        for batch in (1, 2):
            ids = _ids(batch=batch)
            torch.testing.assert_close(fast(ids), model(ids), rtol=1e-5, atol=1e-5)
    c = diagpass.counters["stacked_weights"]
    assert c["stacked_graphs_compiled"] == 0 and c["view_calls"] == 0


def test_gqa_with_weights_stored_stacked_compiles_batches_and_matches():
    """Regression: compiling the stacked-weights variant inside Dynamo's tracing
    context gave the stacked views' sizes symbols of Dynamo's ShapeEnv; with
    GQA's expand a guard on them made Dynamo's guard building fail
    (IndexError in produce_guards_verbose). It now compiles on first call."""
    import diagpass
    from diagpass.models.armt import build_armt, randomize_memory_
    from diagpass.testing import assert_equivalent

    model = build_armt("llama", hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, vocab_size=64, segment_size=8, num_mem_tokens=2, d_mem=4)
    randomize_memory_(model)
    diagpass.stack_weights_(model.layers)
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(0))
    before = diagpass.counters["stacked_weights"]["stacked_graphs_compiled"]
    report = assert_equivalent(model, ids, options={"inner": "aot_eager", "cost_model": False}, expect_batched=True)
    assert report.graphs[0].num_wavefronts == 4 + 3 - 1
    assert diagpass.counters["stacked_weights"]["stacked_graphs_compiled"] == before + 1


@pytest.mark.slow  # Inductor compiles; CI runs -m slow too
def test_cached_stacks_serve_inference_and_follow_every_weight_update():
    """cache_weight_stacks: stacked once, reused, rebuilt after an in-place update
    (a stale stack would give the old weights' output)."""
    model = _model(stacked=False)
    ids = _ids()
    compiled = torch.compile(model, backend="diagonal", options={"inner": "aot_eager", "cache_weight_stacks": True})
    c = diagpass.counters["stacked_weights"]
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
        assert c["cached_stacks_built"] == 1 and c["cached_stack_calls"] == 2 and c["copying_calls"] == 0
        model.layers[1].layer.self_attn.q_proj.weight.mul_(1.5)  # version counter moves
        expected = model(ids)
        torch.testing.assert_close(compiled(ids), expected, rtol=1e-5, atol=1e-5)
        assert c["cached_stacks_built"] == 2
        model.layers[2].layer.mlp.up_proj.weight.data = torch.randn_like(model.layers[2].layer.mlp.up_proj.weight)
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)  # new storage
        assert c["cached_stacks_built"] == 3
    assert diagpass.reports()[-1].batched


def test_cached_stacks_are_not_used_when_gradients_flow_into_the_weights():
    """A call that needs weight gradients stacks per call: the same graph, so the
    same gradients bit for bit as without the option."""
    ids = _ids()
    grads = []
    for cache in (True, False):
        model = _model(stacked=False)
        compiled = torch.compile(model, backend="diagonal", options={"inner": "eager", "cache_weight_stacks": cache})
        compiled(ids).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        torch._dynamo.reset()
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0)
    c = diagpass.counters["stacked_weights"]
    assert c["copying_calls"] == 2 and c["cached_stack_calls"] == 0 and c["cached_stacks_built"] == 0
