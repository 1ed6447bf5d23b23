"""A configurable family of recurrent-memory transformers (pure PyTorch).

``RecurrentTransformer(FamilyConfig(...))`` is a decoder-only transformer run over
segments of the input, segment x layer unrolled in Python, with one of several kinds of
memory carried across segments (see ``FamilyConfig.memory_kind``). It is the test
material for the ``diagonal`` torch.compile backend: the Dynamo graph has one "cell" per
(segment s, layer l), and ``dependence_pattern`` / ``is_diagonal_batchable`` /
``cell_schedule`` describe which cells depend on which.

Memory kinds (per layer l unless noted; shared/ARMT.md has the ARMT equations):

* ``"associative"``: ARMT associative memory (DPFP, nu, d_mem); W_v random (not zero).
* ``"gated"``: vector m_l (B, d); read x + W_r m_l; write
  m_l <- sigmoid(g) m_l + (1 - sigmoid(g)) tanh(W_w mean(Y[:, -M:] or Y)).
* ``"linear_attention"``: S_l (B, d, d), z_l (B, d), elu+1 features; ARMT without corrections.
* ``"xl_cache"``: layer l of segment s also attends (keys/values) to layer l's *input* of
  segment s-1 (optionally detached: ``xl_detach``). No memory tokens.
* ``"rmt"``: classic RMT: [mem, segment, mem]; the last layer's outputs at the write
  positions become ``mem`` of the next segment (segment 0 uses the learned memory tokens).
  Not diagonal-batchable.
* ``"skip_k"``: vector from layer l of segment s to layer l+k of segment s+1
  (k = ``memory_shift``); layers l < k, and every layer in segment 0, read a learned init.
  Note the memory only climbs: segment 0 can influence segments up to (L-1)//k later.
* ``"none"``: segments independent.

Memory tokens: M = ``num_mem_tokens`` learned embeddings, appended after every segment's
tokens for associative / gated / linear_attention / skip_k (M may be 0: the write then
uses all positions), placed before *and* after the segment for rmt (M >= 1), unused for
xl_cache and none. Their positions are dropped from the logits.

Code-shape options (same maths, bitwise-identical outputs):

* ``state_in_attributes``: state kept in module attributes (``self.A = self.A + ...``),
  reset at the start of ``forward``, ``self.first_segment`` Python flag.
* ``layer_major`` / ``stacked_memory``: loop order and state container (see the
  fields); ignored with ``state_in_attributes``, for rmt, and (stacked_memory)
  for none or with ``layer_major``.
* ``memory_params_outside``: per-layer memory modules live in the top-level
  ``self.memories`` ModuleList and the top-level forward does read / layer / write inline;
  ``self.layers[l]`` is then a plain decoder layer. Ignored for rmt / none (no per-layer
  memory). Weights are initialised in a layout-independent canonical order, so the same
  seed gives the same weights either way (see ``canonical_named_parameters``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from diagpass.models.family_layers import Block, RMSNorm, make_norm
from diagpass.models.family_memory import make_memory

MEMORY_KINDS = ("associative", "gated", "linear_attention", "xl_cache", "rmt", "skip_k", "none")
PER_LAYER_MEMORY_KINDS = ("associative", "gated", "linear_attention", "xl_cache", "skip_k")
STACKABLE_MEMORY_KINDS = ("associative", "gated", "linear_attention", "xl_cache")  # every layer has a state
TOKEN_MEMORY_KINDS = ("associative", "gated", "linear_attention", "skip_k")
FFN_KINDS = ("gelu_mlp", "swiglu")
NORM_PLACEMENTS = ("pre", "post")
NORM_KINDS = ("layernorm", "rmsnorm")


@dataclass(frozen=True)
class FamilyConfig:
    vocab_size: int = 64
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads; fewer -> GQA (must divide n_heads)
    d_ff: int | None = None  # None -> 4 * d_model
    ffn_kind: str = "gelu_mlp"  # "gelu_mlp" | "swiglu"
    norm_placement: str = "pre"  # "pre" | "post"
    norm_kind: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    bias: bool = False  # biases in attention / MLP linears
    rope: bool = False  # rotary positions, restarting at 0 in every segment
    rope_base: float = 10000.0
    segment_size: int = 8
    num_mem_tokens: int = 2
    memory_kind: str = "associative"  # one of MEMORY_KINDS
    d_mem: int = 8  # associative: key width before DPFP (d_key = 2 * nu * d_mem)
    nu: int = 3  # associative: DPFP order
    memory_shift: int = 1  # skip_k: k >= 1
    xl_detach: bool = True  # xl_cache: detach the cached hidden states
    state_in_attributes: bool = False
    memory_params_outside: bool = False
    detach_every: int | None = None  # truncated BPTT: detach state after every k-th segment
    # research-code shapes (same maths): residuals added in place / F.silu(inplace=True),
    # attention masks built with & | and masked_fill_, rope inside autocast(enabled=False)
    inplace_ops: bool = False
    mask_ops: bool = False
    autocast_rope: bool = False
    # loop shapes (same maths): ``layer_major`` runs every segment through layer l
    # before layer l+1 (the layer's outputs concatenated, the next layer slicing its
    # segments out again); ``stacked_memory`` keeps all layers' states as one
    # ``torch.stack`` per segment, read back as ``states[l]``. Functional forward
    # only; layer_major: per-layer memory kinds and "none"; stacked_memory: the
    # STACKABLE_MEMORY_KINDS, not with layer_major; ignored otherwise.
    layer_major: bool = False
    stacked_memory: bool = False
    # cells that differ only by a constant: layer l scales its attention branch by
    # the Python float 1 - 0.05 l (batched with the constants stacked, fp32/fp64)
    per_layer_scale: bool = False
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ValueError(f"FamilyConfig: {msg}")

        check(self.memory_kind in MEMORY_KINDS, f"memory_kind must be one of {MEMORY_KINDS}")
        check(self.ffn_kind in FFN_KINDS, f"ffn_kind must be one of {FFN_KINDS}")
        check(self.norm_placement in NORM_PLACEMENTS, f"norm_placement must be one of {NORM_PLACEMENTS}")
        check(self.norm_kind in NORM_KINDS, f"norm_kind must be one of {NORM_KINDS}")
        check(min(self.vocab_size, self.d_model, self.n_layers, self.n_heads) >= 1, "sizes must be >= 1")
        check(self.d_model % self.n_heads == 0, "n_heads must divide d_model")
        check(self.kv_heads >= 1 and self.n_heads % self.kv_heads == 0, "n_kv_heads must divide n_heads")
        check(not self.rope or (self.d_model // self.n_heads) % 2 == 0, "rope needs an even head_dim")
        check(self.segment_size >= 1, "segment_size must be >= 1")
        check(self.num_mem_tokens >= 0, "num_mem_tokens must be >= 0")
        check(self.memory_kind != "rmt" or self.num_mem_tokens >= 1, "rmt needs num_mem_tokens >= 1")
        check(self.d_mem >= 1 and self.nu >= 1, "d_mem and nu must be >= 1")
        check(self.memory_shift >= 1, "memory_shift must be >= 1")
        check(self.detach_every is None or self.detach_every >= 1, "detach_every must be None or >= 1")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    def replace(self, **changes) -> "FamilyConfig":
        return dataclasses.replace(self, **changes)


def memory_token_counts(config: FamilyConfig) -> tuple[int, int]:
    """(memory positions before the segment tokens, memory positions after them) per cell."""
    if config.memory_kind == "rmt":
        return config.num_mem_tokens, config.num_mem_tokens
    if config.memory_kind in TOKEN_MEMORY_KINDS:
        return 0, config.num_mem_tokens
    return 0, 0


def _stack_states(states):
    """All layers' states as one stack (a tuple of stacks for tuple states)."""
    if isinstance(states[0], tuple):
        return tuple(torch.stack([st[i] for st in states]) for i in range(len(states[0])))
    return torch.stack(states)


def _unstack_states(stacked, n_layers: int):
    """``[stacked[l] for l]``: how code keeping memory stacked reads layer l's."""
    if isinstance(stacked, tuple):
        return [tuple(c[l] for c in stacked) for l in range(n_layers)]
    return [stacked[l] for l in range(n_layers)]


def _detach(state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(t.detach() for t in state)
    return state.detach()


class RecurrentTransformer(nn.Module):
    """Segment-recurrent decoder-only transformer. ``forward(input_ids (B, N)) -> (B, N, vocab)``."""

    def __init__(self, config: FamilyConfig, seed: int | None = None):
        super().__init__()
        if seed is None:  # drawn before any submodule consumes the global RNG
            seed = int(torch.randint(0, 2**62, ()).item())
        self.config = config
        kind = config.memory_kind
        self.outside = config.memory_params_outside and kind in PER_LAYER_MEMORY_KINDS
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.n_read_mem, self.n_write_mem = memory_token_counts(config)
        if self.n_read_mem + self.n_write_mem > 0:
            self.mem_tokens = nn.Parameter(torch.zeros(config.num_mem_tokens, config.d_model))
        else:
            self.mem_tokens = None
        memories = [make_memory(config, l) for l in range(config.n_layers)]
        if self.outside:
            self.memories = nn.ModuleList(memories)
            self.layers = nn.ModuleList(Block(config, None, index=l) for l in range(config.n_layers))
        else:
            self.memories = None
            self.layers = nn.ModuleList(Block(config, memories[l], index=l) for l in range(config.n_layers))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_state()
        self.reset_parameters(seed)
        self.to(config.dtype)

    # ------------------------------------------------------------------ weights
    def canonical_named_parameters(self):
        """(name, param) with layout-independent names (``memories.l.X`` -> ``layers.l.memory.X``),
        sorted by name."""
        out = []
        for name, p in self.named_parameters():
            if name.startswith("memories."):
                _, l, rest = name.split(".", 2)
                name = f"layers.{l}.memory.{rest}"
            out.append((name, p))
        return sorted(out, key=lambda t: t[0])

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Deterministic init from ``seed`` in canonical order. Weights are deliberately
        non-trivial (random norm gains and biases, random W_v) so that mix-ups between
        layers, segments or memory paths change the output."""
        g = torch.Generator().manual_seed(seed)
        owners = {}
        for mname, mod in self.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                owners[id(p)] = (mod, pname)
        for _, p in self.canonical_named_parameters():
            mod, pname = owners[id(p)]
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if isinstance(mod, nn.Linear) and pname == "weight":
                val = noise / math.sqrt(mod.in_features)
            elif isinstance(mod, (nn.LayerNorm, RMSNorm)) and pname == "weight":
                val = 1.0 + 0.1 * noise
            elif pname == "bias":
                val = 0.1 * noise
            else:  # embeddings, memory tokens, gates, inits
                val = noise
            p.copy_(val.to(p.dtype))

    # ------------------------------------------------------------------ state
    def memory_modules(self) -> list:
        """Per-layer memory modules (wherever they live); empty for rmt / none."""
        if self.outside:
            return list(self.memories)
        return [b.memory for b in self.layers if b.memory is not None]

    def reset_state(self) -> None:
        """Research-style state reset (used when ``state_in_attributes``)."""
        for mem in self.memory_modules():
            mem.reset_state()
        self.rmt_mem = None
        self.first_segment = True

    # ------------------------------------------------------------------ forward
    def _wrap_segment(self, x, rmt_mem):
        """Add memory positions around the embedded segment x (B, T, d)."""
        if self.mem_tokens is None:
            return x
        tokens = self.mem_tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
        if self.config.memory_kind == "rmt":
            mem = tokens if rmt_mem is None else rmt_mem
            return torch.cat([mem, x, mem], dim=1)
        return torch.cat([x, tokens], dim=1)

    def _logits(self, h, T):
        h = h[:, self.n_read_mem : self.n_read_mem + T]
        return self.lm_head(self.final_norm(h))

    def _detach_now(self, s: int) -> bool:
        k = self.config.detach_every
        return k is not None and (s + 1) % k == 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.state_in_attributes:
            return self._forward_attributes(input_ids)
        if self.config.layer_major and self.config.memory_kind in PER_LAYER_MEMORY_KINDS + ("none",):
            return self._forward_layer_major(input_ids)
        return self._forward_functional(input_ids)

    def _cell(self, l, x, incoming):
        """Layer l on one segment: (output, new state)."""
        if self.config.memory_kind not in PER_LAYER_MEMORY_KINDS:
            return self.layers[l](x), None
        if self.outside:
            mem = self.memories[l]
            x_in, prefix = mem.read(x, incoming)
            y = self.layers[l](x_in, prefix=prefix)
            return y, mem.write(x, y, incoming)
        return self.layers[l](x, incoming)

    def _forward_layer_major(self, input_ids):
        """Layer by layer, each over all segments; between layers the segment
        outputs are concatenated and sliced again (as one call of a base model
        over all segments would see them)."""
        cfg = self.config
        k = cfg.memory_shift
        segments = input_ids.split(cfg.segment_size, dim=1)
        xs = [self._wrap_segment(self.embed(seg), None) for seg in segments]
        widths = [x.shape[1] for x in xs]
        states = []  # states[l][s]: layer l's state after segment s
        for l in range(cfg.n_layers):
            ys, row, state = [], [], None
            for s, x in enumerate(xs):
                if cfg.memory_kind == "skip_k":
                    incoming = states[l - k][s - 1] if l >= k and s > 0 else None
                else:
                    incoming = state
                y, state = self._cell(l, x, incoming)
                if self._detach_now(s):
                    state = _detach(state)
                ys.append(y)
                row.append(state)
            states.append(row)
            h = torch.cat(ys, dim=1)
            starts = [sum(widths[:i]) for i in range(len(widths))]
            xs = [h[:, a : a + w] for a, w in zip(starts, widths)]
        outs = [self._logits(x, seg.shape[1]) for x, seg in zip(xs, segments)]
        return torch.cat(outs, dim=1)

    def _forward_functional(self, input_ids):
        cfg = self.config
        kind = cfg.memory_kind
        L = cfg.n_layers
        k = cfg.memory_shift
        states = [None] * L  # per-layer state after the previous segment
        rmt_mem = None
        outs = []
        for s, seg in enumerate(input_ids.split(cfg.segment_size, dim=1)):
            T = seg.shape[1]
            x = self._wrap_segment(self.embed(seg), rmt_mem)
            new_states = [None] * L
            for l, block in enumerate(self.layers):
                if kind not in PER_LAYER_MEMORY_KINDS:
                    x = block(x)
                    continue
                if kind == "skip_k":
                    incoming = states[l - k] if l >= k else None
                else:
                    incoming = states[l]
                if self.outside:
                    mem = self.memories[l]
                    x_in, prefix = mem.read(x, incoming)
                    y = block(x_in, prefix=prefix)
                    new_states[l] = mem.write(x, y, incoming)
                else:
                    y, new_states[l] = block(x, incoming)
                x = y
            states = new_states
            if cfg.stacked_memory and kind in STACKABLE_MEMORY_KINDS and not cfg.layer_major:
                states = _unstack_states(_stack_states(states), L)
            if kind == "rmt":
                rmt_mem = x[:, -cfg.num_mem_tokens :]
            if self._detach_now(s):
                states = [_detach(st) for st in states]
                rmt_mem = _detach(rmt_mem)
            outs.append(self._logits(x, T))
        return torch.cat(outs, dim=1)

    def _forward_attributes(self, input_ids):
        cfg = self.config
        kind = cfg.memory_kind
        k = cfg.memory_shift
        self.reset_state()
        mems = self.memory_modules()
        outs = []
        for s, seg in enumerate(input_ids.split(cfg.segment_size, dim=1)):
            T = seg.shape[1]
            if self.first_segment:
                x = self._wrap_segment(self.embed(seg), None)
            else:
                x = self._wrap_segment(self.embed(seg), self.rmt_mem)
            for l, block in enumerate(self.layers):
                if self.outside:
                    mem = self.memories[l]
                    x_in, prefix = mem.read_attr(x)
                    y = block(x_in, prefix=prefix)
                    mem.write_attr(x, y)
                    x = y
                else:
                    x = block(x)
            if kind == "skip_k":
                for j in range(len(mems) - 1, k - 1, -1):
                    mems[j].incoming = mems[j - k].outgoing
            if kind == "rmt":
                self.rmt_mem = x[:, -cfg.num_mem_tokens :]
            self.first_segment = False
            if self._detach_now(s):
                for mem in mems:
                    mem.detach_state()
                if self.rmt_mem is not None:
                    self.rmt_mem = self.rmt_mem.detach()
            outs.append(self._logits(x, T))
        return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------- analysis
def dependence_pattern(config: FamilyConfig) -> set[tuple[int, int]]:
    """Dependence vectors (ds, dl): cell (s, l) uses a value produced by cell (s - ds, l - dl).

    Config-level, assuming enough segments for every vector to occur (>= 2). Cells are
    (segment, layer) pairs; the embedding / memory-token concat of segment s belongs to
    layer 0's cell and the final norm / lm_head to the last layer's cell.

    * (0, 1): hidden states flowing up a segment; present iff n_layers > 1.
    * associative / gated / linear_attention / xl_cache: (1, 0) (per-layer state).
      For xl_cache the cached tensor is the input of cell (s-1, l) (computed by cell
      (s-1, l-1)); it is reported as (1, 0), a conservative summary: any order that
      respects (1, 0) and (0, 1) also respects (1, 1).
    * rmt: (1, -(L-1)): the last layer feeds the first layer of the next segment.
    * skip_k: (1, k) if k < n_layers, else no cross-segment vector (every layer reads init).
    * none: no cross-segment vector.
    """
    L = config.n_layers
    out = {(0, 1)} if L > 1 else set()
    kind = config.memory_kind
    if kind in ("associative", "gated", "linear_attention", "xl_cache"):
        out.add((1, 0))
    elif kind == "rmt":
        out.add((1, -(L - 1)))
    elif kind == "skip_k" and config.memory_shift < L:
        out.add((1, config.memory_shift))
    return out


def is_diagonal_batchable(config: FamilyConfig) -> bool:
    """True iff every cross-segment dependence vector is (1, 0) (per-layer state).

    Vacuously True when there is no cross-segment dependence at all ("none", or skip_k with
    memory_shift >= n_layers): every segment is independent, which anti-diagonal batching
    handles trivially. False for rmt with n_layers > 1 and for skip_k with k < n_layers
    (skip_k is still wavefront-schedulable with partial parallelism: see ``cell_schedule``).
    """
    return all(v == (1, 0) for v in dependence_pattern(config) if v[0] != 0)


def num_segments(config: FamilyConfig, seq_len: int) -> int:
    return -(-seq_len // config.segment_size)


def cell_schedule(config: FamilyConfig, n_segments: int) -> list[list[tuple[int, int]]]:
    """As-soon-as-possible levels of the cell DAG: list of steps, each a list of (s, l).

    For per-layer kinds this is the anti-diagonal wavefront (S + L - 1 steps); rmt gives
    S * L steps of one cell; none gives L steps of S cells.
    """
    L = config.n_layers
    vecs = dependence_pattern(config)
    step: dict[tuple[int, int], int] = {}
    for s in range(n_segments):
        for l in range(L):
            preds = [(s - ds, l - dl) for ds, dl in vecs]
            preds = [p for p in preds if 0 <= p[0] < n_segments and 0 <= p[1] < L]
            step[(s, l)] = 1 + max((step[p] for p in preds), default=-1)
    # rmt's (1, -(L-1)) predecessor (s-1, L-1) is computed before (s, 0) in this loop order.
    levels: list[list[tuple[int, int]]] = [[] for _ in range(max(step.values(), default=-1) + 1)]
    for cell, t in sorted(step.items()):
        levels[t].append(cell)
    return levels


def build_family_model(config: FamilyConfig, seed: int = 0) -> RecurrentTransformer:
    """Deterministically initialised model (same seed -> same weights, whatever the layout) in eval mode."""
    return RecurrentTransformer(config, seed=seed).eval()


__all__ = [
    "FFN_KINDS",
    "MEMORY_KINDS",
    "NORM_KINDS",
    "NORM_PLACEMENTS",
    "PER_LAYER_MEMORY_KINDS",
    "STACKABLE_MEMORY_KINDS",
    "TOKEN_MEMORY_KINDS",
    "Block",
    "FamilyConfig",
    "RecurrentTransformer",
    "build_family_model",
    "cell_schedule",
    "dependence_pattern",
    "is_diagonal_batchable",
    "memory_token_counts",
    "num_segments",
]
