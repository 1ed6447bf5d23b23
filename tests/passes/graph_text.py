"""Graphs as golden text: one line per node, ``name = target(args)``; a
parameter placeholder is named by its module path (``layers.0.w.weight``)."""

import torch.fx as fx

from diagpass.fx_facts import placeholder_path


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        path = placeholder_path(a) if a.op == "placeholder" else None
        return path or a.name  # a parameter by its module path: layers.0.w.weight
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, slice):
        return f"{_arg(a.start) if a.start is not None else ''}:{_arg(a.stop) if a.stop is not None else ''}"
    return repr(a)


def _target(n: fx.Node) -> str:
    if n.op == "call_method":
        return "." + n.target
    if n.op in ("call_module", "get_attr"):
        return f"{n.op}:{n.target}"
    return getattr(n.target, "__name__", str(n.target))


def render(gm: fx.GraphModule, placeholders: bool = False, keep=None) -> str:
    """The graph in execution order; placeholders only if asked (their names
    are in the arguments anyway); other nodes only where ``keep(node)``, if given."""
    lines = []
    for n in gm.graph.nodes:
        if keep is not None and n.op not in ("placeholder", "output") and not keep(n):
            continue
        if n.op == "placeholder":
            if placeholders:
                lines.append(f"input {_arg(n)}")
            continue
        args = [_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()]
        if n.op == "output":
            lines.append(f"return {', '.join(args)}")
        else:
            lines.append(f"{n.name} = {_target(n)}({', '.join(args)})")
    return "\n".join(lines)
