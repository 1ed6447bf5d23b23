"""partition: FX node -> Cell(segment, layer) or glue.

Before (Dynamo's unrolled graph, one line per node)::

    emb_0  = embedding(ids_0, emb.weight)              # glue
    q_0_0  = linear(emb_0, layers.0.q.weight)          # cell (0, 0)
    ...
    mem_0_0 = matmul(...)                              # cell (0, 0)
    q_0_1  = linear(h_0_0, layers.1.q.weight)          # cell (0, 1)
    ...
    emb_1  = embedding(ids_1, emb.weight)              # glue
    read_1_0 = matmul(emb_1, mem_0_0)                  # cell (1, 0)

After: a ``CellGrid`` mapping every compute node to a cell or to glue.

How:
1. *Layer stack*: lifted parameters/buffers at ``<prefix>.<i>.<role>`` with
   i = 0..L-1 are the layers' weights, located by their original FQN
   (Dynamo's FQN map; placeholder names only where the map lacks them).
   Parallel lists of the same length (``layers.i`` and ``mem.i``) share i.
   Layers of differing shapes stay in the stack with roles of their own.
2. *Anchors*: a node is anchored to layer i if it reads a layer-i weight or
   runs inside module ``<prefix>.<i>`` (``nn_module_stack``); both must agree.
3. *Segments*: in graph (= execution) order, every maximal run of anchors of
   one layer is one call of that layer; the k-th run is segment k.
4. *The rest* by dataflow (nearest anchored ancestors ``A`` and descendants
   ``D``): a node in the middle of one cell (A ∩ D = {c}) joins c; a node fed
   by exactly one cell and read by later cells (a state update) joins its
   producer; everything else is glue.

The partition is a heuristic; *correctness* does not rest on it: the
dependence pass rejects non-convex partitions and the schedule pass only
batches cells whose subgraphs are identical. A poor partition batches less.
"""

from __future__ import annotations

import collections
import re
from typing import Dict, List, Optional, Set

import torch
import torch.fx as fx

from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.ir.cells import Cell, CellGrid, CellId, LayerStack
from diagpass.fx_facts import dotted_path, example_value, is_compute, is_unproven_write, is_random, module_paths, placeholder_path
from diagpass.fx_facts import placeholder_fqns

_INDEXED = re.compile(r"^(?P<prefix>.*?)\.(?P<idx>\d+)(?:\.(?P<rest>.*))?$")


def _signature_of(node: fx.Node):
    v = example_value(node)
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), v.dtype)
    return type(v).__name__


def _state_paths(gm: fx.GraphModule) -> Dict[fx.Node, str]:
    """Attribute path of every lifted parameter/buffer/attribute placeholder:
    its original FQN where Dynamo's FQN map names it (``placeholder_fqns``),
    else the path parsed from the placeholder (``placeholder_path``: plain
    tensor attributes, graphs without the map)."""
    fqns = placeholder_fqns(gm)
    paths = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        path = fqns.get(node) or placeholder_path(node)
        if path:
            paths[node] = path
    return paths


def _indexed_lists(paths: Dict[fx.Node, str]) -> Dict[str, Dict[int, Dict[str, fx.Node]]]:
    """``<prefix>.<i>.<rest>`` paths as {prefix: {i: {rest: placeholder}}}."""
    lists: Dict[str, Dict[int, Dict[str, fx.Node]]] = collections.defaultdict(dict)
    for node, path in paths.items():
        m = _INDEXED.match(path)
        if m is not None:
            lists[m["prefix"]].setdefault(int(m["idx"]), {})[m["rest"] or ""] = node
    return lists


def _shape_classes(items: Dict[int, Dict[str, fx.Node]]) -> List[List[int]]:
    """Layers grouped by their parameter signature (names, shapes, dtypes),
    largest class first (ties: lowest layer first).

    Why classes, not all-or-nothing: a stack where one layer differs (a wider
    MLP, an extra bias) still has L layers called once per segment; its
    identical layers can batch. Each class gets roles of its own, so weights
    are stacked only within a class and cells of different classes never
    share a group (their input roles differ)."""
    classes: Dict[tuple, List[int]] = {}
    for i in sorted(items):
        key = tuple(sorted((r, _signature_of(p)) for r, p in items[i].items()))
        classes.setdefault(key, []).append(i)
    return sorted(classes.values(), key=lambda ls: (-len(ls), ls[0]))


def find_layer_stack(gm: fx.GraphModule) -> LayerStack:
    """The repeated layers: lifted state at ``<list>.<i>.<name>`` for
    i = 0..L-1 (the longest such list, plus parallel lists of the same
    length). Layers whose shapes differ from the majority keep their place
    in the stack with roles of their own (``<list>.*<k>.<name>`` for the k-th
    class); at least two layers must share one class."""
    lists = _indexed_lists(_state_paths(gm))
    candidates = {}
    for prefix, items in lists.items():
        n = len(items)
        if n >= 2 and sorted(items) == list(range(n)) and len(_shape_classes(items)[0]) >= 2:
            candidates[prefix] = items
    if not candidates:
        raise NotBatchable(
            "no stack of identical layers found: expected parameters at "
            "<list>.<i>.<name> (an nn.ModuleList of layers, at least two of equal shapes)"
        )
    main = max(candidates, key=lambda p: (sum(len(v) for v in candidates[p].values()), p))
    num_layers = len(candidates[main])
    prefixes = sorted(p for p in candidates if len(candidates[p]) == num_layers)
    param_layer, param_role = {}, {}
    for prefix in prefixes:
        for k, layers in enumerate(_shape_classes(candidates[prefix])):
            tag = "*" if k == 0 else f"*{k}"
            for i in layers:
                for rest, node in candidates[prefix][i].items():
                    param_layer[node] = i
                    param_role[node] = f"{prefix}.{tag}.{rest}" if rest else f"{prefix}.{tag}"
    if any(len(_shape_classes(candidates[p])) > 1 for p in prefixes):
        counters["partition"]["stacks_with_differing_layers"] += 1
    return LayerStack(num_layers, prefixes, param_layer, param_role)


def _module_layer(node: fx.Node, stack: LayerStack) -> Optional[int]:
    for path in module_paths(node):
        for prefix in stack.prefixes:
            if path.startswith(prefix + "."):
                head = path[len(prefix) + 1 :].split(".", 1)[0]
                if head.isdigit():
                    return int(head)
    return None


def _anchor_layers(gm: fx.GraphModule, stack: LayerStack) -> Dict[fx.Node, int]:
    anchors: Dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if not is_compute(node):
            continue
        by_params = {stack.param_layer[a] for a in node.all_input_nodes if a in stack.param_layer}
        by_module = _module_layer(node, stack)
        if len(by_params) > 1:
            raise NotBatchable(
                f"node {node.name} reads weights of layers {sorted(by_params)}: "
                "layers share computation, cells cannot be separated"
            )
        if by_params and by_module is not None and by_params != {by_module}:
            raise NotBatchable(
                f"module {stack.prefixes[0]}.{by_module} uses weights of layer "
                f"{next(iter(by_params))} (node {node.name}): tied or shared layers"
            )
        layer = next(iter(by_params)) if by_params else by_module
        if layer is not None:
            anchors[node] = layer
    return anchors


def _anchor_runs(gm: fx.GraphModule, anchors: Dict[fx.Node, int]) -> List[tuple]:
    """Maximal runs of anchors of one layer, in graph order: [(layer, nodes)]."""
    runs: List[tuple] = []
    for node in gm.graph.nodes:
        layer = anchors.get(node)
        if layer is None:
            continue
        if not runs or runs[-1][0] != layer:
            runs.append((layer, []))
        runs[-1][1].append(node)
    return runs


def _runs(gm: fx.GraphModule, anchors: Dict[fx.Node, int], stack: LayerStack) -> Dict[fx.Node, CellId]:
    """Cell of every anchor. Segment-major graphs (every layer once per
    segment): the k-th run of a layer's anchors is segment k. Layer-major
    graphs (every layer exactly one run, looping over the segments itself):
    the run is split by ``_split_layer_major``."""
    num_layers = stack.num_layers
    runs = _anchor_runs(gm, anchors)
    seen_runs = [0] * num_layers
    for layer, _ in runs:
        seen_runs[layer] += 1
    if seen_runs == [1] * num_layers:
        split = _split_layer_major(runs, stack)
        if split is not None:
            counters["partition"]["layer_major_graphs"] += 1
            return split
    if len(set(seen_runs)) != 1 or seen_runs[0] == 0:
        raise NotBatchable(
            "layers are not each called once per segment: calls per layer "
            f"{seen_runs} (a layer called twice per segment, a layer skipped, or "
            "interleaved layer code)"
        )
    cell_of: Dict[fx.Node, CellId] = {}
    seen_runs = [0] * num_layers
    for layer, nodes in runs:
        seen_runs[layer] += 1
        for node in nodes:
            cell_of[node] = (seen_runs[layer] - 1, layer)
    return cell_of


def _block_call(node: fx.Node, layer_paths: List[str]):
    """(module path, call key) of the module that runs ``node`` as the layer's
    loop body: the layer module itself (``layers.0``, key ``'1407...@3'``: its
    4th call in the frame) or the outermost module below it
    (``layers.0.layer``); None for code outside any such module."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = []
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else value
        if isinstance(path, str):
            entries.append((dotted_path(path), key))
    for i, (path, key) in enumerate(entries):
        if path in layer_paths:
            below = [e for e in entries[i + 1 :] if e[0].startswith(path + ".")]
            return [(path, key)] + below[:1]
    return None


def _loop_calls(nodes: List[fx.Node], stack: LayerStack, layer: int):
    """The calls of the layer's per-segment block in one run: ``call_of``,
    node -> call index; None if no candidate module is called twice.

    Candidates are the layer module and its direct children. The block is the
    layer module itself when the run calls it several times (a segment loop
    around ``layers[l](x_s)``), else the child called at least twice that
    reads the most layer parameters, and at least a third of them (the wrapped
    decoder layer of a wrapper that loops inside its forward, not a norm or a
    memory projection called once per segment; ties: more calls, then first
    called)."""
    layer_paths = [f"{p}.{layer}" for p in stack.prefixes]
    keys: Dict[str, Dict[str, None]] = collections.defaultdict(dict)
    params: Dict[str, Set[fx.Node]] = collections.defaultdict(set)
    calls_of: Dict[fx.Node, list] = {}
    for node in nodes:
        found = _block_call(node, layer_paths)
        if not found:
            continue
        calls_of[node] = found
        for path, key in found:
            keys[path].setdefault(key, None)
            params[path].update(a for a in node.all_input_nodes if a in stack.param_layer)
    repeated = [c for c in keys if len(keys[c]) >= 2]
    own = [c for c in repeated if c in layer_paths]
    layer_params = sum(1 for p, i in stack.param_layer.items() if i == layer)
    children = [c for c in repeated if c not in layer_paths and 3 * len(params[c]) >= layer_params]
    if own:
        block = own[0]
    elif children:
        block = max(children, key=lambda c: (len(params[c]), len(keys[c]), -children.index(c)))
    else:
        return None
    index = {k: i for i, k in enumerate(keys[block])}
    return {n: index[key] for n, found in calls_of.items() for path, key in found if path == block}


def _split_layer_major(runs: List[tuple], stack: LayerStack) -> Optional[Dict[fx.Node, CellId]]:
    """Segments of layer-major graphs: every layer is one run of anchors that
    loops over the segments itself (``for seg in segments: y = self.layer(seg)``)
    and the next layer slices the concatenated outputs again (``see_through``
    has replaced those slices by the pieces).

    The k-th call of the layer's block (``_loop_calls``) is segment k. Every
    other node of the run takes the *latest* segment among its inputs that
    have one (calls of the block, earlier nodes of the run, cells of earlier
    layers), so a memory write after call k is segment k and a read before
    call k+1 that uses segment k+1's input is segment k+1; segments never
    decrease along an edge. A node computed from placeholders alone (a
    memory gate's ``sigmoid(g)``, recomputed per segment) is loop-invariant
    and left to the dataflow step (glue). A node reading three or more segments (the
    ``torch.cat`` of the layer's outputs) gathers the loop's results, not one
    iteration's work: the dataflow step makes it glue. A node none of whose inputs has a segment but that
    reads a layer weight and an activation (the memory read's projection of a layer-0 segment,
    which is glue) belongs to the next block call in execution order. Any
    other node without a segmented input (memory init, the slice of a glue
    input or of the attention mask, positions) is left to the dataflow step,
    which makes it glue: inside a cell its per-segment constants (slice
    bounds) would make every cell differ.
    Before/after::

        mem  = new_zeros(x_0, ...)     # glue: no segmented input
        y_0  = layer(x_0)              # (0, l): call 0 of the block
        mem1 = write(y_0, mem)         # (0, l): latest input segment 0
        m_1  = getitem(mask, 10:20)    # glue: reads glue only
        q_1  = linear(x_1, W_mq)       # (1, l): x_1 is cell (1, l-1)'s output
        r_1  = read(q_1, mem1)         # (1, l)
        y_1  = layer(x_1 + r_1, m_1)   # (1, l): call 1

    None (not layer-major) unless every layer has a block called the same
    number of times N >= 2; NotBatchable if a call of the block reads a later
    segment (the split would not be a partition by segments)."""
    loops = [_loop_calls(nodes, stack, layer) for layer, nodes in runs]
    if any(lp is None for lp in loops) or len({max(lp.values()) for lp in loops}) != 1:
        return None
    cell_of: Dict[fx.Node, CellId] = {}
    for (layer, nodes), call_of in zip(runs, loops):
        next_call = _next_call_index(nodes, call_of)
        weights_only: Set[fx.Node] = set()  # computed from placeholders alone (sigmoid(gate))
        for node in nodes:
            seen = [cell_of[a][0] for a in node.all_input_nodes if a in cell_of]
            latest = max(seen) if seen else None
            if node in call_of:
                k = call_of[node]
                if latest is not None and latest > k:
                    raise NotBatchable(
                        f"layer-major loop of layer {layer}: call {k} of its block reads segment {latest} "
                        f"(node {node.name}); the layer's segments cannot be separated"
                    )
                cell_of[node] = (k, layer)
            elif latest is not None and len(set(seen)) <= 2:
                cell_of[node] = (latest, layer)
            elif latest is not None:
                continue
            elif all(a.op == "placeholder" or a in weights_only for a in node.all_input_nodes):
                weights_only.add(node)
            elif any(a in stack.param_layer for a in node.all_input_nodes):
                cell_of[node] = (next_call[node], layer)
    return cell_of


def _next_call_index(nodes: List[fx.Node], call_of: Dict[fx.Node, int]) -> Dict[fx.Node, int]:
    """For every node of a run: the index of the block call it is in, else of
    the first call after it (the last call's index after the last call)."""
    out: Dict[fx.Node, int] = {}
    pending: List[fx.Node] = []
    for node in nodes:
        pending.append(node)
        if node in call_of:
            for p in pending:
                out[p] = call_of[node]
            pending = []
    last = max(call_of.values())
    out.update((p, last) for p in pending)
    return out


def _nearest_anchor_cells(order: List[fx.Node], cell_of: Dict[fx.Node, CellId], edges) -> Dict[fx.Node, Set[CellId]]:
    near: Dict[fx.Node, Set[CellId]] = {}
    for node in order:
        acc: Set[CellId] = set()
        for other in edges(node):
            if other in cell_of:
                acc.add(cell_of[other])
            else:
                acc |= near.get(other, set())
        near[node] = acc
    return near


def _refuse_mutation_and_randomness(gm: fx.GraphModule) -> None:
    # FX edges do not order an in-place op against other readers of the same
    # tensor, nor random ops against each other (one RNG stream): no schedule
    # other than the original order is provably safe.
    for node in gm.graph.nodes:
        if is_random(node):
            raise NotBatchable(
                f"random op {getattr(node.target, '__name__', node.target)} (node {node.name}, e.g. "
                "dropout in train mode): reordering would change the random numbers each op draws; "
                "use model.eval() or dropout p=0 to enable batching"
            )
        if is_unproven_write(node):
            raise NotBatchable(
                f"in-place op {node.target} (node {node.name}) that functionalize did not prove "
                "private: reordering around it is not provably safe; use the out-of-place op"
            )


_PASS_THROUGH = {"detach", "clone", "contiguous", "detach_copy"}


def _is_pass_through(node: fx.Node) -> bool:
    """A detach/clone between cells (truncated BPTT every k segments) stays
    glue: inside the producer it would make every k-th cell differ."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name in _PASS_THROUGH


def partition(gm: fx.GraphModule) -> CellGrid:
    _refuse_mutation_and_randomness(gm)
    stack = find_layer_stack(gm)
    anchors = _anchor_layers(gm, stack)
    cell_of = _runs(gm, anchors, stack)
    num_segments = max(s for s, _ in cell_of.values()) + 1

    nodes = [n for n in gm.graph.nodes]
    position = {n: i for i, n in enumerate(nodes)}
    up = _nearest_anchor_cells(nodes, cell_of, lambda n: n.all_input_nodes)
    down = _nearest_anchor_cells(nodes[::-1], cell_of, lambda n: list(n.users))

    glue: List[fx.Node] = []
    pass_through: Dict[fx.Node, CellId] = {}
    for node in nodes:
        if node in cell_of or not is_compute(node):
            continue
        a, d = up[node], down[node]
        both = a & d
        if len(both) == 1:
            cell_of[node] = next(iter(both))
        elif len(a) == 1 and d and not both:
            if _is_pass_through(node):
                pass_through[node] = next(iter(a))
            else:
                cell_of[node] = next(iter(a))  # tail of the producer (e.g. a state update)
        else:
            glue.append(node)
    # A detach stays glue only if nothing after it went back into its producer
    # (that would be a value leaving the cell and re-entering it).
    changed = True
    while changed:
        changed = False
        for node, producer in list(pass_through.items()):
            if any(cell_of.get(u) == producer for u in node.users):
                cell_of[node] = producer
                del pass_through[node]
                changed = True
    glue.extend(pass_through)
    glue.sort(key=lambda n: position[n])

    cells: Dict[CellId, Cell] = {}
    for node in nodes:
        cid = cell_of.get(node)
        if cid is not None:
            cells.setdefault(cid, Cell(*cid)).nodes.append(node)
    for cell in cells.values():
        cell.finalize()
    counters["partition"]["cells"] += len(cells)
    counters["partition"]["glue_nodes"] += len(glue)
    return CellGrid(gm, stack, cells, glue, cell_of, num_segments)
