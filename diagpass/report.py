"""What the pass did to one graph, in a form users and tests can read."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

CellId = Tuple[int, int]


@dataclasses.dataclass
class GraphReport:
    """One FX graph's analysis and rewrite."""

    num_segments: int = 0
    num_layers: int = 0
    wavefronts: List[List[CellId]] = dataclasses.field(default_factory=list)
    groups: List[List[List[CellId]]] = dataclasses.field(default_factory=list)
    batched_groups: List[List[CellId]] = dataclasses.field(default_factory=list)
    batched: bool = False
    reason: Optional[str] = None
    closed_form: Optional[str] = None
    time_function: Optional[str] = None
    dependence_vectors: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
    num_nodes: int = 0
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)
    # passes/cost.py: weight bytes a copying batched call stacks vs the cells' matmul FLOPs
    cost: Optional[str] = None
    bytes_per_flop: Optional[float] = None
    # peak memory of a batched call that copies the layer weights, over the sequential graph's (estimated)
    copy_memory_ratio: Optional[float] = None
    # the cost estimate was too close to call: {"chose": variant, "<variant>_ms": median, ...}
    measured: Optional[Dict[str, object]] = None
    # on CPU the variant reading stored stacks against the sequential graph, timed the same way
    measured_stacked: Optional[Dict[str, object]] = None
    # the sequential graph as one call per segment (segment_steps): calls, distinct structures
    segment_steps: Optional[Dict[str, int]] = None
    # the batched graph as one call per wavefront (wavefront_steps): calls, distinct structures
    wavefront_steps: Optional[Dict[str, int]] = None
    # set when the cost decision left the graph sequential for copied weights: the input
    # positions of each layer-weight role; a call with them stored stacked batches after all
    weight_inputs: Optional[List[List[int]]] = None
    # passes/functionalize.py: in-place writes made private (clone / redirect)
    writes_functionalized: int = 0
    # the guard of the previous compile that failed, as Dynamo states it (None: first compile)
    recompile_reason: Optional[str] = None

    @property
    def num_wavefronts(self) -> int:
        return len(self.wavefronts)

    def grid(self) -> str:
        """The S x L grid; each cell shows its wavefront, ``*`` if batched."""
        if not self.wavefronts:
            return "(no cells)"
        wave = {c: t for t, cells in enumerate(self.wavefronts) for c in cells}
        batched = {c for g in self.batched_groups for c in g}
        width = max(3, len(str(len(self.wavefronts))) + 2)
        head = "seg\\layer " + "".join(f"{l:>{width}}" for l in range(self.num_layers))
        rows = [head]
        for s in range(self.num_segments):
            cells = []
            for l in range(self.num_layers):
                t = wave.get((s, l))
                mark = "" if t is None else f"{t}{'*' if (s, l) in batched else ''}"
                cells.append(f"{mark or '.':>{width}}")
            rows.append(f"{s:>9} " + "".join(cells))
        return "\n".join(rows)

    def plot(self, path=None, ax=None):
        """Draw the S x L grid, each cell coloured by its wavefront and batched
        cells outlined (``diagpass.plot``; needs matplotlib: ``pip install
        'diagpass[plot]'``). With ``path`` the figure is saved there (PNG, SVG,
        ... by extension); returns the matplotlib Figure."""
        from diagpass.plot import plot_grid

        return plot_grid(self, path=path, ax=ax)

    def __str__(self) -> str:
        lines = [
            f"segments S={self.num_segments}, layers L={self.num_layers}, "
            f"wavefronts={self.num_wavefronts}"
            + (f" (closed form {self.closed_form}, t = {self.time_function})" if self.closed_form else ""),
            f"dependence vectors: {sorted(self.dependence_vectors)}",
            f"batched: {self.batched}"
            + (f" ({len(self.batched_groups)} batched groups, "
               f"{sum(len(g) for g in self.batched_groups)} cells)" if self.batched else ""),
        ]
        if self.reason:
            lines.append(f"reason: {self.reason}")
        if self.cost:
            lines.append(f"cost (weights not stored stacked): {self.cost}")
        if self.wavefronts:
            lines.append("cell -> wavefront (* = ran in a batched group):")
            lines.append(self.grid())
        return "\n".join(lines)


@dataclasses.dataclass
class DiagonalReport:
    """``diagpass.explain``'s answer: one ``GraphReport`` per Dynamo graph."""

    graphs: List[GraphReport]
    graph_breaks: List[str] = dataclasses.field(default_factory=list)

    def _main(self) -> GraphReport:
        if not self.graphs:
            return GraphReport(reason="Dynamo captured no graph")
        return max(self.graphs, key=lambda g: (g.num_segments * g.num_layers, g.num_nodes))

    @property
    def num_segments(self) -> int:
        return self._main().num_segments

    @property
    def num_layers(self) -> int:
        return self._main().num_layers

    @property
    def wavefronts(self):
        return self._main().wavefronts

    @property
    def batched(self) -> bool:
        return any(g.batched for g in self.graphs)

    @property
    def reason(self) -> Optional[str]:
        if self.batched:
            return None
        reasons = [g.reason for g in self.graphs if g.reason]
        if self.graph_breaks:
            reasons.append("graph breaks split the recurrence: " + "; ".join(self.graph_breaks))
        return "; ".join(reasons) or "nothing to batch"

    def plot(self, path=None, ax=None):
        """The grid of the main graph (the largest S x L), as ``GraphReport.plot``."""
        return self._main().plot(path=path, ax=ax)

    def __str__(self) -> str:
        parts = [f"DiagonalReport: {len(self.graphs)} graph(s), "
                 f"{len(self.graph_breaks)} graph break(s)"]
        for b in self.graph_breaks:
            parts.append(f"  graph break: {b}")
        for i, g in enumerate(self.graphs):
            parts.append(f"--- graph {i} ({g.num_nodes} nodes) ---")
            parts.append(str(g))
        return "\n".join(parts)


# Reports of the graphs compiled most recently, newest last. ``_count`` only
# grows: ``reports_since(mark)`` stays right when old reports are dropped.
_REPORTS: List[GraphReport] = []
_MAX_REPORTS = 1024
_count = 0


def record(report: GraphReport) -> None:
    global _count
    _REPORTS.append(report)
    _count += 1
    del _REPORTS[:-_MAX_REPORTS]


def recorded() -> List[GraphReport]:
    """The reports kept (the most recent 1,024), newest last; a copy."""
    return list(_REPORTS)


def report_count() -> int:
    """How many reports were ever recorded: a mark for ``reports_since``."""
    return _count


def reports_since(mark: int) -> List[GraphReport]:
    """Reports of the graphs compiled after ``report_count()`` was ``mark``."""
    new = _count - mark
    return list(_REPORTS[-new:]) if new > 0 else []
