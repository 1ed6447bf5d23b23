"""Hugging Face compatibility layer for the reference models.

Everything that depends on how a given ``transformers`` version lays out or calls a
causal LM lives here, so that :mod:`diagpass.models.armt` and
:mod:`diagpass.models.rmt` only see

* :class:`BaseParts` - the reused modules of a causal LM (token embedding, optional
  absolute position embedding, optional embedding dropout, optional rotary embedding,
  decoder layers, final norm, lm_head), found by :func:`extract_parts`;
* :class:`SegmentContext` - the per-segment-length tensors every decoder layer call
  needs (position ids, causal mask, rotary ``(cos, sin)``), made by
  :func:`make_context`;
* :class:`LayerCaller` - calls one decoder layer with exactly the keyword arguments
  its ``forward`` declares (found with :mod:`inspect` once, at construction) and
  unwraps a tuple return (transformers 4.x) or a bare tensor (transformers 5.x).

Calling conventions handled (per architecture family)
----------------------------------------------------
llama / qwen2 / mistral / gpt_neox
    rotary position embeddings. Newer transformers (>= ~4.45 for llama, 5.x for all)
    compute ``(cos, sin)`` once in ``<inner model>.rotary_emb`` and pass them to each
    layer as ``position_embeddings=``; older ones compute them inside the attention
    from ``position_ids=``. We pass ``position_embeddings`` when the layer's forward
    declares it *and* the inner model owns a ``rotary_emb``; we always pass
    ``position_ids`` when declared (harmless in the new API, required in the old).
gpt2
    learned absolute positions ``wpe``; they are added in the embedding stage by the
    wrapper (positions restart at 0 every segment), the layers get only the mask.

Causality
---------
We never go through the base model's ``forward`` (hence never through
``create_causal_mask`` / ``_update_causal_mask``, which differ a lot between
versions). Two modes:

``"mask"`` (default)
    an explicit additive float mask of shape ``(1, 1, Q, Q)`` (0 on and below the
    diagonal, ``finfo(dtype).min`` above) is passed as ``attention_mask``. Every
    eager and SDPA attention in transformers 4.4x and 5.x accepts a 4D additive
    mask and applies it as-is, so this is correct regardless of the attention
    backend (except flash-attention, which we refuse).
``"sdpa_is_causal"``
    ``attention_mask=None``; SDPA then infers ``is_causal=True`` for ``Q > 1`` (true in
    4.4x ``*SdpaAttention`` classes and in 5.x ``sdpa_attention_forward``). Requires
    the SDPA backend to be active: an eager llama attention with a ``None`` mask is
    NOT causal. Smaller graphs and flash kernels on GPU, but version-dependent.

Attention implementation
------------------------
:func:`force_sdpa` switches a model to SDPA: via ``model.set_attn_implementation``
where it exists (transformers >= 4.5x / 5.x), else by setting
``config._attn_implementation`` when the attention modules dispatch on it at call
time. In transformers < 4.48 the attention *class* was chosen at construction
(``LlamaSdpaAttention`` ...), so nothing can be switched later; build such models with
``attn_implementation="sdpa"`` (:func:`build_base_model` does, falling back to eager for
classes with ``_supports_sdpa = False``, e.g. GPT-2 in early 4.4x).
:func:`check_attention_backend` inspects the module tree, reports the backend in
effect and refuses combinations that would be wrong (flash-attention; eager with
``"sdpa_is_causal"``).

Key/value-cache decoding
------------------------
Used by :mod:`diagpass.models.generation` to decode one position at a time against the
cached keys/values of the current segment. :meth:`LayerCaller.call_cached` passes a
``transformers.DynamicCache`` (:func:`new_cache`) through the layer's own cache keyword
(:data:`CACHE_KWARGS`: ``cache`` from 5.24, ``past_key_values`` in earlier 5.x, ``past_key_value`` in 4.4x llama /
qwen2 / mistral, ``layer_past`` in gpt_neox), plus ``use_cache=True`` and, where
declared (4.4x), ``cache_position``; the attention appends its new keys/values under its
``layer_idx``. :func:`make_step_context` gives the ``(1, 1, q, past + q)`` mask (always
explicit: SDPA's ``is_causal`` is top-left aligned, wrong with a past) and the rotary
``(cos, sin)`` / ``position_ids`` of the absolute positions ``past .. past+q-1``.
A layer whose cache keyword is not annotated with a ``Cache`` type (4.4x GPT-2:
``layer_past: Optional[Tuple[...]]``, the legacy tuple protocol) is reported by
:func:`kv_cache_unsupported` and generation falls back to re-running the segment; a
layer that takes the keyword but does not grow the cache raises rather than decode
wrongly.

Only transformers 5.23 was available when this was written; the 4.4x branches
(tuple returns, ``position_ids``-only rotary, class-per-backend attention, the
``past_key_value`` / ``cache_position`` keywords) are written from the 4.4x sources'
conventions but have NOT been executed.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "ARCH_SPECS",
    "BaseParts",
    "CACHE_KWARGS",
    "LayerCaller",
    "SegmentContext",
    "add_positions",
    "build_base_model",
    "check_attention_backend",
    "extract_parts",
    "force_sdpa",
    "kv_cache_unsupported",
    "make_context",
    "make_step_context",
    "new_cache",
    "transformers_version",
]

CAUSAL_MODES = ("mask", "sdpa_is_causal")


def transformers_version():
    """``packaging.version.Version`` of the installed transformers."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__)


# attribute names on the *inner* model (``causal_lm.base_model``)
ARCH_SPECS: dict[str, dict[str, Any]] = {
    "llama": dict(embed="embed_tokens", layers="layers", norm="norm", pos=None, drop=None, rotary=True),
    "qwen2": dict(embed="embed_tokens", layers="layers", norm="norm", pos=None, drop=None, rotary=True),
    "mistral": dict(embed="embed_tokens", layers="layers", norm="norm", pos=None, drop=None, rotary=True),
    "gpt2": dict(embed="wte", layers="h", norm="ln_f", pos="wpe", drop="drop", rotary=False),
    "gpt_neox": dict(
        embed="embed_in", layers="layers", norm="final_layer_norm", pos=None, drop="emb_dropout", rotary=True
    ),
}


class BaseParts(NamedTuple):
    arch: str
    config: Any
    hidden_size: int
    max_positions: int | None
    embed_tokens: nn.Module
    pos_embed: nn.Module | None  # absolute learned positions (gpt2 wpe)
    embed_dropout: nn.Module | None
    rotary_emb: nn.Module | None  # shared rotary module, if the version has one
    layers: list  # decoder layers, in order
    norm: nn.Module
    lm_head: nn.Module


def extract_parts(model: nn.Module) -> BaseParts:
    """Find the reusable modules of a causal LM (no copies: the same module objects)."""
    config = model.config
    arch = getattr(config, "model_type", None)
    if arch not in ARCH_SPECS:
        raise NotImplementedError(f"model_type {arch!r} not supported; supported: {sorted(ARCH_SPECS)}")
    spec = ARCH_SPECS[arch]
    inner = model.base_model  # PreTrainedModel property: getattr(self, base_model_prefix)
    if inner is model:
        raise ValueError("expected a *ForCausalLM model (with an lm_head), got a bare base model")
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError("model has no output embeddings (lm_head)")
    rotary = getattr(inner, "rotary_emb", None) if spec["rotary"] else None
    hidden = config.hidden_size
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return BaseParts(
        arch=arch,
        config=config,
        hidden_size=hidden,
        max_positions=max_pos,
        embed_tokens=getattr(inner, spec["embed"]),
        pos_embed=getattr(inner, spec["pos"]) if spec["pos"] else None,
        embed_dropout=getattr(inner, spec["drop"], None) if spec["drop"] else None,
        rotary_emb=rotary,
        layers=list(getattr(inner, spec["layers"])),
        norm=getattr(inner, spec["norm"]),
        lm_head=lm_head,
    )


def force_sdpa(model: nn.Module) -> None:
    """Ask ``model`` to use SDPA attention where that can be changed after construction.

    * ``model.set_attn_implementation`` exists (transformers >= 4.5x, 5.x): use it;
    * else, if the attention modules dispatch on the config at call time
      (``ALL_ATTENTION_FUNCTIONS`` in their modeling file, transformers >= 4.48 for
      llama/qwen2): set ``config._attn_implementation``;
    * else (transformers < 4.48: one attention class per backend, fixed at
      construction) nothing can be done here; :func:`check_attention_backend` reports
      what is in effect. Build such models with ``attn_implementation="sdpa"``.
    """
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        return
    if not getattr(type(model), "_supports_sdpa", False):
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    elif any(_dispatches_on_config(m) for m in _attention_modules(model)):
        model.config._attn_implementation = "sdpa"


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "Attention" in type(m).__name__ and not isinstance(m, nn.ModuleList)]


def _dispatches_on_config(module: nn.Module) -> bool:
    """True if the module's modeling file uses the call-time attention interface
    (``ALL_ATTENTION_FUNCTIONS``, transformers >= 4.48 for llama, 5.x for all), i.e. the
    backend is whatever ``config._attn_implementation`` says at call time."""
    mod = sys.modules.get(type(module).__module__)
    return mod is not None and hasattr(mod, "ALL_ATTENTION_FUNCTIONS")


def check_attention_backend(model: nn.Module, causal: str) -> str:
    """Return the attention backend in effect; raise if it is wrong for ``causal``.

    Inspects the attention modules: a class per backend (transformers < 4.48:
    ``*SdpaAttention``, ``*FlashAttention2``, plain = eager) or, where the modeling file
    dispatches through ``ALL_ATTENTION_FUNCTIONS``, the config's ``_attn_implementation``.
    """
    if causal not in CAUSAL_MODES:
        raise ValueError(f"causal must be one of {CAUSAL_MODES}, got {causal!r}")
    backends = set()
    for m in _attention_modules(model):
        name = type(m).__name__
        if "Flash" in name:
            backends.add("flash_attention_2")
        elif "Sdpa" in name:
            backends.add("sdpa")
        elif _dispatches_on_config(m):
            backends.add(getattr(model.config, "_attn_implementation", None) or "eager")
        else:
            backends.add("eager")
    if not backends:
        raise ValueError("no attention modules found")
    if len(backends) > 1:
        raise ValueError(f"mixed attention backends {sorted(backends)}")
    (backend,) = backends
    if backend not in ("sdpa", "eager"):
        raise ValueError(f"attention backend {backend!r} unsupported (explicit 4D mask); build the model with sdpa")
    if causal == "sdpa_is_causal" and backend != "sdpa":
        raise ValueError(
            f"causal='sdpa_is_causal' needs the sdpa backend (got {backend!r}); use causal='mask' "
            "or build the model with attn_implementation='sdpa'"
        )
    return backend


def build_base_model(
    arch: str,
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None,
    intermediate_size: int | None,
    max_positions: int,
    seed: int,
    dtype: torch.dtype,
) -> nn.Module:
    """A tiny randomly initialised causal LM (eval mode, sdpa, dropout 0)."""
    import transformers as tf

    inter = intermediate_size if intermediate_size is not None else 2 * hidden_size
    kv = num_kv_heads if num_kv_heads is not None else num_heads
    if arch in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
        extra = {}
        if arch == "mistral":
            extra["sliding_window"] = None
        config = cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=inter,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=kv,
            max_position_embeddings=max_positions,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **extra,
        )
    elif arch == "gpt2":
        if num_kv_heads not in (None, num_heads):
            raise ValueError("gpt2 has no grouped-query attention")
        config = tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=inter,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=vocab_size - 1,
            eos_token_id=vocab_size - 1,
        )
    elif arch == "gpt_neox":
        if num_kv_heads not in (None, num_heads):
            raise ValueError("gpt_neox has no grouped-query attention")
        config = tf.GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=inter,
            max_position_embeddings=max_positions,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
        )
    else:
        raise NotImplementedError(f"arch {arch!r}; supported: {sorted(ARCH_SPECS)}")
    # sdpa where the class supports it (all four in 5.x; e.g. GPT-2 / GPT-NeoX in early
    # 4.4x do not, and then eager is used - correct with the explicit causal mask)
    model_cls = tf.AutoModelForCausalLM._model_mapping[type(config)]
    attn = "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model = model.to(dtype)
    model.eval()
    return model


class SegmentContext(NamedTuple):
    """Tensors shared by every layer call on a segment of one length."""

    position_ids: torch.Tensor  # (1, Q) long, 0..Q-1
    attention_mask: torch.Tensor | None  # (1, 1, Q, Q) additive float, or None (sdpa is_causal)
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # rotary (cos, sin), or None


def causal_additive_mask(q: int, dtype: torch.dtype, device: torch.device, past: int = 0) -> torch.Tensor:
    """(1, 1, q, past + q): 0 where key <= past + query, finfo(dtype).min elsewhere.

    ``past > 0`` is the mask of ``q`` new queries over ``past`` cached keys followed by
    their own keys (the same rows as the last ``q`` rows of the full ``past + q`` mask)."""
    mask = torch.full((q, past + q), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(mask, diagonal=1 + past)[None, None]


def make_context(
    q: int, *, like: torch.Tensor, causal: str, rotary_emb: nn.Module | None
) -> SegmentContext:
    """Context for a segment of ``q`` positions (tokens + memory). ``like`` gives dtype/device."""
    position_ids = torch.arange(q, device=like.device).unsqueeze(0)
    mask = causal_additive_mask(q, like.dtype, like.device) if causal == "mask" else None
    pe = rotary_emb(like, position_ids) if rotary_emb is not None else None
    return SegmentContext(position_ids, mask, pe)


def make_step_context(
    start: int, q: int, *, like: torch.Tensor, rotary_emb: nn.Module | None
) -> SegmentContext:
    """Context for ``q`` new positions ``start .. start+q-1`` of a segment whose earlier
    ``start`` positions are in a key/value cache (decoding).

    The mask is always the explicit ``(1, 1, q, start + q)`` additive one, whatever the
    model's ``causal`` mode: SDPA's ``is_causal`` aligns the triangle top-left, which is
    wrong as soon as there are cached keys. Rotary ``(cos, sin)`` are computed for the
    absolute positions, elementwise the same values :func:`make_context` gives there.
    """
    position_ids = torch.arange(start, start + q, device=like.device).unsqueeze(0)
    mask = causal_additive_mask(q, like.dtype, like.device, past=start)
    pe = rotary_emb(like, position_ids) if rotary_emb is not None else None
    return SegmentContext(position_ids, mask, pe)


# the cache keyword of a decoder layer's forward, newest spelling first:
# 5.24+ ``cache`` (``past_key_values`` deprecated); 5.x llama/qwen2/mistral/gpt2 ``past_key_values``; 4.4x llama/qwen2/mistral
# ``past_key_value``; gpt_neox (4.4x and 5.x) and 4.4x gpt2 ``layer_past``
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _attention_layer_index(layer: nn.Module) -> int | None:
    """The ``layer_idx`` under which the layer's attention stores into a Cache (the
    attention module carries it in 4.4x and 5.x); ``None`` if absent or ambiguous."""
    found = {m.layer_idx for m in layer.modules() if getattr(m, "layer_idx", None) is not None}
    return found.pop() if len(found) == 1 else None


def _annotation(param: inspect.Parameter) -> str:
    ann = param.annotation
    return ann if isinstance(ann, str) else str(ann)  # "Optional[Cache]", "Cache | None", a class


def _attention_takes_cache(layer: nn.Module, name: str) -> bool:
    """True if the layer's attention module (the one holding ``layer_idx``) takes
    keyword ``name`` annotated with a ``Cache`` type."""
    for m in layer.modules():
        if m is layer or getattr(m, "layer_idx", None) is None:
            continue
        params = inspect.signature(m.forward).parameters
        if name in params and "Cache" in _annotation(params[name]):
            return True
    return False


def _cache_support(layer: nn.Module, params) -> tuple[str | None, int | None, str | None]:
    """``(cache keyword, layer_idx, None)`` if the layer can decode against a
    ``transformers`` Cache object, else ``(None, None, reason)``.

    Decided from the signatures only: the keyword must exist and be annotated with a
    ``Cache`` type, on the layer or, where the layer's annotation is stale, on the
    attention module it hands the keyword to (transformers 4.46 Qwen2: the decoder
    layer says ``past_key_value: Optional[Tuple[...]]``, its attention
    ``Optional[Cache]``). Layers whose attention is annotated with a tuple too
    (``layer_past: Optional[Tuple[...]]``, GPT-2 in transformers 4.4x) use the legacy
    tuple protocol, which we do not drive. ``call_cached`` checks at run time that
    the cache grew.
    """
    name = next((n for n in CACHE_KWARGS if n in params), None)
    if name is None:
        return None, None, f"{type(layer).__name__}.forward takes none of {CACHE_KWARGS}"
    ann = _annotation(params[name])
    if "Cache" not in ann and not _attention_takes_cache(layer, name):
        return None, None, f"{type(layer).__name__}.forward({name}: {ann}) is not a Cache (legacy tuple cache)"
    idx = _attention_layer_index(layer)
    if idx is None:
        return None, None, f"{type(layer).__name__}: no unique attention layer_idx to index the Cache"
    return name, idx, None


class LayerCaller:
    """Calls one HF decoder layer with the keywords its forward declares.

    A plain (non-Module) object: the flags are decided once here with
    :func:`inspect.signature`, so the traced call has no version-dependent branches
    beyond constant Python booleans.
    """

    def __init__(self, layer: nn.Module, *, has_rotary_module: bool, needs_rotary: bool):
        params = inspect.signature(layer.forward).parameters
        self.layer_class = type(layer).__name__
        self.pass_attention_mask = "attention_mask" in params
        self.pass_position_ids = "position_ids" in params
        self.pass_position_embeddings = "position_embeddings" in params and has_rotary_module
        self.pass_use_cache = "use_cache" in params
        if not self.pass_attention_mask:
            raise TypeError(f"{self.layer_class}.forward takes no attention_mask")
        if needs_rotary and not (self.pass_position_embeddings or self.pass_position_ids):
            raise TypeError(f"{self.layer_class}: no way to pass rotary positions")
        # key/value-cache decoding (generation.py); the reason says why not, if not
        self.cache_kwarg, self.cache_layer_idx, self.cache_unsupported = _cache_support(layer, params)
        self.pass_cache_position = "cache_position" in params  # 4.4x: the attention reads it

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, ctx: SegmentContext) -> torch.Tensor:
        kwargs = {"attention_mask": ctx.attention_mask}
        if self.pass_position_ids:
            kwargs["position_ids"] = ctx.position_ids
        if self.pass_position_embeddings:
            kwargs["position_embeddings"] = ctx.position_embeddings
        if self.pass_use_cache:
            kwargs["use_cache"] = False
        out = layer(hidden, **kwargs)
        # transformers 4.x: (hidden_states, [attn_weights], [present]); 5.x: hidden_states
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out

    def call_cached(self, layer: nn.Module, hidden: torch.Tensor, ctx: SegmentContext, cache) -> torch.Tensor:
        """The layer on ``q`` new positions (``ctx`` from :func:`make_step_context`)
        attending to the keys/values already in ``cache`` plus their own, which the
        layer's attention appends to ``cache`` (a ``transformers.DynamicCache``).

        Raises if the cache did not grow by ``q``: a layer that silently ignored the
        cache would otherwise give wrong logits.
        """
        if self.cache_unsupported is not None:
            raise RuntimeError(self.cache_unsupported)
        past = cache.get_seq_length(self.cache_layer_idx)
        q = hidden.shape[1]
        kwargs = {"attention_mask": ctx.attention_mask, self.cache_kwarg: cache}
        if self.pass_position_ids:
            kwargs["position_ids"] = ctx.position_ids
        if self.pass_position_embeddings:
            kwargs["position_embeddings"] = ctx.position_embeddings
        if self.pass_use_cache:
            kwargs["use_cache"] = True
        if self.pass_cache_position:
            kwargs["cache_position"] = ctx.position_ids[0]
        out = layer(hidden, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        got = cache.get_seq_length(self.cache_layer_idx)
        if got != past + q:
            raise RuntimeError(
                f"{self.layer_class}: cache holds {got} positions after a step of {q} on {past} "
                f"(keyword {self.cache_kwarg!r} not honoured)"
            )
        return out

    def __repr__(self):
        flags = [
            n
            for n in ("attention_mask", "position_ids", "position_embeddings", "use_cache")
            if getattr(self, f"pass_{n}")
        ]
        return f"LayerCaller({self.layer_class}, passes={flags})"


def make_callers(parts: BaseParts) -> list[LayerCaller]:
    needs_rotary = ARCH_SPECS[parts.arch]["rotary"]
    return [
        LayerCaller(layer, has_rotary_module=parts.rotary_emb is not None, needs_rotary=needs_rotary)
        for layer in parts.layers
    ]


def kv_cache_unsupported(callers: list[LayerCaller]) -> str | None:
    """Why these layers cannot decode against a key/value cache, or ``None`` if they can."""
    for i, c in enumerate(callers):
        if c.cache_unsupported is not None:
            return f"layer {i}: {c.cache_unsupported}"
    if len({c.cache_layer_idx for c in callers}) != len(callers):
        return "decoder layers share a layer_idx (their cache entries would collide)"
    return None


def new_cache():
    """An empty ``transformers.DynamicCache`` that grows one entry per ``layer_idx`` on
    first use (no config: never a sliding-window layer; segments are short)."""
    from transformers import DynamicCache

    return DynamicCache()


def add_positions(
    h: torch.Tensor, pos_embed: nn.Module | None, dropout: nn.Module | None, ctx: SegmentContext
) -> torch.Tensor:
    """Absolute position embedding at ``ctx.position_ids`` (if the model has one), then
    dropout: the part of :func:`embed_segment` after the concatenation, for a slice of
    a segment (elementwise, so bitwise the same values as the whole-segment call)."""
    if pos_embed is not None:
        h = h + pos_embed(ctx.position_ids)
    if dropout is not None:
        h = dropout(h)
    return h


def embed_segment(
    parts_embed: nn.Module,
    pos_embed: nn.Module | None,
    dropout: nn.Module | None,
    token_ids: torch.Tensor,
    prefix: torch.Tensor | None,
    suffix: torch.Tensor | None,
    ctx: SegmentContext,
) -> torch.Tensor:
    """[prefix?, embed(token_ids), suffix?] (+ absolute positions restarting at 0) -> dropout."""
    pieces = []
    if prefix is not None:
        pieces.append(prefix)
    pieces.append(parts_embed(token_ids))
    if suffix is not None:
        pieces.append(suffix)
    h = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    if pos_embed is not None:
        h = h + pos_embed(ctx.position_ids)
    if dropout is not None:
        h = dropout(h)
    return h
