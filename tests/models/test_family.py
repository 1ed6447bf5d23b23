"""Tests for the recurrent-memory transformer family (diagpass.models.family)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from diagpass.models.family import (
    MEMORY_KINDS,
    PER_LAYER_MEMORY_KINDS,
    FamilyConfig,
    RecurrentTransformer,
    build_family_model,
    cell_schedule,
    dependence_pattern,
    is_diagonal_batchable,
    memory_token_counts,
    num_segments,
)

RECURRENT_KINDS = [k for k in MEMORY_KINDS if k != "none"]
VARIANTS = [(False, False), (True, False), (False, True), (True, True)]  # (attributes, outside)


def tiny(kind: str, **kw) -> FamilyConfig:
    base = dict(vocab_size=32, d_model=16, n_layers=3, n_heads=4, segment_size=6, num_mem_tokens=2,
                d_mem=4, memory_kind=kind)
    base.update(kw)
    return FamilyConfig(**base)


def ids_for(cfg: FamilyConfig, batch: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, n), generator=g)


@pytest.mark.parametrize("kind", MEMORY_KINDS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n", [4, 12, 17])  # shorter than a segment, whole segments, partial last
def test_shapes(kind, batch, n):
    cfg = tiny(kind)
    model = build_family_model(cfg, seed=0)
    assert not model.training
    out = model(ids_for(cfg, batch, n))
    assert out.shape == (batch, n, cfg.vocab_size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_memory_matters(kind):
    # 3 layers, memory_shift 1: even skip_k's climbing memory (reach (L-1)//k segments)
    # and xl_cache's (reach L segments) carry segment 0 to segment 2.
    cfg = tiny(kind)
    model = build_family_model(cfg, seed=1)
    ids = ids_for(cfg, 2, 16)  # segments 6, 6, 4
    ids2 = ids.clone()
    ids2[:, :6] = (ids2[:, :6] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    last_a, last_b = a[:, 12:], b[:, 12:]
    if kind == "none":
        assert torch.equal(last_a, last_b)
        assert torch.equal(a[:, 6:], b[:, 6:])
    else:
        assert (last_a - last_b).abs().max() > 1e-3


@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_causal_across_segments(kind):
    cfg = tiny(kind)
    model = build_family_model(cfg, seed=2)
    ids = ids_for(cfg, 2, 17)
    ids2 = ids.clone()
    ids2[:, 9:] = (ids2[:, 9:] + 3) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("kind", MEMORY_KINDS)
@pytest.mark.parametrize("attributes,outside", VARIANTS[1:])
def test_code_shapes_identical(kind, attributes, outside):
    cfg = tiny(kind, rope=True, n_kv_heads=2)
    ref = build_family_model(cfg, seed=3)
    alt = build_family_model(cfg.replace(state_in_attributes=attributes, memory_params_outside=outside), seed=3)
    ids = ids_for(cfg, 3, 17)
    with torch.no_grad():
        assert torch.equal(ref(ids), alt(ids))
        assert torch.equal(alt(ids), ref(ids))  # attribute state is reset at every call


@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_memory_params_outside_layout(kind):
    cfg = tiny(kind)
    inside = build_family_model(cfg, seed=4)
    outside = build_family_model(cfg.replace(memory_params_outside=True), seed=4)
    if kind in PER_LAYER_MEMORY_KINDS:
        assert len(outside.memories) == cfg.n_layers
        assert all(b.memory is None for b in outside.layers)
        assert all(b.memory is not None for b in inside.layers)
    else:
        assert outside.memories is None
    ci, co = inside.canonical_named_parameters(), outside.canonical_named_parameters()
    assert [n for n, _ in ci] == [n for n, _ in co]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(ci, co))


def test_weights_non_trivial_and_seeded():
    cfg = tiny("associative")
    a, b, c = (build_family_model(cfg, seed=s) for s in (5, 5, 6))
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(a.embed.weight, c.embed.weight)
    for block in a.layers:
        assert block.memory.W_v.weight.abs().min() > 0  # W_v random, not zero
    assert not torch.equal(a.layers[0].norm1.weight, a.layers[1].norm1.weight)
    # the ARMT read is non-trivial: memory after segment 0 has |K|^2 >> 1e-5
    with torch.no_grad():
        ids = ids_for(cfg, 1, 12)
        m = build_family_model(cfg.replace(state_in_attributes=True), seed=5)
        m(ids)
        for block in m.layers:
            assert block.memory.A.abs().max() > 1e-2
            assert block.memory.z.abs().max() > 1e-2


@pytest.mark.parametrize("kind", MEMORY_KINDS)
@pytest.mark.parametrize("attributes,outside", VARIANTS)
def test_zero_graph_breaks(kind, attributes, outside):
    cfg = tiny(kind, n_layers=2, state_in_attributes=attributes, memory_params_outside=outside)
    model = build_family_model(cfg, seed=7)
    ids = ids_for(cfg, 2, 10)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("kind", MEMORY_KINDS)
@pytest.mark.parametrize("attributes", [False, True])
def test_compiled_fullgraph_matches_eager(kind, attributes):
    cfg = tiny(kind, n_layers=2, state_in_attributes=attributes, norm_placement="post",
               norm_kind="rmsnorm", ffn_kind="swiglu", bias=True)
    model = build_family_model(cfg, seed=8)
    ids = ids_for(cfg, 2, 11)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(ids)
        again = compiled(ids)
        want = model(ids)
    torch._dynamo.reset()
    assert torch.equal(got, want)
    assert torch.equal(again, want)


@pytest.mark.parametrize("kind", MEMORY_KINDS)
@pytest.mark.parametrize("attributes", [False, True])
def test_gradients_flow(kind, attributes):
    cfg = tiny(kind, state_in_attributes=attributes, xl_detach=False)
    model = build_family_model(cfg, seed=9).train()
    model(ids_for(cfg, 2, 16)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def _grad_to_segment0(cfg, detach_every):
    model = build_family_model(cfg.replace(detach_every=detach_every), seed=10)
    captured = []

    def hook(mod, inp, out):
        out.retain_grad()
        captured.append(out)

    handle = model.embed.register_forward_hook(hook)
    out = model(ids_for(cfg, 2, 18))
    handle.remove()
    out[:, 12:].sum().backward()
    g = captured[0].grad
    return 0.0 if g is None else g.abs().max().item()


@pytest.mark.parametrize("kind", RECURRENT_KINDS)
def test_detach_every_truncates_gradients(kind):
    cfg = tiny(kind, xl_detach=False)
    assert _grad_to_segment0(cfg, None) > 0
    assert _grad_to_segment0(cfg, 1) == 0
    # forward values do not depend on truncation
    ids = ids_for(cfg, 2, 18)
    a = build_family_model(cfg, seed=11)(ids)
    b = build_family_model(cfg.replace(detach_every=1), seed=11)(ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["associative", "xl_cache", "rmt"])
def test_dtypes(kind, dtype):
    cfg = tiny(kind, dtype=dtype)
    model = build_family_model(cfg, seed=12)
    assert all(p.dtype == dtype for p in model.parameters())
    out = model(ids_for(cfg, 2, 13))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kind", ["associative", "gated", "linear_attention", "skip_k"])
def test_zero_memory_tokens(kind):
    cfg = tiny(kind, num_mem_tokens=0)
    model = build_family_model(cfg, seed=13)
    assert model.mem_tokens is None
    ids = ids_for(cfg, 2, 16)
    ids2 = ids.clone()
    ids2[:, 0] = (ids2[:, 0] + 1) % cfg.vocab_size
    with torch.no_grad():
        assert not torch.allclose(model(ids)[:, 12:], model(ids2)[:, 12:])


def test_memory_token_counts():
    assert memory_token_counts(tiny("associative")) == (0, 2)
    assert memory_token_counts(tiny("rmt", num_mem_tokens=3)) == (3, 3)
    assert memory_token_counts(tiny("xl_cache")) == (0, 0)
    assert memory_token_counts(tiny("none")) == (0, 0)


def test_dependence_pattern_and_batchability():
    L = 3
    for kind in ("associative", "gated", "linear_attention", "xl_cache"):
        assert dependence_pattern(tiny(kind, n_layers=L)) == {(0, 1), (1, 0)}
        assert is_diagonal_batchable(tiny(kind, n_layers=L))
    assert dependence_pattern(tiny("rmt", n_layers=L)) == {(0, 1), (1, -2)}
    assert not is_diagonal_batchable(tiny("rmt", n_layers=L))
    assert is_diagonal_batchable(tiny("rmt", n_layers=1))  # one layer: (1, 0)
    assert dependence_pattern(tiny("skip_k", n_layers=L, memory_shift=2)) == {(0, 1), (1, 2)}
    assert not is_diagonal_batchable(tiny("skip_k", n_layers=L, memory_shift=2))
    assert dependence_pattern(tiny("skip_k", n_layers=L, memory_shift=3)) == {(0, 1)}
    assert is_diagonal_batchable(tiny("skip_k", n_layers=L, memory_shift=3))
    assert dependence_pattern(tiny("none", n_layers=L)) == {(0, 1)}
    assert is_diagonal_batchable(tiny("none", n_layers=L))
    assert dependence_pattern(tiny("none", n_layers=1)) == set()


def test_cell_schedule():
    S, L = 4, 3
    waves = cell_schedule(tiny("associative", n_layers=L), S)
    assert len(waves) == S + L - 1
    assert all(s + l == t for t, w in enumerate(waves) for s, l in w)
    assert max(len(w) for w in waves) == min(S, L)
    assert len(cell_schedule(tiny("rmt", n_layers=L), S)) == S * L
    none = cell_schedule(tiny("none", n_layers=L), S)
    assert len(none) == L and all(len(w) == S for w in none)
    skip = cell_schedule(tiny("skip_k", n_layers=L, memory_shift=1), S)
    assert sorted(c for w in skip for c in w) == [(s, l) for s in range(S) for l in range(L)]
    # (1, k) with k >= 1 points to an earlier level: every layer level runs all segments at once
    assert skip == [[(s, l) for s in range(S)] for l in range(L)]
    assert num_segments(tiny("none"), 13) == 3


def test_skip_k_large_shift_runs():
    cfg = tiny("skip_k", n_layers=2, memory_shift=5)
    model = build_family_model(cfg, seed=14)
    assert all(b.memory.W_w is None for b in model.layers)
    assert model(ids_for(cfg, 1, 13)).shape == (1, 13, cfg.vocab_size)


@pytest.mark.parametrize(
    "bad",
    [
        dict(memory_kind="bogus"),
        dict(memory_kind="rmt", num_mem_tokens=0),
        dict(n_heads=3),
        dict(n_kv_heads=3),
        dict(memory_shift=0),
        dict(detach_every=0),
        dict(ffn_kind="relu"),
        dict(norm_placement="sandwich"),
        dict(norm_kind="batchnorm"),
        dict(segment_size=0),
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        tiny("associative", **bad)


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(MEMORY_KINDS),
    n_layers=st.integers(1, 3),
    heads=st.sampled_from([(2, 2), (4, 2), (4, 1), (4, 4)]),
    ffn=st.sampled_from(["gelu_mlp", "swiglu"]),
    placement=st.sampled_from(["pre", "post"]),
    norm=st.sampled_from(["layernorm", "rmsnorm"]),
    rope=st.booleans(),
    seg=st.integers(1, 5),
    mem=st.integers(0, 2),
    shift=st.integers(1, 3),
    detach_every=st.sampled_from([None, 1, 2]),
    batch=st.integers(1, 2),
    n=st.integers(1, 11),
    attributes=st.booleans(),
    outside=st.booleans(),
)
def test_random_configs_code_shapes_agree(kind, n_layers, heads, ffn, placement, norm, rope, seg, mem, shift,
                                          detach_every, batch, n, attributes, outside):
    if kind == "rmt":
        mem = max(mem, 1)
    cfg = FamilyConfig(vocab_size=16, d_model=8, n_layers=n_layers, n_heads=heads[0], n_kv_heads=heads[1],
                       ffn_kind=ffn, norm_placement=placement, norm_kind=norm, rope=rope, segment_size=seg,
                       num_mem_tokens=mem, memory_kind=kind, d_mem=2, memory_shift=shift,
                       detach_every=detach_every)
    ids = ids_for(cfg, batch, n)
    with torch.no_grad():
        ref = build_family_model(cfg, seed=15)(ids)
        alt = build_family_model(cfg.replace(state_in_attributes=attributes, memory_params_outside=outside),
                                 seed=15)(ids)
    assert ref.shape == (batch, n, cfg.vocab_size)
    assert torch.isfinite(ref).all()
    assert torch.equal(ref, alt)


def test_is_nn_module():
    model = RecurrentTransformer(tiny("gated"))
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == 3
