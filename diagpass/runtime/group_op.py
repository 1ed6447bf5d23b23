"""Compiled glue: a rolled graph's group calls as one opaque op, the rest through Inductor.

With ``roll`` every group call is a ``CompiledGroup`` whose kernel comes
from the process-wide cache. Run as Python, the glue around them (embedding,
concatenations, norms, logits) is eager. Here each group call becomes one
``torch.ops.diagpass.group_call`` node, so the whole graph can go to
Inductor: the glue fuses and compiles, and the group calls stay calls into
the cached kernels (Inductor sees an extern kernel whose output shapes the
op's fake implementation gives).

Before (lowered rolled graph, run as Python)::

    out = diag_t2_g0(x, A, w_q_0_1)                      # CompiledGroup
    h = getitem(out, 0)

After (handed to Inductor)::

    out = diagpass.group_call(7, [x, A, w_q_0_1])        # 7: the group's id
    h = getitem(out, 0)

Inference only: the op has no autograd formula. A graph that needs gradients
keeps its glue eager (``backend``), where each kernel's own backward runs.
The op's id names a ``CompiledGroup`` in a registry that holds it weakly; the
compiled graph returned by ``compile_glue`` holds its groups.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable, List, Optional

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from diagpass.counters import counters
from diagpass.fx_facts import copy_graph_module, example_value, static_meta
from diagpass.runtime.inner import inner_compile
from diagpass.runtime.kernel_cache import CompiledGroup

_GROUPS: "weakref.WeakValueDictionary[int, _GroupSite]" = weakref.WeakValueDictionary()
_IDS = itertools.count()


class _GroupSite:
    """One group call: its module, the call's non-tensor arguments, the
    shapes and dtypes of its outputs (static: traced once on fakes) and, once
    compiled, its kernel."""

    def __init__(self, group: CompiledGroup, args: tuple, outputs: tuple):
        self.group = group
        self.tensor_at = [i for i, a in enumerate(args) if isinstance(a, fx.Node)]
        self.constants = list(args)
        self.outputs = outputs
        self.kernel: Optional[Callable] = None
        self.declared: Optional[bool] = None  # the kernel's outputs are as declared as they are

    def arguments(self, tensors) -> list:
        args = list(self.constants)
        for i, t in zip(self.tensor_at, tensors):
            args[i] = t
        return args

    def __call__(self, tensors) -> List[torch.Tensor]:
        # The kernel is bound, not looked up: the compiled glue feeds this call
        # inputs of one fixed shape and stride (static shapes, exact strides),
        # under the grad mode Dynamo guards.
        outs = self.kernel(*self.arguments(tensors))
        if self.declared:
            return list(outs)
        # whether outputs alias inputs, or each other, or are not contiguous is
        # fixed by the compiled kernel for fixed input layouts: checked once
        declared = declared_outputs(outs, tensors)
        self.declared = all(a is b for a, b in zip(declared, outs))
        return declared


def declared_outputs(outs, tensors) -> List[torch.Tensor]:
    """The op's outputs as declared: contiguous, aliasing neither an input nor
    each other (Inductor plans buffers on that); copies only where needed."""
    seen = {t.untyped_storage().data_ptr() for t in tensors if t.numel()}
    declared = []
    for o in outs:
        fresh = o.contiguous()
        if fresh.numel() and fresh.untyped_storage().data_ptr() in seen:
            fresh = fresh.clone()
        seen.add(fresh.untyped_storage().data_ptr())
        declared.append(fresh)
    return declared


# exact strides: the kernels were compiled for the strides of the traced graph
@torch.library.custom_op("diagpass::group_call", mutates_args=(), tags=(torch._C.Tag.needs_exact_strides,))
def group_call(group_id: int, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    return _GROUPS[group_id](tensors)


@group_call.register_fake
def _(group_id: int, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in _GROUPS[group_id].outputs]


def registered_ids() -> set:
    """The ids of the group calls of compiled graphs still alive."""
    return set(_GROUPS.keys())


def opaque_groups(gm: fx.GraphModule) -> Optional[tuple]:
    """Rewrite ``gm`` (a lowered rolled graph, in place) so that its group
    calls are ``group_call`` nodes. Returns the sites the graph names (keep
    them alive as long as the compiled graph), or None when a group call
    has an argument that is neither a tensor nor a constant."""
    placeholders = [example_value(n) for n in gm.graph.find_nodes(op="placeholder")]
    if static_meta(placeholders) is None:  # symbolic sizes: output shapes are traced statically
        return None
    sites, traced = [], {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), CompiledGroup):
            continue
        if node.kwargs or not all(_tensor_or_constant(a) for a in node.args):
            return None
        group = gm.get_submodule(node.target)
        compiled = _compiled(group, node.args, traced)
        if compiled is None:
            return None
        site = _GroupSite(group, node.args, compiled[0])
        site.kernel = compiled[1]
        key = next(_IDS)
        _GROUPS[key] = site
        sites.append(site)
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(torch.ops.diagpass.group_call.default, (key, tensors))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    for name, child in list(gm.named_children()):
        if isinstance(child, CompiledGroup):
            delattr(gm, name)
    gm.graph.lint()
    gm.recompile()
    return tuple(sites) or None


def _compiled(group: CompiledGroup, args: tuple, traced: dict) -> Optional[tuple]:
    """(output (shape, dtype, device)s, kernel) of a group call, from a trace
    on fresh fakes of its arguments and the kernel cache; None when an input's
    size is symbolic. The kernel compiles here, not inside the op's dispatch
    (where its trace would run in the op's dispatch context)."""
    values = [example_value(a) if isinstance(a, fx.Node) else a for a in args]
    key = (group.structure_id, static_meta([v for v in values if isinstance(v, torch.Tensor)]),
           tuple(repr(v) for v in values if not isinstance(v, torch.Tensor)))
    if key[1] is None:
        return None
    if key not in traced:
        with FakeTensorMode() as mode:
            fakes = [mode.from_tensor(v, static_shapes=True) if isinstance(v, torch.Tensor) else v for v in values]
            outputs = tuple((tuple(o.shape), o.dtype, o.device) for o in group.batched(*fakes))
        traced[key] = (outputs, group.kernel(fakes))
    return traced[key]


def _tensor_or_constant(a) -> bool:
    if isinstance(a, fx.Node):
        return isinstance(example_value(a), torch.Tensor)
    return not isinstance(a, (list, tuple, dict, slice, torch.Tensor))


def compile_glue(gm: fx.GraphModule, example_inputs, inner: str) -> Optional[Callable]:
    """``gm`` with its glue compiled by ``inner`` and its group calls opaque;
    None when a group call's arguments cannot be passed to the op."""
    gm = copy_graph_module(gm)[0]  # the eager-glue graph stays as it is
    sites = opaque_groups(gm)
    if sites is None:
        return None
    compiled = inner_compile(gm, list(example_inputs), inner, rewritten=True)
    counters["roll"]["glue_compiled"] += 1

    def run(*args):
        sites  # noqa: B018 - the compiled graph names its groups by id: keep them alive
        return compiled(*args)

    return run


def compile_rolled(gm: fx.GraphModule, args, inner: str, glue: bool) -> Callable:
    """A ``roll`` graph: its group calls take their kernels from the cache; the glue runs
    eagerly, or with ``glue`` (inference, Inductor) compiled around them on the first call,
    outside Dynamo's tracing context (the kernels compile then too)."""
    from diagpass.runtime.dispatch import Lazy, needs_grad

    if not glue or inner != "inductor" or needs_grad(args):
        return gm.forward
    compiled = Lazy(lambda real: compile_glue(gm, real, inner) or gm.forward)
    return lambda *real: compiled(real)(*real)
