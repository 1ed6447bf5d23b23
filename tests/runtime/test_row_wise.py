"""Ops vmap cannot batch (issue 14, item 6).

- Every entry of the row-wise table (``diagpass/runtime/row_wise.py``) is checked: the
  folded call (the group's rows in one call) equals per-row calls, its
  decomposition equals the op, and ``BatchedCell`` uses the fold when the
  weights are shared and the decomposition when they are stacked.
- An op with no batching rule and no table entry (``aten::rrelu``, eval mode:
  deterministic, yet vmap refuses it) leaves only the groups that use it
  unbatched: exact results, the other groups batch, one log line.
"""

from __future__ import annotations

import logging
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import diagpass
from diagpass.runtime.row_wise import ROW_WISE
from diagpass.runtime.batched_cell import BatchedCell
from diagpass.testing import assert_equivalent

IN, H, B, G = 5, 4, 3, 4
GATES = {"lstm_cell": 4, "gru_cell": 3, "rnn_tanh_cell": 1, "rnn_relu_cell": 1}
OPS = sorted(ROW_WISE, key=lambda t: ROW_WISE[t].name)


def _args(op, gen, lead=()):
    """(input, hx, w_ih, w_hh, b_ih, b_hh) of the op; ``lead`` dims before each tensor."""
    n = GATES[ROW_WISE[op].name] * H
    r = lambda *s: torch.randn(*lead, *s, generator=gen)  # noqa: E731
    hx = [r(B, H), r(B, H)] if op is torch.lstm_cell else r(B, H)
    return [r(B, IN), hx, r(n, IN), r(n, H), r(n), r(n)]


def _rows(x, i):
    return [t[i : i + 1] for t in x] if isinstance(x, list) else x[i : i + 1]


def test_table_covers_the_rnn_cells():
    assert {s.name for s in ROW_WISE.values()} == set(GATES)


@pytest.mark.parametrize("op", OPS, ids=lambda t: ROW_WISE[t].name)
def test_op_is_row_wise(op):
    """Row i of one call on all rows == the call on row i alone: what the fold relies on."""
    x, hx, *w = _args(op, torch.Generator().manual_seed(0))
    whole = op(x, hx, *w)
    for i in range(B):
        row = op(_rows(x, i), _rows(hx, i), *w)
        torch.testing.assert_close(_rows(list(whole), i) if isinstance(whole, tuple) else whole[i : i + 1],
                                   list(row) if isinstance(row, tuple) else row, rtol=1e-6, atol=1e-6)  # mm rounding


@pytest.mark.parametrize("op", OPS, ids=lambda t: ROW_WISE[t].name)
def test_decomposition_equals_the_op(op):
    args = _args(op, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ROW_WISE[op].decomposition(*args), op(*args), rtol=1e-6, atol=1e-6)


def _one_op_template(op) -> fx.GraphModule:
    """A cell that is just the op: inputs x, h[, c], weights; outputs the op's tensors."""
    g = fx.Graph()
    x, h = g.placeholder("x"), g.placeholder("h")
    hx = [h, g.placeholder("c")] if op is torch.lstm_cell else h
    w = [g.placeholder(f"w{k}") for k in range(4)]
    out = g.call_function(op, (x, hx, *w))
    if op is torch.lstm_cell:
        g.output((g.call_function(operator.getitem, (out, 0)), g.call_function(operator.getitem, (out, 1))))
    else:
        g.output((out,))
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("shared_weights", [True, False], ids=["shared-weights-fold", "stacked-weights-decompose"])
@pytest.mark.parametrize("op", OPS, ids=lambda t: ROW_WISE[t].name)
def test_batched_cell_runs_the_op_per_cell(op, shared_weights):
    """A group of G cells == G separate calls; the fold when the weights are
    shared, the decomposition when they differ per cell (counted)."""
    gen = torch.Generator().manual_seed(2)
    stacked = _args(op, gen, lead=(G,))
    x, hx, *w = stacked
    if shared_weights:
        w = [t[0] for t in w]
    states = hx if isinstance(hx, list) else [hx]
    n_in = 1 + len(states)
    dims = [0] * n_in + [None if shared_weights else 0] * 4
    cell = BatchedCell(_one_op_template(op), dims, G)
    event = "row_wise_folded" if shared_weights else "row_wise_decomposed"
    before = diagpass.counters["runtime"][event]
    outs = cell(x, *states, *w)
    assert diagpass.counters["runtime"][event] == before + 1
    for g in range(G):
        wg = w if shared_weights else [t[g] for t in w]
        hg = [s[g] for s in states] if op is torch.lstm_cell else states[0][g]
        ref = op(x[g], hg, *wg)
        ref = list(ref) if isinstance(ref, tuple) else [ref]
        for o, r in zip(outs, ref):
            torch.testing.assert_close(o[g], r, rtol=1e-5, atol=1e-6)


def test_rrelu_has_no_batching_rule():
    """The premise of the fallback test below, checked on this torch."""
    f = lambda t: torch.nn.functional.rrelu(t, training=False)  # noqa: E731
    with pytest.raises(RuntimeError, match="rrelu"):
        torch.vmap(f)(torch.randn(2, 3))
    assert torch.rrelu not in ROW_WISE


class _Layer(nn.Module):
    def __init__(self, d, act):
        super().__init__()
        self.w, self.m, self.act = nn.Linear(d, d), nn.Linear(d, d), act

    def forward(self, x, mem):
        x = x + self.act(self.w(x) + mem)
        return x, torch.tanh(mem + self.m(x).mean(1, keepdim=True))


class AlternatingActivations(nn.Module):
    """Per-layer memory; odd layers use ``nn.RReLU`` (eval: a fixed slope, no
    vmap rule), even layers GELU. Cells of odd and even layers are different
    groups of each wavefront."""

    def __init__(self, d=8, layers=4, seg=4):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(d, nn.GELU() if l % 2 == 0 else nn.RReLU()) for l in range(layers))
        self.seg, self.d = seg, d

    def forward(self, x):
        mems = [x.new_zeros(x.shape[0], 1, self.d) for _ in self.layers]
        outs = []
        for s in range(x.shape[1] // self.seg):
            h = x[:, s * self.seg : (s + 1) * self.seg]
            for l, layer in enumerate(self.layers):
                h, mems[l] = layer(h, mems[l])
            outs.append(h)
        return torch.cat(outs, 1)


def test_group_without_batching_rule_runs_cell_by_cell_others_batch(caplog, capfd):
    S, L = 6, 4
    torch.manual_seed(0)
    model = AlternatingActivations(layers=L).eval()
    x = torch.randn(2, S * 4, 8)
    before = diagpass.counters["batch"]["groups_unbatchable"]
    with caplog.at_level(logging.INFO, logger="diagpass"):
        report = assert_equivalent(model, x, options={"inner": "eager", "cost_model": False}, expect_batched=True)
    graph = report.graphs[0]
    assert graph.num_wavefronts == S + L - 1
    batched = {c for g in graph.batched_groups for c in g}
    assert batched and all(l % 2 == 0 for _, l in batched)  # only the GELU layers' groups
    assert max(len(g) for g in graph.batched_groups) == L // 2
    odd_groups = [g for w in graph.groups for g in w if len(g) >= 2 and g[0][1] % 2 == 1]
    assert odd_groups and diagpass.counters["batch"]["groups_unbatchable"] - before >= len(odd_groups)
    lines = [r for r in caplog.records if "does not trace" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and lines[0].exc_info is None
    assert "aten::rrelu" in lines[0].getMessage() and "\n" not in lines[0].getMessage()
    err = capfd.readouterr().err
    for noise in ("Traceback", "While executing"):
        assert noise not in err and noise not in caplog.text, noise


def test_unbatchable_traceback_only_at_debug(caplog):
    torch.manual_seed(0)
    model = AlternatingActivations(layers=4).eval()
    with caplog.at_level(logging.DEBUG, logger="diagpass"), torch.no_grad():
        torch.compile(model, backend="diagonal", options={"inner": "eager", "cost_model": False})(torch.randn(2, 20, 8))
    torch._dynamo.reset()
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)
