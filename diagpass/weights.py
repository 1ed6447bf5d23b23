"""Layer weights stored stacked, and whether a call's weights are.

    diagpass.stack_weights_(model.layers)    # once, after building / loading the model
    fast = torch.compile(model, backend="diagonal")

See ``diagpass/passes/stacked_weights.py`` for the graph variant this feeds.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


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
