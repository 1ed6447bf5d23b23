"""ARMT generation (diagpass.models.generation): greedy equals the no-cache reference
exactly, sampling is reproducible, edge cases."""

import pytest
import torch

from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.models.generation import generate, run_segment

SEG = 4
L = 2


def _model(arch):
    model = build_armt(arch, num_layers=L, segment_size=SEG, num_mem_tokens=2, d_mem=8, hidden_size=32, seed=3)
    # std large enough that memory reads visibly change the logits (else the test would
    # not exercise the memory path)
    return randomize_memory_(model, std=2.0, seed=3)


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
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("prompt_len", [SEG, L * SEG, 3 * L * SEG + 3, 2])
def test_greedy_equals_sequential_reference(arch, prompt_len):
    model = _model(arch)
    ids = _prompt(2, prompt_len, seed=prompt_len)
    n = 2 * SEG + 1  # crosses at least two segment boundaries
    got = generate(model, ids, n)
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
