"""Facts about Dynamo's FX graphs, shared by the passes and the runtime.

Names of things (placeholder paths, layer FQNs), a node's example value, which
nodes compute, write, draw random numbers or call SDPA, a tensor's metadata
key, and the one graph copy. Nothing here rewrites a graph."""

from __future__ import annotations

import functools
import operator
import re
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.multiprocessing.reductions import StorageWeakRef

from diagpass.ir.meta import PRIVATE_WRITE

_ROOT = re.compile(r"^L\[['\"][^'\"]*['\"]\]\.?")
# ``.__dict__['_modules']['layer']``: how Dynamo reaches a submodule of a
# module whose class overrides ``__getattr__`` (layer wrappers that forward
# unknown attributes to the wrapped layer).
_VIA_DICT = re.compile(r"\.__dict__\[['\"]_(?:modules|parameters|buffers)['\"]\]\[['\"]([^'\"]+)['\"]\]")
_CONTAINER = re.compile(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]")
_ITEM = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


@functools.lru_cache(maxsize=1 << 14)
def dotted_path(source_name: str) -> str:
    """``L['self']._modules['layers']._modules['0'].q`` -> ``layers.0.q``.

    Cached: an unrolled graph repeats each module path once per segment."""
    path = _VIA_DICT.sub(r".\1", source_name)
    path = _CONTAINER.sub(r".\1", path)
    path = _ROOT.sub("", path)
    path = _ITEM.sub(r".\1", path)
    return path.strip(".")


_LIFTED = re.compile(r"_(?:parameters|buffers)_(?P<attr>.+)_$")
_SELF_STATE = re.compile(r"^l_self_(?P<body>(?:modules|parameters|buffers)_.+)_$")
_STATE_SEP = re.compile(r"(?:^|_)(?:dict_)?(?:modules|parameters|buffers)_")


def placeholder_path(node: fx.Node) -> Optional[str]:
    """Attribute path of a lifted parameter/buffer/attribute placeholder.

    From Dynamo's ``grapharg`` source when present; graphs handed out by
    ``torch._dynamo.explain`` lack it, so fall back to the path Dynamo encodes
    in the placeholder's name (``l_self_modules_layers_modules_0_..._parameters_weight_``),
    else to the owning module (``nn_module_stack``) plus the attribute name.
    The name, not the module stack, comes first: placeholders lifted while
    tracing a ``nested_compile_region`` body carry the stack of the first call.
    """
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        named = _SELF_STATE.match(node.name)
        if named is not None:
            return ".".join(p for p in _STATE_SEP.split(named["body"]) if p)
        m = _LIFTED.search(node.name)
        paths = module_paths(node)
        if m is None or not paths:
            return None
        return f"{paths[-1]}.{m['attr']}" if paths[-1] else m["attr"]
    name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", None)
    if not isinstance(name, str) or not name.startswith("L["):
        return None
    if "_modules" not in name and "_parameters" not in name and "_buffers" not in name:
        return None  # a plain forward() argument, not module state
    return dotted_path(name)


_FQN_MAP = "dynamo_flat_name_to_original_fqn"
# Container steps Dynamo writes into a placeholder's target between two
# attribute names: ``_modules_``, ``_parameters_``, ``_buffers_``, and
# ``_dict_`` (``__dict__['_modules']``, for classes overriding ``__getattr__``).
_MARKERS = re.compile(r"(?:_(?:modules|parameters|buffers|dict)(?=_))+")
_NON_ALNUM = re.compile(r"[^A-Za-z0-9]")


def _fqn_pattern(root: str, fqn: str) -> "re.Pattern":
    steps = "".join(
        "_(?:(?:modules|parameters|buffers|dict)_)*" + re.escape(_NON_ALNUM.sub("_", c)) for c in fqn.split(".")
    )
    return re.compile("L_" + re.escape(root) + steps + "_?")


def placeholder_fqns(gm: fx.GraphModule) -> dict:
    """{placeholder: original FQN} for the parameters and buffers Dynamo lifted.

    Why not parse placeholder names: they encode the *access path*, which real
    code bends (``__dict__`` steps for wrappers with a custom ``__getattr__``,
    lower-cased names, a ModuleList reached under an alias); the FQN map
    (``gm.meta['dynamo_flat_name_to_original_fqn']``, flat name -> FQN relative
    to the compiled module, one per parameter object as ``named_parameters``
    dedupes them) does not. Its keys are not placeholder names, so a
    placeholder's target is matched to an FQN by canonical form (container
    steps dropped, non-alphanumerics as ``_``) and then verified by a full
    match of the target against that FQN's path. Placeholders that match no
    FQN (plain tensor attributes, which the map leaves out; a parameter
    reached under another name than its FQN) are not in the result, and
    neither is any placeholder whose canonical form two FQNs share. Empty when
    the graph has no map (graphs from ``torch._dynamo.explain``).
    """
    fqn_map = gm.meta.get(_FQN_MAP) or {}
    by_canon: dict = {}
    roots = set()
    for flat, fqn in fqn_map.items():
        if not isinstance(flat, str) or not isinstance(fqn, str):
            continue
        canon = _NON_ALNUM.sub("_", fqn)
        if flat.startswith("L__") and flat.endswith("___" + canon):
            roots.add(flat[3 : len(flat) - len(canon) - 3])
        by_canon.setdefault(canon, set()).add(fqn)
    out = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        if not isinstance(node.target, str):
            continue
        stripped = _MARKERS.sub("", node.target).rstrip("_")
        for root in roots:
            head = "L_" + root + "_"
            fqns = by_canon.get(stripped[len(head):]) if stripped.startswith(head) else None
            if fqns and len(fqns) == 1:
                fqn = next(iter(fqns))
                if _fqn_pattern(root, fqn).fullmatch(node.target):
                    out[node] = fqn
                    break
    return out


def module_paths(node: fx.Node) -> list:
    """Module paths owning ``node``, outermost first (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else value
        if isinstance(path, str):
            out.append(dotted_path(path))
    return out


def copy_graph_module(gm: fx.GraphModule) -> Tuple[fx.GraphModule, Dict[fx.Node, fx.Node]]:
    """A copy of ``gm`` (same root, same ``meta``) and the old -> new node map."""
    graph = fx.Graph()
    val_map: Dict[fx.Node, fx.Node] = {}
    value = graph.graph_copy(gm.graph, val_map, return_output_node=True)
    if isinstance(value, tuple):
        value = value[0]
    out = graph.output(value)
    old_out = next(iter(gm.graph.find_nodes(op="output")))
    out.meta = dict(old_out.meta)
    val_map[old_out] = out
    new = graph_module(gm, graph, type(gm).__name__)
    new.meta = dict(gm.meta)
    return new, val_map


def graph_module(root, graph: fx.Graph, class_name: str = "GraphModule") -> fx.GraphModule:
    """``fx.GraphModule(root, graph)`` whose Python code is generated on first use (a
    call, ``.code``), as Dynamo's and Inductor's own graph modules: a pass's graph of
    ten thousand nodes is mostly read as a graph, never run as Python."""
    return _LazyGraphModule(root, graph, class_name=class_name)


def storages_of(value) -> frozenset:
    """The storages of the tensors in ``value`` (any pytree), as ``StorageWeakRef``s; a
    tensor without a plain storage (sparse, nested) has none."""
    out = set()
    for leaf in torch.utils._pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            try:
                out.add(StorageWeakRef(leaf.untyped_storage()))
            except (RuntimeError, NotImplementedError):
                continue
    return frozenset(out)


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def is_compute(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method", "call_module")


SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def tensor_meta(value, with_grad: bool = True, skip_leading: bool = False):
    """What compiled code is specialised on for one value: (shape, stride,
    dtype, device[, requires_grad]) of a tensor (past its leading dim with
    ``skip_leading``), the type and repr of anything else. Sizes may be
    symbolic; ``static_meta`` is the variant that refuses them."""
    if not isinstance(value, torch.Tensor):
        return (type(value).__name__, repr(value))
    shape, stride = tuple(value.shape), tuple(value.stride())
    if skip_leading:
        shape = shape[1:]
    key = (shape, stride, value.dtype, value.device)
    return key + (value.requires_grad,) if with_grad else key


def graph_structure(gm: fx.GraphModule, width_free: bool = False) -> tuple:
    """``gm``'s nodes in order, each (op, target, arguments with nodes as indices,
    checkpoint tags); placeholders by position, not name. Equal for graphs that
    compute the same function of their inputs with the same ops (constants
    included) and recompute the same regions in the backward. ``width_free``: a
    module call with a ``width_free_structure`` (a group call, whose width is its
    stacked arguments' leading dim) is keyed by it."""
    index: Dict[fx.Node, int] = {}
    regions: Dict[object, int] = {}
    out = []
    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: ("node", index[a]))
        target = None if n.op == "placeholder" else n.target
        if n.op == "call_module":  # by what the module computes, not by its name in this graph
            module = gm.get_submodule(n.target)
            free = getattr(module, "width_free_structure", None) if width_free else None
            target = free or module_structure(module) or _Identity(module)
        out.append((n.op, target, _hashable(args), _checkpoint_tags(n, regions)))
    return tuple(out)


def width_free_structure(step: fx.GraphModule, rows: Sequence[int], group_rows: Sequence[tuple] = ()) -> tuple:
    """A wavefront step's key when its inputs at ``rows`` have their groups' width as
    leading dim, less ``group_rows``' constants (``passes/width_free.py``): equal for
    steps of every width."""
    return ("width_free", tuple(rows), tuple(group_rows), graph_structure(step, width_free=True))


def _checkpoint_tags(node: fx.Node, regions: Dict[object, int]) -> Optional[tuple]:
    """What AOTAutograd's partitioner reads to recompute a checkpointed region
    (``meta["recompute"]``, ``meta["ac_graph_id"]``), region ids numbered in order
    of appearance: graphs with and without checkpointing are different kernels."""
    if node.meta.get("recompute") is None:
        return None
    region = node.meta.get("ac_graph_id")
    return (str(node.meta["recompute"]), regions.setdefault(region, len(regions)))


def module_structure(module: torch.nn.Module) -> Optional[tuple]:
    """A key equal for modules computing the same function of their arguments: a
    graph module's ``graph_structure``, or a module's own ``structure`` (``BatchedCell``);
    None for a module holding state (parameters, buffers) or without one."""
    if isinstance(module, fx.GraphModule) and not _has_state(module):
        return ("graph", graph_structure(module))
    own = getattr(module, "structure", None)
    if isinstance(own, tuple) and not _has_state(module):
        return (type(module).__qualname__, own)
    return None


def _has_state(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _hashable(x):
    if isinstance(x, (list, tuple)):
        return tuple(_hashable(a) for a in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    if isinstance(x, slice):
        return ("slice", _hashable(x.start), _hashable(x.stop), _hashable(x.step))
    if isinstance(x, torch.Tensor):
        return _Identity(x)  # a tensor constant: equal only to itself
    try:
        hash(x)
    except TypeError:
        return _Identity(x)
    return x


class _Identity:
    """Equal only to itself; holds the object, so its id is never reused while a key lives."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.obj is self.obj


def static_meta(values) -> Optional[tuple]:
    """``tensor_meta`` of each value; None if any is not a tensor or has a
    symbolic size or stride (not worth the risk to reproduce)."""
    out = []
    for v in values:
        if not isinstance(v, torch.Tensor):
            return None
        key = tensor_meta(v)
        if not all(isinstance(d, int) for d in key[0] + key[1]):
            return None
        out.append(key)
    return tuple(out)


_MUTATING_FUNCTIONS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift, operator.imatmul,
}



def looks_like_mutation(node: fx.Node) -> bool:
    """A second line of defence only: the in-place forms recognisable from the
    node alone (``x.mul_()``, ``x += y``, an ATen overload's schema). The
    authority is ``passes/effects.py`` (every ATen op a node dispatches), which
    also sees ``inplace=True`` arguments and ``out=``."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        if node.target in _MUTATING_FUNCTIONS:
            return True
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.is_mutable
    return False


def is_unproven_write(node: fx.Node) -> bool:
    """An in-place op that functionalize did not prove private."""
    return PRIVATE_WRITE not in node.meta and looks_like_mutation(node)


_RANDOM_NAMES = {
    "rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "randperm",
    "bernoulli", "bernoulli_", "multinomial", "normal", "normal_", "poisson", "uniform_",
    "exponential_", "geometric_", "cauchy_", "log_normal_", "native_dropout",
    "rrelu_with_noise", "rrelu_with_noise_",
}


def is_random(node: fx.Node) -> bool:
    """Ops that draw random numbers: batching would change the RNG stream."""
    if not is_compute(node):
        return False
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    if name in ("rrelu", "rrelu_"):  # F.rrelu(x, lower, upper, training=False, inplace)
        training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else False)
        return training is not False
    if "dropout" in name and name != "native_dropout":
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return training is not False and not (isinstance(p, (int, float)) and p == 0)
    if name == "scaled_dot_product_attention":
        p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        return not (isinstance(p, (int, float)) and p == 0)
    return name in _RANDOM_NAMES
