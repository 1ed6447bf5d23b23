"""Mark layers as compile regions: Dynamo traces a layer body once, not S x L times.

    diagpass.mark_compile_regions(model.layers)           # or any modules
    fast = torch.compile(model, backend="diagonal")

``torch.compiler.nested_compile_region`` decorates a *function*; marking an
instance needs its class's ``forward`` decorated. Decorating the user's class
would change every instance in the process, so each marked module gets its own
subclass (same name, same methods) whose ``forward`` is the decorated one.
The diagonal backend inlines the resulting ``invoke_subgraph`` calls and
partitions as usual (``diagpass/passes/inline_subgraphs.py``).
"""

from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch import nn

_MARKED: Dict[type, type] = {}


def _marked_class(cls: type) -> type:
    if getattr(cls, "__diagpass_region__", False):
        return cls
    if cls not in _MARKED:
        forward = torch.compiler.nested_compile_region(cls.forward)
        _MARKED[cls] = type(cls.__name__, (cls,), {"forward": forward, "__diagpass_region__": True,
                                                   "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _MARKED[cls]


def mark_compile_regions(modules: Iterable[nn.Module]) -> int:
    """Mark each module's forward as a nested compile region; return how many
    were newly marked. Parameters, hooks and state are untouched."""
    if isinstance(modules, nn.Module) and not isinstance(modules, (nn.ModuleList, nn.Sequential)):
        modules = [modules]
    count = 0
    for module in modules:
        marked = _marked_class(type(module))
        if type(module) is not marked:
            module.__class__ = marked
            count += 1
    return count
