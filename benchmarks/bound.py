"""The even-load bound (issue 16): one segment at batch B*S instead of S segments in turn.

Why: in a recurrent-memory model cell (s, l) needs (s-1, l), so no schedule lets one read of
layer l's weights serve two segments: the diagonal schedule only packs *different* layers'
cells into one call. Running every segment as if it were independent (the S segments stacked
into the batch dim, one pass through the layer stack) does exactly that, with the same total
tokens. No recurrent schedule can beat it, so ``(t_seq - t_diag) / (t_seq - t_bound)`` is the
share of the reachable gain that diagonal takes.

The bound runs the steady-state cell (memory read and full write, as segments s > 0 do), not
segment 0's read-less cell, and returns the new states so the compiler cannot drop the write.
Its output is NOT the model's output (no recurrence): it is for timing only.

``build_bound`` is ARMT's (``diagpass.models.armt``); ``build_family_bound`` does the same for
the research-family models (``diagpass.models.family``) whose layer l reads layer l's state.
"""
from __future__ import annotations

import torch
from torch import nn

from diagpass.models import hf_layers
from diagpass.models.family import STACKABLE_MEMORY_KINDS


class EvenLoadBound(nn.Module):
    """``forward(input_ids (B, S*T)) -> (logits (B, S*T, V), states)`` over ``armt``'s own
    modules (no copy of the weights). ``states``: per-layer ``(A, z)`` read by every segment,
    taken from a real first segment so the read sees non-trivial memory."""

    def __init__(self, armt: nn.Module, states):
        super().__init__()
        self.armt = armt
        for l, (A, z) in enumerate(states):
            self.register_buffer(f"A{l}", A[:1].detach().clone(), persistent=False)
            self.register_buffer(f"z{l}", z[:1].detach().clone(), persistent=False)

    def _state(self, l: int, batch: int):
        A, z = getattr(self, f"A{l}"), getattr(self, f"z{l}")
        return A.expand(batch, *A.shape[1:]), z.expand(batch, *z.shape[1:])

    def forward(self, input_ids: torch.Tensor):
        m = self.armt
        B, N = input_ids.shape
        T, M = m.segment_size, m.num_mem_tokens
        if N % T:
            raise ValueError(f"the bound needs whole segments: N={N} is not a multiple of T={T}")
        seg = input_ids.reshape(B * (N // T), T)  # segment s of row b -> row b*S + s
        ctx = m._context(T + M)
        mem = m.memory.unsqueeze(0).expand(seg.shape[0], -1, -1)
        h = hf_layers.embed_segment(m.embed_tokens, m.pos_embed, m.embed_dropout, seg, None, mem, ctx)
        states = []
        for l, layer in enumerate(m.layers):
            h, st = layer(h, self._state(l, seg.shape[0]), ctx)
            states.append(st)
        logits = m.lm_head(m.norm(h[:, :T]))
        return logits.reshape(B, N, -1), states


@torch.no_grad()
def build_bound(armt: nn.Module, input_ids: torch.Tensor) -> EvenLoadBound:
    """The bound over ``armt``, its memory states taken from ``armt`` run on the first segment."""
    _, states = armt(input_ids[:, : armt.segment_size], return_state=True)
    return EvenLoadBound(armt, states).eval()


def _rows(state, batch: int):
    """Batch row 0 of a state (a tensor or a tuple of them) for every one of ``batch`` rows."""
    if isinstance(state, tuple):
        return tuple(_rows(t, batch) for t in state)
    return state[:1].expand(batch, *state.shape[1:])


class FamilyEvenLoadBound(nn.Module):
    """The bound over a research-family model (``RecurrentTransformer``, memory per layer):
    ``forward(input_ids (B, S*T)) -> (logits (B, S*T, V), states)``, every segment's layer l
    reading the state layer l left after a real first segment (batch row 0's)."""

    def __init__(self, model: nn.Module, states):
        super().__init__()
        self.model, self.states = model, states

    def forward(self, input_ids: torch.Tensor):
        m = self.model
        B, N = input_ids.shape
        T = m.config.segment_size
        if N % T:
            raise ValueError(f"the bound needs whole segments: N={N} is not a multiple of T={T}")
        seg = input_ids.reshape(B * (N // T), T)  # segment s of row b -> row b*S + s
        x = m._wrap_segment(m.embed(seg), None)
        states = []
        for l, state in enumerate(self.states):
            x, st = m._cell(l, x, _rows(state, seg.shape[0]))
            states.append(st)
        return m._logits(x, T).reshape(B, N, -1), states


@torch.no_grad()
def build_family_bound(model: nn.Module, input_ids: torch.Tensor) -> FamilyEvenLoadBound:
    """The bound over ``model``, its states those of ``model``'s cells on the first segment.
    Memory kinds where layer l reads another layer's state, or none, have no such bound."""
    kind = model.config.memory_kind
    if kind not in STACKABLE_MEMORY_KINDS or model.config.state_in_attributes:
        raise ValueError(f"the even-load bound needs a memory state per layer, read by the same layer, "
                         f"held functionally (memory kinds {STACKABLE_MEMORY_KINDS}), not {kind!r}")
    T = model.config.segment_size
    x = model._wrap_segment(model.embed(input_ids[:, :T]), None)
    states = []
    for l in range(model.config.n_layers):
        x, st = model._cell(l, x, None)
        states.append(st)
    return FamilyEvenLoadBound(model, states).eval()
