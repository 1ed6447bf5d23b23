"""autocast: enabled=False regions that change nothing are dropped; the rest refuse, exactly."""

from __future__ import annotations

import torch
import torch.nn as nn

import diagpass
from diagpass.passes.autocast import drop_noop_autocast_regions
from tests.helpers import dynamo_graph

D, SEG, S, L = 8, 4, 5, 3


class RotaryLikeCell(nn.Module):
    """transformers 4.4x's rotary embedding shape: the maths wrapped in an
    ``autocast(enabled=False)`` region in every layer call."""

    def __init__(self):
        super().__init__()
        self.w, self.m = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x, mem):
        with torch.autocast("cpu", enabled=False):
            angle = (x.float() * 0.5).cos()
        x = x + torch.tanh(self.w(x * angle) + mem)
        return x, mem + self.m(x).mean(1, keepdim=True)


class RotaryLikeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(RotaryLikeCell() for _ in range(L))

    def forward(self, x):
        mems = [x.new_zeros(x.shape[0], 1, D) + 0.1 * l for l in range(L)]
        outs = []
        for seg in x.split(SEG, 1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


def _run(model, x):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="diagonal", options={"inner": "eager", "cost_model": False})
    with torch.no_grad():
        return compiled, compiled(x), diagpass.reports()[-1]


def test_disabled_regions_are_dropped_and_the_graph_batches():
    torch.manual_seed(0)
    model, x = RotaryLikeNet().eval(), torch.randn(2, S * SEG, D)
    before = diagpass.counters["autocast"]["noop_regions_dropped"]
    with torch.no_grad():
        expected = model(x)
    _, got, report = _run(model, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert report.batched, report.reason
    assert report.num_wavefronts == S + L - 1
    assert diagpass.counters["autocast"]["noop_regions_dropped"] - before == S * L


def test_golden_region_removed_ops_kept():
    gm, _ = dynamo_graph(RotaryLikeCell(), torch.randn(1, SEG, D), torch.zeros(1, 1, D))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.amp.autocast_mode._enter_autocast in targets
    assert drop_noop_autocast_regions(gm) == 1
    names = [getattr(n.target, "__name__", n.target) for n in gm.graph.nodes if n.op != "placeholder"]
    assert "_enter_autocast" not in names and "_exit_autocast" not in names
    assert "cos" in names and "float" in names


def test_a_call_under_ambient_autocast_is_not_run_with_the_region_dropped():
    """Dynamo guards on the ambient autocast state: a call under bf16 autocast
    recompiles, and there the enabled=False region matters: it is kept with
    its nodes, and cells partly inside it are not batched (the reason says
    so). Both calls equal eager."""
    torch.manual_seed(0)
    model, x = RotaryLikeNet().eval(), torch.randn(2, S * SEG, D)
    compiled, got, report = _run(model, x)
    assert report.batched
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        got = compiled(x)
    under = diagpass.reports()[-1]
    assert under is not report, "no recompile under ambient autocast"
    assert not under.batched and "partly inside a torch.autocast region" in under.reason
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected)


class Bf16FfnCell(RotaryLikeCell):
    """A bf16 autocast block inside the cell (research code's mixed precision)."""

    def forward(self, x, mem):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the whole layer in bf16 autocast
            h = torch.tanh(self.w(x))                      # bf16 linear
            x = x + h.float() + mem
            new = mem + self.m(x).float().mean(1, keepdim=True)
        return x, new


class Bf16Net(RotaryLikeNet):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Bf16FfnCell() for _ in range(L))


def _without_autocast(model, x, monkeypatch):
    """The same model with its autocast blocks turned into no-ops: the fp32 answer."""
    import contextlib

    with monkeypatch.context() as m:
        m.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
        with torch.no_grad():
            return model(x)


def test_enabled_region_inside_cells_travels_with_them_and_batches(monkeypatch):
    torch.manual_seed(0)
    model, x = Bf16Net().eval(), torch.randn(2, S * SEG, D)
    with torch.no_grad():
        expected = model(x)
    fp32 = _without_autocast(model, x, monkeypatch)
    before = diagpass.counters["autocast"]["regions_lifted"]
    _, got, report = _run(model, x)
    assert report.batched, report.reason
    assert report.num_wavefronts == S + L - 1 and max(len(g) for g in report.batched_groups) == L
    assert diagpass.counters["autocast"]["regions_lifted"] - before == S * L
    assert got.dtype == expected.dtype == torch.float32
    # bf16 noise only: a bmm rounds differently from L separate mm in bf16, so the
    # batched result is as far from eager as eager is from the fp32 answer, no further;
    # and the region really ran (an fp32 run would be ~1e-6 from the fp32 answer)
    bf16_noise = (expected - fp32).abs().max().item()
    assert (got - expected).abs().max().item() <= 2 * bf16_noise
    assert (got - fp32).abs().max().item() > 1e-3


def test_golden_regions_restored_around_runs():
    from diagpass.passes.autocast import lift_autocast_regions, restore_autocast_regions

    torch.manual_seed(0)
    cell, x, mem = Bf16FfnCell(), torch.randn(1, SEG, D), torch.randn(1, 1, D)
    gm, inputs = dynamo_graph(cell, x, mem)
    assert lift_autocast_regions(gm) == 1
    assert not any("autocast" in str(n.target) for n in gm.graph.nodes)
    tagged = [n.name for n in gm.graph.nodes if n.meta.get("diagpass_autocast")]
    assert tagged[:2] == ["linear", "h"] and len(tagged) == 9
    assert restore_autocast_regions(gm) == 1
    names = [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert names[0].startswith("_enter_autocast") and names[-1].startswith("_exit_autocast")
    assert names[1:-1] == tagged
    with torch.no_grad():
        assert torch.equal(gm(*inputs)[0], cell(x, mem)[0])
