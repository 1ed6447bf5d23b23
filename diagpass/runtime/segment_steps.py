"""Steps: each distinct segment's (or wavefront's) subgraph compiled once, reused across steps and graphs.

``passes/segment_steps.py`` cuts the sequential graph into one ``call_module``
per segment, ``passes/wavefront_steps.py`` the batched graph into one per
wavefront (the same, with its steady state one structure). Here each of those subgraphs becomes a ``CompiledStep``: on its
first call it looks up a process-wide cache by (structure, grad mode, the
arguments' static metadata) and compiles on a miss (``inner_compile`` of a
copy, with the real arguments). The middle segments share one structure, so a
model compiles about three steps whatever S is, and a new segment count finds
them compiled. The outer graph (prologue, the step calls, epilogue) runs as
Python: views of the input (as contiguous copies), glue several steps share, and
the final concatenation.

Before (``SegmentSteps.gm``)::

    step_1 = segment_1(x_1, m_0, w..)      # fx.GraphModule

After::

    step_1 = segment_1(x_1, m_0, w..)      # CompiledStep: the cached kernel of its structure

Each compiled step is AOTAutograd's (Inductor: ``compile_fx``), so a call that
needs gradients gets its backward, and a step that aliases or writes its
inputs is handled there, as for any graph.

A wavefront step whose group inputs were moved outside it (``passes/width_free.py``:
its placeholders named in ``meta["group_inputs"]`` have their group's width G, or
G less a constant from ``meta["group_rows"]``, as leading dim) is compiled once for
a symbolic G (``kernel_cache.symbolic_rows``) and cached with the test of what the
compile assumed of G: the ramp steps of every width, and a new segment count's,
share it.

On the CPU a step is compiled with Inductor's C++ wrapper (``step_cpp_wrapper``):
a step runs S times a call, and its Python wrapper (buffer allocation, an
assert per input) was a cost the whole graph pays once.
"""

from __future__ import annotations

import logging
import operator
from typing import Callable, Dict, List, Tuple

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from diagpass.counters import counters
from diagpass.fx_facts import (copy_graph_module, example_value, graph_structure, static_meta, tensor_meta,
                               width_free_structure)
from diagpass.logs import first_line
from diagpass.runtime.inner import inner_compile
from diagpass.runtime.kernel_cache import rows_outermost, symbolic_rows

log = logging.getLogger("diagpass")

_STEPS: Dict[tuple, Callable] = {}  # key -> the compiled step (its tensor arguments)
# key -> [(admits(widths), the step compiled for symbolic widths)], newest last
_WIDTH_FREE_STEPS: Dict[tuple, List[Tuple[Callable[[tuple], bool], Callable]]] = {}
# structure -> small id: a structure is a deep tuple, slow to hash on every call
_STRUCTURE_IDS: Dict[tuple, int] = {}


def clear_step_cache() -> None:
    _STEPS.clear()
    _WIDTH_FREE_STEPS.clear()


def _intern(structure: tuple) -> int:
    return _STRUCTURE_IDS.setdefault(structure, len(_STRUCTURE_IDS))


class CompiledStep(torch.nn.Module):
    """``rewritten``: a wavefront step (``passes/wavefront_steps.py``), compiled with the
    Inductor options of rewritten graphs; ``kind`` names its counters; ``cpp_wrapper``:
    Inductor's C++ wrapper for steps whose tensors are all on the CPU."""

    def __init__(self, step: fx.GraphModule, inner: str, rewritten: bool = False, kind: str = "segment_steps",
                 cpp_wrapper: bool = False):
        super().__init__()
        self.step, self.inner, self.rewritten, self.kind = step, inner, rewritten, kind
        self.cpp_wrapper = cpp_wrapper and inner == "inductor"
        self.structure_id = _intern(step.meta["structure"])
        # Dynamo guards the outer graph's inputs and grad mode, so at this site only the
        # arguments Dynamo kept symbolic (numbers, tensors with symbolic sizes) can vary
        # from call to call; the kernel is kept per their values (Inductor's code also
        # asserts its inputs' sizes and strides). Hashing the full key every call cost
        # about 2 ms a step.
        self.varying = [k for k, ph in enumerate(step.graph.find_nodes(op="placeholder"))
                        if static_meta([example_value(ph)]) is None]
        # the inputs whose leading dim is the groups' width (passes/width_free.py)
        self.rows = tuple(step.meta.get("group_inputs", ()))
        self.group_rows = tuple(step.meta.get("group_rows", ()))  # set with group_inputs
        self.kernels: Dict[tuple, Callable] = {}

    def forward(self, *args):
        if any(isinstance(a, FakeTensor) for a in args):
            return self.step(*args)
        site = tuple((a.shape, a.stride()) if isinstance(a, torch.Tensor) else a for a in map(args.__getitem__, self.varying))
        fn = self.kernels.get(site)
        if fn is None:
            fn = self.kernels[site] = self._kernel(args)
        return fn(*args)

    def _kernel(self, args) -> Callable:
        """From the process-wide cache, compiled on a miss."""
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        numbers = [a for a in args if not isinstance(a, torch.Tensor)]
        if static_meta([args[i] for i in tensors]) is None or not all(type(a) in (int, float, bool) for a in numbers):
            counters[self.kind]["calls_uncompiled"] += 1  # never seen: run it as it is
            return self.step
        # a site Dynamo kept symbolic is keyed as the graph it becomes for these arguments
        # (a static graph's step, with those sizes as constants, is the same kernel)
        dynamic = bool(self.varying)
        step, tensors = _specialized(self.step, args) if dynamic else (self.step, tensors)
        meta = static_meta([args[i] for i in tensors])
        example = [args[i] for i in tensors]
        cpp = self.cpp_wrapper and all(t.device.type == "cpu" for t in example)
        if self.rows and self.inner != "eager" and set(self.rows) <= set(tensors) \
                and all(rows_outermost(args[i]) for i in self.rows):
            structure = _intern(width_free_structure(step, [tensors.index(i) for i in self.rows], self.group_rows)) \
                if dynamic else self.structure_id
            return self._width_free_kernel(step, args, tensors, structure, cpp)
        structure = _intern(graph_structure(step)) if dynamic else self.structure_id
        key = (structure, torch.is_grad_enabled(), meta, self.inner, self.rewritten, cpp)
        compiled = _STEPS.get(key)
        if compiled is None:
            compiled = _STEPS[key] = self._compile(step, example, cpp)
            counters[self.kind]["steps_compiled"] += 1
        else:
            counters[self.kind]["step_cache_hits"] += 1
        # which of this site's arguments the kernel takes is the site's own (a static and a
        # specialised site of one kernel pass their tensors at different positions)
        return lambda *a: compiled(*[a[i] for i in tensors])

    def _width_free_kernel(self, step: fx.GraphModule, args, tensors: List[int], structure: int, cpp: bool) -> Callable:
        """The kernel compiled for a symbolic width, from the process-wide cache: keyed
        as a static step but for its row inputs' leading dims, kept if its ShapeEnv's
        guards admit these widths (one compiled for G = 2 may be specialised to it)."""
        grad = torch.is_grad_enabled()
        meta = tuple(tensor_meta(args[i], skip_leading=i in self.rows) for i in tensors)
        key = (structure, grad, meta, self.inner, self.rewritten, cpp)
        widths = tuple(args[i].shape[0] for i in self.rows)
        entries = _WIDTH_FREE_STEPS.setdefault(key, [])
        compiled = next((fn for admits, fn in entries if admits(widths)), None)
        if compiled is None:
            fakes, admits = symbolic_rows(args, self.rows, self.group_rows)
            compiled = self._compile(step, [fakes[i] for i in tensors], cpp, own_symbols=True)
            if not admits(widths):  # its guards contradict the sizes it was traced at
                raise RuntimeError(f"the kernel compiled for the widths {widths} does not admit them")
            counters[self.kind]["steps_compiled"] += 1
            counters[self.kind]["steps_width_free"] += 1
            if entries:
                counters[self.kind]["steps_specialized"] += 1  # an earlier kernel's guards did not admit these widths
            entries.append((admits, compiled))
        else:
            counters[self.kind]["step_cache_hits"] += 1
        return lambda *a: compiled(*[a[i] for i in tensors])

    def _compile(self, step: fx.GraphModule, example: list, cpp: bool, own_symbols: bool = False) -> Callable:
        symbols = {"own_symbols": True} if own_symbols else {}
        if cpp:
            try:
                compiled = inner_compile(copy_graph_module(step)[0], example, self.inner, self.rewritten, cpp_wrapper=True,
                                         **symbols)
                counters[self.kind]["steps_cpp_wrapper"] += 1
                return compiled
            except Exception as e:  # noqa: BLE001 - the C++ wrapper is a per-call saving; the Python one is Inductor's default
                counters[self.kind]["steps_cpp_wrapper_failed"] += 1
                log.info("diagpass: a %s step did not compile with the C++ wrapper (%s); using the Python wrapper",
                         self.kind.split("_")[0], first_line(e), exc_info=log.isEnabledFor(logging.DEBUG))
        return inner_compile(copy_graph_module(step)[0], example, self.inner, rewritten=self.rewritten, **symbols)


# integer arithmetic on sizes, as Dynamo writes it (``sym_sum([-56, s70])`` for a slice end)
_FOLDABLE = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
             operator.neg, operator.truediv, torch.sym_sum, torch.sym_max, torch.sym_min, torch.sym_int}


def _specialized(step: fx.GraphModule, args) -> Tuple[fx.GraphModule, List[int]]:
    """A copy of ``step`` for these concrete arguments, and the indices of the arguments
    it still takes: its number inputs (sizes Dynamo kept as symbols) baked in as
    constants, the sizes it reads off its tensor inputs and the integer arithmetic on
    them folded, and a tensor input read only for its size dropped. The static graph of
    another segment count has those as constants: the two steps are then one kernel."""
    gm, _ = copy_graph_module(step)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    given = dict(zip(placeholders, args))
    known = {ph: a for ph, a in given.items() if not isinstance(a, torch.Tensor)}
    for n in gm.graph.nodes:
        if n.op == "call_method" and n.target == "size" and isinstance(given.get(n.args[0]), torch.Tensor):
            shape = tuple(given[n.args[0]].shape)
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            if not isinstance(dim, fx.Node):
                known[n] = shape if dim is None else shape[dim]
        elif n.op == "call_function" and n.target in _FOLDABLE and n.all_input_nodes \
                and all(a in known for a in n.all_input_nodes):
            a, kw = fx.node.map_arg((n.args, n.kwargs), known.__getitem__)
            known[n] = n.target(*a, **kw)
    for n in reversed(list(known)):
        for user in list(n.users):
            user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda m: known[m] if m is n else m)
        gm.graph.erase_node(n)
    for ph in placeholders:
        if ph not in known and not ph.users:
            gm.graph.erase_node(ph)
    gm.recompile()
    kept = set(gm.graph.find_nodes(op="placeholder"))
    return gm, [i for i, ph in enumerate(placeholders) if ph in kept]


def compile_steps(gm: fx.GraphModule, inner: str, rewritten: bool = False, kind: str = "segment_steps",
                  cpp_wrapper: bool = False) -> fx.GraphModule:
    """A copy of ``gm`` (``passes/cut.Steps.gm``) whose step subgraphs are ``CompiledStep``s."""
    out, _ = copy_graph_module(gm)
    for name, step in list(gm.named_children()):
        if isinstance(step, fx.GraphModule) and "structure" in step.meta:
            setattr(out, name, CompiledStep(step, inner, rewritten, kind, cpp_wrapper))
    return out


def with_fallback(steps: fx.GraphModule, fallback: Callable[[tuple], Callable], kind: str = "segment_steps") -> Callable:
    """``steps`` run per call; if a call fails (a step did not compile), ``fallback(args)``
    (the graph compiled whole) runs it and every later call. Safe to retry: the cut
    graph writes no graph input (functionalized graphs that would are never cut)."""
    whole: list = []

    def run(*args):
        if whole:
            return whole[0](*args)
        try:
            return steps(*args)
        except Exception as e:  # noqa: BLE001 - the steps are a compile-time saving, never worth a failed call
            counters[kind]["graphs_compiled_whole"] += 1
            log.warning("diagpass: a %s step failed (%s); compiling the graph whole", kind.split("_")[0], first_line(e),
                        exc_info=log.isEnabledFor(logging.DEBUG))
            whole.append(fallback(args))
            return whole[0](*args)

    return run
