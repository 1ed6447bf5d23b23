"""Cells that differ only by constants (a per-layer residual scale, per-segment
offsets) batch, the constants passed as a stacked input; the rest stays exact."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

import diagpass
from diagpass.passes.schedule import constant_sites
from diagpass.testing import assert_equivalent

D, SEG, S, L = 8, 4, 6, 3


class ScaledCell(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.w, self.m = nn.Linear(D, D), nn.Linear(D, D)
        self.scale = scale

    def forward(self, x, mem, offset: int):
        pos = torch.arange(x.shape[1], device=x.device) + offset          # int64 + per-segment int
        h = torch.tanh(self.w(x) + mem) * self.scale                      # per-layer float
        x = x + h + pos.to(x.dtype)[None, :, None] * 0.01
        return x, mem + self.m(x).mean(1, keepdim=True) - 0.001 * offset  # per-segment float


class ConstantsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(ScaledCell(0.5 + 0.25 * l) for l in range(L))

    def forward(self, x):
        mems = [x.new_zeros(x.shape[0], 1, D) + 0.1 * l for l in range(L)]
        outs = []
        for s, seg in enumerate(x.split(SEG, 1)):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l], s * SEG)
            outs.append(seg)
        return torch.cat(outs, 1)


def test_cells_differing_in_constants_batch_exactly():
    torch.manual_seed(0)
    before = diagpass.counters["batch"]["constants_lifted"]
    x = torch.randn(2, S * SEG, D)
    report = assert_equivalent(ConstantsNet(), x, options={"inner": "eager", "cost_model": False}, expect_batched=True)
    graph = report.graphs[0]
    assert graph.num_wavefronts == S + L - 1
    assert max(len(g) for g in graph.batched_groups) == L
    # every middle group lifts the layer scale and both segment offsets
    assert diagpass.counters["batch"]["constants_lifted"] - before >= 3 * (S - 3)


def test_constants_train_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, S * SEG, D, requires_grad=True)
    assert_equivalent(ConstantsNet(), x, options={"inner": "aot_eager", "cost_model": False}, grads=True, expect_batched=True)


def _node(target, a, b, out_dtype=torch.float32, a_dtype=torch.float32):
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = torch.empty(2, dtype=a_dtype)
    n = g.call_function(target, (x if a == "x" else a, x if b == "x" else b))
    n.meta["example_value"] = torch.empty(2, dtype=out_dtype)
    return n


@pytest.mark.parametrize(
    "target,a,b,a_dtype,out_dtype,sites",
    [
        (operator.mul, "x", 0.5, torch.float32, torch.float32, [1]),
        (operator.sub, 2.0, "x", torch.float32, torch.float32, [0]),
        (operator.add, "x", 3, torch.int64, torch.int64, [1]),
        (operator.truediv, "x", 2.0, torch.float32, torch.float32, []),     # a kernel may use the reciprocal
        (operator.mul, "x", 0.1, torch.bfloat16, torch.bfloat16, []),      # scalar math in fp32
        (operator.mul, "x", 0.5, torch.int64, torch.float32, []),          # promotes
        (operator.mul, "x", True, torch.float32, torch.float32, []),
    ],
)
def test_which_constants_are_liftable(target, a, b, a_dtype, out_dtype, sites):
    assert [pos for pos, _, _ in constant_sites(_node(target, a, b, out_dtype, a_dtype))] == sites


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_lifted_constant_is_bit_identical_to_the_scalar(dtype):
    x = torch.randn(1000, dtype=dtype)
    for c in (0.1, 1 / 3, 7, -2.5e-3):
        for op in (operator.mul, operator.add, operator.sub):
            assert torch.equal(op(x, c), op(x, torch.tensor(c, dtype=dtype)))
            assert torch.equal(op(c, x), op(torch.tensor(c, dtype=dtype), x))
