"""The IR data types: frozen, and the Schedule's derived quantities."""

import dataclasses

import networkx as nx
import pytest
import torch
import torch.fx as fx

from diagpass.ir import CellGraph, Group, Schedule, Wavefront
from diagpass.ir.rewrite import BatchedGraph, GroupCall
from diagpass.runtime.batched_cell import BatchedCell
from diagpass.runtime.lower import lower


def _schedule(**kw) -> Schedule:
    """3 segments x 2 layers, by anti-diagonals; wavefront 2's cells in two
    groups of one (as when their signatures differ)."""
    waves = [
        Wavefront(0, ((0, 0),), (Group(((0, 0),)),)),
        Wavefront(1, ((1, 0), (0, 1)), (Group(((1, 0), (0, 1))),)),
        Wavefront(2, ((2, 0), (1, 1)), (Group(((2, 0),)), Group(((1, 1),)))),
        Wavefront(3, ((2, 1),), (Group(((2, 1),)),)),
    ]
    return Schedule(tuple(waves), num_segments=3, num_layers=2, **kw)


@pytest.mark.parametrize("value, field", [
    (Group(((0, 0),)), "cells"),
    (Wavefront(0, ((0, 0),), ()), "index"),
    (_schedule(), "wavefronts"),
    (_schedule(), "signatures"),
    (CellGraph(nx.DiGraph(), frozenset(), 1, 1), "vectors"),
])
def test_ir_types_are_frozen(value, field):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, field, None)


def test_schedule_derived_quantities():
    s = _schedule()
    assert s.num_steps == 4
    assert s.max_width == 2
    assert s.batched_groups(2) == [Group(((1, 0), (0, 1)))]
    assert [g.cells for g in s.batched_groups(1)] == [((0, 0),), ((1, 0), (0, 1)), ((2, 0),), ((1, 1),), ((2, 1),)]
    assert s.batched_groups(3) == []
    assert [g.size for g in s.wavefronts[2].groups] == [1, 1]
    empty = Schedule((), num_segments=0, num_layers=0)
    assert (empty.num_steps, empty.max_width, empty.batched_groups(1)) == (0, 0, [])


def test_schedule_equality_ignores_signatures_and_constants():
    a = _schedule(signatures={(1, 0): ("x",), (0, 1): ("x",)})
    b = _schedule(signatures={}, constants={(1, 0): [(0, 1, 2.0, torch.float32)]})
    assert a == b
    assert a != dataclasses.replace(a, wavefronts=a.wavefronts[:-1])


def _template():
    def cell(x, w):
        return (torch.tanh(x @ w),)

    return fx.symbolic_trace(cell)


def _graph_calling(module: torch.nn.Module) -> fx.GraphModule:
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    g.output(g.call_module("diag_t1_g0", (x, w)))
    return fx.GraphModule({"diag_t1_g0": module}, g)


def test_group_call_is_ir_and_lowering_makes_it_run():
    call = GroupCall(_template(), in_dims=(0, None), group_size=3, structure=("s",), rolled=False)
    x, w = torch.randn(3, 2, 4), torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="diagpass.runtime.lower"):
        call(x, w)
    gm = _graph_calling(call)
    batched = BatchedGraph(gm, (Group(((2, 0), (1, 1), (0, 2))),))
    assert batched.group_calls() == [("diag_t1_g0", call)]
    with pytest.raises(RuntimeError, match="lower"):
        gm(x, w)
    lowered = lower(gm, "eager")
    assert isinstance(lowered.diag_t1_g0, BatchedCell)
    assert isinstance(gm.diag_t1_g0, GroupCall)  # the IR graph is left as it was
    (out,) = lowered(x, w)
    torch.testing.assert_close(out, torch.tanh(x @ w))
