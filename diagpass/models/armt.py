"""ARMT reference model: a Hugging Face causal LM with per-layer associative memory.

Equations: ``shared/ARMT.md`` (ARMT paper, arXiv 2407.04841). ``ARMT.forward`` *is* the
sequential reference: a Python loop over segments and, inside, over layers; the memory
state of each layer is passed functionally (returned by :class:`AssociativeMemoryLayer`),
never stored on a module. Dynamo unrolls the loops into one S x L graph with no graph
breaks.

Layout of one segment (Q = T + M positions, positions restart at 0)::

    [ tok_0 ... tok_{T-1} | mem_0 ... mem_{M-1} ]    causal attention over all Q

Cell (s, l), X = hidden states of layer l-1 (embeddings for l = 0):

    s > 0:  Q = phi(X W_q);  X <- X + (Q A) / (Q z + eps)               (read)
            Y = DecoderLayer_l(X)
            m = Y[:, -M:]; K = phi(m W_k); V = m W_v; beta = sigmoid(m w_b + b)
    s = 0:  A = sum_j beta_j K_j^T V_j ;  z = sum_j K_j                  (Vbar=0, gamma=1)
    s > 0:  Vbar = (K A) / (K z + eps)
            gamma = clip(1 - (K z + eps) / (|K|^2 + eps), 0, 1)          (detached)
            A <- A + sum_j beta_j K_j^T (V_j - Vbar_j);  z <- z + sum_j gamma_j K_j

Segment 0 passes ``state=None`` into every layer: its cells have no read and the simple
write, i.e. they are structurally different from later cells (expected by diagpass).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import hf_layers
from .hf_layers import LayerCaller, SegmentContext

__all__ = ["ARMT", "AssociativeMemoryLayer", "dpfp", "build_armt", "randomize_memory_"]

EPS = 1e-5

State = tuple[torch.Tensor, torch.Tensor]  # (A: (B, d_key, d), z: (B, d_key))


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """DPFP feature map: u = [relu(x), relu(-x)]; phi = concat_{j=1..nu} u * roll(u, j)."""
    u = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([u * torch.roll(u, shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)


class AssociativeMemoryLayer(nn.Module):
    """One decoder layer + its associative memory (W_q, W_k, W_v, w_b).

    ``forward(x, state, ctx) -> (y, new_state)``; ``state`` is ``None`` for segment 0.
    ``caller`` adapts the HF calling convention (see :mod:`hf_layers`); with
    ``caller=None`` the wrapped layer is called as ``layer(x)`` (used by unit tests with a
    stand-in layer).
    """

    def __init__(
        self,
        layer: nn.Module,
        d_model: int,
        d_mem: int,
        num_mem_tokens: int,
        nu: int = 3,
        caller: LayerCaller | None = None,
    ):
        super().__init__()
        if num_mem_tokens < 1:
            raise ValueError("num_mem_tokens must be >= 1")
        self.layer = layer
        self.caller = caller  # plain object, not a Module
        self.d_model = d_model
        self.d_mem = d_mem
        self.nu = nu
        self.d_key = 2 * nu * d_mem
        self.num_mem_tokens = num_mem_tokens
        self.W_q = nn.Linear(d_model, d_mem, bias=False)
        self.W_k = nn.Linear(d_model, d_mem, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)
        self.w_b = nn.Linear(d_model, 1, bias=True)
        nn.init.zeros_(self.W_v.weight)  # as in the ARMT paper: memory starts inert

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return dpfp(x, self.nu)

    def read(self, x: torch.Tensor, state: State) -> torch.Tensor:
        A, z = state
        q = self.phi(self.W_q(x))  # (B, Q, d_key)
        num = torch.matmul(q, A)  # (B, Q, d)
        den = torch.matmul(q, z.unsqueeze(-1)) + EPS  # (B, Q, 1)
        return x + num / den

    def write(self, y: torch.Tensor, state: State | None) -> State:
        m = y[:, -self.num_mem_tokens :]  # (B, M, d)
        k = self.phi(self.W_k(m))  # (B, M, d_key)
        v = self.W_v(m)  # (B, M, d)
        beta = torch.sigmoid(self.w_b(m))  # (B, M, 1)
        if state is None:
            A = torch.matmul(k.transpose(1, 2), beta * v)  # (B, d_key, d)
            z = k.sum(dim=1)  # (B, d_key)
            return A, z
        A, z = state
        kz = torch.matmul(k, z.unsqueeze(-1)) + EPS  # (B, M, 1)
        v_bar = torch.matmul(k, A) / kz  # (B, M, d)
        k_d = k.detach()
        gamma = torch.clamp(
            1.0 - (kz.detach()) / (k_d.pow(2).sum(dim=-1, keepdim=True) + EPS), min=0.0, max=1.0
        )  # (B, M, 1), no gradient
        A = A + torch.matmul(k.transpose(1, 2), beta * (v - v_bar))
        z = z + (gamma * k).sum(dim=1)
        return A, z

    def forward(
        self, x: torch.Tensor, state: State | None, ctx: SegmentContext | None = None
    ) -> tuple[torch.Tensor, State]:
        if state is not None:
            x = self.read(x, state)
        if self.caller is None:
            y = self.layer(x)
        else:
            y = self.caller(self.layer, x, ctx)
        return y, self.write(y, state)

    def extra_repr(self):
        return f"d_model={self.d_model}, d_mem={self.d_mem}, d_key={self.d_key}, nu={self.nu}, M={self.num_mem_tokens}"


class ARMT(nn.Module):
    """Associative Recurrent Memory Transformer over a Hugging Face causal LM.

    Reuses (does not copy) the base model's embeddings, decoder layers, final norm and
    lm_head. ``forward(input_ids) -> logits (B, N, vocab)``.

    ``causal``: ``"mask"`` (explicit additive (1,1,Q,Q) mask, default, backend-agnostic)
    or ``"sdpa_is_causal"`` (``attention_mask=None``; relies on SDPA's is_causal
    inference). Attention is switched to SDPA on construction.
    """

    def __init__(
        self,
        base_model: nn.Module,
        segment_size: int,
        num_mem_tokens: int,
        d_mem: int,
        nu: int = 3,
        *,
        causal: str = "mask",
    ):
        super().__init__()
        if segment_size < 1:
            raise ValueError("segment_size must be >= 1")
        hf_layers.force_sdpa(base_model)
        self.attn_backend = hf_layers.check_attention_backend(base_model, causal)
        parts = hf_layers.extract_parts(base_model)
        if parts.max_positions is not None and segment_size + num_mem_tokens > parts.max_positions:
            raise ValueError(
                f"segment_size + num_mem_tokens = {segment_size + num_mem_tokens} exceeds the base model's "
                f"{parts.max_positions} positions"
            )
        self.arch = parts.arch
        self.config = parts.config
        self.causal = causal
        self.segment_size = segment_size
        self.num_mem_tokens = num_mem_tokens
        self.d_model = parts.hidden_size
        self.d_mem = d_mem
        self.nu = nu
        self.d_key = 2 * nu * d_mem

        self.embed_tokens = parts.embed_tokens
        self.pos_embed = parts.pos_embed
        self.embed_dropout = parts.embed_dropout
        self.rotary_emb = parts.rotary_emb
        callers = hf_layers.make_callers(parts)
        self.layers = nn.ModuleList(
            AssociativeMemoryLayer(layer, self.d_model, d_mem, num_mem_tokens, nu, caller=c)
            for layer, c in zip(parts.layers, callers)
        )
        self.norm = parts.norm
        self.lm_head = parts.lm_head

        w = self.embed_tokens.weight
        with torch.no_grad():
            mem = torch.randn(num_mem_tokens, self.d_model, dtype=w.dtype, device=w.device) * w.std()
        self.memory = nn.Parameter(mem)
        # memory params in the base model's dtype/device
        self.layers.to(dtype=w.dtype, device=w.device)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _context(self, q: int) -> SegmentContext:
        return hf_layers.make_context(q, like=self.memory, causal=self.causal, rotary_emb=self.rotary_emb)

    def forward(
        self,
        input_ids: torch.Tensor,
        detach_every: int | None = None,
        return_state: bool = False,
    ):
        """logits (B, N, vocab); with ``return_state=True`` also the final per-layer
        states ``[(A_l, z_l) for l]``.

        ``detach_every=k``: truncated BPTT, the memory state is detached before every
        segment s with s % k == 0 (s > 0).
        """
        if detach_every is not None and detach_every < 1:
            raise ValueError("detach_every must be None or >= 1")
        B = input_ids.shape[0]
        M = self.num_mem_tokens
        mem = self.memory.unsqueeze(0).expand(B, -1, -1)
        states: list[State | None] = [None] * len(self.layers)
        contexts: dict[int, SegmentContext] = {}
        logits = []
        for s, seg in enumerate(input_ids.split(self.segment_size, dim=1)):
            if detach_every is not None and s > 0 and s % detach_every == 0:
                states = [(A.detach(), z.detach()) for (A, z) in states]
            T = seg.shape[1]
            if T not in contexts:
                contexts[T] = self._context(T + M)
            ctx = contexts[T]
            h = hf_layers.embed_segment(
                self.embed_tokens, self.pos_embed, self.embed_dropout, seg, None, mem, ctx
            )
            for l, layer in enumerate(self.layers):
                h, states[l] = layer(h, states[l], ctx)
            logits.append(self.lm_head(self.norm(h[:, :T])))
        out = torch.cat(logits, dim=1) if len(logits) > 1 else logits[0]
        if return_state:
            return out, states
        return out

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """See :func:`diagpass.models.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def extra_repr(self):
        return (
            f"arch={self.arch}, segment_size={self.segment_size}, num_mem_tokens={self.num_mem_tokens}, "
            f"d_mem={self.d_mem}, nu={self.nu}, causal={self.causal!r}, attn={self.attn_backend}"
        )


@torch.no_grad()
def randomize_memory_(
    model: ARMT, std: float = 1.0, *, seed: int = 0, randomize_memory_tokens: bool = True
) -> ARMT:
    """Make the associative memory non-trivial (in place).

    W_q, W_k, W_v, w_b.weight ~ N(0, std^2 / d); w_b.bias = 0; memory tokens ~ N(0, std^2)
    (if ``randomize_memory_tokens``). With unit-scale memory tokens, keys
    ``phi(m W_k)`` are O(1) so |K|^2 >> 1e-5, and V = m W_v is O(std), so reads change the
    hidden states (token embeddings of the tiny models are ~0.02) visibly.
    Uses its own RNG (``seed``), leaving the global one alone.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    d = model.d_model
    s = std / math.sqrt(d)

    def fill_(p: torch.Tensor, scale: float):
        p.copy_((torch.randn(p.shape, generator=g) * scale).to(dtype=p.dtype, device=p.device))

    for layer in model.layers:
        fill_(layer.W_q.weight, s)
        fill_(layer.W_k.weight, s)
        fill_(layer.W_v.weight, s)
        fill_(layer.w_b.weight, s)
        layer.w_b.bias.zero_()
    if randomize_memory_tokens:
        fill_(model.memory, std)
    return model


def build_armt(
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
    d_mem: int = 16,
    nu: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    causal: str = "mask",
) -> ARMT:
    """Tiny ARMT over a randomly initialised base (``arch`` in llama, qwen2, mistral,
    gpt2, gpt_neox), eval mode, deterministic in ``seed``; global RNG untouched.
    ``intermediate_size`` defaults to 2 * hidden_size."""
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
        model = ARMT(base, segment_size, num_mem_tokens, d_mem, nu, causal=causal)
    return model.eval()
