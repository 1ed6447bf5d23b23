"""Pass 5 — roll: compile each distinct batched step once, reuse it everywhere.

Unrolled, Inductor compiles every cell copy: ~1 s per cell on a small CPU, and
again for every new segment count. But the schedule is regular: all
steady-state wavefronts run the *same* batched step, and ramp wavefronts run
it on fewer cells. With ``roll`` each group call becomes a ``CompiledGroup``:

Before (batch pass output, handed to Inductor whole)::

    out_t2 = diag_t2_g0(stack(h..), w_q[0:2], ...)   # BatchedCell, traced inline
    out_t3 = diag_t3_g0(stack(h..), w_q[0:3], ...)

After (run as Python; each call looks up a kernel)::

    out_t2 = diag_t2_g0(...)   # CompiledGroup(key=(signature, G=2, in_dims))
    out_t3 = diag_t3_g0(...)   # CompiledGroup(key=(signature, G=2+1 chunks))

Kernels are compiled (``compile_fx``, so forward and backward) on first use
and cached process-wide by (cell signature, group size, which inputs are
shared, input shapes/dtypes/strides, grad mode): a new segment count, traced
anew by Dynamo, finds every kernel already compiled. Group sizes are split
into powers of two so the number of kernels is O(log L) per cell structure,
independent of S. Glue (embedding, logits, concat) runs eagerly.

Why a host loop and not ``scan``/``while_loop`` in the graph: the ramp
wavefronts have other widths (a scan needs masking or padding, wasting cells),
segment-0 and last-segment cells differ structurally (several scans), and
scan's backward under Inductor needs its carries cloned; separately compiled
pieces keep training through AOTAutograd per kernel and cost one Python call
per group (measured in benchmarks/).
"""

from __future__ import annotations

import operator
from typing import Callable, Dict, List, Tuple

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from diagpass.counters import counters
from diagpass.runtime import BatchedCell

_KERNELS: Dict[tuple, Callable] = {}


def clear_kernel_cache() -> None:
    _KERNELS.clear()


def power_of_two_chunks(n: int) -> List[int]:
    """7 -> [4, 2, 1]: group sizes for which kernels are compiled."""
    out, bit = [], 1 << max(n.bit_length() - 1, 0)
    while n:
        if n >= bit:
            out.append(bit)
            n -= bit
        bit >>= 1
    return out


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return (tuple(a.shape), a.dtype, a.stride(), a.requires_grad, a.device.type)
    return (type(a).__name__, repr(a))


class CompiledGroup(torch.nn.Module):
    """A ``BatchedCell`` whose kernel comes from the process-wide cache."""

    def __init__(self, batched: BatchedCell, structure: tuple, inner: str):
        super().__init__()
        self.batched = batched
        self.structure = structure
        self.inner = inner

    def _compile(self, args) -> Callable:
        g = fx.Graph()
        placeholders = [g.placeholder(f"arg{i}") for i in range(len(args))]
        call = g.call_module("batched", tuple(placeholders))
        g.output(tuple(g.call_function(operator.getitem, (call, j)) for j in range(len(self.batched._final))))
        gm = fx.GraphModule({"batched": self.batched}, g)
        from diagpass.backend import inner_compile

        return inner_compile(gm, list(args), self.inner)

    def forward(self, *args):
        if any(isinstance(a, FakeTensor) for a in args):
            return self.batched(*args)  # the backend's fake-tensor check: trace, don't compile
        key = (self.structure, torch.is_grad_enabled(), tuple(_arg_key(a) for a in args))
        fn = _KERNELS.get(key)
        if fn is None:
            fn = self._compile(args)
            _KERNELS[key] = fn
            counters["roll"]["kernels_compiled"] += 1
        else:
            counters["roll"]["kernel_cache_hits"] += 1
        return tuple(fn(*args))


def group_structure(signature: tuple, size: int, in_dims: Tuple) -> tuple:
    return (signature, size, tuple(in_dims))
