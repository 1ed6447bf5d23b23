"""Small FX helpers shared by the passes: names of things, not rewrites."""

from __future__ import annotations

import functools
import operator
import re
from typing import Optional

import torch
import torch.fx as fx

_ROOT = re.compile(r"^L\[['\"][^'\"]*['\"]\]\.?")
_CONTAINER = re.compile(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]")
_ITEM = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


@functools.lru_cache(maxsize=1 << 14)
def dotted_path(source_name: str) -> str:
    """``L['self']._modules['layers']._modules['0'].q`` -> ``layers.0.q``.

    Cached: an unrolled graph repeats each module path once per segment."""
    path = _CONTAINER.sub(r".\1", source_name)
    path = _ROOT.sub("", path)
    path = _ITEM.sub(r".\1", path)
    return path.strip(".")


_LIFTED = re.compile(r"_(?:parameters|buffers)_(?P<attr>.+)_$")
_SELF_STATE = re.compile(r"^l_self_(?P<body>(?:modules|parameters|buffers)_.+)_$")
_STATE_SEP = re.compile(r"(?:^|_)(?:modules|parameters|buffers)_")


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


def module_paths(node: fx.Node) -> list:
    """Module paths owning ``node``, outermost first (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else value
        if isinstance(path, str):
            out.append(dotted_path(path))
    return out


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def is_compute(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method", "call_module")


_MUTATING_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def is_mutation(node: fx.Node) -> bool:
    """In-place ops: reordering or batching them is not provably safe."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        if node.target in _MUTATING_FUNCTIONS:
            return True
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.is_mutable
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__") and name != "_"
    return False


_RANDOM_NAMES = {
    "rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "randperm",
    "bernoulli", "bernoulli_", "multinomial", "normal", "normal_", "poisson", "uniform_",
    "exponential_", "geometric_", "cauchy_", "log_normal_", "native_dropout",
}


def is_random(node: fx.Node) -> bool:
    """Ops that draw random numbers: batching would change the RNG stream."""
    if not is_compute(node):
        return False
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    if "dropout" in name and name != "native_dropout":
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return training is not False and not (isinstance(p, (int, float)) and p == 0)
    if name == "scaled_dot_product_attention":
        p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        return not (isinstance(p, (int, float)) and p == 0)
    return name in _RANDOM_NAMES
