"""autocast: enabled=False regions that change nothing are dropped; the rest refuse, exactly."""

from __future__ import annotations

import torch
import torch.nn as nn

import diagpass
from diagpass import backend
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
        return compiled, compiled(x), backend.reports[-1]


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
    recompiles, and there the enabled=False region matters (it is kept, and
    the graph refuses with the reason). Both calls equal eager."""
    torch.manual_seed(0)
    model, x = RotaryLikeNet().eval(), torch.randn(2, S * SEG, D)
    compiled, got, report = _run(model, x)
    assert report.batched
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        got = compiled(x)
    under = backend.reports[-1]
    assert under is not report, "no recompile under ambient autocast"
    assert not under.batched and "global state" in under.reason
    torch.testing.assert_close(got, expected)
