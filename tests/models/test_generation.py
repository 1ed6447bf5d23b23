"""ARMT generation (diagpass.models.generation): greedy equals the no-cache reference
exactly with both decoders (key/value cache and re-run), the cache is really used,
sampling is reproducible, edge cases."""

from typing import Optional, Tuple

import pytest
import torch
from torch import nn

from diagpass.models import hf_layers
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.models.generation import KVDecoder, RerunDecoder, generate, kv_unsupported, run_segment

SEG = 4
L = 2


def _model(arch):
    model = build_armt(arch, num_layers=L, segment_size=SEG, num_mem_tokens=2, d_mem=8, hidden_size=32, seed=3)
    # std large enough that memory reads visibly change the logits (else the test would
    # not exercise the memory path)
    return randomize_memory_(model, std=2.0, seed=3)


def _skip_legacy_tuple_cache(model):
    """GPT-2 on transformers 4.4x has the legacy tuple cache: key/value decoding is
    refused there and generation falls back to 're-run' (that path is tested by
    ``test_legacy_tuple_cache_is_detected_and_falls_back_to_rerun``). Anything
    else refusing the cache still fails the test."""
    reason = kv_unsupported(model)
    if reason is not None and "legacy tuple cache" in reason and hf_layers.transformers_version().major < 5:
        pytest.skip(f"transformers {hf_layers.transformers_version()}: {reason}")


def _reference(model, ids, n):
    """Sequential, no cache: call the model on everything so far, argmax of the last."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def _prompt(batch, length, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# prompt lengths: 1 segment, L segments, 3L segments + a partial one, shorter than a segment
@pytest.mark.parametrize("cache", ["kv", "rerun"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("prompt_len", [SEG, L * SEG, 3 * L * SEG + 3, 2])
def test_greedy_equals_sequential_reference(arch, prompt_len, cache):
    model = _model(arch)
    ids = _prompt(2, prompt_len, seed=prompt_len)
    n = 2 * SEG + 1  # crosses at least two segment boundaries
    got = generate(model, ids, n, cache=cache)
    assert got.shape == (2, prompt_len + n)
    assert torch.equal(got, _reference(model, ids, n))


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_greedy_with_diagonal_prefill(inner):
    model = _model("llama")
    ids = _prompt(1, 3 * L * SEG + 1, seed=7)  # 6 whole segments: the prefill batches
    compiled = torch.compile(model, backend="diagonal", options={"inner": inner})
    import diagpass

    got = generate(model, ids, 2 * SEG, compiled=compiled)
    assert diagpass.counters["backend"]["graphs_batched"] >= 1
    assert torch.equal(got, _reference(model, ids, 2 * SEG))


def test_memory_matters():
    """Guard: the prompt's early segments change the continuation (memory is exercised)."""
    model = _model("llama")
    ids = _prompt(1, 3 * SEG)
    other = ids.clone()
    other[:, :SEG] = (other[:, :SEG] + 1) % 128
    with torch.no_grad():
        a, b = model(ids)[:, -1], model(other)[:, -1]
    assert (a - b).abs().max() > 1e-3


def test_run_segment_matches_forward_state():
    model = _model("gpt2")
    ids = _prompt(2, 3 * SEG)
    with torch.no_grad():
        logits, states = model(ids, return_state=True)
        st = None
        outs = []
        for seg in ids.split(SEG, dim=1):
            lg, st = run_segment(model, seg, st)
            outs.append(lg)
    assert torch.equal(torch.cat(outs, 1), logits)
    for (a, z), (a2, z2) in zip(states, st):
        assert torch.equal(a, a2) and torch.equal(z, z2)


def test_sampling_is_reproducible():
    model = _model("llama")
    ids = _prompt(2, SEG + 1)
    kw = dict(do_sample=True, temperature=1.5, top_k=20)
    a = generate(model, ids, 2 * SEG, seed=123, **kw)
    b = generate(model, ids, 2 * SEG, seed=123, **kw)
    c = generate(model, ids, 2 * SEG, generator=torch.Generator().manual_seed(123), **kw)
    d = generate(model, ids, 2 * SEG, seed=124, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)
    assert torch.equal(a[:, : ids.shape[1]], ids)


def test_top_k_1_is_greedy():
    model = _model("gpt2")
    ids = _prompt(1, SEG + 2)
    assert torch.equal(generate(model, ids, SEG, do_sample=True, top_k=1, seed=0), generate(model, ids, SEG))


def test_max_new_tokens_zero_and_method():
    model = _model("llama")
    ids = _prompt(2, SEG + 1)
    out = generate(model, ids, 0)
    assert torch.equal(out, ids)
    assert torch.equal(model.generate(ids, 3), generate(model, ids, 3))
    with pytest.raises(ValueError):
        generate(model, ids, -1)
    with pytest.raises(ValueError):
        generate(model, ids[:, :0], 2)


# --- key/value-cache decoding ---------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral", "gpt_neox"])
def test_kv_logits_and_memory_match_rerun(arch):
    """Same tokens fed to both decoders over three segment boundaries: logits agree to
    float rounding, and so does the memory written at each boundary."""
    model = _model(arch)
    _skip_legacy_tuple_cache(model)
    ids = _prompt(2, 2 * SEG + 1, seed=5)
    with torch.no_grad():
        _, states = model(ids[:, : 2 * SEG], return_state=True)
        kv, rr = KVDecoder(model, list(states)), RerunDecoder(model, list(states))
        feeds = [ids[:, 2 * SEG :]] + list(_prompt(2, 3 * SEG - 1, seed=6).split(1, dim=1))
        for tok in feeds:
            a, b = kv.feed(tok), rr.feed(tok)
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert kv.pos == 0 and rr.cur is None  # both just finished a segment
    for (A, z), (A2, z2) in zip(kv.states, rr.states):
        torch.testing.assert_close(A, A2, rtol=1e-5, atol=1e-5 * A2.abs().max().item())
        torch.testing.assert_close(z, z2, rtol=1e-5, atol=1e-5 * z2.abs().max().item())


def _record_layer_calls(model):
    """Forward pre-hooks on the HF decoder layers: (layer index, query positions, cache
    passed?) for every call."""
    calls, handles = [], []
    for i, layer in enumerate(model.layers):
        kw = layer.caller.cache_kwarg

        def hook(mod, args, kwargs, i=i, kw=kw):
            calls.append((i, args[0].shape[1], kwargs.get(kw) is not None))

        handles.append(layer.layer.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_decoding_runs_one_query_position_per_token(arch):
    """The cached path calls every layer with the partial prompt once, then 1 query
    position per decoded token, and the M memory tokens once per completed segment
    (the memory write) - always with a cache; the re-run path re-runs t + M positions."""
    model = _model(arch)
    _skip_legacy_tuple_cache(model)
    M = model.num_mem_tokens
    part = 3
    ids = _prompt(1, L * SEG + part, seed=1)
    n = 3 * SEG + 2  # several segment boundaries inside decoding
    calls, handles = _record_layer_calls(model)
    try:
        generate(model, ids, n, cache="kv")
        kv_calls = list(calls)
        calls.clear()
        generate(model, ids, n, cache="rerun")
        rerun_calls = list(calls)
    finally:
        for h in handles:
            h.remove()
    # prefill of the L whole segments goes through model.forward: L segments x L layers
    prefill = [(l, SEG + M, False) for _ in range(L) for l in range(L)]
    assert kv_calls[: len(prefill)] == prefill
    expected_q, pos = [part], part
    for _ in range(n - 1):  # the last token is chosen, never fed
        expected_q.append(1)
        pos += 1
        if pos == SEG:
            expected_q.append(M)  # memory tokens of the completed segment
            pos = 0
    expected = [(l, q, True) for q in expected_q for l in range(L)]
    assert kv_calls[len(prefill) :] == expected
    assert expected_q.count(M) >= 3  # memory written at >= 3 boundaries while decoding
    assert all(q > 1 and not cached for _, q, cached in rerun_calls)


def test_kv_with_sdpa_is_causal_model():
    """A model built with causal='sdpa_is_causal' (no mask in forward) still decodes with
    an explicit offset mask: SDPA's is_causal would be top-left aligned over the cache."""
    model = build_armt("llama", num_layers=L, segment_size=SEG, num_mem_tokens=2, d_mem=8, hidden_size=32,
                       seed=3, causal="sdpa_is_causal")
    randomize_memory_(model, std=2.0, seed=3)
    ids = _prompt(2, L * SEG + 2, seed=4)
    got = generate(model, ids, 2 * SEG + 1)
    assert torch.equal(got, _reference(model, ids, 2 * SEG + 1))


def test_kv_sampling_reproducible_and_matches_rerun():
    model = _model("llama")
    ids = _prompt(2, SEG + 1)
    kw = dict(do_sample=True, temperature=1.5, top_k=20)
    a = generate(model, ids, 3 * SEG, seed=123, cache="kv", **kw)
    b = generate(model, ids, 3 * SEG, seed=123, cache="kv", **kw)
    c = generate(model, ids, 3 * SEG, seed=123, cache="rerun", **kw)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_causal_mask_with_past_is_the_tail_of_the_full_mask():
    full = hf_layers.causal_additive_mask(7, torch.float32, torch.device("cpu"))
    for past in range(7):
        got = hf_layers.causal_additive_mask(7 - past, torch.float32, torch.device("cpu"), past=past)
        assert torch.equal(got, full[:, :, past:])


class _LegacyTupleLayer(nn.Module):
    """Stand-in with the transformers 4.4x GPT-2 block signature (tuple cache)."""

    self_attn = None

    def forward(
        self,
        hidden_states,
        layer_past: Optional[Tuple[torch.Tensor]] = None,
        attention_mask=None,
        use_cache=False,
    ):
        return (hidden_states,)


class _IgnoresCacheAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_idx = 0


class _IgnoresCacheLayer(nn.Module):
    """Declares a Cache keyword but never stores into it."""

    def __init__(self):
        super().__init__()
        self.attn = _IgnoresCacheAttention()

    def forward(self, hidden_states, attention_mask=None, past_key_values: Optional["Cache"] = None):  # noqa: F821
        return hidden_states


def test_legacy_tuple_cache_is_detected_and_falls_back_to_rerun():
    caller = hf_layers.LayerCaller(_LegacyTupleLayer(), has_rotary_module=False, needs_rotary=False)
    assert caller.cache_kwarg is None and "legacy tuple cache" in caller.cache_unsupported
    assert hf_layers.kv_cache_unsupported([caller]).startswith("layer 0:")
    model = _model("gpt2")
    ids = _prompt(1, SEG + 1)
    ref = generate(model, ids, SEG + 2, cache="rerun")
    model.layers[0].caller.cache_unsupported = caller.cache_unsupported  # as on 4.4x gpt2
    assert kv_unsupported(model) is not None
    with pytest.warns(UserWarning, match="falls back to 'rerun'.*legacy tuple cache"):
        got = generate(model, ids, SEG + 2)
    assert torch.equal(got, ref)
    with pytest.raises(ValueError):
        generate(model, ids, 2, cache="static")


def test_layer_ignoring_the_cache_raises():
    layer = _IgnoresCacheLayer()
    caller = hf_layers.LayerCaller(layer, has_rotary_module=False, needs_rotary=False)
    assert caller.cache_unsupported is None and caller.cache_kwarg == "past_key_values"
    ctx = hf_layers.make_step_context(0, 2, like=torch.zeros(1), rotary_emb=None)
    with pytest.raises(RuntimeError, match="not honoured"):
        caller.call_cached(layer, torch.zeros(1, 2, 4), ctx, hf_layers.new_cache())
