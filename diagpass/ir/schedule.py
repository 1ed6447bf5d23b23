"""Wavefront schedules."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import sympy

from diagpass.ir.cells import CellId


@dataclasses.dataclass
class Group:
    """Cells of one wavefront that are structurally identical: one batched call."""

    cells: List[CellId]

    @property
    def size(self) -> int:
        return len(self.cells)


@dataclasses.dataclass
class Wavefront:
    index: int
    cells: List[CellId]
    groups: List[Group]


@dataclasses.dataclass
class Schedule:
    wavefronts: List[Wavefront]
    num_segments: int
    num_layers: int
    # Closed form of the step count of the best linear schedule t = a*s + b*l,
    # in the symbols S and L, and the (a, b) that achieves it.
    closed_form: Optional[sympy.Expr] = None
    time_function: Optional[sympy.Expr] = None
    reason: Optional[str] = None  # why this schedule cannot batch, if it cannot

    @property
    def num_steps(self) -> int:
        return len(self.wavefronts)

    @property
    def sequential_steps(self) -> int:
        return sum(len(w.cells) for w in self.wavefronts)

    @property
    def max_width(self) -> int:
        return max((len(w.cells) for w in self.wavefronts), default=0)

    def batched_groups(self, min_group: int) -> List[Group]:
        return [g for w in self.wavefronts for g in w.groups if g.size >= min_group]
