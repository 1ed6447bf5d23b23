"""A catalogue of tricky / unbatchable graphs.

Each case is a small ``nn.Module`` built here. For every one: the compiled
model (inner "eager") must not crash and must equal eager; when the pass does
not batch it, ``diagpass.explain(...).reason`` must say why.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import diagpass
from diagpass.testing import assert_equivalent

D = 8
SEG = 4


class Cell(nn.Module):
    """The well-behaved cell: hidden update + per-layer memory write."""

    def __init__(self, d_in=D, d_out=D, scale=1.0, act=torch.tanh):
        super().__init__()
        self.w = nn.Linear(d_in, d_out)
        self.m = nn.Linear(d_out, d_out)
        self.scale = scale
        self.act = act

    def forward(self, x, mem):
        h = self.act(self.w(x) + mem) * self.scale
        x = h if h.shape[-1] != x.shape[-1] else x + h
        return x, mem + self.m(x).mean(1, keepdim=True)


def zeros_mem(x, n, d=D):
    return [x.new_zeros(x.shape[0], 1, d) for _ in range(n)]


class Net(nn.Module):
    """Segment x layer recurrence with per-layer memory (batches for S >= 4, L >= 2)."""

    def __init__(self, n_layers=3, **cell_kw):
        super().__init__()
        self.layers = nn.ModuleList(Cell(**cell_kw) for _ in range(n_layers))

    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


# ---------------------------------------------------------------------- cases
class NoRecurrence(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(3))

    def forward(self, x):
        outs = []
        for seg in x.split(SEG, dim=1):
            for layer in self.layers:
                seg = torch.relu(layer(seg)) + seg
            outs.append(seg)
        return torch.cat(outs, 1)


class DifferentWidths(nn.Module):
    def __init__(self):
        super().__init__()
        widths = [D, 16, 12, D]
        self.layers = nn.ModuleList(Cell(widths[i], widths[i + 1]) for i in range(3))

    def forward(self, x):
        mems = [x.new_zeros(x.shape[0], 1, layer.w.out_features) for layer in self.layers]
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


class TiedLayers(Net):
    """One module used at depths 0 and 2."""

    def __init__(self):
        super().__init__(n_layers=2)
        self.order = [0, 1, 0]

    def forward(self, x):
        mems = zeros_mem(x, len(self.order))
        outs = []
        for seg in x.split(SEG, dim=1):
            for depth, l in enumerate(self.order):
                seg, mems[depth] = self.layers[l](seg, mems[depth])
            outs.append(seg)
        return torch.cat(outs, 1)


class SkipAcrossLayers(Net):
    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for seg in x.split(SEG, dim=1):
            prev = seg
            for l, layer in enumerate(self.layers):
                new, mems[l] = layer(seg, mems[l])
                seg, prev = new + 0.5 * prev, seg
            outs.append(seg)
        return torch.cat(outs, 1)


class ItemInRecurrence(Net):
    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
                mems[l] = mems[l] * (1.0 / (1.0 + abs(mems[l].sum().item())))
            outs.append(seg)
        return torch.cat(outs, 1)


class DataDependentBranch(Net):
    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
                if mems[l].sum() > 0:
                    mems[l] = -mems[l]
            outs.append(seg)
        return torch.cat(outs, 1)


class AttributeMemory(nn.Module):
    """Memory kept in module attributes (``self.W_mem = self.W_mem + ...``)."""

    def __init__(self, n_layers=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(n_layers))
        self.writes = nn.ModuleList(nn.Linear(D, D) for _ in range(n_layers))
        self.W_mem = [torch.zeros(1, D, D) for _ in range(n_layers)]

    def forward(self, x):
        for l in range(len(self.layers)):
            self.W_mem[l] = torch.zeros(x.shape[0], D, D)
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg = seg + torch.tanh(layer(seg) + seg @ self.W_mem[l])
                k = self.writes[l](seg)
                self.W_mem[l] = self.W_mem[l] + 0.1 * k.transpose(1, 2) @ seg / seg.shape[1]
            outs.append(seg)
        return torch.cat(outs, 1)


class LayerCalledTwice(Net):
    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
                seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


class DropoutCell(Cell):
    def forward(self, x, mem):
        x, mem = super().forward(x, mem)
        return F.dropout(x, 0.3, self.training), mem


class DropoutNet(Net):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(DropoutCell() for _ in range(3))


class ReversedSegments(Net):
    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for seg in reversed(x.split(SEG, dim=1)):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs[::-1], 1)


class InPlaceCell(Cell):
    def forward(self, x, mem):
        h = self.w(x)
        h.add_(mem).tanh_()
        x = x + h
        new = mem.clone()
        new.mul_(0.9).add_(self.m(x).mean(1, keepdim=True))
        return x, new


class InPlaceNet(Net):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(InPlaceCell() for _ in range(3))


class SharedGlobalParam(Net):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.randn(D))

    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg * self.g, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


class PerLayerScale(Net):
    """Layer-dependent Python constants: identical weights' shapes, different maths."""

    def __init__(self):
        super().__init__()
        for l, layer in enumerate(self.layers):
            layer.scale = 1.0 + l


class PerLayerActivation(Net):
    """Same parameter shapes, different op per layer."""

    def __init__(self):
        super().__init__()
        for layer, act in zip(self.layers, (torch.tanh, torch.sigmoid, torch.relu)):
            layer.act = act


class PerLayerBuffer(Net):
    def __init__(self):
        super().__init__()
        for l, layer in enumerate(self.layers):
            layer.register_buffer("c", torch.full((D,), float(l + 1)))

    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg * layer.c, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


class ReversedLayers(Net):
    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for seg in x.split(SEG, dim=1):
            for l in reversed(range(len(self.layers))):
                seg, mems[l] = self.layers[l](seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


class NestedModuleList(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleList(Cell() for _ in range(2)) for _ in range(2))

    def forward(self, x):
        mems = zeros_mem(x, 4)
        outs = []
        for seg in x.split(SEG, dim=1):
            for b, block in enumerate(self.blocks):
                for j, layer in enumerate(block):
                    seg, mems[2 * b + j] = layer(seg, mems[2 * b + j])
            outs.append(seg)
        return torch.cat(outs, 1)


class MemoryToLayerPlusK(Net):
    """Layer l of segment s writes the memory read by layer l+1 of segment s+1."""

    def __init__(self, k=1):
        super().__init__(n_layers=4)
        self.k = k

    def forward(self, x):
        L = len(self.layers)
        mems = zeros_mem(x, L)
        outs = []
        for seg in x.split(SEG, dim=1):
            new = zeros_mem(x, L)
            for l, layer in enumerate(self.layers):
                seg, written = layer(seg, mems[l])
                if l + self.k < L:
                    new[l + self.k] = written
            mems = new
            outs.append(seg)
        return torch.cat(outs, 1)


class TwoSegmentDependence(Net):
    """Memory from segment s-2 (dependence vector (2, 0)) as well as s-1."""

    def forward(self, x):
        L = len(self.layers)
        mems, older = zeros_mem(x, L), zeros_mem(x, L)
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg, m = layer(seg, mems[l] + 0.5 * older[l])
                older[l], mems[l] = mems[l], m
            outs.append(seg)
        return torch.cat(outs, 1)


class ReturnsMemories(Net):
    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1), tuple(mems)


class LayerIndexBranch(Net):
    """Python control flow on the layer index inside the loop."""

    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for s, seg in enumerate(x.split(SEG, dim=1)):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(-seg if (l + s) % 2 else seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


class MemoryInitFromInput(Net):
    def forward(self, x):
        mems = [x[:, :1] * (l + 1) for l in range(len(self.layers))]
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


class CrossBatchMix(Net):
    """Memory mixes batch rows (flip) between segments: batching must not confuse the batch dim."""

    def forward(self, x):
        mems = zeros_mem(x, len(self.layers))
        outs = []
        for seg in x.split(SEG, dim=1):
            for l, layer in enumerate(self.layers):
                seg, m = layer(seg, mems[l])
                mems[l] = m.flip(0) + m.mean(0, keepdim=True)
            outs.append(seg)
        return torch.cat(outs, 1)


def _x(S=5, B=2, last=SEG):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, SEG * (S - 1) + last, D, generator=g)


def _model(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


CASES = {
    "baseline_batches": (Net, _x()),
    "no_recurrence": (NoRecurrence, _x()),
    "different_widths": (DifferentWidths, _x()),
    "tied_layers": (TiedLayers, _x()),
    "skip_across_layers": (SkipAcrossLayers, _x()),
    "item_graph_break": (ItemInRecurrence, _x()),
    "data_dependent_branch": (DataDependentBranch, _x()),
    "layer_called_twice": (LayerCalledTwice, _x()),
    "reversed_segments": (ReversedSegments, _x(last=2)),
    "zero_length_input": (Net, torch.zeros(2, 0, D)),
    "single_segment": (Net, _x(S=1)),
    "single_layer": (lambda: Net(n_layers=1), _x()),
    "in_place_ops": (InPlaceNet, _x()),
    "shared_global_param": (SharedGlobalParam, _x()),
    "per_layer_scale": (PerLayerScale, _x()),
    "per_layer_activation": (PerLayerActivation, _x()),
    "per_layer_buffer": (PerLayerBuffer, _x()),
    "reversed_layers": (ReversedLayers, _x()),
    "nested_module_list": (NestedModuleList, _x()),
    "memory_to_layer_plus_1": (MemoryToLayerPlusK, _x()),
    "memory_to_layer_plus_2": (lambda: MemoryToLayerPlusK(k=2), _x()),
    "two_segment_dependence": (TwoSegmentDependence, _x(S=6)),
    "returns_memories": (ReturnsMemories, _x()),
    "layer_index_branch": (LayerIndexBranch, _x(S=6)),
    "memory_init_from_input": (MemoryInitFromInput, _x()),
    "cross_batch_mix": (CrossBatchMix, _x(B=3)),
    "short_last_segment": (Net, _x(S=5, last=1)),
    "batch_of_one": (Net, _x(B=1)),
}


def _explain_reason(model, x):
    explained = diagpass.explain(model, x)
    if not explained.batched:
        assert isinstance(explained.reason, str) and explained.reason.strip(), str(explained)
    return explained


@pytest.mark.parametrize("name", sorted(CASES))
def test_adversarial_matches_eager(name):
    cls, x = CASES[name]
    model = _model(cls)
    report = assert_equivalent(model, x, options={"inner": "eager"})
    if not report.batched:
        assert isinstance(report.reason, str) and report.reason.strip(), str(report)
    _explain_reason(model, x)


@pytest.mark.parametrize("name", ["baseline_batches", "per_layer_scale", "per_layer_buffer", "shared_global_param"])
def test_adversarial_gradients_match_eager(name):
    cls, x = CASES[name]
    assert_equivalent(_model(cls), x, options={"inner": "eager"}, grads=True)


def test_baseline_really_batches():
    cls, x = CASES["baseline_batches"]
    assert_equivalent(_model(cls), x, options={"inner": "eager"}, expect_batched=True)
    assert diagpass.counters["batch"]["cells"] > 0


def test_attribute_memory_ends_like_eager():
    model = _model(AttributeMemory)
    x = _x()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = twin(x)
        torch._dynamo.reset()
        actual = torch.compile(model, backend="diagonal", options={"inner": "eager"})(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert len(model.W_mem) == len(twin.W_mem)
    for got, want in zip(model.W_mem, twin.W_mem):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _explain_reason(copy.deepcopy(twin), x)


def test_dropout_in_train_mode_is_never_silently_different():
    """Active dropout: the pass must keep RNG semantics (same seed -> same
    output) or refuse to rewrite; it must not change results silently."""
    model = _model(DropoutNet).train()
    x = _x()
    torch.manual_seed(123)
    expected = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="diagonal", options={"inner": "eager"})
    first = diagpass.report.report_count()
    torch.manual_seed(123)
    actual = compiled(x)
    reports = diagpass.report.reports_since(first)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not any(r.batched for r in reports), "dropout graph was batched"
    assert all(r.reason for r in reports)


def test_dropout_in_eval_mode_batches():
    cls, x = DropoutNet, _x()
    assert_equivalent(_model(cls).eval(), x, options={"inner": "eager"}, expect_batched=True)
