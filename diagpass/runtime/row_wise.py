"""Ops that ``torch.vmap`` cannot batch but that are independent per batch row.

``BatchedCell`` (``diagpass/runtime/batched_cell.py``) runs a group of cells as one vmap
of a cell's subgraph. A few ops have no batching rule: ``aten::lstm_cell``
(its ``Tensor[] hx`` argument defeats vmap's generic fallback, so it is an
error) and ``gru_cell`` / ``rnn_tanh_cell`` / ``rnn_relu_cell`` (the fallback
works, as a Python loop per group member). Each of them computes row ``i`` of
its outputs from row ``i`` of its batch arguments and the shared weights
alone, so a group can be run without vmap:

- **fold**: when every cell of the group uses the same weights, the group dim
  is folded into the op's batch dim: one call on ``(G * B, ...)`` rows;
- **decomposition**: when the weights differ per cell (a group spans layers:
  the usual case), the op's own math, written here from ATen's CPU kernel
  (``aten/src/ATen/native/RNN.cpp``: on CPU these ops have no kernel of their
  own, only that composite one), runs under vmap, where its linears batch.

The table is the only place an op is declared row-wise; each entry is checked
by ``tests/runtime/test_row_wise.py`` (folded call == per-row calls, and the
decomposition == the op). An op not in the table is left to vmap; if vmap
cannot batch it, the batch pass leaves that group unbatched.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F


def _lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """ATen's ``LSTMCell``: gates = linear_hh(h) + linear_ih(x), chunked i, f, g, o."""
    gates = F.linear(hx[0], w_hh, b_hh) + F.linear(input, w_ih, b_ih)
    i, f, g, o = gates.chunk(4, 1)
    cy = torch.sigmoid(f) * hx[1] + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cy), cy


def _gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """ATen's ``GRUCell``: reset, input (update) and new gates."""
    i_r, i_z, i_n = F.linear(input, w_ih, b_ih).chunk(3, 1)
    h_r, h_z, h_n = F.linear(hx, w_hh, b_hh).chunk(3, 1)
    reset = torch.sigmoid(h_r + i_r)
    update = torch.sigmoid(h_z + i_z)
    new = torch.tanh(i_n + h_n * reset)
    return (hx - new) * update + new


def _rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.tanh(F.linear(hx, w_hh, b_hh) + F.linear(input, w_ih, b_ih))


def _rnn_relu_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.relu(F.linear(hx, w_hh, b_hh) + F.linear(input, w_ih, b_ih))


@dataclasses.dataclass(frozen=True)
class RowWiseOp:
    """An op whose output row ``i`` depends only on row ``i`` of ``row_args``.

    row_args:    positions of the arguments with the batch dim at 0 (a tensor,
                 or a list of tensors such as lstm_cell's ``hx``).
    shared_args: positions of the per-op constants (weights, biases): the fold
                 needs them equal across the group, i.e. not stacked.
    rank:        rank of a row argument, batch dim included (all outputs have
                 the batch dim at 0 too). The fold only applies at this rank.
    decomposition: the same function in ops vmap batches.
    """

    name: str
    row_args: Tuple[int, ...]
    shared_args: Tuple[int, ...]
    rank: int
    decomposition: Callable


_RNN_CELL_ARGS = dict(row_args=(0, 1), shared_args=(2, 3, 4, 5), rank=2)

ROW_WISE: Dict[object, RowWiseOp] = {
    torch.lstm_cell: RowWiseOp("lstm_cell", decomposition=_lstm_cell, **_RNN_CELL_ARGS),
    torch.gru_cell: RowWiseOp("gru_cell", decomposition=_gru_cell, **_RNN_CELL_ARGS),
    torch.rnn_tanh_cell: RowWiseOp("rnn_tanh_cell", decomposition=_rnn_tanh_cell, **_RNN_CELL_ARGS),
    torch.rnn_relu_cell: RowWiseOp("rnn_relu_cell", decomposition=_rnn_relu_cell, **_RNN_CELL_ARGS),
}


def row_wise_spec(target, args: tuple, kwargs: dict):
    """The table entry for a call, or None. Calls with keyword arguments are
    left to vmap (positions are what the table states)."""
    spec = ROW_WISE.get(target) if callable(target) else None
    if spec is None or kwargs or len(args) <= max(spec.row_args):
        return None
    return spec
