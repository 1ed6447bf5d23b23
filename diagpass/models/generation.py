"""Autoregressive generation for :class:`~diagpass.models.armt.ARMT`.

    from diagpass.models.generation import generate
    compiled = torch.compile(model, backend="diagonal")
    out = generate(model, prompt_ids, max_new_tokens=20, compiled=compiled)      # greedy
    out = generate(model, prompt_ids, 20, do_sample=True, top_k=10, seed=0)     # sampled

How it works
------------
1. **Prefill.** The whole segments of the prompt (``P // segment_size`` of them) are run
   in one call, ``f(prefix, return_state=True)``, where ``f`` is ``compiled`` when given
   (so the diagonal schedule does the prefill) and ``model`` otherwise. That yields the
   per-layer memory state ``[(A_l, z_l)]`` after the last whole segment.
2. **Decode.** The state of generation is *(per-layer memory state, tokens of the current,
   partial segment)* - nothing else. For each new token the current segment (its tokens
   so far, followed by the M memory tokens, exactly the layout ``ARMT.forward`` uses for a
   trailing partial segment) is run through every layer with the stored memory state, and
   the token is chosen from the logits of its last position.
3. **Segment boundary.** When the current segment reaches ``segment_size`` tokens, the run
   in step 2 *is* the run ``ARMT.forward`` does for that whole segment, memory tokens
   included, so the memory it writes (``AssociativeMemoryLayer.write``) is kept as the new
   state and a new, empty segment starts. Memory is therefore written exactly as
   ``forward`` writes it.

Exactness: every segment is computed with the same modules, the same shapes and the same
operations as ``ARMT.forward`` on the full sequence, so greedy decoding with an eager
prefill is *bitwise* the same as the no-cache reference "call ``model(all_ids)``, take the
argmax of the last position, append, repeat" (tests/models/test_generation.py). With a
compiled prefill the state can differ from eager by rounding (Inductor fuses differently).

Cost / what is NOT done: there is no per-layer key/value cache of the current segment;
each decoded token re-runs the current partial segment (at most ``segment_size + M``
positions) through the layers, i.e. O(T^2) attention work per token inside a segment, but
O(1) in the length of the history (the history lives only in the memory state). Only one
model is used; no weights are copied.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import hf_layers

__all__ = ["generate", "run_segment", "prefill"]


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
) -> torch.Tensor:
    """Generate ``max_new_tokens`` tokens after ``input_ids`` (B, P), P >= 1.

    Greedy (``do_sample=False``) or sampling with ``temperature`` / ``top_k``. Sampling
    draws from ``generator`` if given, else from a fresh generator seeded with ``seed``
    if given, else from the global RNG. ``compiled``: a compiled version of ``model``
    (e.g. ``torch.compile(model, backend="diagonal")``) used for the prefill of the
    whole prompt segments. Returns (B, P + max_new_tokens) token ids.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError("input_ids must be (batch, length >= 1)")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if max_new_tokens == 0:
        return input_ids.clone()
    if do_sample and generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)

    with torch.no_grad():
        prefix_logits, states, n = prefill(model, input_ids, compiled)
        cur = input_ids[:, n:]
        if cur.shape[1] == 0:
            next_logits = prefix_logits[:, -1]
        else:  # partial segment (cannot be whole: whole segments were prefilled)
            logits, _ = run_segment(model, cur, states)
            next_logits = logits[:, -1]
        out = [input_ids]
        for i in range(max_new_tokens):
            tok = _select(next_logits, do_sample, temperature, top_k, generator).to(input_ids.dtype)
            out.append(tok)
            if i == max_new_tokens - 1:
                break
            cur = torch.cat([cur, tok], dim=1)
            logits, new_states = run_segment(model, cur, states)
            next_logits = logits[:, -1]
            if cur.shape[1] == model.segment_size:  # segment complete: keep its memory write
                states = new_states
                cur = cur[:, :0]
        return torch.cat(out, dim=1)
