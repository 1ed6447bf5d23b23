"""RMT reference model (Bulatov et al., NeurIPS 2022), decoder-only variant.

Layout of one segment (Q = M + T + M positions, positions restart at 0)::

    [ read_0 .. read_{M-1} | tok_0 .. tok_{T-1} | write_0 .. write_{M-1} ]

Both the read and the write memory tokens take the current memory state as input
(as in the RMT reference ``MemoryCell``); segment 0 uses the learned memory
parameter (M, d). The new memory state is the output of the LAST layer at the write
positions, after the final norm (the RMT code takes ``hidden_states[-1]``, which in
Hugging Face models is the final-normed output); it becomes the read/write input of
the FIRST layer of the next segment. Logits are taken at the T token positions.

Dependence vectors: (0, 1) within a segment and (1, -(L-1)) across segments, so
there is no diagonal parallelism: diagpass must leave this graph alone.
"""

from __future__ import annotations

import torch
from torch import nn

from . import hf_layers
from .hf_layers import SegmentContext

__all__ = ["RMT", "build_rmt"]


class RMT(nn.Module):
    """Recurrent Memory Transformer over a Hugging Face causal LM (modules reused).

    ``forward(input_ids, detach_every=None, return_state=False) -> logits (B, N, vocab)``
    (and the final memory state (B, M, d) with ``return_state=True``).
    """

    def __init__(
        self,
        base_model: nn.Module,
        segment_size: int,
        num_mem_tokens: int,
        *,
        causal: str = "mask",
    ):
        super().__init__()
        if segment_size < 1 or num_mem_tokens < 1:
            raise ValueError("segment_size and num_mem_tokens must be >= 1")
        hf_layers.force_sdpa(base_model)
        self.attn_backend = hf_layers.check_attention_backend(base_model, causal)
        parts = hf_layers.extract_parts(base_model)
        if parts.max_positions is not None and segment_size + 2 * num_mem_tokens > parts.max_positions:
            raise ValueError("segment_size + 2 * num_mem_tokens exceeds the base model's positions")
        self.arch = parts.arch
        self.config = parts.config
        self.causal = causal
        self.segment_size = segment_size
        self.num_mem_tokens = num_mem_tokens
        self.d_model = parts.hidden_size

        self.embed_tokens = parts.embed_tokens
        self.pos_embed = parts.pos_embed
        self.embed_dropout = parts.embed_dropout
        self.rotary_emb = parts.rotary_emb
        self.layers = nn.ModuleList(parts.layers)
        self.callers = hf_layers.make_callers(parts)  # plain objects, one per layer
        self.norm = parts.norm
        self.lm_head = parts.lm_head

        w = self.embed_tokens.weight
        with torch.no_grad():
            mem = torch.randn(num_mem_tokens, self.d_model, dtype=w.dtype, device=w.device) * w.std()
        self.memory = nn.Parameter(mem)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _context(self, q: int) -> SegmentContext:
        return hf_layers.make_context(q, like=self.memory, causal=self.causal, rotary_emb=self.rotary_emb)

    def forward(self, input_ids: torch.Tensor, detach_every: int | None = None, return_state: bool = False):
        if detach_every is not None and detach_every < 1:
            raise ValueError("detach_every must be None or >= 1")
        B = input_ids.shape[0]
        M = self.num_mem_tokens
        memory = self.memory.unsqueeze(0).expand(B, -1, -1)
        contexts: dict[int, SegmentContext] = {}
        logits = []
        for s, seg in enumerate(input_ids.split(self.segment_size, dim=1)):
            if detach_every is not None and s > 0 and s % detach_every == 0:
                memory = memory.detach()
            T = seg.shape[1]
            if T not in contexts:
                contexts[T] = self._context(T + 2 * M)
            ctx = contexts[T]
            h = hf_layers.embed_segment(
                self.embed_tokens, self.pos_embed, self.embed_dropout, seg, memory, memory, ctx
            )
            for layer, caller in zip(self.layers, self.callers):
                h = caller(layer, h, ctx)
            h = self.norm(h)
            memory = h[:, -M:]
            logits.append(self.lm_head(h[:, M : M + T]))
        out = torch.cat(logits, dim=1) if len(logits) > 1 else logits[0]
        if return_state:
            return out, memory
        return out

    def extra_repr(self):
        return (
            f"arch={self.arch}, segment_size={self.segment_size}, num_mem_tokens={self.num_mem_tokens}, "
            f"causal={self.causal!r}, attn={self.attn_backend}"
        )


def build_rmt(
    arch: str = "llama",
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    segment_size: int = 8,
    num_mem_tokens: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    causal: str = "mask",
) -> RMT:
    """Tiny RMT over a randomly initialised base; eval mode; global RNG untouched."""
    base = hf_layers.build_base_model(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_positions=max(64, segment_size + 2 * num_mem_tokens),
        seed=seed,
        dtype=dtype,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = RMT(base, segment_size, num_mem_tokens, causal=causal)
    return model.eval()
