"""Autoregressive generation for :class:`~diagpass.models.armt.ARMT`.

    from diagpass.models.generation import generate
    compiled = torch.compile(model, backend="diagonal")
    out = generate(model, prompt_ids, max_new_tokens=20, compiled=compiled)      # greedy
    out = generate(model, prompt_ids, 20, do_sample=True, top_k=10, seed=0)     # sampled
    out = generate(model, prompt_ids, 20, cache="rerun")                        # reference

How it works
------------
1. **Prefill.** The whole segments of the prompt (``P // segment_size`` of them) are run
   in one call, ``f(prefix, return_state=True)``, where ``f`` is ``compiled`` when given
   (so the diagonal schedule does the prefill) and ``model`` otherwise. That yields the
   per-layer memory state ``[(A_l, z_l)]`` after the last whole segment.
2. **Decode** (``cache="kv"``, default). The state of generation is *(per-layer memory
   state, per-layer key/value cache of the current segment)*. A segment is laid out
   ``[tok_0 .. tok_{T-1} | mem_0 .. mem_{M-1}]`` with causal attention, so token ``t``
   attends only to tokens ``0..t`` of its segment - the memory tokens come *after* it.
   Each new token is therefore run alone (one query position, position id = its index in
   the segment) through every layer: ``x = read(x, state_l)`` as in ``ARMT.forward``, then
   the decoder layer attending to the cached keys/values of the earlier tokens of the
   segment plus its own (a ``transformers.DynamicCache`` passed to the layer through its
   own cache keyword; the version-dependent calling details are in
   :mod:`~diagpass.models.hf_layers`). A trailing partial prompt segment is put into the
   cache in one call.
3. **Segment boundary.** When the segment reaches ``segment_size`` tokens, the M memory
   tokens (positions ``T .. T+M-1``) are run through the layers against the cache, and
   ``AssociativeMemoryLayer.write`` on their outputs - the same function ``forward``
   applies to the same positions - gives the new memory state; the cache is cleared.
   Per token this is O(T) attention work instead of O(T^2), and O(1) in the history.

``cache="rerun"`` keeps the cache-free decoder: for every new token the current partial
segment (its tokens so far + the M memory tokens, exactly the layout ``ARMT.forward``
uses for a trailing partial segment) is re-run through every layer. It computes every
segment with the same modules, shapes and operations as ``forward``, so greedy decoding
with an eager prefill is *bitwise* the no-cache reference "call ``model(all_ids)``, take
the argmax of the last position, append, repeat". The kv decoder computes the same
functions with other shapes (1 query instead of T+M), so its logits differ from the
re-run ones by float rounding (~1e-7 in float32 in the tests); greedy tokens are equal in the tests
(tests/models/test_generation.py), not guaranteed bitwise in general. With a compiled
prefill the state can differ from eager by rounding (Inductor fuses differently).

Architectures: every base the repo builds ARMT over (llama, qwen2, mistral, gpt2,
gpt_neox) decodes with the cache in transformers 5.x. A layer whose forward takes no
``Cache`` object (GPT-2 in transformers 4.4x takes a legacy tuple ``layer_past``) makes
``cache="kv"`` warn with the reason and use the re-run decoder.

Speed (``examples/generate_armt.py --inner eager``, llama d=64, L=4, M=2, one thread
pinned to one shared core): segment 16, 64 tokens: kv ~440 tok/s vs re-run ~290 tok/s
(1.5x); segment 128, 256 tokens: kv ~460 vs ~210 tok/s (2.2x). At this width the time
is per-call overhead, so the gain grows with the segment size.
Only one model is used; no weights are copied.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from . import hf_layers

__all__ = ["generate", "run_segment", "prefill", "KVDecoder", "RerunDecoder", "kv_unsupported"]

CACHE_MODES = ("kv", "rerun")


def run_segment(model, seg_ids: torch.Tensor, states):
    """One segment through every layer, exactly as in ``ARMT.forward``.

    ``seg_ids`` (B, T) with 1 <= T <= segment_size; ``states`` a list of per-layer
    ``(A, z)`` or ``None`` (first segment). Returns ``(logits (B, T, V), new_states)``;
    ``new_states`` is the memory written by this segment (meaningful when T is a whole
    segment).
    """
    B, T = seg_ids.shape
    if not 1 <= T <= model.segment_size:
        raise ValueError(f"segment of {T} tokens (segment_size={model.segment_size})")
    M = model.num_mem_tokens
    mem = model.memory.unsqueeze(0).expand(B, -1, -1)
    ctx = model._context(T + M)
    h = hf_layers.embed_segment(model.embed_tokens, model.pos_embed, model.embed_dropout, seg_ids, None, mem, ctx)
    if states is None:
        states = [None] * model.num_layers
    new_states = []
    for layer, st in zip(model.layers, states):
        h, st = layer(h, st, ctx)
        new_states.append(st)
    return model.lm_head(model.norm(h[:, :T])), new_states


def prefill(model, input_ids: torch.Tensor, compiled: Optional[Callable] = None):
    """Run the whole segments of ``input_ids`` (through ``compiled`` if given).

    Returns ``(logits of the prefix or None, states or None, number of prefilled tokens)``.
    """
    T = model.segment_size
    n = (input_ids.shape[1] // T) * T
    if n == 0:
        return None, None, 0
    fn = compiled if compiled is not None else model
    logits, states = fn(input_ids[:, :n], return_state=True)
    return logits, list(states), n


def _select(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, generator) -> torch.Tensor:
    """(B, V) float logits -> (B, 1) token ids."""
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling")
    logits = logits.float() / temperature
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


class RerunDecoder:
    """Cache-free decoder: re-runs the current partial segment for every new token.

    Bitwise the computation of ``ARMT.forward`` (see module docstring).
    """

    def __init__(self, model, states):
        self.model = model
        self.states = states
        self.cur = None  # token ids of the current segment so far, (B, t)

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` (B, q) to the current segment; logits (B, q, V) of those positions."""
        cur = ids if self.cur is None else torch.cat([self.cur, ids], dim=1)
        logits, new_states = run_segment(self.model, cur, self.states)
        if cur.shape[1] == self.model.segment_size:  # segment complete: keep its memory write
            self.states, self.cur = new_states, None
        else:
            self.cur = cur
        return logits[:, -ids.shape[1] :]


class KVDecoder:
    """Decoder with a per-layer key/value cache of the current segment (module docstring).

    ``pos`` is the number of tokens of the current segment already in ``cache``;
    ``states`` the per-layer memory state (``None`` before the first whole segment).
    """

    def __init__(self, model, states):
        reason = kv_unsupported(model)
        if reason is not None:
            raise RuntimeError(f"no key/value-cache decoding: {reason}")
        self.model = model
        self.states = states
        self.cache = hf_layers.new_cache()
        self.pos = 0

    def _layers(self, h: torch.Tensor, ctx, memory_write: bool) -> torch.Tensor:
        """``h`` through every layer against the cache; with ``memory_write`` (the memory
        tokens of a complete segment) also the new per-layer memory state."""
        states = self.states if self.states is not None else [None] * self.model.num_layers
        new_states = []
        for layer, st in zip(self.model.layers, states):
            if st is not None:
                h = layer.read(h, st)
            h = layer.caller.call_cached(layer.layer, h, ctx, self.cache)
            if memory_write:
                new_states.append(layer.write(h, st))
        if memory_write:
            self.states = new_states
        return h

    def _context(self, q: int):
        m = self.model
        return hf_layers.make_step_context(self.pos, q, like=m.memory, rotary_emb=m.rotary_emb)

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` (B, q) to the current segment; logits (B, q, V) of those positions.

        Completing the segment also runs its memory tokens and starts a new segment.
        """
        m = self.model
        q = ids.shape[1]
        if self.pos + q > m.segment_size:
            raise ValueError(f"{q} tokens do not fit in the segment ({self.pos} of {m.segment_size} used)")
        ctx = self._context(q)
        h = hf_layers.add_positions(m.embed_tokens(ids), m.pos_embed, m.embed_dropout, ctx)
        h = self._layers(h, ctx, memory_write=False)
        self.pos += q
        logits = m.lm_head(m.norm(h))
        if self.pos == m.segment_size:
            self._end_segment(ids.shape[0])
        return logits

    def _end_segment(self, batch: int) -> None:
        """Memory tokens at positions T..T+M-1 over the cached segment -> new memory
        state; then an empty cache for the next segment (positions restart at 0)."""
        m = self.model
        ctx = self._context(m.num_mem_tokens)
        mem = m.memory.unsqueeze(0).expand(batch, -1, -1)
        self._layers(hf_layers.add_positions(mem, m.pos_embed, m.embed_dropout, ctx), ctx, memory_write=True)
        self.cache = hf_layers.new_cache()
        self.pos = 0


def kv_unsupported(model) -> Optional[str]:
    """Why ``model`` cannot decode with a key/value cache (``None`` if it can)."""
    callers = [layer.caller for layer in model.layers]
    if any(c is None for c in callers):
        return "layers without an HF LayerCaller (stand-in layers)"
    return hf_layers.kv_cache_unsupported(callers)


def make_decoder(model, states, cache: str):
    """The decoder for ``cache`` ("kv" or "rerun"); "kv" falls back to "rerun", with a
    warning giving the reason, where the layers cannot drive a cache."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache == "kv":
        reason = kv_unsupported(model)
        if reason is None:
            return KVDecoder(model, states)
        warnings.warn(f"generate(cache='kv') falls back to 'rerun': {reason}", stacklevel=3)
    return RerunDecoder(model, states)


def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    compiled: Optional[Callable] = None,
    cache: str = "kv",
) -> torch.Tensor:
    """Generate ``max_new_tokens`` tokens after ``input_ids`` (B, P), P >= 1.

    Greedy (``do_sample=False``) or sampling with ``temperature`` / ``top_k``. Sampling
    draws from ``generator`` if given, else from a fresh generator seeded with ``seed``
    if given, else from the global RNG. ``compiled``: a compiled version of ``model``
    (e.g. ``torch.compile(model, backend="diagonal")``) used for the prefill of the
    whole prompt segments. ``cache``: ``"kv"`` (per-layer key/value cache of the current
    segment) or ``"rerun"`` (re-run the partial segment per token; the bitwise
    reference). Returns (B, P + max_new_tokens) token ids.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError("input_ids must be (batch, length >= 1)")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if max_new_tokens == 0:
        return input_ids.clone()
    if do_sample and generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)

    with torch.no_grad():
        prefix_logits, states, n = prefill(model, input_ids, compiled)
        decoder = make_decoder(model, states, cache)
        rest = input_ids[:, n:]  # a partial segment (whole segments were prefilled) or empty
        next_logits = prefix_logits[:, -1] if rest.shape[1] == 0 else decoder.feed(rest)[:, -1]
        out = [input_ids]
        for i in range(max_new_tokens):
            tok = _select(next_logits, do_sample, temperature, top_k, generator).to(input_ids.dtype)
            out.append(tok)
            if i == max_new_tokens - 1:
                break
            next_logits = decoder.feed(tok)[:, -1]
        return torch.cat(out, dim=1)
