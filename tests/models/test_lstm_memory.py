"""Research-code memory shapes that hit ops vmap cannot batch (issue 14):

- memory in ``nn.LSTMCell``: each layer's memory is an LSTMCell's (h, c),
  carried to the next segment; ``aten::lstm_cell`` has no batching rule, so
  a group spanning layers runs its decomposition (``diagpass/runtime/row_wise.py``);
- attention through ``nn.MultiheadAttention(batch_first=True)`` with a bool
  causal mask (torch converts it with ``masked_fill_`` on a graph-local
  tensor, which functionalize makes private).

Both exact (outputs; gradients under aot_eager) and batched with S + L - 1
wavefronts and the group sizes the anti-diagonals give.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import diagpass
from diagpass.testing import assert_equivalent

S, L, SEG, D = 5, 3, 4, 8


def _expected_batched_groups(num_segments, num_layers):
    """Anti-diagonal groups of every segment, two or more cells each (segment S-1's
    state write is dead; passes/complete_cells.py gives it the middle cells' outputs)."""
    groups = []
    for t in range(num_segments + num_layers - 1):
        cells = [(t - l, l) for l in range(num_layers) if 0 <= t - l < num_segments]
        if len(cells) >= 2:
            groups.append(sorted(cells))
    return groups


class LSTMMemoryLayer(nn.Module):
    """A layer reading its memory h and writing it back through an LSTMCell."""

    def __init__(self, d):
        super().__init__()
        self.inp = nn.Linear(2 * d, d)
        self.cell = nn.LSTMCell(d, d)

    def forward(self, x, state):
        h, c = state
        y = x + torch.tanh(self.inp(torch.cat([x, h.unsqueeze(1).expand_as(x)], -1)))
        return y, self.cell(y.mean(1), (h, c))


class LSTMMemoryModel(nn.Module):
    def __init__(self, d=D, layers=L, seg=SEG):
        super().__init__()
        self.layers = nn.ModuleList(LSTMMemoryLayer(d) for _ in range(layers))
        self.seg, self.d = seg, d

    def forward(self, x):
        B = x.shape[0]
        # a zero (h, c) per layer, as LSTMCell makes for hx=None; segment 0's cells
        # then read two distinct inputs, as later segments do, and batch with them
        states = [(x.new_zeros(B, self.d), x.new_zeros(B, self.d)) for _ in self.layers]
        outs = []
        for s in range(x.shape[1] // self.seg):
            h = x[:, s * self.seg : (s + 1) * self.seg]
            for l, layer in enumerate(self.layers):
                h, states[l] = layer(h, states[l])
            outs.append(h)
        return torch.cat(outs, 1)


class MHAMemoryLayer(nn.Module):
    """Memory tokens prepended to the segment; bool causal mask; memory updated from its outputs."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mem = nn.Linear(d, d)

    def forward(self, x, mem):
        m = mem.shape[1]
        h = torch.cat([mem, x], 1)
        T = h.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        h = h + a
        return h[:, m:], torch.tanh(self.mem(h[:, :m]))


class MHAMemoryModel(nn.Module):
    def __init__(self, d=D, layers=L, seg=SEG, mem_tokens=2):
        super().__init__()
        self.layers = nn.ModuleList(MHAMemoryLayer(d) for _ in range(layers))
        self.mem0 = nn.Parameter(torch.randn(1, mem_tokens, d) * 0.5)
        self.seg = seg

    def forward(self, x):
        mems = [self.mem0.expand(x.shape[0], -1, -1) for _ in self.layers]
        outs = []
        for s in range(x.shape[1] // self.seg):
            h = x[:, s * self.seg : (s + 1) * self.seg]
            for l, layer in enumerate(self.layers):
                h, mems[l] = layer(h, mems[l])
            outs.append(h)
        return torch.cat(outs, 1)


def _check_batched(report):
    graph = report.graphs[0]
    assert graph.batched and graph.num_wavefronts == S + L - 1
    assert sorted(sorted(g) for g in graph.batched_groups) == sorted(_expected_batched_groups(S, L))
    assert max(len(g) for g in graph.batched_groups) == L


def test_lstm_memory_exact_and_batched():
    torch.manual_seed(0)
    model = LSTMMemoryModel().eval()
    x = torch.randn(2, S * SEG, D)
    before = diagpass.counters["runtime"]["row_wise_decomposed"]
    report = assert_equivalent(model, x, options={"inner": "eager", "cost_model": False}, expect_batched=True)
    _check_batched(report)
    assert diagpass.counters["runtime"]["row_wise_decomposed"] > before  # per-layer weights: decomposed


def test_lstm_memory_gradients_exact():
    torch.manual_seed(1)
    model = LSTMMemoryModel().train()
    x = torch.randn(2, S * SEG, D)
    report = assert_equivalent(model, x, options={"inner": "aot_eager", "cost_model": False},
                               grads=True, expect_batched=True)
    _check_batched(report)


def test_lstm_memory_roll_exact():
    """roll compiles each group once for a symbolic group size: the
    decomposition must not specialise on G."""
    torch.manual_seed(2)
    model = LSTMMemoryModel().eval()
    x = torch.randn(2, S * SEG, D)
    report = assert_equivalent(model, x, options={"inner": "aot_eager", "roll": True, "cost_model": False},
                               expect_batched=True)
    assert report.graphs[0].num_wavefronts == S + L - 1


def test_mha_bool_mask_memory_exact_and_batched():
    torch.manual_seed(3)
    model = MHAMemoryModel().eval()
    x = torch.randn(2, S * SEG, D)
    report = assert_equivalent(model, x, options={"inner": "eager", "cost_model": False}, expect_batched=True)
    graph = report.graphs[0]
    assert graph.batched and graph.num_wavefronts == S + L - 1
    assert max(len(g) for g in graph.batched_groups) == L
    assert sorted(sorted(g) for g in graph.batched_groups) == sorted(_expected_batched_groups(S, L))


def test_mha_bool_mask_memory_gradients_exact():
    torch.manual_seed(4)
    model = MHAMemoryModel().train()  # dropout=0.0 in nn.MultiheadAttention: deterministic
    x = torch.randn(2, S * SEG, D)
    report = assert_equivalent(model, x, options={"inner": "aot_eager", "cost_model": False},
                               grads=True, expect_batched=True)
    assert report.graphs[0].num_wavefronts == S + L - 1
