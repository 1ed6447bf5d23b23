"""Tests for the ARMT reference model (diagpass.models.armt)."""

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from diagpass.models import ARMT, AssociativeMemoryLayer, build_armt, dpfp, randomize_memory_  # noqa: E402
from diagpass.models import hf_layers  # noqa: E402

ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2"]
SEG, MEM = 8, 2


def _ids(b, n, seed=0, lo=0, hi=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (b, n), generator=g)


def _base(arch, num_layers=2, **kw):
    return hf_layers.build_base_model(
        arch,
        vocab_size=128,
        hidden_size=64,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=kw.pop("num_kv_heads", None),
        intermediate_size=None,
        max_positions=64,
        seed=0,
        dtype=torch.float32,
    )


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n", [24, 21, 5])  # 3 full segments; partial last; S=1 shorter than a segment
def test_output_shape(arch, batch, n):
    m = randomize_memory_(build_armt(arch, num_layers=2))
    with torch.no_grad():
        out, states = m(_ids(batch, n), return_state=True)
    assert out.shape == (batch, n, 128)
    assert torch.isfinite(out).all()
    assert len(states) == 2
    for A, z in states:
        assert A.shape == (batch, m.d_key, 64)
        assert z.shape == (batch, m.d_key)
    assert m.d_key == 2 * 3 * 16


def test_gqa_and_bf16_smoke():
    m = build_armt("llama", num_layers=2, num_heads=4, num_kv_heads=2, dtype=torch.bfloat16)
    randomize_memory_(m)
    with torch.no_grad():
        out = m(_ids(2, 19))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 19, 128)
    assert torch.isfinite(out.float()).all()


# ------------------------------------------------------- adapter vs Hugging Face forward


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("causal", ["mask", "sdpa_is_causal"])
def test_inert_memory_equals_segmentwise_hf_forward(arch, causal):
    """Fresh ARMT (W_v = 0 -> A = 0 -> reads add exactly 0) == the HF model's own forward
    on [segment embeddings, memory] with positions 0..T+M-1, segment by segment.
    Checks the per-architecture layer calling convention (mask, rotary, wpe, returns)."""
    base = _base(arch)
    m = ARMT(base, SEG, MEM, 16, causal=causal).eval()
    ids = _ids(3, 21)
    with torch.no_grad():
        out = m(ids)
        ref = []
        for seg in ids.split(SEG, dim=1):
            t = seg.shape[1]
            emb = torch.cat([m.embed_tokens(seg), m.memory.expand(3, -1, -1)], dim=1)
            pos = torch.arange(t + MEM).unsqueeze(0)
            ref.append(base(inputs_embeds=emb, position_ids=pos).logits[:, :t])
        ref = torch.cat(ref, dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_modules_are_reused_not_copied():
    base = _base("llama")
    m = ARMT(base, SEG, MEM, 16)
    for wrapper, layer in zip(m.layers, base.model.layers):
        assert wrapper.layer is layer
    assert m.embed_tokens is base.model.embed_tokens
    assert m.norm is base.model.norm
    assert m.lm_head is base.lm_head
    assert isinstance(m.layers, nn.ModuleList)
    assert all(isinstance(w, AssociativeMemoryLayer) for w in m.layers)
    assert torch.count_nonzero(m.layers[0].W_v.weight) == 0  # zero init as in the paper
    gb = _base("gpt2")
    mg = ARMT(gb, SEG, MEM, 16)
    assert mg.pos_embed is gb.transformer.wpe and mg.layers[1].layer is gb.transformer.h[1]


def test_bad_causal_mode_rejected():
    with pytest.raises(ValueError):
        ARMT(_base("llama"), SEG, MEM, 16, causal="bogus")


# ------------------------------------------------------------------ memory semantics


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memory_matters_only_after_randomisation(arch):
    ids = _ids(2, 24)
    ids2 = ids.clone()
    ids2[:, :SEG] = _ids(2, SEG, seed=1)  # change segment 0 only
    m = build_armt(arch, num_layers=2)
    with torch.no_grad():
        out, st = m(ids, return_state=True)
        out2 = m(ids2)
    for A, _ in st:
        assert torch.count_nonzero(A) == 0  # W_v = 0 -> A stays 0
    torch.testing.assert_close(out[:, -SEG:], out2[:, -SEG:], rtol=0, atol=0)

    randomize_memory_(m)
    with torch.no_grad():
        out, st = m(ids, return_state=True)
        out2 = m(ids2)
    for A, z in st:
        assert A.abs().max() > 1e-2
        assert (z >= 0).all() and z.sum() > 0
    assert (out[:, -SEG:] - out2[:, -SEG:]).abs().max() > 1e-3


def test_keys_far_from_eps_after_randomisation():
    """ARMT.md: |K|^2 >> 1e-5 after randomisation, so gamma/denominators are meaningful."""
    m = randomize_memory_(build_armt("llama", num_layers=2))
    norms = []
    hooks = [
        layer.W_k.register_forward_hook(lambda mod, inp, out: norms.append(dpfp(out).pow(2).sum(-1).min()))
        for layer in m.layers
    ]
    with torch.no_grad():
        m(_ids(2, 24))
    for h in hooks:
        h.remove()
    assert len(norms) == 2 * 3
    assert min(float(n) for n in norms) > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_and_prefix_consistent(arch):
    """Logits at position p depend only on tokens <= p, across segments; the output on a
    prefix (ending mid-segment) equals the prefix of the output."""
    m = randomize_memory_(build_armt(arch, num_layers=2))
    ids = _ids(2, 24)
    with torch.no_grad():
        full = m(ids)
        for n in (3, 8, 13, 16, 20):
            torch.testing.assert_close(m(ids[:, :n]), full[:, :n], rtol=1e-5, atol=1e-5)
        ids2 = ids.clone()
        ids2[:, 13] = (ids2[:, 13] + 1) % 128
        out2 = m(ids2)
    torch.testing.assert_close(out2[:, :13], full[:, :13], rtol=0, atol=0)
    assert (out2[:, 13:] - full[:, 13:]).abs().max() > 1e-4


def test_batch_rows_independent():
    m = randomize_memory_(build_armt("llama", num_layers=2))
    ids = _ids(3, 21)
    with torch.no_grad():
        out = m(ids)
        for i in range(3):
            torch.testing.assert_close(m(ids[i : i + 1]), out[i : i + 1], rtol=1e-5, atol=1e-5)


def test_single_segment_and_exact_multiple():
    m = randomize_memory_(build_armt("llama", num_layers=2))
    with torch.no_grad():
        assert m(_ids(1, SEG)).shape == (1, SEG, 128)  # S = 1, full
        assert m(_ids(1, 1)).shape == (1, 1, 128)  # S = 1, one token
        assert m(_ids(1, SEG + 1)).shape == (1, SEG + 1, 128)  # last segment of length 1


def test_build_is_deterministic_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = randomize_memory_(build_armt("llama", num_layers=2, seed=7))
    b = randomize_memory_(build_armt("llama", num_layers=2, seed=7))
    assert torch.equal(torch.get_rng_state(), before)
    ids = _ids(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)
    c = build_armt("llama", num_layers=2, seed=8)
    assert not torch.equal(a.memory, c.memory) or not torch.equal(a.lm_head.weight, c.lm_head.weight)


# ------------------------------------------------- hand-written ARMT equations (one layer)

EPS = 1e-5


def _hand_phi(x, nu):
    u = torch.cat([x.clamp(min=0), (-x).clamp(min=0)], dim=-1)
    n = u.shape[-1]
    parts = []
    for j in range(1, nu + 1):
        rolled = u[..., [(i - j) % n for i in range(n)]]  # roll by j: rolled[i] = u[i - j]
        parts.append(u * rolled)
    return torch.cat(parts, dim=-1)


def _hand_cell(x, state, Wq, Wk, Wv, wb, b, layer_fn, M, nu):
    """Straightforward per-row, per-token, per-memory-token transcription of ARMT.md."""
    B, Q, _ = x.shape
    if state is not None:
        A, z = state
        rows = []
        for bi in range(B):
            toks = []
            for t in range(Q):
                q = _hand_phi(Wq @ x[bi, t], nu)
                toks.append(x[bi, t] + (q @ A[bi]) / (q @ z[bi] + EPS))
            rows.append(torch.stack(toks))
        x = torch.stack(rows)
    y = layer_fn(x)
    newA, newz = [], []
    for bi in range(B):
        if state is None:
            Ab = torch.zeros(_hand_phi(Wk @ y[bi, 0], nu).shape[0], y.shape[-1], dtype=y.dtype)
            zb = torch.zeros(Ab.shape[0], dtype=y.dtype)
        else:
            Ab, zb = state[0][bi], state[1][bi]
        A_acc, z_acc = Ab, zb
        for j in range(M):
            mj = y[bi, Q - M + j]
            k = _hand_phi(Wk @ mj, nu)
            v = Wv @ mj
            beta = torch.sigmoid(wb @ mj + b)
            if state is None:
                vbar = torch.zeros_like(v)
                gamma = torch.ones((), dtype=y.dtype)
            else:
                vbar = (k @ Ab) / (k @ zb + EPS)  # uses the OLD A, z
                gamma = torch.clamp(1 - (k @ zb + EPS) / (k @ k + EPS), 0, 1).detach()
            A_acc = A_acc + beta * torch.outer(k, v - vbar)
            z_acc = z_acc + gamma * k
        newA.append(A_acc)
        newz.append(z_acc)
    return y, (torch.stack(newA), torch.stack(newz))


@pytest.mark.parametrize("with_state", [False, True])
def test_layer_matches_handwritten_equations(with_state):
    torch.manual_seed(0)
    d, d_mem, M, nu, B, Q = 12, 4, 3, 3, 2, 7
    inner = nn.Sequential(nn.Linear(d, d), nn.Tanh()).double()
    layer = AssociativeMemoryLayer(inner, d, d_mem, M, nu).double()
    with torch.no_grad():
        for p in (layer.W_q.weight, layer.W_k.weight, layer.W_v.weight, layer.w_b.weight):
            p.normal_(0, 0.7)
        layer.w_b.bias.fill_(0.3)
    x = torch.randn(B, Q, d, dtype=torch.float64, requires_grad=True)
    d_key = 2 * nu * d_mem
    state = None
    if with_state:
        A0 = torch.randn(B, d_key, d, dtype=torch.float64, requires_grad=True)
        # z >= 0 as in real runs; row 0 small (gamma strictly inside (0, 1): the detach
        # matters for gradients), row 1 large (gamma clipped to 0)
        scale = torch.tensor([[0.3], [20.0]], dtype=torch.float64)
        z0 = (torch.rand(B, d_key, dtype=torch.float64) * scale).requires_grad_()
        state = (A0, z0)

    y, (A, z) = layer(x, state)
    y_h, (A_h, z_h) = _hand_cell(
        x, state, layer.W_q.weight, layer.W_k.weight, layer.W_v.weight, layer.w_b.weight[0], layer.w_b.bias[0],
        inner, M, nu,
    )
    torch.testing.assert_close(y, y_h)
    torch.testing.assert_close(A, A_h)
    torch.testing.assert_close(z, z_h)
    if with_state:  # both gamma regimes are exercised
        k = dpfp(layer.W_k(y[:, -M:]), nu)
        g = 1 - (k @ z0.unsqueeze(-1) + EPS) / (k.pow(2).sum(-1, keepdim=True) + EPS)
        assert ((g[0] > 0.01) & (g[0] < 0.99)).all()
        assert (g[1] < 0).all()

    # gradients (gamma detached on both sides) agree too
    params = [layer.W_k.weight, layer.W_v.weight, layer.w_b.weight, layer.w_b.bias, x]
    if with_state:
        params += [layer.W_q.weight, A0, z0]  # no read (so W_q unused) in segment 0
    w = [torch.randn_like(t) for t in (y, A, z)]
    loss = sum((a * b).sum() for a, b in zip((y, A, z), w))
    loss_h = sum((a * b).sum() for a, b in zip((y_h, A_h, z_h), w))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads_h = torch.autograd.grad(loss_h, params, allow_unused=True)
    for g1, g2 in zip(grads, grads_h):
        assert g1 is not None and g2 is not None
        torch.testing.assert_close(g1, g2)


def test_dpfp_matches_handwritten():
    x = torch.randn(3, 5, 6)
    torch.testing.assert_close(dpfp(x, 3), _hand_phi(x, 3))
    assert dpfp(x, 3).shape == (3, 5, 2 * 3 * 6)
    assert (dpfp(x, 3) >= 0).all()


def test_segment0_write_is_simple_form():
    """state=None: A = sum_j beta_j K_j^T V_j, z = sum_j K_j (Vbar = 0, gamma = 1), and no read."""
    torch.manual_seed(1)
    layer = AssociativeMemoryLayer(nn.Identity(), 8, 3, 2).double()
    with torch.no_grad():
        layer.W_v.weight.normal_()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    y, (A, z) = layer(x, None)
    torch.testing.assert_close(y, x)  # no read
    k = dpfp(layer.W_k(x[:, -2:]))
    torch.testing.assert_close(z, k.sum(1))


# ---------------------------------------------------------------------- Dynamo


@pytest.mark.parametrize("arch,n", [("llama", 24), ("gpt2", 24), ("llama", 21)])
def test_dynamo_traces_without_graph_breaks(arch, n):
    m = randomize_memory_(build_armt(arch, num_layers=4))
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(m)(_ids(2, n))
    finally:
        torch._dynamo.reset()
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


def test_fullgraph_compile_matches_eager():
    m = randomize_memory_(build_armt("llama", num_layers=2))
    ids = _ids(2, 21)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(m, backend="eager", fullgraph=True)
        with torch.no_grad():
            got = compiled(ids, detach_every=1, return_state=True)
            ref = m(ids, detach_every=1, return_state=True)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- gradients


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_reach_memory_parameters(arch):
    m = randomize_memory_(build_armt(arch, num_layers=3)).train()
    ids = _ids(2, 21)
    logits = m(ids)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 128), _ids(2, 21, seed=5).reshape(-1))
    loss.backward()
    assert m.memory.grad is not None and m.memory.grad.abs().max() > 0
    for i, layer in enumerate(m.layers):
        for name in ("W_q", "W_k", "W_v", "w_b"):
            mod = getattr(layer, name)
            assert mod.weight.grad is not None, (i, name)
            assert mod.weight.grad.abs().max() > 0, (i, name)
        assert layer.w_b.bias.grad.abs() > 0


def test_gradients_flow_with_fresh_zero_wv():
    """Paper init (W_v = 0): W_v itself still gets a gradient (the only way to learn)."""
    m = build_armt("llama", num_layers=2).train()
    m(_ids(1, 16)).sum().backward()
    assert m.layers[0].W_v.weight.grad.abs().max() > 0


def test_detach_every_truncates_bptt():
    """Loss on the last segment only. Tokens 0..9 occur only in segment 0, 64..127 only later;
    with detach_every=1 no gradient reaches segment-0 token embeddings through memory."""
    seg0 = _ids(1, SEG, lo=0, hi=10)
    rest = _ids(1, 2 * SEG, seed=3, lo=64, hi=128)
    ids = torch.cat([seg0, rest], dim=1)

    def seg0_embed_grad(detach_every):
        m = randomize_memory_(build_armt("llama", num_layers=2))
        out = m(ids, detach_every=detach_every)
        out[:, -SEG:].pow(2).sum().backward()
        return m.embed_tokens.weight.grad[:10].abs().max(), out.detach()

    g_full, out_full = seg0_embed_grad(None)
    g_trunc, out_trunc = seg0_embed_grad(1)
    g_2, out_2 = seg0_embed_grad(2)  # detaches before segment 2 only
    assert g_full > 0
    assert g_trunc == 0 and g_2 == 0
    torch.testing.assert_close(out_full, out_trunc, rtol=0, atol=0)
    torch.testing.assert_close(out_full, out_2, rtol=0, atol=0)


def _under_eager_attention(base, armt):
    """(base, armt) with the same weights under eager attention. transformers 5.x
    switches in place (``set_attn_implementation``); 4.46 fixes the attention class
    at construction, so there a twin is built with eager attention and given the
    same weights (ARMT's own parameters included)."""
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation("eager")
        return base, armt
    twin = type(base)._from_config(base.config, attn_implementation="eager")
    twin.load_state_dict(base.state_dict())
    twin.eval()
    twin_armt = ARMT(twin, armt.segment_size, armt.num_mem_tokens, armt.d_mem)
    twin_armt.load_state_dict(armt.state_dict())
    return twin, twin_armt


def test_explicit_mask_is_backend_agnostic():
    """The explicit additive mask gives the same result under eager attention (which has no
    is_causal inference) as under sdpa; relying on is_causal under eager would not be causal."""
    base = _base("llama")
    m = randomize_memory_(ARMT(base, SEG, MEM, 16))
    assert m.attn_backend == "sdpa"
    ids = _ids(2, 21)
    with torch.no_grad():
        ref = m(ids)
        base, m = _under_eager_attention(base, m)
        assert hf_layers.check_attention_backend(base, "mask") == "eager"
        with pytest.raises(ValueError):
            hf_layers.check_attention_backend(base, "sdpa_is_causal")
        torch.testing.assert_close(m(ids), ref, rtol=1e-5, atol=1e-5)
        m.causal = "sdpa_is_causal"  # bypassing the check: eager + no mask = bidirectional
        assert (m(ids) - ref).abs().max() > 1e-4


def test_wrapping_switches_eager_model_to_sdpa():
    base = _base("gpt2")
    if not hasattr(base, "set_attn_implementation"):
        pytest.skip(
            f"transformers {hf_layers.transformers_version()}: the attention class is fixed at "
            "construction, there is no eager model to switch (hf_layers.force_sdpa documents it)"
        )
    base.set_attn_implementation("eager")
    m = ARMT(base, SEG, MEM, 16)
    assert base.config._attn_implementation == "sdpa" and m.attn_backend == "sdpa"


def test_detach_every_validated():
    m = build_armt("llama", num_layers=1)
    with pytest.raises(ValueError):
        m(_ids(1, 16), detach_every=0)
