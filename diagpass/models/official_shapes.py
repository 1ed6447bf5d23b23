"""Test models in the *shapes* of the official ARMT code (not its code).

The official repository (RodkinIvan/associative-recurrent-memory-transformer)
has two code shapes that users run; diagpass must batch both without changes to
them. These models reproduce the structure that matters to the passes — where
the memory lives, how the segment loop runs, how layers are wrapped — over a
tiny Hugging Face LLaMA, written here from scratch:

``AttributeMemoryARMT`` — the 2024 shape (``modeling_amt/language_modeling.py``,
  transformers 4.4x). A memory *cell* wraps the HF causal LM and writes a
  wrapper into the HF model's own ``model.layers`` list (so the list is reachable
  as ``cell.model.model.layers`` and, aliased, as ``cell.layers``). Each wrapper
  keeps its memory in *plain tensor attributes* (``W_mem``, ``z``) reassigned
  per segment, a ``first_seg`` flag, and is reset by ``zero_mem()`` called from
  the recurrent wrapper's forward. The recurrent wrapper runs the whole HF model
  once per segment (segment-major: every layer once per segment).

``HorizontalARMT`` — the current shape (``src/armt.py``, ``ARMTForCausalLM``,
  transformers 5.x, "horizontal" mode). The HF model runs *once* over all
  segments (each followed by its memory tokens); each memory layer (a wrapper
  keeping the HF layer at ``.layer`` and forwarding unknown attributes to it via
  ``__getattr__``) loops over the segments itself, keeps memory in locals, and
  returns ``torch.cat`` of its segment outputs, which the next layer slices
  again (layer-major).

Both use the associative memory of ARMT (DPFP keys, delta-rule write with a
denominator and correction) with one head; like ARMT, the value projection is
zero-initialised, so ``randomize_memory_`` is needed for non-trivial memory.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from diagpass.models import hf_layers

__all__ = ["AttributeMemoryARMT", "HorizontalARMT", "build_official_shape", "randomize_memory_"]

EPS = 1e-5


def _features(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """DPFP: products of the rectified features with nu rolled copies, L2-normalised."""
    u = torch.cat((F.relu(x), F.relu(-x)), dim=-1)
    phi = torch.cat([u * u.roll(j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    return F.normalize(phi, dim=-1)


class _Projections(nn.Module):
    """The four memory projections of one layer (query, key, value, gate)."""

    def __init__(self, d_model: int, d_mem: int):
        super().__init__()
        self.W_mq = nn.Linear(d_model, d_mem, bias=False)
        self.W_mk = nn.Linear(d_model, d_mem, bias=False)
        self.W_mv = nn.Linear(d_model, d_model, bias=False)
        self.W_mb = nn.Linear(d_model, 1)
        nn.init.zeros_(self.W_mv.weight)


def _read(p: _Projections, h: torch.Tensor, mem: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    q = _features(p.W_mq(h))  # (B, T, K)
    return torch.einsum("btk,bkd->btd", q, mem) / (torch.einsum("bk,btk->bt", den, q)[..., None] + EPS)


def _write(p: _Projections, tokens: torch.Tensor, mem, den, first: bool):
    """Delta-rule write of the memory tokens; returns the new (mem, den)."""
    k = _features(p.W_mk(tokens))  # (B, M, K)
    v = p.W_mv(tokens)
    if first:
        old, keep = torch.zeros_like(v), 1.0
    else:
        norm = torch.einsum("bk,bmk->bm", den, k)[..., None] + EPS
        old = torch.einsum("bmk,bkd->bmd", k, mem) / norm
        keep = torch.clamp(1 - norm / (k.norm(dim=-1, keepdim=True) ** 2), 0, 1).detach()
    gate = torch.sigmoid(p.W_mb(tokens))  # (B, M, 1)
    mem = mem + torch.einsum("bmk,bmd->bkd", k, gate * (v - old))
    den = den + (keep * k).sum(dim=1)
    return mem, den


def _hidden(out):
    """A decoder layer's hidden states: a tensor (transformers 5.x) or the first
    element of a tuple (4.4x)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _tiny_llama(num_layers: int, hidden_size: int, seed: int, max_positions: int) -> nn.Module:
    return hf_layers.build_base_model(
        "llama", vocab_size=128, hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
        num_kv_heads=None, intermediate_size=None, max_positions=max_positions, seed=seed, dtype=torch.float32,
    )


# --- the 2024 shape ------------------------------------------------------------


class AttributeMemoryLayer(nn.Module):
    """Written into the HF model's ``layers`` list in place of the decoder layer.

    Memory: ``self.W_mem`` (B, K, D) and ``self.z`` (B, K) are plain tensor
    attributes (not buffers), reassigned after every segment; ``first_seg`` says
    whether there is anything to read."""

    def __init__(self, layer: nn.Module, d_model: int, d_mem: int, num_mem_tokens: int):
        super().__init__()
        self.layer = layer
        self.mem = _Projections(d_model, d_mem)
        self.num_mem_tokens = num_mem_tokens
        self.d_key, self.d_model = 6 * d_mem, d_model
        self.zero_mem()

    def zero_mem(self) -> None:
        dtype = self.mem.W_mq.weight.dtype
        self.W_mem = torch.zeros(1, self.d_key, self.d_model, dtype=dtype)
        self.z = torch.zeros(1, self.d_key, dtype=dtype)
        self.first_seg = True

    def forward(self, hidden_states, *args, **kwargs):
        if not self.first_seg:
            hidden_states = hidden_states + _read(self.mem, hidden_states, self.W_mem, self.z)
        out = self.layer(hidden_states, *args, **kwargs)
        tokens = _hidden(out)[:, -self.num_mem_tokens :]
        self.W_mem, self.z = _write(self.mem, tokens, self.W_mem, self.z, self.first_seg)
        self.first_seg = False
        return out


class _MemoryCell(nn.Module):
    """HF causal LM + memory tokens appended to each segment; the decoder layers
    of the LM are replaced in place by ``AttributeMemoryLayer``s."""

    def __init__(self, base: nn.Module, num_mem_tokens: int, d_mem: int):
        super().__init__()
        self.model = base
        d = base.config.hidden_size
        self.layers = base.model.layers  # the same ModuleList, a second name for it
        for i in range(len(self.layers)):
            self.layers[i] = AttributeMemoryLayer(self.layers[i], d, d_mem, num_mem_tokens)
        self.num_mem_tokens = num_mem_tokens
        emb = base.get_input_embeddings().weight
        self.memory = nn.Parameter(torch.randn(num_mem_tokens, d) * emb.detach().std())

    def zero_mem(self) -> None:
        for layer in self.layers:
            layer.zero_mem()

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)
        memory = self.memory.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        kwargs = {}
        if attention_mask is not None:  # the segment's padding mask, memory tokens always seen
            ones = attention_mask.new_ones(attention_mask.shape[0], self.num_mem_tokens)
            kwargs["attention_mask"] = torch.cat([attention_mask, ones], dim=1)
        out = self.model(inputs_embeds=torch.cat([embeds, memory], dim=1), use_cache=False, **kwargs)
        return out.logits[:, : -self.num_mem_tokens]


class AttributeMemoryARMT(nn.Module):
    """The recurrent wrapper: zero the memory, run the cell on each segment,
    concatenate the logits."""

    def __init__(self, cell: _MemoryCell, segment_size: int):
        super().__init__()
        self.memory_cell = cell
        self.segment_size = segment_size

    @property
    def memory_layers(self):
        return list(self.memory_cell.layers)

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        self.memory_cell.zero_mem()
        segments = input_ids.split(self.segment_size, dim=1)
        if attention_mask is None:
            logits = [self.memory_cell(seg) for seg in segments]
        else:  # the official wrapper hands each segment its slice of the mask
            masks = attention_mask.split(self.segment_size, dim=1)
            logits = [self.memory_cell(seg, attention_mask=m) for seg, m in zip(segments, masks)]
        return torch.cat(logits, dim=1)


# --- the current (horizontal) shape --------------------------------------------


class LoopingMemoryLayer(_Projections):
    """Wraps one HF decoder layer (at ``.layer``) and runs it on every segment of
    its input in turn, reading and writing memory kept in locals. Unknown
    attributes are forwarded to the wrapped layer (a custom ``__getattr__``:
    Dynamo then reaches ``.layer`` through ``__dict__``)."""

    def __init__(self, layer: nn.Module, d_model: int, d_mem: int, num_mem_tokens: int, segment_size: int, rotary):
        super().__init__(d_model, d_mem)
        self.layer = layer
        self.num_mem_tokens, self.segment_size = num_mem_tokens, segment_size
        self.d_key, self.d_model = 6 * d_mem, d_model
        self._rotary = [rotary]  # not a submodule: the HF model owns it
        self.accepts = set(inspect.signature(layer.forward).parameters)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def _call_layer(self, segment: torch.Tensor, mask):
        positions = torch.arange(segment.shape[1], device=segment.device).unsqueeze(0)
        kwargs = {"attention_mask": mask, "position_ids": positions}
        if "position_embeddings" in self.accepts and self._rotary[0] is not None:
            kwargs["position_embeddings"] = self._rotary[0](segment, positions)
        if "use_cache" in self.accepts:
            kwargs["use_cache"] = False
        return _hidden(self.layer(segment, **kwargs))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        batch, length = hidden_states.shape[:2]
        mem = hidden_states.new_zeros(batch, self.d_key, self.d_model)
        den = hidden_states.new_zeros(batch, self.d_key)
        width = self.segment_size + self.num_mem_tokens
        mask = kwargs.get("attention_mask")
        outputs, first = [], True
        for start in range(0, length, width):
            end = min(start + width, length)
            segment = hidden_states[:, start:end]
            if not first:
                segment = segment + _read(self, segment, mem, den)
            seg_mask = mask[..., start:end, start:end] if isinstance(mask, torch.Tensor) and mask.dim() == 4 else None
            y = self._call_layer(segment, seg_mask)
            mem, den = _write(self, y[:, -self.num_mem_tokens :], mem, den, first)
            first = False
            outputs.append(y)
        merged = torch.cat(outputs, dim=1)
        return merged if hf_layers.transformers_version().major >= 5 else (merged,)


class HorizontalARMT(nn.Module):
    """The HF causal LM runs once over [seg_0, mem, seg_1, mem, ...]; the memory
    layers loop over the segments; the memory tokens' logits are dropped."""

    def __init__(self, base: nn.Module, segment_size: int, num_mem_tokens: int, d_mem: int):
        super().__init__()
        self.model = base
        self.segment_size, self.num_mem_tokens = segment_size, num_mem_tokens
        d = base.config.hidden_size
        layers = base.model.layers
        for i in range(len(layers)):
            layers[i] = LoopingMemoryLayer(layers[i], d, d_mem, num_mem_tokens, segment_size, base.model.rotary_emb)
        self.memory = nn.Parameter(torch.randn(num_mem_tokens, d) * 0.02)

    @property
    def memory_layers(self):
        return list(self.model.model.layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)
        memory = self.memory.unsqueeze(0).expand(embeds.shape[0], -1, -1)
        pieces = []
        for seg in embeds.split(self.segment_size, dim=1):
            pieces += [seg, memory]
        logits = self.model(inputs_embeds=torch.cat(pieces, dim=1), use_cache=False).logits
        width = self.segment_size + self.num_mem_tokens
        return torch.cat([s[:, : -self.num_mem_tokens] for s in logits.split(width, dim=1)], dim=1)


# --- building ------------------------------------------------------------------


def randomize_memory_(model: nn.Module, std: float = 1.0, seed: int = 0) -> nn.Module:
    """Memory projections ~ N(0, std^2/d) (the value projection is zero at init,
    so memory would be inert) and memory tokens ~ N(0, std^2); own RNG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.memory_layers:
            p = layer.mem if isinstance(layer, AttributeMemoryLayer) else layer
            for lin in (p.W_mq, p.W_mk, p.W_mv, p.W_mb):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std / math.sqrt(lin.in_features))
        model_memory = model.memory_cell.memory if isinstance(model, AttributeMemoryARMT) else model.memory
        model_memory.copy_(torch.randn(model_memory.shape, generator=g) * std)
    return model


def build_official_shape(
    shape: str, *, num_layers: int = 3, segment_size: int = 8, num_mem_tokens: int = 2, d_mem: int = 8,
    hidden_size: int = 32, seed: int = 0,
) -> nn.Module:
    """``shape``: ``"attribute_memory"`` (2024) or ``"horizontal"`` (current);
    eval mode, memory randomised, deterministic in ``seed``."""
    if shape == "attribute_memory":
        base = _tiny_llama(num_layers, hidden_size, seed, max(64, segment_size + num_mem_tokens))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            model = AttributeMemoryARMT(_MemoryCell(base, num_mem_tokens, d_mem), segment_size)
    elif shape == "horizontal":
        base = _tiny_llama(num_layers, hidden_size, seed, 512)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            model = HorizontalARMT(base, segment_size, num_mem_tokens, d_mem)
    else:
        raise ValueError(f"shape must be 'attribute_memory' or 'horizontal', got {shape!r}")
    return randomize_memory_(model.eval(), seed=seed)
