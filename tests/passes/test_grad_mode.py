"""no-grad blocks inside forward: batched, and gradients still equal eager."""

import torch
import torch.nn as nn

import diagpass
from diagpass.testing import assert_equivalent


class GatedLayer(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.w, self.m = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mem):
        x = x + torch.tanh(self.w(x) + mem)
        upd = self.m(x).mean(1, keepdim=True)
        with torch.no_grad():  # as in ARMT's gamma: a gate without gradient
            gate = torch.sigmoid(upd - mem)
        return x, gate * mem + (1 - gate) * upd


class Net(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(GatedLayer() for _ in range(layers))

    def forward(self, x):
        mems = [torch.zeros(x.shape[0], 1, 8) for _ in self.layers]
        outs = []
        for seg in x.split(4, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


def test_no_grad_region_is_detached_and_batched():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 4 * 6, 8, requires_grad=True)
    report = assert_equivalent(model, x, options={"inner": "aot_eager"}, grads=True, expect_batched=True)
    assert diagpass.counters["grad_mode"]["regions_detached"] == 6 * 3
    assert report.graphs[0].num_wavefronts == 6 + 3 - 1


def test_autocast_inside_forward_travels_with_its_nodes():
    class AutocastNet(Net):
        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = x * 2
            return super().forward(y.float())

    torch.manual_seed(0)
    report = assert_equivalent(
        AutocastNet(), torch.randn(1, 24, 8), options={"inner": "eager", "cost_model": False},
        expect_batched=True, rtol=1e-2, atol=1e-2,
    )
    assert report.graphs[0].num_wavefronts == 6 + 3 - 1
