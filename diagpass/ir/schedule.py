"""Wavefront schedules."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import sympy
import torch

from diagpass.ir.cells import CellId

# (node index in the cell, argument position, value, dtype): a Python number a
# cell combines with a tensor where a 0-dim tensor of that dtype is bit-identical
ConstantSite = Tuple[int, int, object, torch.dtype]


@dataclasses.dataclass(frozen=True)
class Group:
    """Cells of one wavefront that are structurally identical: one batched call."""

    cells: Tuple[CellId, ...]

    @property
    def size(self) -> int:
        return len(self.cells)


@dataclasses.dataclass(frozen=True)
class Wavefront:
    index: int
    cells: Tuple[CellId, ...]
    groups: Tuple[Group, ...]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Wavefronts and groups, plus what the batch pass needs per cell:
    ``signatures`` (equal iff two cells compute the same function; None:
    never batched) and ``constants`` (the liftable constant sites; cells of a
    group may differ in their values)."""

    wavefronts: Tuple[Wavefront, ...]
    num_segments: int
    num_layers: int
    signatures: Dict[CellId, Optional[tuple]] = dataclasses.field(default_factory=dict, compare=False)
    constants: Dict[CellId, List[ConstantSite]] = dataclasses.field(default_factory=dict, compare=False)
    # Closed form of the step count of the best linear schedule t = a*s + b*l,
    # in the symbols S and L, and the (a, b) that achieves it.
    closed_form: Optional[sympy.Expr] = None
    time_function: Optional[sympy.Expr] = None
    reason: Optional[str] = None  # why this schedule cannot batch, if it cannot

    @property
    def num_steps(self) -> int:
        return len(self.wavefronts)

    @property
    def max_width(self) -> int:
        return max((len(w.cells) for w in self.wavefronts), default=0)

    def batched_groups(self, min_group: int) -> List[Group]:
        return [g for w in self.wavefronts for g in w.groups if g.size >= min_group]
