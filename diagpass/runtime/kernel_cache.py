"""The compiled-step cache (``roll``): each distinct batched step compiled once, reused everywhere.

Unrolled, Inductor compiles every cell copy (the cost grows with S), and
again for every new segment count. But the schedule is regular: all
steady-state wavefronts run the *same* batched step, and ramp wavefronts run
it on fewer cells. With ``roll`` each group call becomes a ``CompiledGroup``:

Before (batch pass output, handed to Inductor whole)::

    out_t2 = diag_t2_g0(stack(h..), w_q[0:2], ...)   # BatchedCell, traced inline
    out_t3 = diag_t3_g0(stack(h..), w_q[0:3], ...)

After (run as Python; each call looks up a kernel)::

    out_t2 = diag_t2_g0(...)   # CompiledGroup: kernel (signature, in_dims, G symbolic)
    out_t3 = diag_t3_g0(...)   # the same kernel, G = 3

Kernels are compiled (``compile_fx``, so forward and backward) on first use
and cached process-wide by (cell signature, which inputs are stacked, the
inputs' shapes/dtypes/strides past the group dim, grad mode). The group size
G is a *symbol*: groups of two or more cells are compiled once on fake
arguments whose leading dim is one ``SymInt`` (Inductor reads G from the
arguments' sizes at run time), so one kernel serves every wavefront width
and a new segment count, traced anew by Dynamo, finds every kernel already
compiled. Whatever the compile assumed about G is in the ShapeEnv's guards;
a kernel is reused only for a G its guards admit (a model whose cell
branches on G gets a kernel per width, counted as ``kernels_specialized``).
Single cells (G = 1, which the ShapeEnv specialises anyway) compile with
static shapes. Glue (embedding, logits, concat) runs eagerly.

Why a host loop and not ``scan``/``while_loop`` in the graph: the ramp
wavefronts have other widths (a scan needs masking or padding, wasting cells),
segment-0 and last-segment cells differ structurally (several scans), and
scan's backward under Inductor needs its carries cloned; separately compiled
pieces keep training through AOTAutograd per kernel and cost one Python call
per group (measured in benchmarks/).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from diagpass.counters import counters
from diagpass.fx_facts import tensor_meta
from diagpass.runtime.batched_cell import BatchedCell
from diagpass.runtime.inner import inner_compile

# key -> [(admits(G), kernel)], newest last
_KERNELS: Dict[tuple, List[Tuple[Callable[[int], bool], Callable]]] = {}
# structure -> small id: a cell signature is a deep tuple, too slow to hash on
# every group call; equal structures (across graphs too) get the same id
_STRUCTURE_IDS: Dict[tuple, int] = {}


def clear_kernel_cache() -> None:
    _KERNELS.clear()


def rows_outermost(a) -> bool:
    """Strides past dim 0 do not depend on G (true of stacks and of slices
    of a weight stack): the strides in the key then hold for every G."""
    if not isinstance(a, torch.Tensor) or a.dim() == 0:
        return False
    extent = sum((size - 1) * stride for size, stride in zip(a.shape[1:], a.stride()[1:]))
    return a.stride(0) > extent


def symbolic_group_args(args, in_dims, G: int):
    """Fake copies of ``args`` whose stacked inputs share one symbolic leading
    dim; everything else static. Returns (fakes, shape_env, symbol)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    source = ConstantSource("diagpass_group_size")
    symbol = shape_env.create_symbol(G, source=source, dynamic_dim=DimDynamic.DYNAMIC)
    size = shape_env.create_symintnode(symbol, hint=G, source=source)
    fakes = []
    with mode:
        for a, d in zip(args, in_dims):
            if not isinstance(a, torch.Tensor):
                fakes.append(a)
                continue
            # fresh tensors, not from_tensor: a view's base would get symbols of its own
            shape = tuple(a.shape) if d is None else (size, *a.shape[1:])
            fake = torch.empty_strided(shape, a.stride(), dtype=a.dtype, device=a.device)
            fakes.append(fake.requires_grad_(a.requires_grad))
    return fakes, shape_env, symbol


def symbolic_rows(args, rows: Sequence[int], group_rows: Sequence[tuple] = ()) -> Tuple[list, Callable[[tuple], bool]]:
    """Fake copies of ``args`` whose inputs at ``rows`` have a symbolic leading dim,
    everything else static; and the test of widths (the leading dims at ``rows``)
    against what the compile assumed of them (``_admits``).

    ``group_rows`` gives, per row input, (its group, how many rows fewer than the
    group's width) where the pass knows it (``passes/width_free.py``): such inputs
    share their group's symbol G, as G - 1 for the rows an entering segment is cat to.
    Other inputs get one symbol per distinct size (Dynamo's duck sizing). With a
    symbol per size, G - 1 = 1 at G = 2 would be specialised to 1, and the kernel
    compiled for G = 2 would admit no other width."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    relation = _relation(args, rows, group_rows)
    symbols: Dict[tuple, tuple] = {}  # group or size -> (its SymInt, its symbol; both constant when specialised)
    fakes, exprs = [], []
    with mode:
        for k, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                fakes.append(a)
                continue
            shape = tuple(a.shape)
            if k in rows:
                key, fewer = relation[k]
                if key not in symbols:
                    source = ConstantSource(f"diagpass_rows_{len(symbols)}")
                    symbol = shape_env.create_symbol(shape[0] + fewer, source=source, dynamic_dim=DimDynamic.DYNAMIC)
                    symbols[key] = (shape_env.create_symintnode(symbol, hint=shape[0] + fewer, source=source), symbol)
                size, symbol = symbols[key]
                shape = (size - fewer if fewer else size, *shape[1:])
                exprs.append(symbol - fewer)
            fake = torch.empty_strided(shape, a.stride(), dtype=a.dtype, device=a.device)
            fakes.append(fake.requires_grad_(a.requires_grad))
    answers: Dict[Tuple[tuple, int], bool] = {}

    def admits(widths: tuple) -> bool:
        key = (widths, len(shape_env.guards))
        if key not in answers:
            answers[key] = _admits(shape_env, exprs, widths)
        return answers[key]

    return fakes, admits


def _relation(args, rows: Sequence[int], group_rows: Sequence[tuple]) -> Dict[int, tuple]:
    """Row input -> (the key of its symbol, rows fewer than the symbol). A group whose
    inputs do not agree on its width here falls back to a symbol per size."""
    known = dict(zip(rows, group_rows))
    widths: Dict[object, set] = {}
    for k in rows:
        group, fewer = known.get(k, (None, None))
        if fewer is not None:
            widths.setdefault(group, set()).add(args[k].shape[0] + fewer)
    relation = {}
    for k in rows:
        group, fewer = known.get(k, (None, None))
        if fewer is not None and len(widths[group]) == 1:
            relation[k] = (("group", group), fewer)
        else:
            relation[k] = (("size", args[k].shape[0]), 0)
    return relation


def _admits(shape_env, exprs: list, widths: tuple) -> bool:
    """Whether widths satisfy what the compile assumed: each row's size is one symbol
    less a constant (or a constant), the symbols' values agree, and the ShapeEnv's
    ranges, replacements and guards hold for them."""
    value: Dict[sympy.Symbol, sympy.Integer] = {}
    for e, w in zip(exprs, widths):
        if not e.is_number:
            (symbol,) = e.free_symbols
            value.setdefault(symbol, sympy.Integer(w) - (e - symbol))
    if any(e.xreplace(value) != w for e, w in zip(exprs, widths)):
        return False
    for symbol, w in value.items():
        bounds = shape_env.var_to_range.get(symbol)
        if bounds is not None and not bounds.lower <= w <= bounds.upper:
            return False
        replaced = shape_env.replacements.get(symbol)
        if replaced is not None and replaced.xreplace(value) != w:
            return False
    # anything still symbolic after substituting the widths is not provably true
    return all(g.expr.xreplace(value) is sympy.true for g in shape_env.guards)


def admits_group_size(shape_env, symbol) -> Callable[[int], bool]:
    """G -> whether every assumption the compile made about G holds. Read
    live, not snapshotted: Inductor lowers the backward on first use and may
    add guards then; answers are cached per (G, number of guards)."""
    answers: Dict[Tuple[int, int], bool] = {}

    def admits(G: int) -> bool:
        key = (G, len(shape_env.guards))
        if key not in answers:
            answers[key] = _admits(shape_env, [symbol], (G,))
        return answers[key]

    return admits


class CompiledGroup(torch.nn.Module):
    """A ``BatchedCell`` whose kernel comes from the process-wide cache."""

    def __init__(self, batched: BatchedCell, structure: tuple, inner: str):
        super().__init__()
        self.batched = batched
        self.structure_id = _STRUCTURE_IDS.setdefault(structure, len(_STRUCTURE_IDS))
        self.inner = inner

    def _graph(self, args) -> fx.GraphModule:
        """The group call on the tensor arguments; non-tensors (ints such as
        a batch size, already in the cache key) are constants of the graph,
        not inputs AOTAutograd would turn into symbols."""
        return self.batched.as_graph(args, lambda a: isinstance(a, torch.Tensor))

    def _symbolic(self, args) -> bool:
        stacked = [a for a, d in zip(args, self.batched.in_dims) if d is not None]
        return (
            self.batched.group_size >= 2
            and self.inner != "eager"  # nothing is compiled: any G runs as is
            and bool(stacked)
            and all(isinstance(a, torch.Tensor) and rows_outermost(a) for a in stacked)
        )

    def _compile(self, args, symbolic: bool) -> Tuple[Callable[[int], bool], Callable]:
        gm = self._graph(args)
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        if not symbolic:
            G = self.batched.group_size
            admits = lambda g: g == G  # noqa: E731
            fn = inner_compile(gm, [args[i] for i in tensors], self.inner)
        else:
            fakes, shape_env, symbol = symbolic_group_args(args, self.batched.in_dims, self.batched.group_size)
            fn = inner_compile(gm, [fakes[i] for i in tensors], self.inner, own_symbols=True)
            admits = admits_group_size(shape_env, symbol)
        return admits, lambda *a: fn(*[a[i] for i in tensors])

    def _key(self, args) -> tuple:
        # requires_grad only matters to a kernel compiled with grad enabled
        grad = torch.is_grad_enabled()
        return (
            self.structure_id,
            grad,
            "G" if self._symbolic(args) else self.batched.group_size,
            tuple(tensor_meta(a, with_grad=grad, skip_leading=d is not None) for a, d in zip(args, self.batched.in_dims)),
        )

    def cached_kernel(self, args) -> Optional[Callable]:
        """The kernel already compiled for ``args``, or None."""
        G = self.batched.group_size
        return next((fn for admits, fn in _KERNELS.get(self._key(args), ()) if admits(G)), None)

    def kernel(self, args) -> Callable:
        """The kernel for ``args`` (real tensors, or fakes of their metadata),
        compiled on the first call that needs it."""
        fn = self.cached_kernel(args)
        if fn is not None:
            counters["roll"]["kernel_cache_hits"] += 1
            return fn
        entries = _KERNELS.setdefault(self._key(args), [])
        admits, fn = self._compile(args, self._symbolic(args))
        if entries:
            counters["roll"]["kernels_specialized"] += 1  # an earlier symbolic compile did not admit G
        entries.append((admits, fn))
        counters["roll"]["kernels_compiled"] += 1
        return fn

    def forward(self, *args):
        if any(isinstance(a, FakeTensor) for a in args):
            return self.batched(*args)  # the backend's fake-tensor check: trace, don't compile
        return tuple(self.kernel(args)(*args))
