"""Layer weights stored stacked, and whether a call's weights are.

    diagpass.stack_weights_(model.layers)    # once, after building / loading the model
    fast = torch.compile(model, backend="diagonal")

See ``diagpass/passes/stacked_weights.py`` for the graph variant this feeds.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

from diagpass.counters import counters


def stacked_view(params: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """``torch.stack(params)`` without a copy, if ``params`` are consecutive
    contiguous slices of one storage (what ``stack_weights_`` makes); else None."""
    first = params[0]
    if not first.is_contiguous():
        return None
    storage = first.untyped_storage().data_ptr()
    numel, offset = first.numel(), first.storage_offset()
    for i, p in enumerate(params):
        if (
            p.untyped_storage().data_ptr() != storage
            or p.storage_offset() != offset + i * numel
            or p.shape != first.shape
            or p.dtype != first.dtype
            or not p.is_contiguous()
        ):
            return None
    return first.detach().as_strided((len(params), *first.shape), (numel, *first.stride()), offset)


def stacked_views(groups: Sequence[Sequence[torch.Tensor]]) -> Optional[list]:
    """One stacked view per group of parameters, or None when a call would
    copy them instead: a group not stored stacked, or gradients flowing into
    the parameters (the copying graph's stack carries them)."""
    if torch.is_grad_enabled() and any(p.requires_grad for g in groups for p in g):
        return None
    views = []
    for g in groups:
        v = stacked_view(g)
        if v is None:
            return None
        views.append(v)
    return views


def stacked_views_at(args: Sequence, indices: Sequence[Sequence[int]]) -> Optional[list]:
    """``stacked_views`` of the parameters at ``indices`` (one list of input positions per role)."""
    return stacked_views([[args[i] for i in idx] for idx in indices])


class WeightStackCache:
    """``torch.stack`` of each group of parameters, kept between calls while
    every parameter is the same live tensor (held by weak reference: a freed
    model's addresses may be reused) with the same storage and version counter
    (an optimizer step, ``load_state_dict`` or ``p.data = ...`` all change one
    of them). Only when no gradient flows into the parameters: a kept stack
    would route none back to them."""

    def __init__(self):
        self.refs: list = []
        self.key: Optional[tuple] = None
        self.stacks: Optional[list] = None

    def stacks_for(self, groups: Sequence[Sequence[torch.Tensor]]) -> Optional[list]:
        params = [p for g in groups for p in g]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        try:
            key = tuple((p.untyped_storage().data_ptr(), p.storage_offset(), p._version) for p in params)
        except RuntimeError:  # inference tensors keep no version counter: nothing proves a stack current
            return None
        same = len(self.refs) == len(params) and all(r() is p for r, p in zip(self.refs, params))
        if not same or key != self.key:
            with torch.no_grad():
                self.stacks = [torch.stack([p.detach() for p in g]) for g in groups]
            self.refs, self.key = [weakref.ref(p) for p in params], key
            counters["stacked_weights"]["cached_stacks_built"] += 1
        return self.stacks

    def stacks_at(self, args: Sequence, indices: Sequence[Sequence[int]]) -> Optional[list]:
        return self.stacks_for([[args[i] for i in idx] for idx in indices])


def stack_weights_(layers: torch.nn.Module) -> int:
    """Store the parameters of ``layers`` (an ``nn.ModuleList`` of identical
    layers) stacked: each parameter name becomes one contiguous ``(L, ...)``
    tensor and every layer's parameter a view of its slice (same ``Parameter``
    objects: optimizers and state dicts are unaffected). The diagonal backend
    then reads the stack instead of copying the weights on each call. Returns
    how many parameter names were stacked."""
    modules = list(layers)
    if len(modules) < 2:
        return 0
    names = [n for n, _ in modules[0].named_parameters()]
    stacked = 0
    with torch.no_grad():
        for name in names:
            try:
                params = [m.get_parameter(name) for m in modules]
            except AttributeError:
                continue
            first = params[0]
            if any(p.shape != first.shape or p.dtype != first.dtype or p.device != first.device for p in params):
                continue
            if stacked_view(params) is not None:
                stacked += 1
                continue
            big = torch.stack([p.detach() for p in params])
            for i, p in enumerate(params):
                p.data = big[i]
            stacked += 1
    return stacked
