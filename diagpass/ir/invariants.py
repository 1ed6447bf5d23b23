"""The invariants of each stage's output, written once and checked at stage boundaries.

``check_stage(name, value, *context)`` returns ``value``; when checking is on
it first asserts the invariants of stage ``name`` (``passes/README.md`` states
them in prose). Checking is on under ``DIAGPASS_CHECK_INVARIANTS=1`` (the test
suite sets it) and off otherwise: the checks walk every node and edge.
A violation raises ``InvariantViolation``, which the pipeline treats like any
internal error: the graph is compiled unchanged and the reason is logged.
"""

from __future__ import annotations

import os
from typing import Callable, Dict

import networkx as nx
import torch.fx as fx

from diagpass.fx_facts import is_compute, is_random, is_unproven_write
from diagpass.ir.cell_graph import CellGraph
from diagpass.ir.cells import CellGrid
from diagpass.ir.rewrite import GroupCall
from diagpass.ir.schedule import Schedule

ENV_FLAG = "DIAGPASS_CHECK_INVARIANTS"


class InvariantViolation(AssertionError):
    """A stage produced data that breaks its contract: a bug in diagpass."""


def enabled() -> bool:
    return os.environ.get(ENV_FLAG, "") not in ("", "0")


def check_stage(stage: str, value, *context):
    if enabled():
        _CHECKS[stage](value, *context)
    return value


def _require(ok: bool, stage: str, what: str) -> None:
    if not ok:
        raise InvariantViolation(f"diagpass invariant broken after {stage}: {what}")


def _graph(gm: fx.GraphModule, stage: str) -> None:
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - lint's own message names the node
        raise InvariantViolation(f"diagpass invariant broken after {stage}: graph lint: {e}") from e


def _prepared(gm: fx.GraphModule) -> None:
    """A well-formed graph; every placeholder keeps Dynamo's example value."""
    _graph(gm, "prepare")
    for p in gm.graph.find_nodes(op="placeholder"):
        _require("example_value" in p.meta or "val" in p.meta, "prepare", f"placeholder {p.name} lost its example value")


def _partitioned(grid: CellGrid) -> None:
    """Every compute node is in exactly one cell or in the glue; ``cell_of``
    agrees; no random op and no write functionalize did not prove private
    (partition refuses both: nothing below re-checks them)."""
    seen: Dict[fx.Node, object] = {}
    for cid, cell in grid.cells.items():
        _require(cell.id == cid, "partition", f"cell {cell.id} filed under {cid}")
        for n in cell.nodes:
            _require(n not in seen, "partition", f"{n.name} in two cells")
            _require(grid.cell_of.get(n) == cid, "partition", f"cell_of[{n.name}] is not {cid}")
            seen[n] = cid
    for n in grid.glue:
        _require(n not in seen, "partition", f"{n.name} is glue and in cell {seen.get(n)}")
        seen[n] = "glue"
    for n in grid.gm.graph.nodes:
        if is_compute(n):
            _require(n in seen, "partition", f"{n.name} is in no cell and not glue")
            _require(not is_random(n) and not is_unproven_write(n), "partition", f"{n.name} is random or an unproven write")


def _dependence(graph: CellGraph, grid: CellGrid) -> None:
    """One vertex per cell, acyclic, vectors are the edges' differences, every glue node placed."""
    _require(set(graph.dag.nodes) == set(grid.cells), "dependence", "the DAG's vertices are not the cells")
    _require(nx.is_directed_acyclic_graph(graph.dag), "dependence", "the cell graph has a cycle")
    vectors = {(b[0] - a[0], b[1] - a[1]) for a, b in graph.dag.edges}
    _require(vectors == set(graph.vectors), "dependence", "vectors differ from the edges' differences")
    missing = [n.name for n in grid.glue if n not in graph.glue_sources]
    _require(not missing, "dependence", f"glue without sources: {missing[:3]}")


def _scheduled(sched: Schedule, grid: CellGrid, graph: CellGraph) -> None:
    """Wavefronts partition the cells, every edge goes forward in time, groups
    partition their wavefront, and a group of two or more has a signature."""
    wave = {}
    for position, w in enumerate(sched.wavefronts):
        _require(w.index == position, "schedule", f"wavefront {w.index} is number {position} in the schedule")
        for c in w.cells:
            _require(c not in wave, "schedule", f"cell {c} in two wavefronts")
            wave[c] = w.index
        grouped = [c for g in w.groups for c in g.cells]
        _require(sorted(grouped) == sorted(w.cells), "schedule", f"groups of wavefront {w.index} do not partition it")
        for g in w.groups:
            if g.size > 1:
                _require(all(sched.signatures.get(c) is not None for c in g.cells), "schedule",
                         f"group {list(g.cells)} has a cell without a signature")
    _require(set(wave) == set(grid.cells), "schedule", "the wavefronts do not cover the cells")
    late = [(a, b) for a, b in graph.dag.edges if wave[a] >= wave[b]]
    _require(not late, "schedule", f"edge {late[:1]} does not go forward in time")


def _rewritten(gm: fx.GraphModule) -> None:
    """A well-formed graph whose group calls were all lowered."""
    _graph(gm, "rewrite")
    left = [name for name, m in gm.named_children() if isinstance(m, GroupCall)]
    _require(not left, "rewrite", f"group calls not lowered: {left[:3]}")


_CHECKS: Dict[str, Callable] = {
    "prepare": _prepared,
    "partition": _partitioned,
    "dependence": _dependence,
    "schedule": _scheduled,
    "rewrite": _rewritten,
}
