"""diagpass IR: cells, the cell graph and wavefront schedules."""

from diagpass.ir.cell_graph import CellGraph
from diagpass.ir.cells import Cell, CellGrid, CellId, LayerStack
from diagpass.ir.schedule import Group, Schedule, Wavefront

__all__ = ["Cell", "CellGrid", "CellId", "CellGraph", "Group", "LayerStack", "Schedule", "Wavefront"]
