"""wavefront_steps: the batched graph as one call per wavefront, so that equal wavefronts compile once.

Not a rewrite of the computation: the lowered graph of ``batch`` (emitted in
schedule order, every node tagged with its wavefront, ``meta[WAVEFRONT]``) cut
into one subgraph per wavefront. Once S > L the wavefronts from L - 1 to S - 1
are the steady state: the same group call over the same kinds of inputs, so
their subgraphs have one structure and the runtime compiles it once
(``runtime/segment_steps.py``); the ramps add about 2(L - 1) more, whatever S is,
or, with ``symbolic_width`` (``passes/width_free.py``: the groups' stacking between
the steps), a few: a ramp's steps of every width are one structure, compiled once
for a symbolic width.

With ``glue_steps`` the glue of a wavefront is cut apart from its cells: what
enters there (a segment's embedding, its cat with the memory tokens: glue that
reads no group) into a step before it, what leaves (the final norm, the logits:
glue that feeds no group) into a step after it. Every segment's entering glue is
then one structure, its leaving glue another, and a wavefront's step is its group
call (beside the first segment's cell on the ramp up), whatever enters or leaves
there: a segment count meets no wavefront another count has not.

Before (lowered batched graph, L = 2)::

    x_1 = getitem(split(ids), 1);  e_1 = embedding(x_1, E)       # glue, no cell source
    w_q = stack([q0.weight, q1.weight])                           # weight stack
    h   = stack([e_1, h_0_0]);  out = diag_t1_g0(h, A, w_q[0:2])  # wavefront 1
    h_1_0 = out[0][0];  h_0_1 = out[0][1];  y_0 = lm_head(h_0_1)  # and the glue it makes ready
    out = cat([y_0, y_1])                                         # glue reading several wavefronts

After (``glue_steps=False``; ``symbolic_width`` then moves the stacking out)::

    x_1 = getitem(split(ids), 1);  w_q = stack([..])              # prologue
    step_1 = wavefront_1(x_1.clone(), h_0_0, A, w_q, E)           # embedding, stack, call, lm_head
    h_1_0 = step_1[0];  h_0_1 = step_1[1];  y_0 = step_1[2]
    out = cat([y_0, y_1])                                         # epilogue

After (``glue_steps``)::

    e_1 = wavefront_1_enter(x_1.clone(), E)[0]                    # embedding
    step_1 = wavefront_1(e_1, h_0_0, A, w_q)                      # stack, call
    h_1_0 = step_1[0];  h_0_1 = step_1[1]
    y_0 = wavefront_1_leave(h_0_1, W)[0]                          # lm_head

Placement: a group's nodes and the glue emitted after it go to its wavefront;
weight stacks, views of the inputs and glue several wavefronts read to the
prologue; glue that reads several wavefronts and feeds no group (the closing
concatenation) to the epilogue; glue that reads no cell to the one wavefront
that uses it (with ``glue_steps``: to the step before it). Autocast regions: the
restored enter/exit pairs are erased again (the regions are on the nodes'
metadata) and each step restores its own. Refused (None, with the reason) for
random ops, checkpointed regions, a module call that holds state or has no
structure (a compiled step is shared across graphs), an untagged node, or a value
crossing a cut that is not a tensor or a number.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Set, Tuple

import torch.fx as fx

from diagpass.counters import counters
from diagpass.fx_facts import is_random, module_structure, width_free_structure
from diagpass.ir.meta import GROUP_INPUT, WAVEFRONT, WEIGHT_STACK
from diagpass.passes.autocast import without_restored_regions
from diagpass.passes.cut import (EPILOGUE, PROLOGUE, Steps, cut, entering, graph_input_storages, is_number, is_outer,
                                 is_view, leaving, reads_only_prologue, views_an_input)
from diagpass.passes.width_free import width_free


def wavefront_steps(gm: fx.GraphModule, symbolic_width: bool = True, glue_steps: bool = True
                    ) -> Tuple[Optional[Steps], str]:
    """(the cut graph, "") or (None, why not). ``symbolic_width``: the groups' stacking
    outside their steps (``passes/width_free.py``), so that steps of every width are one.
    ``glue_steps``: what enters and what leaves at a wavefront in steps of their own, so
    that a wavefront's step is its cells; where that cut is refused, the glue stays in."""
    gm = without_restored_regions(gm)  # the regions live on in the metadata; each step restores its own
    if gm is None:
        return None, "an autocast region covers a node that does not record it"
    why = _refusal(gm)
    if why:
        return None, why
    steps, why = _cut(gm, symbolic_width, glue_steps)
    if steps is None and glue_steps:
        counters["wavefront_steps"]["glue_kept_in"] += 1
        steps, why = _cut(gm, symbolic_width, False)
    return steps, why


def _cut(gm: fx.GraphModule, symbolic_width: bool, glue_steps: bool) -> Tuple[Optional[Steps], str]:
    place = _placement(gm, glue_steps)
    if symbolic_width:
        gm, place = width_free(gm, place)
    steps, why = cut(gm, place, "wavefront")
    return (_width_free_structures(steps) if steps is not None and symbolic_width else steps), why


def _width_free_structures(steps: Steps) -> Steps:
    """A step reading moved group inputs is keyed without its groups' width: by its graph
    with each group call's structure less G, which of its inputs have rows of a group,
    and how many fewer than its width (``group_rows``: the group numbered in the step)."""
    structures = set()
    for _, step in steps.gm.named_children():
        if "structure" not in step.meta:
            continue
        tags = {k: ph.meta[GROUP_INPUT] for k, ph in enumerate(step.graph.find_nodes(op="placeholder"))
                if ph.meta.get(GROUP_INPUT)}
        if tags:
            groups: Dict[str, int] = {}
            step.meta["group_inputs"] = tuple(tags)
            step.meta["group_rows"] = tuple((groups.setdefault(g.call, len(groups)), g.fewer) for g in tags.values())
            step.meta["structure"] = width_free_structure(step, tuple(tags), step.meta["group_rows"])
        structures.add(step.meta["structure"])
    return dataclasses.replace(steps, num_structures=len(structures))


def _refusal(gm: fx.GraphModule) -> str:
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        if is_random(n):
            return "random ops (reordered, they would draw other numbers)"
        if n.meta.get("recompute") is not None:  # cut, a checkpointed model saved more for its backward (tests/e2e)
            return "torch.utils.checkpoint regions (the whole graph's partitioner saves less for the backward)"
        if WAVEFRONT not in n.meta:
            return f"{n.name} was not emitted by the batch pass (no wavefront)"
        if n.op == "call_module" and module_structure(gm.get_submodule(n.target)) is None:
            return f"the module call {n.name} holds state or has no structure (a shared step would bake it in)"
    return ""


def _placement(gm: fx.GraphModule, glue_steps: bool) -> Dict[fx.Node, Tuple[int, int]]:
    """Every compute node's (region, graph index); see the module docstring."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    index = {n: i for i, n in enumerate(nodes)}
    # a number (a size, its arithmetic) is never part of a group: the batch pass emits one
    # when a group first reads it, tagged with that group's wavefront; it is glue
    group = {n for n in nodes if n.meta[WAVEFRONT][1] == "group" and WEIGHT_STACK not in n.meta and not is_number(n)}
    feeds_group: Dict[fx.Node, bool] = {}
    for n in reversed(nodes):
        feeds_group[n] = any(u in group or feeds_group.get(u, False) for u in n.users)
    # the wavefronts of the groups a node reads through glue; a group stops the walk (a
    # segment's logits read its last cell, not every wavefront before it)
    reads: Dict[fx.Node, Set[int]] = {}
    for n in nodes:
        if n in group:
            reads[n] = {n.meta[WAVEFRONT][0]}
        else:
            reads[n] = set().union(*(reads.get(a, set()) for a in n.all_input_nodes))
    place: Dict[fx.Node, Tuple[int, int]] = {}
    free: List[fx.Node] = []  # reads no group: placed by its users below
    for n in nodes:
        if WEIGHT_STACK in n.meta:
            place[n] = (PROLOGUE, index[n])
        elif n in group:
            place[n] = (n.meta[WAVEFRONT][0], index[n])
        elif not reads[n]:
            free.append(n)
        elif len(reads[n]) > 1 and not feeds_group[n]:
            place[n] = (EPILOGUE, index[n])
        else:
            place[n] = (max(reads[n]), index[n])
    inputs = graph_input_storages(gm)
    for n in reversed(free):
        users = {place[u][0] if u in place else EPILOGUE for u in n.users}
        one = len(users) == 1 and not views_an_input(n, inputs)
        place[n] = (users.pop() if one else PROLOGUE, index[n])
    for n in free:  # a slice of a mask or position table built once, and the numbers bounding it: outside too
        if reads_only_prologue(n, place) and place[n][0] != PROLOGUE and (is_view(n) or is_number(n)):
            place[n] = (PROLOGUE, index[n])
    if glue_steps:
        _glue_apart(nodes, group, feeds_group, set(free), place)
    return place


def _glue_apart(nodes: List[fx.Node], group: Set[fx.Node], feeds_group: Dict[fx.Node, bool], free: Set[fx.Node],
                place: Dict[fx.Node, Tuple[int, int]]) -> None:
    """Out of each wavefront's step: the glue that reads no group (what enters: an
    embedding, the memory tokens' cat) to a step before it, and the glue that feeds no
    group (what leaves: a norm, the logits) to a step after it. A number stays where a
    node left in the step reads it (a step returns tensors only)."""
    for n in reversed(nodes):
        t = place[n][0]
        if n in group or is_outer(t) or (n not in free and feeds_group[n]):
            continue
        if is_number(n) and any(place[u][0] == t for u in n.users if u in place):
            continue
        if n in free:
            place[n] = (entering(t), place[n][1])
            counters["wavefront_steps"]["glue_entering"] += 1
        else:
            place[n] = (leaving(t), place[n][1])
            counters["wavefront_steps"]["glue_leaving"] += 1

