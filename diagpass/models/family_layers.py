"""Decoder-layer building blocks for :mod:`diagpass.models.family`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(config) -> nn.Module:
    if config.norm_kind == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def rope_cos_sin(n: int, head_dim: int, base: float, dtype, device):
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(n, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hk, N, hd) -> (B, Hk * n_rep, N, hd), each kv head repeated n_rep times (GQA)."""
    if n_rep == 1:
        return x
    B, Hk, N, hd = x.shape
    return x[:, :, None, :, :].expand(B, Hk, n_rep, N, hd).reshape(B, Hk * n_rep, N, hd)


class Attention(nn.Module):
    """Causal multi-head / grouped-query attention via F.scaled_dot_product_attention.

    ``prefix`` (B, P, d), if given, adds P keys/values in front of the sequence that every
    query may attend (Transformer-XL cache); queries then see prefix + causal current keys.
    """

    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = d // config.n_heads
        self.rope = config.rope
        self.rope_base = config.rope_base
        self.mask_ops = config.mask_ops
        self.autocast_rope = config.autocast_rope
        bias = config.bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)

    def forward(self, x, prefix=None):
        B, N, _ = x.shape
        H, Hk, hd = self.n_heads, self.n_kv_heads, self.head_dim
        kv_in = x if prefix is None else torch.cat([prefix, x], dim=1)
        P = kv_in.shape[1] - N
        q = self.q_proj(x).view(B, N, H, hd).transpose(1, 2)
        k = self.k_proj(kv_in).view(B, P + N, Hk, hd).transpose(1, 2)
        v = self.v_proj(kv_in).view(B, P + N, Hk, hd).transpose(1, 2)
        if self.rope:
            if self.autocast_rope:  # transformers 4.4x's rotary embedding shape
                with torch.autocast(x.device.type, enabled=False):
                    cos, sin = rope_cos_sin(P + N, hd, self.rope_base, x.dtype, x.device)
            else:
                cos, sin = rope_cos_sin(P + N, hd, self.rope_base, x.dtype, x.device)
            q = apply_rope(q, cos[P:], sin[P:])
            k = apply_rope(k, cos, sin)
        k = repeat_kv(k, H // Hk)
        v = repeat_kv(v, H // Hk)
        if self.mask_ops:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=_additive_causal_mask(N, P, x))
        elif P == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.ones(N, P + N, dtype=torch.bool, device=x.device).tril(diagonal=P)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, H * hd))


def _additive_causal_mask(N: int, P: int, x: torch.Tensor) -> torch.Tensor:
    """The causal-with-prefix mask as research code builds it: bool algebra
    with ``&``/``|``, then an additive float mask filled in place."""
    i = torch.arange(N, device=x.device)[:, None]
    j = torch.arange(P + N, device=x.device)[None, :]
    allowed = (j <= i + P) & (j >= 0) | (j < P)
    bias = torch.zeros(N, P + N, dtype=x.dtype, device=x.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias


class GeluMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.ffn_dim, bias=config.bias)
        self.fc_out = nn.Linear(config.ffn_dim, config.d_model, bias=config.bias)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(x)))


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=config.bias)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=config.bias)
        self.inplace = config.inplace_ops

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x), inplace=self.inplace) * self.up_proj(x))


class Block(nn.Module):
    """One layer: attention, MLP, two norms and (optionally) its memory read/write.

    * ``memory is None`` (memory kept outside, or a kind without per-layer memory):
      ``forward(x, prefix=None) -> y`` is the plain decoder layer.
    * functional memory: ``forward(x, state) -> (y, new_state)``.
    * ``state_in_attributes``: ``forward(x) -> y``, state lives in ``self.memory``'s attributes.
    """

    def __init__(self, config, memory: nn.Module | None = None, index: int = 0):
        super().__init__()
        self.post_norm = config.norm_placement == "post"
        self.scale = 1.0 - 0.05 * index if getattr(config, "per_layer_scale", False) else None
        self.inplace = config.inplace_ops
        self.state_in_attributes = config.state_in_attributes
        self.attn = Attention(config)
        self.mlp = SwiGLU(config) if config.ffn_kind == "swiglu" else GeluMLP(config)
        self.norm1 = make_norm(config)
        self.norm2 = make_norm(config)
        self.memory = memory

    def _attn(self, x, prefix=None):
        out = self.attn(x, prefix)
        return out if self.scale is None else out * self.scale

    def decoder_layer(self, x, prefix=None):
        if self.post_norm:
            h = self.norm1(x + self._attn(x, prefix))
            return self.norm2(h + self.mlp(h))
        if self.inplace:  # h = x + attn(...) written into the attention output
            h = self._attn(self.norm1(x), None if prefix is None else self.norm1(prefix))
            h += x
            out = self.mlp(self.norm2(h))
            out += h
            return out
        h = x + self._attn(self.norm1(x), None if prefix is None else self.norm1(prefix))
        return h + self.mlp(self.norm2(h))

    def forward(self, x, state=None, prefix=None):
        mem = self.memory
        if mem is None:
            return self.decoder_layer(x, prefix)
        if self.state_in_attributes:
            x_in, prefix = mem.read_attr(x)
            y = self.decoder_layer(x_in, prefix)
            mem.write_attr(x, y)
            return y
        x_in, prefix = mem.read(x, state)
        y = self.decoder_layer(x_in, prefix)
        return y, mem.write(x, y, state)
