"""Tests for the RMT reference model (diagpass.models.rmt)."""

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from diagpass.models import RMT, build_rmt  # noqa: E402
from diagpass.models import hf_layers  # noqa: E402

SEG, MEM = 8, 2


def _ids(b, n, seed=0, lo=0, hi=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (b, n), generator=g)


def _base(arch, num_layers=2):
    return hf_layers.build_base_model(
        arch,
        vocab_size=128,
        hidden_size=64,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=None,
        intermediate_size=None,
        max_positions=64,
        seed=0,
        dtype=torch.float32,
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n", [24, 21, 5])
def test_output_shape(arch, batch, n):
    m = build_rmt(arch, num_layers=2)
    with torch.no_grad():
        out, mem = m(_ids(batch, n), return_state=True)
    assert out.shape == (batch, n, 128)
    assert mem.shape == (batch, MEM, 64)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_matches_hand_loop_over_hf_forward(arch):
    """Reference: for each segment, the HF model's own forward on
    [memory, segment embeddings, memory] (positions restart at 0); the next memory is
    the final-normed last-layer output at the write positions."""
    base = _base(arch)
    m = RMT(base, SEG, MEM).eval()
    ids = _ids(3, 21)
    with torch.no_grad():
        out = m(ids)
        inner = base.base_model
        memory = m.memory.expand(3, -1, -1)
        ref = []
        for seg in ids.split(SEG, dim=1):
            t = seg.shape[1]
            emb = torch.cat([memory, m.embed_tokens(seg), memory], dim=1)
            pos = torch.arange(t + 2 * MEM).unsqueeze(0)
            h = inner(inputs_embeds=emb, position_ids=pos).last_hidden_state  # after final norm
            ref.append(base.get_output_embeddings()(h[:, MEM : MEM + t]))
            memory = h[:, -MEM:]
        ref = torch.cat(ref, dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memory_carries_information(arch):
    m = build_rmt(arch, num_layers=2)
    ids = _ids(2, 24)
    ids2 = ids.clone()
    ids2[:, :SEG] = _ids(2, SEG, seed=1)
    with torch.no_grad():
        out, out2 = m(ids), m(ids2)
    assert (out[:, -SEG:] - out2[:, -SEG:]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_and_prefix_consistent(arch):
    m = build_rmt(arch, num_layers=2)
    ids = _ids(2, 24)
    with torch.no_grad():
        full = m(ids)
        for n in (3, 8, 13, 20):
            torch.testing.assert_close(m(ids[:, :n]), full[:, :n], rtol=1e-5, atol=1e-5)
        ids2 = ids.clone()
        ids2[:, 13] = (ids2[:, 13] + 1) % 128
        out2 = m(ids2)
    torch.testing.assert_close(out2[:, :13], full[:, :13], rtol=0, atol=0)


def test_modules_reused():
    base = _base("llama")
    m = RMT(base, SEG, MEM)
    assert all(a is b for a, b in zip(m.layers, base.model.layers))
    assert m.lm_head is base.lm_head and m.norm is base.model.norm


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dynamo_traces_without_graph_breaks(arch):
    m = build_rmt(arch, num_layers=4)
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(m)(_ids(2, 21))
    finally:
        torch._dynamo.reset()
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


def test_fullgraph_compile_matches_eager():
    m = build_rmt("gpt2", num_layers=2)
    ids = _ids(2, 21)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(m, backend="eager", fullgraph=True)
        with torch.no_grad():
            got, ref = compiled(ids), m(ids)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_gradients_and_detach_every():
    seg0 = _ids(1, SEG, lo=0, hi=10)
    rest = _ids(1, 2 * SEG, seed=3, lo=64, hi=128)
    ids = torch.cat([seg0, rest], dim=1)

    def run(detach_every):
        m = build_rmt("llama", num_layers=2).train()
        out = m(ids, detach_every=detach_every)
        out[:, -SEG:].pow(2).sum().backward()
        return m, out.detach()

    m, out_full = run(None)
    assert m.memory.grad.abs().max() > 0
    assert m.embed_tokens.weight.grad[:10].abs().max() > 0
    m1, out_trunc = run(1)
    assert m1.embed_tokens.weight.grad[:10].abs().max() == 0
    assert m1.memory.grad.abs().max() == 0  # the learned memory only enters segment 0
    torch.testing.assert_close(out_full, out_trunc, rtol=0, atol=0)
