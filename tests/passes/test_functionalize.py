"""functionalize + effects: in-place writes found from ATen semantics, made private, exact.

Regression for issue 14: a layer writing its memory input in place while the
next cell (or a returned list) reads the same tensor was batched, and the
batched call wrote a stacked copy instead: outputs off by 0.09-1.75.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import diagpass
from diagpass.passes.effects import analyze_effects
from diagpass.passes.functionalize import assign_item, functionalize
from diagpass.ir.meta import PRIVATE_WRITE
from tests.helpers import dynamo_graph

D, SEG, S, L = 8, 4, 6, 3
EAGER = {"inner": "eager", "cost_model": False}


def _write(mode: str, mem: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """Research-code in-place forms, each writing the memory input itself."""
    if mode == "relu_inplace":
        return F.relu(mem, inplace=True)
    if mode == "module_inplace":
        return act(mem)
    if mode == "leaky_relu_inplace":
        return F.leaky_relu(mem, 0.1, inplace=True)
    if mode == "hardtanh_inplace":
        return F.hardtanh(mem, -0.2, 0.2, inplace=True)
    if mode == "ipow":
        mem **= 2
        return mem
    if mode == "imul":
        mem *= 0.5
        return mem
    if mode == "method":
        return mem.mul_(0.5).add_(0.1)
    if mode == "setitem":
        mem[..., : D // 2] = 0.0
        return mem
    if mode == "out":
        return torch.mul(mem, 0.5, out=mem)
    if mode == "masked_fill_":
        return mem.masked_fill_(mem < 0.35, 0.0)
    raise AssertionError(mode)


class WritingCell(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.w, self.m = nn.Linear(D, D), nn.Linear(D, D)
        self.mode, self.act = mode, nn.ReLU(inplace=True)

    def forward(self, x, mem):
        r = _write(self.mode, mem, self.act)
        x = x + torch.tanh(self.w(x) + r)
        return x, mem + self.m(x).mean(1, keepdim=True)


class WritingNet(nn.Module):
    """Per-layer memory; every memory tensor is also returned in a list, and
    the next segment's cell reads the (written) memory after the write."""

    def __init__(self, mode: str):
        super().__init__()
        self.layers = nn.ModuleList(WritingCell(mode) for _ in range(L))

    def forward(self, x):
        mems = [x.new_zeros(x.shape[0], 1, D) + 0.3 + 0.1 * l for l in range(L)]
        outs, seen = [], []
        for seg in x.split(SEG, 1):
            for l, layer in enumerate(self.layers):
                seen.append(mems[l])
                seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1), seen


MODES = [
    "relu_inplace", "module_inplace", "leaky_relu_inplace", "hardtanh_inplace", "ipow",
    "imul", "method", "setitem", "out", "masked_fill_",
]


def _compiled(model, *args, **options):
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="diagonal", options={**EAGER, **options})(*args)
    return out, diagpass.reports()[-1]


@pytest.mark.parametrize("mode", MODES)
def test_in_place_writes_of_memory_are_exact_and_batched(mode):
    torch.manual_seed(0)
    model = WritingNet(mode).eval()
    x = torch.randn(2, S * SEG, D)
    with torch.no_grad():
        expected = model(x)
    got, report = _compiled(model, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert report.batched, report.reason
    assert report.writes_functionalized >= S * L
    assert report.num_wavefronts == S + L - 1
    assert max(len(g) for g in report.batched_groups) == L


class _ReadThenWrite(nn.Module):
    def forward(self, x):
        mem = x + 1.0
        before = mem * 2.0                   # reads mem before the write
        F.relu(mem, inplace=True)
        after = mem * 3.0                    # reads the written mem
        return before, after, mem


def test_golden_the_write_gets_its_own_copy_and_later_reads_see_the_write():
    gm, _ = dynamo_graph(_ReadThenWrite(), torch.randn(3))
    new, writes = functionalize(gm)
    assert writes == 1 and new is not gm
    code = [line.strip() for line in new.code.splitlines() if "=" in line or "return" in line]
    assert code[1:7] == [
        "mem = l_x_ + 1.0;  l_x_ = None",
        "before = mem * 2.0",
        "clone = torch.clone(mem);  mem = None",
        "relu = torch.nn.functional.relu(clone, inplace = True);  clone = None",
        "after = relu * 3.0",
        "return (before, after, relu)",
    ], "\n".join(code)
    relu = next(n for n in new.graph.nodes if n.target is F.relu)
    assert relu.meta[PRIVATE_WRITE] == "clone"
    assert not any(n.target is torch.clone for n in gm.graph.nodes)  # input graph untouched
    x = torch.randn(3)
    torch.testing.assert_close(new(x), _ReadThenWrite()(x))


def test_effects_come_from_schemas_not_names():
    def f(x, m):
        y = x.clone()
        a = y & m            # operator.and_: not a write, though its name ends in "_"
        b = y | m
        F.relu(y, inplace=True)
        return a, b, y

    gm = torch.fx.symbolic_trace(f)
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    for ph, v in zip(gm.graph.find_nodes(op="placeholder"), [torch.ones(3, dtype=torch.bool)] * 2):
        ph.meta["example_value"] = mode.from_tensor(v)
    effects = analyze_effects(gm)
    names = {n.name: n for n in gm.graph.nodes}
    assert set(effects.writes) == {names["relu"]}
    assert effects.returns_input[names["relu"]] is names["clone"]
    assert operator.and_ in {n.target for n in gm.graph.nodes}


class InputWriter(nn.Module):
    """Writes its forward argument in place: visible to the caller."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(WritingCell("imul") for _ in range(L))

    def forward(self, x, mem0):
        mem0.mul_(0.5)
        mems = [mem0 + l for l in range(L)]
        for seg in x.split(SEG, 1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
        return seg


def test_write_to_a_graph_input_is_refused_with_the_reason_and_exact():
    torch.manual_seed(0)
    model = InputWriter().eval()
    x, mem = torch.randn(2, S * SEG, D), torch.rand(2, 1, D)
    mem_eager, mem_compiled = mem.clone(), mem.clone()
    with torch.no_grad():
        expected = model(x, mem_eager)
    got, report = _compiled(model, x, mem_compiled)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(mem_compiled, mem_eager)  # the caller sees the write
    assert not report.batched
    assert "writes graph input" in report.reason and "mul_" in report.reason


class ViewReader(nn.Module):
    """Writes a view of the memory, then reads the base: refused, exact."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(L))

    def forward(self, x):
        mems = [x.new_zeros(x.shape[0], 1, D) + 0.5 for _ in range(L)]
        for seg in x.split(SEG, 1):
            for l, layer in enumerate(self.layers):
                head = mems[l][..., :2]
                head.mul_(2.0)                       # writes mems[l] through a view
                seg = seg + torch.tanh(layer(seg) + mems[l])
                mems[l] = mems[l] + seg.mean(1, keepdim=True)
        return seg


def test_write_through_a_view_read_afterwards_is_refused_and_exact():
    torch.manual_seed(0)
    model = ViewReader().eval()
    x = torch.randn(2, S * SEG, D)
    with torch.no_grad():
        expected = model(x)
    got, report = _compiled(model, x)
    torch.testing.assert_close(got, expected)
    assert not report.batched
    assert "reads the same storage afterwards" in report.reason


def test_assign_item_returns_the_written_tensor():
    t = torch.zeros(3)
    assert assign_item(t, slice(0, 2), 1.0) is t and t.tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("mode", ["relu_inplace", "setitem", "ipow"])
def test_in_place_writes_train_with_exact_gradients(mode):
    torch.manual_seed(0)
    model = WritingNet(mode)
    x = torch.randn(2, S * SEG, D)

    def loss(m):
        out, seen = m(x)
        return out.square().mean() + sum(s.mean() for s in seen)

    loss(model).backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="diagonal", options={"inner": "aot_eager", "cost_model": False})
    loss(compiled).backward()
    assert diagpass.reports()[-1].batched, diagpass.reports()[-1].reason
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_version_counters_prove_a_graph_write_free_and_catch_inplace_keywords():
    from diagpass.passes.effects import may_write

    torch.manual_seed(0)
    clean, _ = dynamo_graph(WritingNet("relu_inplace").layers[0].m, torch.randn(1, D))
    assert not may_write(clean)
    for mode in ("relu_inplace", "out", "setitem"):
        gm, _ = dynamo_graph(WritingNet(mode).eval(), torch.randn(1, 2 * SEG, D))
        assert may_write(gm), mode


@pytest.mark.parametrize("mode", ["relu_inplace", "setitem", "out", "method", "masked_fill_"])
def test_suspects_run_alone_find_the_writes_the_whole_graph_run_finds(mode, monkeypatch):
    """The fast path (only nodes reading a tensor whose version counter moved,
    each signature once on Dynamo's own fake values) agrees with interpreting the
    whole graph."""
    import diagpass.passes.effects as effects_mod

    def written_inputs(effects):
        return {
            n.name: sorted(a.name for a in n.all_input_nodes if effects.storages.get(a, frozenset()) & w)
            for n, w in effects.writes.items()
        }

    torch.manual_seed(0)
    gm, _ = dynamo_graph(WritingNet(mode).eval(), torch.randn(1, 3 * SEG, D))
    before = diagpass.counters["effects"]["graphs_analyzed_by_suspects"]
    alike = diagpass.counters["effects"]["suspects_alike"]
    fast = analyze_effects(gm)
    assert diagpass.counters["effects"]["graphs_analyzed_by_suspects"] == before + 1
    # the cells' writers repeat one signature: run once each, the rest taken from it
    assert diagpass.counters["effects"]["suspects_alike"] > alike
    monkeypatch.setattr(effects_mod, "_effects_of_suspects", lambda gm, mode: None)
    full = analyze_effects(gm)
    assert written_inputs(fast) == written_inputs(full) and len(fast.writes) >= 3 * L
    assert {n.name: a.name for n, a in fast.returns_input.items()} == {n.name: a.name for n, a in full.returns_input.items()}


def test_in_place_shape_change_is_refused_not_run():
    class Unsqueezing(nn.Module):
        def forward(self, x):
            y = x * 2
            y.unsqueeze_(0)
            return y

    gm, _ = dynamo_graph(Unsqueezing(), torch.randn(3))
    with pytest.raises(diagpass.NotBatchable, match="shape or strides"):
        functionalize(gm)


def test_suspects_are_alike_only_when_their_arguments_share_storages_alike():
    """``a.add_(b)`` and ``c.add_(c)``: one op, one shape, but the second's arguments are
    one storage; each runs, and both writes are found as the whole-graph run finds them."""
    class Net(nn.Module):
        def forward(self, x):
            a, b, c = x * 1, x * 2, x * 3
            a.add_(b)
            c.add_(c)
            return a + c

    gm, _ = dynamo_graph(Net(), torch.randn(4))
    alike = diagpass.counters["effects"]["suspects_alike"]
    effects = analyze_effects(gm)
    assert diagpass.counters["effects"]["suspects_alike"] == alike
    written = {n.name: sorted(a.name for a in n.all_input_nodes if effects.storages[a] & w) for n, w in effects.writes.items()}
    assert written == {"add_": ["a"], "add__1": ["c"]}
    assert {n.name: a.name for n, a in effects.returns_input.items()} == {"add_": "a", "add__1": "c"}
